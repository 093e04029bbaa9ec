"""Remote stores (issue 8): ``s3://`` against a local S3 server (moto, on 127.0.0.1).

The server runs in this process (moto's ThreadedMotoServer) on a free port, and srdvol finds it
the way a user points it at MinIO or Ceph: ``AWS_ENDPOINT_URL`` and the standard credential
variables. Commands run in-process for the table of faults, and as real ``srdvol`` processes
(whose Dask workers inherit the environment) for ``info``, prediction into the bucket with an
interrupt and a resume, and the stderr a user reads.

Permission errors come from moto's IAM enforcement, switched on for those cases only: a user
"nobody" without any policy (reading is denied), a user "reader" whose policy allows only
``s3:GetObject`` and ``s3:ListBucket`` on the bucket (writing is denied), and a user "writer"
who may also put objects but not delete them. The endpoint of the
"unreachable" cases is a port on 127.0.0.1 that nothing listens on (connection refused).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cli_run import run_cli

from srdvol.app.cli import main
from srdvol.values import DEFAULT_ANCHOR

pytestmark = pytest.mark.slow

BUCKET = "data"
#: Leftovers on stderr that a user must not see: tracebacks, coroutines left behind by zarr
#: ("Exception ignored in: <coroutine ...>"), sessions left open by s3fs in Dask workers.
NOISE = ("Traceback", "Exception ignored", "Unclosed client session", "internal error")
#: botocore retries a refused connection 4 times with backoff (about 10 s); one attempt
#: keeps the unreachable cases quick and changes nothing else.
ONE_ATTEMPT = {"AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}
#: Read-only requests that moto 5.2.6 authorizes under their operation names.
MOTO_OPERATION_ALIASES = ("s3:HeadObject", "s3:HeadBucket", "s3:ListObjectsV2", "s3:ListObjects")


@dataclass
class Remote:
    root: Path  # local folder: in.zarr, long.zarr, the model
    endpoint: str
    dead_endpoint: str  # nothing listens there
    users: dict[str, dict[str, str]]  # IAM user -> AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    admin: object  # an s3fs filesystem with its own endpoint and keys, for setup and checks


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def enforced_auth():
    """Let moto check every request against its IAM users and policies (off by default)."""
    import moto.settings

    moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    try:
        yield
    finally:
        moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")


def _forget_filesystems() -> None:
    """fsspec caches filesystems per process, and an S3 filesystem keeps the endpoint and keys
    it was made with; each case changes the environment, as a new command would."""
    import s3fs

    from srdvol.ngff.remote import close_sessions

    close_sessions()  # zarr's sessions, which would complain when collected
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """A moto S3 server with the bucket ``data`` holding two simulated recordings, a tiny model
    on local disk, and two IAM users for the permission cases."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    from srdvol.model.config import NetworkConfig
    from srdvol.simulate import simulate
    from srdvol.training.loop import train

    root = tmp_path_factory.mktemp("remote")
    simulate(root / "in.zarr", truth=root / "truth.zarr", frames=32, size=(32, 32), seed=0)
    simulate(root / "long.zarr", truth=root / "ltruth.zarr", frames=80, size=(32, 32), seed=1)
    train(
        root / "in.zarr",
        root / "m16.safetensors",
        patch=(16, 16, 16),
        steps=1,
        batch_size=1,
        network=NetworkConfig.tiny(patch_t=16),
        progress=False,
    )
    (root / "m16.safetensors.state").unlink()

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    werkzeug = logging.getLogger("werkzeug")
    level = werkzeug.level
    werkzeug.setLevel(logging.ERROR)  # one line per request would land in the commands' stderr
    admin_keys = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    admin = s3fs.S3FileSystem(
        key="testing",
        secret="testing",
        endpoint_url=endpoint,
        skip_instance_cache=True,
    )
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **admin_keys).create_bucket(
        Bucket=BUCKET
    )
    admin.put(str(root / "in.zarr"), f"{BUCKET}/in.zarr", recursive=True)
    admin.put(str(root / "long.zarr"), f"{BUCKET}/long.zarr", recursive=True)

    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", **admin_keys)
    read_only = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                # moto 5.2.6 checks some requests by their API operation instead of the IAM
                # action AWS uses for it (HeadObject is s3:GetObject, ListObjectsV2 and
                # HeadBucket are s3:ListBucket); naming both keeps "reader" a reader on either.
                "Action": ["s3:GetObject", "s3:ListBucket", *MOTO_OPERATION_ALIASES],
                "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"],
            }
        ],
    }
    no_delete = json.loads(json.dumps(read_only))
    no_delete["Statement"][0]["Action"].append("s3:PutObject")
    policies = {"reader": read_only, "writer": no_delete, "nobody": None}
    users = {}
    for name, policy in policies.items():
        iam.create_user(UserName=name)
        if policy is not None:
            iam.put_user_policy(
                UserName=name, PolicyName="limited", PolicyDocument=json.dumps(policy)
            )
        key = iam.create_access_key(UserName=name)["AccessKey"]
        users[name] = {
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
        }

    with pytest.MonkeyPatch.context() as env:
        for name in list(os.environ):
            if name.startswith(("AWS_", "FSSPEC_S3")):
                env.delenv(name)
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        # a developer's own ~/.aws and a cloud machine's metadata service stay out of it
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(root / "no-credentials"))
        env.setenv("AWS_CONFIG_FILE", str(root / "no-config"))
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        env.setenv("CUDA_VISIBLE_DEVICES", "")
        _forget_filesystems()
        try:
            yield Remote(root, endpoint, f"http://127.0.0.1:{_free_port()}", users, admin)
        finally:
            _forget_filesystems()
            server.stop()
            werkzeug.setLevel(level)


