"""Remote stores (``s3://`` and other fsspec URLs): one sentence instead of a backend's error.

srdvol reads and writes URLs through fsspec; for ``s3://`` that is s3fs (a dependency), which
takes its endpoint, region and credentials where the AWS tools do: ``AWS_ENDPOINT_URL``,
``AWS_REGION``, ``AWS_PROFILE``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` and
``~/.aws/config``/``~/.aws/credentials``. fsspec adds its own ``FSSPEC_S3_<OPTION>`` variables
(``FSSPEC_S3_ANON=true`` for a public bucket). Worker processes of a local cluster inherit the
environment; the workers of a cluster started elsewhere need the same settings.

Without help, a wrong endpoint, a missing bucket, absent credentials or a denied request surface
as a botocore or s3fs exception (and zarr, opening a store whose first read failed, prints
"Exception ignored" tracebacks from coroutines it leaves behind). So:

- :func:`check_readable` reads the input's Zarr metadata once, before zarr opens the store, and
  :func:`storecheck.probe_writable <srdvol.ngff.storecheck.probe_writable>` writes one probe object
  where the output goes; both turn a failure into one sentence here;
- :func:`remote_error` maps a backend exception (also one raised later, in a Dask worker, and
  pickled back) to a :class:`~srdvol.errors.RemoteStoreError` or, for a missing bucket, a
  :class:`~srdvol.errors.StoreNotFoundError`, naming the URL, the problem and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from srdvol.errors import RemoteStoreError, SrdvolError, StoreNotFoundError

__all__ = [
    "check_readable",
    "close_sessions",
    "filesystem",
    "is_remote",
    "protocol_of",
    "remote_error",
    "translated",
]

#: Metadata documents a Zarr store (v3, then v2 group or array) holds at its root.
METADATA = ("zarr.json", ".zgroup", ".zarray")
_S3 = ("s3", "s3a")
#: What the first path component of a URL is called, per protocol.
_BUCKET = {"s3": "bucket", "s3a": "bucket", "gs": "bucket", "gcs": "bucket", "az": "container"}
#: Connection failures, by class name (botocore's, aiohttp's, fsspec's); see _STORAGE_MODULES.
_UNREACHABLE = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "FSTimeoutError",
    "ConnectionError",
}
#: Libraries whose connection errors are about the store (a builtin ConnectionError raised by
#: distributed is about the cluster, and is not translated here).
_STORAGE_MODULES = ("botocore", "aiobotocore", "aiohttp", "fsspec", "s3fs", "gcsfs", "adlfs")
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId": "the server does not know the access key ID",
    "SignatureDoesNotMatch": "the secret access key does not match the access key ID",
    "ExpiredToken": "the credentials have expired",
    "InvalidToken": "the session token is not valid",
    "RequestTimeTooSkewed": "this machine's clock differs too much from the server's",
}


def protocol_of(path: str | os.PathLike[str]) -> str | None:
    """The protocol of a URL (``"s3"`` for ``s3://b/k``), or ``None`` for a local path."""
    text = os.fspath(path)
    if "://" not in text:
        return None
    return text.split("://", 1)[0].split("::")[-1].lower()


def is_remote(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a URL of a store that is not on a local file system."""
    return protocol_of(path) not in (None, "file", "local")


def filesystem(url: str | os.PathLike[str]) -> tuple[Any, str]:
    """``fsspec.core.url_to_fs(url)``, with a missing backend package or an unknown protocol
    as one sentence.

    Raises
    ------
    RemoteStoreError
        If the package that reads the URL's protocol is not installed, or fsspec does not know
        the protocol.
    """
    import fsspec

    text = os.fspath(url)
    try:
        return fsspec.core.url_to_fs(text)
    except ImportError as exc:
        raise RemoteStoreError(
            text,
            f"the package that reads {protocol_of(text)}:// URLs is not installed ({exc})",
            "install it into srdvol's Python environment, then run again",
        ) from exc
    except ValueError as exc:
        if "protocol" not in str(exc).lower():
            raise
        raise RemoteStoreError(
            text,
            f"fsspec knows no protocol {protocol_of(text)}:// ({exc})",
            "check the URL's spelling (s3://bucket/path.zarr), or install the fsspec backend "
            "for that protocol",
        ) from exc


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _code(exc: BaseException) -> str | None:
    """The S3 error code (``AccessDenied``, ``NoSuchBucket`` ...) behind an s3fs exception.

    s3fs keeps botocore's ClientError as ``__cause__``; an error pickled back from a Dask
    worker has lost it, and then only its message is left.
    """
    for item in (exc, exc.__cause__):
        response = getattr(item, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            if code:
                return str(code)
    return None


def _bucket(url: str) -> str:
    root = url.split("://", 1)[1] if "://" in url else url
    return root.split("/", 1)[0]


def _endpoint(exc: BaseException | None, fs: Any = None) -> str | None:
    """The server a request went to: from botocore's error, or from the s3fs client."""
    found = None
    kwargs = getattr(exc, "kwargs", None)
    if isinstance(kwargs, dict):
        found = kwargs.get("endpoint_url")
    if found is None and fs is not None:
        client = getattr(fs, "_s3", None)  # set once s3fs has connected
        found = getattr(getattr(client, "meta", None), "endpoint_url", None)
    if not found:
        return None
    parts = urlsplit(str(found))
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else str(found)


def _reason(exc: BaseException) -> str:
    """The underlying cause of a connection failure, in a few words."""
    kwargs = getattr(exc, "kwargs", None)
    inner = kwargs.get("error") if isinstance(kwargs, dict) else None
    text = str(inner or exc).strip()
    if "Connect call failed" in text or "Connection refused" in text:
        return "connection refused"
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "the host name is not known"
    if "timeout" in text.lower() or "timed out" in text.lower():
        return "the connection timed out"
    return type(exc).__name__


def remote_error(
    url: str | os.PathLike[str],
    exc: BaseException,
    *,
    writing: bool = False,
    then: str | None = None,
    fs: Any = None,
) -> SrdvolError | None:
    """The one-sentence error for a backend exception met on a remote store, or ``None`` when
    ``exc`` is not about reaching the store, its bucket or the credentials.

    Parameters
    ----------
    url
        The store (or object) the request was for; the message names it.
    exc
        What the backend raised.
    writing
        Whether srdvol was writing (the fix names write permissions).
    then
        What to do after the fix (``"run the same command again to resume"``).
    fs
        The filesystem, to name the endpoint when the exception does not.
    """
    subject = os.fspath(url)
    protocol = protocol_of(subject)
    if protocol in (None, "file", "local") or isinstance(exc, SrdvolError):
        return None
    s3 = protocol in _S3
    names = _names(exc)
    endpoint = _endpoint(exc, fs)
    after = f", then {then}" if then else ""
    if names & _NO_CREDENTIALS:
        fix = (
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or write "
            "~/.aws/credentials), or FSSPEC_S3_ANON=true for a public bucket"
            if s3
            else f"configure the credentials of the {protocol}:// backend"
        )
        return RemoteStoreError(
            subject, f"no credentials were found for this store ({type(exc).__name__})", fix + after
        )
    if names & _UNREACHABLE and type(exc).__module__.split(".")[0] in _STORAGE_MODULES:
        where = f"the storage endpoint {endpoint}" if endpoint else "the storage server"
        fix = (
            "check the network and the endpoint address (AWS_ENDPOINT_URL, or endpoint_url in "
            "~/.aws/config, for a server that is not AWS)"
            if s3
            else "check the network and the store's address"
        )
        problem = f"{where} cannot be reached ({_reason(exc)})"
        return RemoteStoreError(subject, problem, f"{fix}, then {then or 'run again'}")
    code = _code(exc)
    if isinstance(exc, FileNotFoundError) and (
        code == "NoSuchBucket" or "bucket does not exist" in str(exc)
    ):
        kind = _BUCKET.get(protocol, "bucket")
        at = f" at {endpoint}" if endpoint else ""
        name = _bucket(subject)
        fix = (
            f"create it first (for example aws s3 mb s3://{name}) or check its name"
            if writing
            else "check the bucket name in the URL"
        )
        if s3:
            fix += " and the endpoint (AWS_ENDPOINT_URL)"
        return StoreNotFoundError(subject, f"the {kind} {name!r} does not exist{at}", fix + after)
    if isinstance(exc, PermissionError):
        detail = _CREDENTIAL_CODES.get(code or "")
        if detail is None:
            shown = code if code and not code.isdigit() else f"HTTP {code or 403}"
            detail = (
                f"access denied ({shown}): the credentials may not "
                f"{'write' if writing else 'read'} this store"
            )
            if code in (None, "403"):  # a HEAD request: no error code, so the key may be bad too
                detail += " or are not valid there"
            if getattr(fs, "anon", False) is True or str(getattr(fs, "anon", "")).lower() == "true":
                detail = f"access denied ({shown}) to anonymous requests (FSSPEC_S3_ANON)"
        if code in _CREDENTIAL_CODES:
            fix = (
                "set this machine's clock right (NTP)"
                if code == "RequestTimeTooSkewed"
                else "correct or renew the credentials (AWS_PROFILE, or AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN)"
                if s3
                else "correct or renew the credentials"
            )
        elif s3:
            needed = (
                "s3:PutObject, s3:DeleteObject and s3:ListBucket"
                if writing
                else "s3:GetObject and s3:ListBucket"
            )
            fix = (
                f"use credentials that have {needed} on it (AWS_PROFILE, or "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
            )
        else:
            fix = f"use credentials that may {'write' if writing else 'read'} it"
        if writing and code not in _CREDENTIAL_CODES:
            fix += ", or write the output somewhere you may"
        return RemoteStoreError(subject, detail, fix + after)
    return None


@contextmanager
def translated(
    url: str | os.PathLike[str],
    *,
    writing: bool = False,
    then: str | None = None,
    fs: Any = None,
) -> Iterator[None]:
    """Raise :func:`remote_error`'s sentence for a backend exception met inside the block;
    other exceptions pass unchanged."""
    try:
        yield
    except Exception as exc:
        error = remote_error(url, exc, writing=writing, then=then, fs=fs)
        if error is None:
            raise
        raise error from exc


def check_readable(url: str | os.PathLike[str]) -> None:
    """Before zarr opens a remote store: read its Zarr metadata once, and turn an unreachable
    endpoint, absent or refused credentials, or a missing bucket into one sentence.

    A store whose bucket exists but that holds nothing under the URL is reported as such; one
    that holds something other than Zarr metadata is left to zarr (whose error the caller
    reports as "not a Zarr store"). Local paths are not checked here.

    Raises
    ------
    RemoteStoreError
        Backend not installed, endpoint unreachable, no or invalid credentials, access denied.
    StoreNotFoundError
        The bucket does not exist, or nothing is stored under the URL.
    """
    text = os.fspath(url)
    if not is_remote(text):
        return
    fs, root = filesystem(text)
    base = root.rstrip("/")
    with translated(text, fs=fs):
        for name in METADATA:
            try:
                fs.cat_file(f"{base}/{name}")
                return
            except FileNotFoundError as exc:
                if remote_error(text, exc, fs=fs) is not None:  # the bucket, not the file
                    raise
            except IsADirectoryError:
                continue
        if protocol_of(text) in _S3:
            _check_prefix(fs, base, text)


def _check_prefix(fs: Any, root: str, url: str) -> None:
    """Whether the bucket exists and holds anything under ``root`` (one listing of one key)."""
    bucket, _, key = root.partition("/")
    prefix = f"{key.rstrip('/')}/" if key else ""
    try:
        reply = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except PermissionError:
        return  # may read objects but not list them: zarr will say what it finds
    if not reply.get("KeyCount") and not reply.get("Contents"):
        raise StoreNotFoundError(
            url,
            f"nothing is stored under this URL (the bucket {bucket!r} exists)",
            "check the path after the bucket name",
        )


def close_sessions() -> int:
    """Close the HTTP sessions of the s3fs filesystems that zarr opened in this process.

    zarr opens its stores' filesystems in asynchronous mode, whose sessions s3fs leaves to their
    user to close; a Dask worker that read or wrote ``s3://`` then printed aiohttp's "Unclosed
    client session" on stderr as it exited. Called when srdvol's workers shut down.

    Returns
    -------
    int
        How many filesystems were closed.
    """
    import sys

    s3fs = sys.modules.get("s3fs")
    if s3fs is None:
        return 0
    from zarr.core.sync import sync

    closed = 0
    for fs in list(s3fs.S3FileSystem._cache.values()):
        creator = getattr(fs, "_s3creator", None)
        if not getattr(fs, "asynchronous", False) or creator is None:
            continue
        try:
            sync(creator.__aexit__(None, None, None), timeout=5)
        except Exception:  # a session of another event loop, or one closed already
            continue
        fs._s3 = fs._s3creator = None  # a later request connects again
        closed += 1
    return closed
