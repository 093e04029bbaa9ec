"""A trained model as a BioImage Model Zoo package (bioimage.io model description 0.5).

The package is one zip file that bioimageio.core (and the zoo's other consumers) run without
srdvol:

- **weights**: TorchScript, traced from srdvol's own network inside :class:`TimeBlocks`.
  Tracing records the frame size as tensor arithmetic (the Swin padding and shifted-window
  masks are computed inside the trace), so the traced module accepts any batch, any y and x,
  and any multiple of ``patch_t`` frames (each block of ``patch_t`` frames denoised on its
  own); the export checks this on another batch, number of blocks and an odd frame size
  before writing anything. ``torch.jit.script`` is not used: the network's Python (pydantic
  config, mask cache, chunked attention) is not scriptable.
- **normalisation**: srdvol's global training statistics as the package's own processing
  steps, ``fixed_zero_mean_unit_variance`` (mean, std) before the network and
  ``scale_linear`` (gain std, offset mean) after it, so the package takes raw intensities and
  returns denoised intensities in the same units, and the statistics are readable in its
  ``rdf.yaml`` rather than hidden in the weights. (bioimageio.core divides by ``std + 1e-6``,
  a relative change of ``1e-6 / std``, far inside its test tolerance.)
- **axes**: ``batch, channel, time, y, x``; one channel; time ``patch_t`` frames (the temporal
  position embedding is learned for that length; a fixed size keeps bioimageio.core's
  blockwise prediction at ``patch_t`` frames per block whatever the tile size in y and x,
  while a whole movie of ``k * patch_t`` frames also runs in one call); y and x any size from
  one Swin window up, in steps of 1 pixel.
- **test pair**: a ``(1, 1, patch_t, y, x)`` input in raw units and the output that srdvol's
  own (not traced) network gives for it; ``bioimageio test`` checks that the package
  reproduces it.
- **description**: the model record (patch, sampling, normalisation, training data, steps,
  seed, weights checksum) in the README and, whole, under ``config.srdvol``.

bioimageio.spec is an optional dependency (``pip install 'srdvol[export]'``); building a
package needs no network.
"""

from __future__ import annotations

import getpass
import os
import re
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from srdvol.errors import (
    ConfigError,
    DataError,
    ModelMismatchError,
    OutputExistsError,
    OutputPathError,
    flag,
)
from srdvol.model.checkpoint import ModelRecord, load_model
from srdvol.model.zoo_description import documentation, min_frame_size, package_content
from srdvol.values import DEFAULT_LICENSE

__all__ = [
    "TimeBlocks",
    "check_metadata",
    "check_package_path",
    "default_test_input",
    "export_package",
    "trace_network",
]

#: Largest difference, in normalised units, allowed between the traced and srdvol's network.
TRACE_TOLERANCE = 1e-4
_NAME_CHARACTERS = re.compile(r"[A-Za-z0-9_+\- ()]+")


def _spec() -> Any:
    """The bioimageio.spec module, or one sentence saying how to install it."""
    try:
        import bioimageio.spec as spec
    except ImportError:
        raise ConfigError(
            "bioimageio.spec",
            "is not installed, and writing a BioImage Model Zoo package needs it",
            "install it with pip install 'srdvol[export]'",
        ) from None
    return spec


def check_package_path(
    out: str | os.PathLike[str],
    *,
    model_path: str | os.PathLike[str],
    overwrite: bool = False,
) -> Path:
    """Check where a package may be written, before any work; return it as an absolute path.

    Raises
    ------
    OutputPathError
        If ``out`` is a URL, does not end in ``.zip``, is a folder, or is the model file.
    OutputExistsError
        If ``out`` exists and ``overwrite`` is not set.
    """
    if "://" in os.fspath(out):
        raise OutputPathError(
            out,
            "a package is written to a local file",
            "write it to a local path, then copy it where it should go",
        )
    target = Path(out).absolute()
    if target.suffix.lower() != ".zip":
        raise OutputPathError(
            out,
            "a BioImage Model Zoo package is a .zip file",
            "give an output path ending in .zip",
        )
    if target.is_dir():
        raise OutputPathError(out, "is a folder", "give the path of the .zip file to write")
    if target.exists() and Path(model_path).exists() and os.path.samefile(target, model_path):
        raise OutputPathError(
            out, "the output is the model file", "give another path for the package"
        )
    if target.exists() and not overwrite:
        raise OutputExistsError(
            out, "the file already exists", f"pass {flag('overwrite')} to replace it"
        )
    return target