@pytest.fixture(autouse=True)
def _fresh_filesystems():
    _forget_filesystems()
    yield
    _forget_filesystems()


def bucket_state(remote: Remote) -> dict[str, str]:
    """Every bucket, and every object with its ETag: what "nothing written" is checked against."""
    remote.admin.invalidate_cache()
    state = {f"bucket {b}": "" for b in remote.admin.ls("", detail=False)}
    for path in remote.admin.find(BUCKET):
        state[path] = remote.admin.info(path)["ETag"]
    return state


def local_state(root: Path) -> dict[str, str]:
    from conftest import digest

    return {
        p.name: digest(p) if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.iterdir()
    }


MODEL = ["--model", "m16.safetensors", "--dashboard-address", "127.0.0.1:0"]
IN = f"s3://{BUCKET}/in.zarr"
OUT = f"s3://{BUCKET}/out.zarr"
UNSET = None
NO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": UNSET, "AWS_SECRET_ACCESS_KEY": UNSET}
REFUSED = "cannot be reached (connection refused); check the network and the endpoint address"

FAULTS = [
    # (case, argv, environment (DEAD: the unreachable endpoint; a user's keys by name),
    #  moto checks IAM, subject of the message, words it must hold)
    (
        "unreachable endpoint: info",
        ["info", IN],
        {"endpoint": "dead"},
        False,
        IN,
        [REFUSED, "AWS_ENDPOINT_URL", "the storage endpoint http://127.0.0.1:"],
    ),
    (
        "unreachable endpoint: predict into the bucket",
        ["predict", "in.zarr", OUT, *MODEL],
        {"endpoint": "dead"},
        False,
        OUT,
        [REFUSED],
    ),
    (
        "missing bucket: info",
        ["info", "s3://nobucket/in.zarr"],
        {},
        False,
        "s3://nobucket/in.zarr",
        ["the bucket 'nobucket' does not exist at http://127.0.0.1:", "check the bucket name"],
    ),
    (
        "missing bucket: predict into it",
        ["predict", IN, "s3://nobucket/out.zarr", *MODEL],
        {},
        False,
        "s3://nobucket/out.zarr",
        ["the bucket 'nobucket' does not exist", "aws s3 mb s3://nobucket"],
    ),
    (
        "nothing under the URL",
        ["info", f"s3://{BUCKET}/nothere.zarr"],
        {},
        False,
        f"s3://{BUCKET}/nothere.zarr",
        [f"nothing is stored under this URL (the bucket '{BUCKET}' exists)"],
    ),
    (
        "missing credentials: info",
        ["info", IN],
        NO_CREDENTIALS,
        False,
        IN,
        ["no credentials were found", "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"],
    ),
    (
        "missing credentials: predict into the bucket",
        ["predict", "in.zarr", OUT, *MODEL],
        NO_CREDENTIALS,
        False,
        OUT,
        ["no credentials were found", "AWS_PROFILE"],
    ),
    (
        "permission denied: read",
        ["info", IN],
        {"user": "nobody"},
        True,
        IN,
        ["access denied (HTTP 403): the credentials may not read", "s3:GetObject"],
    ),
    (
        "permission denied: write",
        ["predict", IN, OUT, *MODEL],
        {"user": "reader"},
        True,
        OUT,
        [
            "access denied (AccessDenied): the credentials may not write this store",
            "s3:PutObject",
            "write the output somewhere you may",
        ],
    ),
    (
        "unknown access key",
        ["predict", "in.zarr", OUT, *MODEL],
        {"AWS_ACCESS_KEY_ID": "AKIANOTKNOWNHERE0000", "AWS_SECRET_ACCESS_KEY": "x" * 40},
        True,
        OUT,
        ["the server does not know the access key ID", "correct or renew the credentials"],
    ),
]


