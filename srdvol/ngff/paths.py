"""Where an output may go: never the input, inside it, or over a file that must survive.

Locations are local paths or fsspec URLs; they are compared after normalising (``realpath``
for local files), so ``./out.zarr``, an absolute path and a ``file://`` URL are the same place.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from srdvol.errors import OutputPathError

__all__ = ["check_output_path", "exists", "is_zarr_store", "remove"]


def _location(path: str | os.PathLike[str]) -> tuple[str, str]:
    """(protocol, normalised path) of a local path or fsspec URL, for comparing locations."""
    from srdvol.ngff.remote import filesystem

    text = os.fspath(path)
    fs, root = filesystem(text)  # a missing fsspec backend is one sentence
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return "file", os.path.realpath(root)
    return protocol, root.rstrip("/")


def check_output_path(
    output: str | os.PathLike[str],
    input: str | os.PathLike[str],
    *,
    keep: Sequence[str | os.PathLike[str]] = (),
) -> None:
    """Refuse an output that is the input, lies inside it, or contains it or a file to keep.

    Run this before any work: writing inside the input store would modify it, and replacing an
    output that contains the input or the model (``overwrite``) would delete them.

    Parameters
    ----------
    output, input
        The output and input locations (local paths or fsspec URLs).
    keep
        Other files that must survive the run, such as the model file (and its training
        state): the output may neither be one of them nor a folder that holds one.

    Raises
    ------
    OutputPathError
        If the output and the input are the same or one lies inside the other, or the output is
        or holds a file of ``keep``.
    """
    out_proto, out_path = _location(output)
    in_proto, in_path = _location(input)
    problem = None
    if out_proto == in_proto:
        if out_path == in_path:
            problem = f"the output is the input image {os.fspath(input)}"
        elif out_path.startswith(in_path + "/"):
            problem = f"the output lies inside the input image {os.fspath(input)}"
        elif in_path.startswith(out_path + "/"):
            problem = f"the output contains the input image {os.fspath(input)}"
    if problem is not None:
        raise OutputPathError(
            output, problem, "choose an output path outside the input, for example next to it"
        )
    for item in keep:
        proto, path = _location(item)
        if proto != out_proto:
            continue
        if path == out_path:
            problem = f"the output is the model file {os.fspath(item)}"
        elif path.startswith(out_path + "/"):
            problem = f"the output is a folder that holds the model file {os.fspath(item)}"
        else:
            continue
        raise OutputPathError(
            output,
            problem,
            "choose an output path of its own, for example out.zarr next to the model "
            "(replacing it would delete the model)",
        )


def is_zarr_store(path: str) -> bool:
    """Whether a location holds Zarr metadata at its root (all that ``overwrite`` may replace)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    names = ("zarr.json", ".zgroup", ".zarray", ".zattrs")
    return any(fs.exists(f"{root.rstrip('/')}/{name}") for name in names)


def exists(path: str) -> bool:
    """Whether something is at ``path`` (an empty folder, made ready by the user, is not)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(root):
        return False
    return not (fs.isdir(root) and not fs.ls(root, detail=False))


def remove(path: str) -> None:
    """Delete a store (or anything) at ``path``, recursively."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    fs.rm(root, recursive=True)