def check_metadata(*, name: str, authors: Sequence[str], license: str) -> None:
    """Check the package's name, authors and licence against the zoo's rules.

    Raises
    ------
    ConfigError
        Naming the option to change.
    """
    if not 5 <= len(name) <= 128 or not _NAME_CHARACTERS.fullmatch(name):
        raise ConfigError(
            flag("name"),
            f"{name!r} is not a model name the zoo accepts",
            "use 5 to 128 letters, digits, spaces, '_', '+', '-', '(' or ')'",
        )
    if not authors or any(not a.strip() or "/" in a for a in authors):
        raise ConfigError(
            flag("author"), f"{list(authors)!r} are not author names", "give names without '/'"
        )
    from bioimageio.spec.generic.v0_3 import LicenseId

    try:
        LicenseId(license)
    except ValueError:
        raise ConfigError(
            flag("license"),
            f"{license!r} is not an SPDX licence identifier",
            "give one such as CC-BY-4.0, CC0-1.0, MIT or BSD-3-Clause",
        ) from None


def default_test_input(record: ModelRecord, *, seed: int = 0) -> np.ndarray:
    """A ``(patch_t, y, x)`` movie of noise with the training data's mean and std.

    ``y`` and ``x`` are the training patch's (at least one attention window).
    """
    side = min_frame_size(record)
    t, y, x = record.patch
    shape = (t, max(y, side), max(x, side))
    rng = np.random.default_rng(seed)
    stats = record.normalization
    return (stats.mean + stats.std * rng.standard_normal(shape)).astype(np.float32)


def _check_sample(sample: Any, record: ModelRecord) -> np.ndarray:
    movie = np.asarray(sample)
    side = min_frame_size(record)
    t = record.network.patch_t
    if movie.ndim != 3 or movie.shape[0] != t or min(movie.shape[1:]) < side:
        raise DataError(
            flag("sample"),
            f"the test movie has shape {movie.shape} and the model needs ({t}, y, x) with y "
            f"and x at least {side}",
            f"give {t} frames of at least {side}x{side} pixels",
        )
    if movie.dtype.kind not in "iuf":
        raise DataError(
            flag("sample"), f"the test movie has dtype {movie.dtype}", "give integers or floats"
        )
    movie = movie.astype(np.float32)
    if not np.isfinite(movie).all():
        raise DataError(flag("sample"), "the test movie holds NaN or Inf", "give finite values")
    return movie


def _normalised(movie: np.ndarray, record: ModelRecord) -> torch.Tensor:
    stats = record.normalization
    scaled = (movie.astype(np.float32) - np.float32(stats.mean)) / np.float32(stats.std)
    return torch.from_numpy(np.ascontiguousarray(scaled, dtype=np.float32))


class TimeBlocks(nn.Module):
    """The network over consecutive blocks of ``frames`` frames: ``(B, 1, k * frames, Y, X)``
    in, the same shape out, each block denoised on its own (a batch of ``B * k`` patches).

    Parameters
    ----------
    network
        srdvol's network, which takes exactly ``frames`` frames.
    frames
        The network's ``patch_t``.
    """

    def __init__(self, network: nn.Module, frames: int) -> None:
        super().__init__()
        self.network = network
        self.frames = int(frames)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        k, frames = t // self.frames, self.frames
        blocks = x.reshape(b, c, k, frames, h, w).transpose(1, 2).reshape(b * k, c, frames, h, w)
        out = self.network(blocks).reshape(b, k, c, frames, h, w)
        return out.transpose(1, 2).reshape(b, c, t, h, w)


def _blockwise(network: nn.Module, x: torch.Tensor, frames: int) -> torch.Tensor:
    """The reference for :class:`TimeBlocks`: one network call per block of frames."""
    return torch.cat([network(x[:, :, i : i + frames]) for i in range(0, x.shape[2], frames)], 2)