@pytest.mark.parametrize(
    ("argv", "env", "auth", "subject", "words"),
    [c[1:] for c in FAULTS],
    ids=[c[0] for c in FAULTS],
)
def test_remote_fault_is_one_sentence_and_writes_nothing(
    remote, monkeypatch, capsys, argv, env, auth, subject, words
):
    monkeypatch.chdir(remote.root)
    for name, value in env.items():
        if name == "endpoint":
            monkeypatch.setenv("AWS_ENDPOINT_URL", remote.dead_endpoint)
            for option, setting in ONE_ATTEMPT.items():
                monkeypatch.setenv(option, setting)
        elif name == "user":
            for option, setting in remote.users[value].items():
                monkeypatch.setenv(option, setting)
        elif value is UNSET:
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, value)
    bucket, local = bucket_state(remote), local_state(remote.root)

    if auth:
        with enforced_auth():
            code, out, err = run_cli(capsys, *argv)
    else:
        code, out, err = run_cli(capsys, *argv)

    message = err.strip()
    assert code == 2, message
    assert message.count("\n") == 0, message
    assert message.startswith(f"srdvol: error: {subject}: "), message
    for text in words:
        assert text in message, message
    assert not any(noise in err + out for noise in NOISE), err
    assert bucket_state(remote) == bucket  # nothing written (not even a probe), bucket kept
    assert local_state(remote.root) == local


def test_credentials_that_may_write_but_not_delete_are_refused_naming_the_probe(
    remote, monkeypatch, capsys
):
    """srdvol deletes its lock file at the end of a run, so such credentials are refused before
    any work; the probe object that found it out cannot be deleted either, and is named."""
    monkeypatch.chdir(remote.root)
    for option, setting in remote.users["writer"].items():
        monkeypatch.setenv(option, setting)
    before = bucket_state(remote)
    with enforced_auth():
        code, _, err = run_cli(capsys, "predict", IN, OUT, *MODEL)
    message = err.strip()
    assert code == 2 and message.count("\n") == 0, message
    assert message.startswith(f"srdvol: error: {OUT}: the credentials may write objects there ")
    assert "but not delete them" in message and "s3:DeleteObject" in message
    left = set(bucket_state(remote)) - set(before)
    assert len(left) == 1, left  # the probe, and nothing else
    (probe,) = left
    assert re.fullmatch(rf"{BUCKET}/out\.zarr\.srdvol-probe-[0-9a-f]{{8}}", probe)
    assert f"(the probe s3://{probe} it wrote is left behind)" in message
    remote.admin.rm_file(probe)
    assert bucket_state(remote) == before


