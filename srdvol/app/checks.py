"""What the commands check before any work: the input (structure, missing chunks), the model and
output paths, the output location (writable, room), the input's intensities against the
model's, and the GPUs. Each check raises one clear error or prints one warning."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from srdvol.app.say import say
from srdvol.errors import OutputPathError, flag
from srdvol.options import ClusterOptions, ReadOptions

__all__ = [
    "check_cluster_options",
    "check_intensities",
    "check_model_path",
    "check_output_location",
    "default_model_path",
    "ledger_path",
    "open_input",
]


def open_input(source: str | os.PathLike[str], read: ReadOptions) -> Any:
    """Open and check the input, including one listing of its chunks (missing chunks are an
    error unless allowed; then a warning with their count and positions)."""
    from srdvol.ngff.read import open_image
    from srdvol.ngff.storecheck import check_chunks

    image = open_image(source, **read.open_options())
    found = check_chunks(image, allow_missing=read.allow_missing_chunks)
    if found is None:
        say(
            f"srdvol: note: {os.fspath(source)}: the store cannot list its chunks, so missing "
            "chunks (read as the fill value) cannot be detected"
        )
    elif found.count:
        it = "it" if found.count == 1 else "them"
        say(
            f"srdvol: warning: {found.array}: {found.describe()}; {flag('allow_missing_chunks')} "
            f"reads {it} as the fill value {found.fill_value}"
        )
    return image


def default_model_path(out: str | os.PathLike[str]) -> Path:
    """Where ``srdvol denoise`` keeps the model it trains: beside OUT (or in the working folder
    when OUT is a URL), named ``<OUT name>.model.safetensors``."""
    text = os.fspath(out).rstrip("/")
    name = text.rsplit("/", 1)[-1]
    stem = name[: -len(".zarr")] if name.endswith(".zarr") else name
    folder = Path(text).parent if "://" not in text else Path.cwd()
    return folder / f"{stem}.model.safetensors"


def check_model_path(model: str | os.PathLike[str], source: str | os.PathLike[str]) -> None:
    """A model file is never written inside the input, and is a file (not a folder)."""
    from srdvol.ngff.write import check_output_path

    check_output_path(model, source)
    if Path(model).is_dir():
        raise OutputPathError(
            model, "is a folder, not a model file", "give the path of a .safetensors file"
        )


def ledger_path(out: str | os.PathLike[str]) -> str:
    """The resume ledger lives inside the level-0 array's folder: a Zarr group listing would
    warn about a foreign file at the group level, and ``overwrite`` removes it with the data."""
    return os.fspath(out).rstrip("/") + "/s0/.srdvol-ledger.json"


def check_output_location(out: str | os.PathLike[str], *, image: Any, dtype: str) -> None:
    """The output location is writable and its disk has room (``dtype``: of the output)."""
    import numpy as np

    from srdvol.ngff.storecheck import check_free_space, probe_writable
    from srdvol.ngff.write import output_nbytes

    probe_writable(out)
    warning = check_free_space(out, needed=output_nbytes(image.shape, image.dims, np.dtype(dtype)))
    if warning:
        say(f"srdvol: warning: {warning}")


def check_intensities(source: Any, image: Any, record: Any, *, renormalize: bool = False) -> Any:
    """Sample the input (NaN/Inf stop the run here) and warn when its intensities are far
    from the model's training data; with ``renormalize``, return the sample's statistics
    (the predictor normalises with them) and say so instead."""
    from srdvol.core.normalize import Statistics, compare_statistics, sample_statistics

    sample = sample_statistics(image)
    trained = Statistics(mean=record.normalization.mean, std=record.normalization.std)
    if renormalize:
        say(
            f"srdvol: normalising {os.fspath(source)} with its own statistics (mean "
            f"{sample.mean:.4g}, std {sample.std:.4g}) instead of the model's training data's "
            f"(mean {trained.mean:.4g}, std {trained.std:.4g})"
        )
        return sample
    warning = compare_statistics(sample, trained, subject=os.fspath(source))
    if warning:
        say(f"srdvol: warning: {warning}")
    return None


def check_still(source: Any, image: Any, predict: Any = None) -> None:
    """Warn when the input seems to move (``--guide`` and ``--restore``, the option that
    ``predict`` sets, assume a still recording); reads
    :data:`~srdvol.predict.motion.SAMPLED_FRAMES` frames of one plane."""
    import numpy as np

    from srdvol.predict.motion import frame_shifts, plane_frames

    if "t" not in image.dims or image.sizes["t"] < 3:
        return
    motion = frame_shifts(np.asarray(plane_frames(image)))
    if motion.moving:
        option = flag("restore" if predict is not None and predict.restore else "guide")
        say(
            f"srdvol: warning: {os.fspath(source)} seems to move: {motion.shifted} of "
            f"{len(motion.shifts)} frames sampled over the recording are shifted by 1 to "
            f"{motion.largest} px against the others' mean; {option} assumes a still "
            f"recording and costs SNR on a moving one: register it first, or run without {option}"
        )


def check_cluster_options(options: ClusterOptions) -> None:
    """Fail on GPUs that are not there before hours of training, not after."""
    from srdvol.dask.gpus import resolve_gpus

    if not options.scheduler:
        resolve_gpus(options.gpus)