def trace_network(network: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """Trace :class:`TimeBlocks` around ``network`` on ``example`` and check the trace on
    another batch, number of blocks and frame size.

    Parameters
    ----------
    network
        A freshly loaded network in evaluation mode (no mask computed yet).
    example
        A ``(1, 1, patch_t, y, x)`` normalised input.

    Returns
    -------
    torch.jit.ScriptModule
        The traced module; on any batch, frame size and multiple of ``patch_t`` frames it
        equals ``network`` applied to each block of ``patch_t`` frames.

    Raises
    ------
    ModelMismatchError
        If the traced module differs from the network on the check input (the network gained
        code that tracing cannot follow).
    """
    t = int(example.shape[2])
    blocks = TimeBlocks(network, t).eval()
    with warnings.catch_warnings(), torch.no_grad():
        # torch 2.13 deprecates torch.jit (it still works, and TorchScript is what the zoo's
        # consumers run), and warns about the input-shape checks it records as constants
        # (TracerWarning); the trace is checked below instead.
        _quiet_jit()
        traced = torch.jit.trace(blocks, example, check_trace=False)
    generator = torch.Generator().manual_seed(1)
    # Two blocks, two samples, a frame that is no multiple of the window and spans two in x.
    side = int(getattr(getattr(network, "config", None), "window", 7))
    check = torch.randn((2, 1, 2 * t, side + 3, 2 * side + 5), generator=generator)
    with torch.no_grad():
        difference = float((traced(check) - _blockwise(network, check, t)).abs().max())
    if not difference <= TRACE_TOLERANCE:
        raise ModelMismatchError(
            "model",
            f"its TorchScript trace differs from the network by {difference:.3g} on a "
            f"(2, 1, {2 * t}, y, x) check input of another size",
            "report this as a srdvol bug: the network changed in a way tracing cannot follow",
        )
    return traced


def _quiet_jit() -> None:
    """Ignore torch.jit's deprecation and tracer warnings (inside ``catch_warnings``)."""
    warnings.filterwarnings("ignore", message="`torch.jit.", category=DeprecationWarning)
    warnings.simplefilter("ignore", torch.jit.TracerWarning)


def _save_traced(traced: torch.jit.ScriptModule, path: Path) -> None:
    with warnings.catch_warnings():
        _quiet_jit()
        torch.jit.save(traced, os.fspath(path))


def _write_files(folder: Path, traced: Any, pair: tuple[Any, Any]) -> None:
    import imageio.v3 as iio

    _save_traced(traced, folder / "weights.pt")
    for stem, movie in zip(("input", "output"), pair, strict=True):
        tensor = np.asarray(movie, dtype=np.float32)[None, None]
        np.save(folder / f"test_{stem}.npy", tensor)
        iio.imwrite(folder / f"sample_{stem}.tif", tensor[0, 0])


def export_package(
    model_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    name: str | None = None,
    authors: Sequence[str] | None = None,
    license: str = DEFAULT_LICENSE,
    sample: Any | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a trained model as a BioImage Model Zoo package (a zip file).

    Everything is checked before the file appears: the output path, the metadata, the model
    (checksum), the TorchScript trace, and the description (bioimageio.spec validation). The
    zip is written beside ``out`` and renamed into place.

    Parameters
    ----------
    model_path
        A model file written by ``srdvol train``.
    out
        The package to write, ending in ``.zip``.
    name
        The model's name in the zoo (default: from the model file's name).
    authors
        Author names (default: the login name).
    license
        SPDX identifier of the licence of the weights.
    sample
        A ``(patch_t, y, x)`` movie in raw intensities to use as the test input (default:
        :func:`default_test_input`).
    overwrite
        Replace an existing ``out``.

    Returns
    -------
    pathlib.Path
        The package written.

    Raises
    ------
    OutputPathError, OutputExistsError
        For an unusable ``out`` (see :func:`check_package_path`) or one that cannot be written.
    ConfigError
        For a name, author or licence the zoo does not accept, or bioimageio.spec missing.
    StoreNotFoundError, ModelMismatchError
        If the model file is missing, not a srdvol model, or damaged.
    DataError
        If ``sample`` does not fit the model.
    """
    spec = _spec()
    target = check_package_path(out, model_path=model_path, overwrite=overwrite)
    name = name if name is not None else _default_name(model_path)
    authors = list(authors) if authors else [_login_name()]
    check_metadata(name=name, authors=authors, license=license)
    network, record = load_model(model_path)
    movie = default_test_input(record) if sample is None else _check_sample(sample, record)
    example = _normalised(movie, record)[None, None]
    traced = trace_network(network, example)  # before srdvol's network runs at this size
    stats = record.normalization
    with torch.no_grad():
        expected = network(example)[0, 0].numpy() * np.float32(stats.std) + np.float32(stats.mean)
    content = package_content(record, name=name, authors=authors, license=license)
    with tempfile.TemporaryDirectory(prefix="srdvol-export-") as scratch:
        folder = Path(scratch)
        _write_files(folder, traced, (movie, expected))
        (folder / "README.md").write_text(documentation(record, name=name), encoding="utf-8")
        context = spec.ValidationContext(root=folder, file_name="rdf.yaml", perform_io_checks=True)
        description = spec.build_description(content, context=context)
        if isinstance(description, spec.InvalidDescr):
            raise RuntimeError(f"the package description is invalid: {description.get_reason()}")
        _save_zip(spec, description, target)
    return target


def _save_zip(spec: Any, description: Any, target: Path) -> None:
    """Write the package beside ``target``, then rename it into place."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(
            prefix=f".{target.stem}.", suffix=".zip", dir=target.parent
        )
    except OSError as exc:
        raise OutputPathError(
            target,
            f"{target.parent} cannot be written ({exc.strerror or exc})",
            "choose a writable location",
        ) from None
    os.close(handle)
    try:
        spec.save_bioimageio_package(description, output_path=Path(partial))
        os.chmod(partial, 0o644)  # mkstemp makes it private
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _default_name(model_path: str | os.PathLike[str]) -> str:
    """``SRDTrans-denoiser-<file stem>``, without spaces: bioimageio's command line names its
    output folder after the model."""
    stem = Path(model_path).name.removesuffix(".safetensors")
    clean = re.sub(r"[^A-Za-z0-9_+\-()]+", "-", stem).strip("-")
    return f"SRDTrans-denoiser-{clean}"[:64].rstrip("-")


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in a bare container
        return "srdvol user"