def test_unknown_protocols_and_missing_backends_are_named(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "info", "nosuchproto://bucket/in.zarr")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("srdvol: error: nosuchproto://bucket/in.zarr: fsspec knows no protocol")

    import importlib

    # a protocol whose backend package is not installed (as gs:// is without gcsfs)
    monkeypatch.setitem(
        importlib.import_module("fsspec.registry").known_implementations,
        "srdvoltest",
        {"class": "srdvol_no_such_package.FS", "err": "Install srdvol-no-such-package"},
    )
    code, _, err = run_cli(capsys, "predict", "srdvoltest://b/in.zarr", "out.zarr", "--model", "m")
    assert code == 2 and err.count("\n") == 1
    assert "the package that reads srdvoltest:// URLs is not installed" in err
    assert "Install srdvol-no-such-package" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# as a user runs it: real srdvol processes, stderr in a file


def _srdvol(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "srdvol"), *args]


def _run(remote: Remote, argv: list[str], log: Path, **env: str) -> tuple[int, str, str]:
    with log.open("w") as stderr:
        done = subprocess.run(
            _srdvol(*argv),
            cwd=remote.root,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            timeout=300,
        )
    return done.returncode, done.stdout, log.read_text()


def test_info_of_a_bucket(remote, monkeypatch, capsys):
    monkeypatch.chdir(remote.root)
    code, out, err = run_cli(capsys, "info", IN)
    assert code == 0, err
    assert f"image      {IN}" in out.splitlines()
    assert "axes       tyx   shape (32, 32, 32)   dtype uint16" in out
    assert "missing" not in out  # the chunks were listed in the bucket, and all are there
    assert "s0 (32, 32, 32) in chunks" in out  # what predict would write
    assert not err


def test_faults_leave_one_line_on_the_stderr_of_a_real_process(remote, tmp_path):
    """Before: "internal error: EndpointConnectionError ...", exit 1, and two "Exception
    ignored" tracebacks from coroutines zarr left behind; a missing bucket was "not a Zarr
    store". The whole stderr of the process, redirected to a file, is now one line."""
    cases = [
        ({"AWS_ENDPOINT_URL": remote.dead_endpoint, **ONE_ATTEMPT}, IN, REFUSED),
        ({}, "s3://nobucket/in.zarr", "the bucket 'nobucket' does not exist"),
    ]
    for env, url, words in cases:
        code, out, err = _run(remote, ["info", url], tmp_path / "fault.err", **env)
        assert code == 2, err
        assert err.count("\n") == 1 and not out, err
        assert err.startswith(f"srdvol: error: {url}: ") and words in err, err


BLOCK = re.compile(r"^denoising (\d+)/5 blocks")


def test_predict_into_the_bucket_resumes_after_ctrl_c(remote, monkeypatch, capfd, tmp_path):
    """``srdvol predict s3://.../long.zarr s3://.../resumed.zarr`` in a real process: Ctrl-C
    once a block is written (SIGINT to the process group, as a terminal sends it), then the same
    command again (here in-process, its workers still separate processes); the result matches
    a prediction made in this process."""
    from srdvol.predict.block import predict_array
    from srdvol.predict.predictors import ModelPredictor

    out = f"s3://{BUCKET}/resumed.zarr"
    argv = ["predict", f"s3://{BUCKET}/long.zarr", out, *MODEL, "--block", "16,32,32"]
    argv += ["--workers", "1"]
    monkeypatch.chdir(remote.root)
    monkeypatch.setenv("SRDVOL_PROGRESS_INTERVAL", "0.2")
    log = tmp_path / "first.log"
    with log.open("w") as stderr:
        first = subprocess.Popen(
            _srdvol(*argv),
            cwd=remote.root,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 240
        while not any(
            (m := BLOCK.match(line)) and int(m.group(1)) >= 1
            for line in log.read_text().splitlines()
        ):
            assert first.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGINT)
        assert first.wait(timeout=120) == 130, log.read_text()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    text = log.read_text()
    last = text.strip().splitlines()[-1]
    found = re.match(
        rf"srdvol: interrupted by SIGINT: (\d+) of 5 blocks written and recorded in "
        rf"{re.escape(out)}/s0/\.srdvol-ledger\.json; to resume, run: (.*)$",
        last,
    )
    assert found, text
    kept = int(found.group(1))
    assert 1 <= kept < 5
    assert shlex.split(found.group(2)) == ["srdvol", *argv]
    assert not any(noise in text for noise in NOISE), text
    assert not remote.admin.exists(f"{BUCKET}/resumed.zarr.srdvol-lock")  # let go of the output

    capfd.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capfd.readouterr()  # file descriptors: the workers' stderr too
    assert code == 0, captured.err
    assert f"wrote {out}: {5 - kept} block(s) computed, {kept} already done" in captured.err
    assert not any(noise in captured.err for noise in NOISE), captured.err

    import zarr

    written = zarr.open_array(f"{out}/s0", mode="r")[...]
    data = zarr.open_array(remote.root / "long.zarr" / "s0", mode="r")[...]
    expected = predict_array(
        data,
        ModelPredictor(remote.root / "m16.safetensors", device="cpu", anchor=DEFAULT_ANCHOR),
        patch=(16, 16, 16),
    )
    np.testing.assert_allclose(written, expected, rtol=1e-5, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# errors met mid-run, in Dask workers


def test_errors_pickled_back_from_workers_are_translated():
    import pickle

    from srdvol.errors import RemoteStoreError, StoreNotFoundError
    from srdvol.ngff.remote import remote_error

    # what s3fs raises, after the trip from a worker (botocore's cause is lost on the way)
    denied = pickle.loads(pickle.dumps(PermissionError("Access Denied")))
    error = remote_error(OUT, denied, writing=True, then="run the same command again to resume")
    assert isinstance(error, RemoteStoreError)
    assert str(error).startswith(f"{OUT}: access denied (HTTP 403): the credentials may not write")
    assert str(error).endswith("then run the same command again to resume.")
    gone = FileNotFoundError("The specified bucket does not exist")
    assert isinstance(remote_error(OUT, gone, writing=True), StoreNotFoundError)
    # not about the store: left alone
    assert remote_error(OUT, ConnectionRefusedError(111, "refused")) is None  # the scheduler's
    assert remote_error("out.zarr", PermissionError("denied")) is None  # local: storecheck's
    assert remote_error(OUT, ValueError("cannot reshape")) is None


def test_a_store_that_goes_away_mid_run_is_named_not_blamed_on_a_chunk(remote, monkeypatch):
    """A read through :class:`srdvol.ngff.read.NamedReads` (what workers run) after the server has
    gone: the store is named as unreachable, rather than the chunk as damaged."""
    from moto.server import ThreadedMotoServer

    from srdvol.errors import RemoteStoreError
    from srdvol.ngff.read import open_image

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    for option, setting in ONE_ATTEMPT.items():
        monkeypatch.setenv(option, setting)
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.call_s3("create_bucket", Bucket="brief")
    fs.put(str(remote.root / "in.zarr"), "brief/in.zarr", recursive=True)
    image = open_image("s3://brief/in.zarr")
    server.stop()
    with pytest.raises(RemoteStoreError) as caught:
        image.data[:16].compute(scheduler="sync")
    message = str(caught.value)
    assert message.startswith("s3://brief/in.zarr/s0: the storage endpoint http://127.0.0.1:")
    assert "cannot be reached" in message and "then run the same command again." in message
