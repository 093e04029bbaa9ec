"""The model file: one safetensors file holding the weights and a JSON record of how they were made.

Loading never executes code (no pickle): the weights are plain tensors and the record is JSON
in the safetensors header, validated by :class:`ModelRecord`. There is deliberately no sidecar
file: one file is all a user moves around, and two files could disagree. The record is
readable without torch, by :func:`read_record` or by any JSON tool on the header
(``srdvol info MODEL`` may show it).

:func:`save_tensors` / :func:`load_tensors` are the generic layer underneath (atomic write,
string-keyed tensors, JSON metadata); the training loop can use them for its resume state.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from srdvol.errors import ModelMismatchError, StoreNotFoundError
from srdvol.model.config import NetworkConfig
from srdvol.model.network import build_network

__all__ = [
    "FORMAT",
    "ModelRecord",
    "Normalization",
    "check_compatible",
    "check_weights",
    "load_model",
    "load_tensors",
    "model_checksum",
    "read_record",
    "save_model",
    "save_tensors",
    "weights_checksum",
]

#: Value of the ``format`` header key that marks a srdvol model file, with its layout version.
FORMAT = "srdvol-model/1"
_FORMAT_KEY = "format"
_RECORD_KEY = "srdvol"


def _version() -> str:
    from srdvol import __version__

    return __version__


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Normalization(BaseModel):
    """Global intensity statistics: the network sees ``(x - mean) / std``."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    mean: float
    """Mean intensity of the training data, in input units."""
    std: float = Field(gt=0)
    """Intensity scale of the training data, in input units."""


class ModelRecord(BaseModel):
    """Everything needed to rebuild a trained network and use it correctly."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    network: NetworkConfig
    """Sizes of the network; the weights fit exactly this configuration."""
    patch: tuple[int, int, int]
    """Patch ``(t, y, x)`` used in training (inference must use the same ``t``)."""
    sampling: Literal["spatial", "temporal"]
    """Training-pair sampler the model was trained with."""
    normalization: Normalization
    """Global statistics applied before and undone after the network."""
    srdvol_version: str = Field(default_factory=_version)
    """srdvol version that wrote the file."""
    training_data: dict[str, Any] = Field(default_factory=dict)
    """Description of the training data: path, shape, dtype, axes, level, ..."""
    steps: int = Field(0, ge=0)
    """Optimisation steps taken."""
    seed: int | None = None
    """Random seed of the training run."""
    created: str = Field(default_factory=_now)
    """When the model was written (ISO 8601, UTC)."""
    weights_sha256: str | None = None
    """SHA-256 of the weights (:func:`weights_checksum`), set by :func:`save_model` and checked
    by :func:`load_model`; ``None`` in files written before srdvol recorded it (they load
    without the check)."""

    @model_validator(mode="after")
    def _patch_fits_network(self) -> ModelRecord:
        if self.patch[0] != self.network.patch_t:
            raise ValueError(
                f"patch: patch t {self.patch[0]} differs from network.patch_t "
                f"{self.network.patch_t}; give both the same number of frames"
            )
        if min(self.patch) < 1:
            raise ValueError(f"patch: sizes {self.patch} must be positive; fix patch")
        return self


def save_tensors(
    path: str | os.PathLike[str],
    tensors: dict[str, torch.Tensor],
    *,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write tensors and JSON-able metadata to one safetensors file, atomically.

    The file appears complete or not at all (written next to ``path``, then renamed), so a
    reader or a killed run never sees half a file.

    Parameters
    ----------
    path
        Destination file; its directory must exist.
    tensors
        Named tensors (any device; stored from CPU copies, made contiguous).
    metadata
        Header entries; each value is stored as JSON text.
    """
    target = Path(path)
    header = {key: json.dumps(value) for key, value in (metadata or {}).items()}
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(handle)
    try:
        save_file(cpu, temporary, metadata=header)
        os.chmod(temporary, 0o644)  # mkstemp makes it private; workers of other users read it
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def load_tensors(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors`: ``(tensors, metadata)``.

    Raises
    ------
    StoreNotFoundError
        If the file does not exist.
    ModelMismatchError
        If it is not a safetensors file.
    """
    with _open(path, device=str(map_location)) as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = _metadata(handle.metadata())
    return tensors, metadata


def _open(path: str | os.PathLike[str], *, device: str = "cpu") -> Any:
    file = Path(path)
    if not file.exists():
        raise StoreNotFoundError(file, "the model file does not exist", "check the path")
    if file.is_dir():
        raise ModelMismatchError(
            file, "is a directory, not a model file", "pass the .safetensors file srdvol wrote"
        )
    try:
        return safe_open(os.fspath(file), framework="pt", device=device)
    except SafetensorError as exc:
        raise ModelMismatchError(
            file,
            f"is not a srdvol model file (not safetensors: {exc})",
            "pass a model written by srdvol train",
        ) from None


def _metadata(header: dict[str, str] | None) -> dict[str, Any]:
    """Decode JSON header values; values other tools wrote as plain text stay text."""
    decoded: dict[str, Any] = {}
    for key, value in (header or {}).items():
        try:
            decoded[key] = json.loads(value)
        except json.JSONDecodeError:
            decoded[key] = value
    return decoded


def _unwrap(network: nn.Module) -> nn.Module:
    """The bare network inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(network, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(network, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return network
        network = inner


def weights_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order (hex).

    Independent of the device and of the file layout, so it identifies the weights themselves:
    a byte flipped inside the file's tensor data changes it.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save_model(
    path: str | os.PathLike[str], network: nn.Module, record: ModelRecord
) -> ModelRecord:
    """Write a trained network and its record to one model file (atomically).

    Parameters
    ----------
    path
        Destination, conventionally ``*.safetensors``.
    network
        The trained network (a bare module, or wrapped in DDP / ``torch.compile``).
    record
        How it was trained; ``record.network`` must describe ``network``.

    Returns
    -------
    ModelRecord
        The record as written: ``record`` with ``weights_sha256`` set.
    """
    state = _unwrap(network).state_dict()
    written = record.model_copy(update={"weights_sha256": weights_checksum(state)})
    metadata = {_FORMAT_KEY: FORMAT, _RECORD_KEY: written.model_dump(mode="json")}
    save_tensors(path, state, metadata=metadata)
    return written


def read_record(path: str | os.PathLike[str]) -> ModelRecord:
    """Read only the record of a model file (cheap: the weights are not loaded).

    Raises
    ------
    StoreNotFoundError
        If the file does not exist.
    ModelMismatchError
        If it is not a srdvol model file or was written by an incompatible srdvol.
    """
    with _open(path) as handle:
        metadata = _metadata(handle.metadata())
    return _record(path, metadata)


def _record(path: str | os.PathLike[str], metadata: dict[str, Any]) -> ModelRecord:
    marker = metadata.get(_FORMAT_KEY)
    if not isinstance(marker, str) or not marker.startswith("srdvol-model/"):
        raise ModelMismatchError(
            path,
            "is a safetensors file but not a srdvol model (no srdvol record)",
            "pass a model written by srdvol train",
        )
    if marker != FORMAT:
        raise ModelMismatchError(
            path,
            f"uses model format {marker!r} and this srdvol reads {FORMAT!r}",
            "use the srdvol version that wrote it or retrain",
        )
    try:
        return ModelRecord.model_validate(metadata.get(_RECORD_KEY))
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise ModelMismatchError(
            path,
            f"has a model record this srdvol cannot read ({where}: {problem['msg']})",
            "use the srdvol version that wrote it or retrain",
        ) from None


def load_model(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, ModelRecord]:
    """Rebuild the network from a model file, in evaluation mode.

    Parameters
    ----------
    path
        A file written by :func:`save_model`.
    map_location
        Device for the weights and the network.

    Returns
    -------
    network, record

    Raises
    ------
    StoreNotFoundError
        If the file does not exist.
    ModelMismatchError
        If it is not a srdvol model, its weights do not fit its own record, differ from the
        record's checksum, or hold NaN/Inf values (see :func:`check_weights`).
    """
    tensors, metadata = load_tensors(path, map_location=map_location)
    record = _record(path, metadata)
    check_weights(tensors, record, subject=path)
    network = build_network(record.network).to(map_location)
    try:
        network.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ModelMismatchError(
            path,
            f"holds weights that do not fit its network configuration ({first})",
            "the file is damaged or from an incompatible srdvol; retrain",
        ) from None
    return network.eval(), record


def check_weights(
    tensors: dict[str, torch.Tensor],
    record: ModelRecord,
    *,
    subject: str | os.PathLike[str] | None = None,
) -> None:
    """Check loaded weights against the record's checksum (when it has one) and for NaN/Inf.

    Raises
    ------
    ModelMismatchError
        If the checksum differs (the file was damaged after it was written) or a weight is not
        finite.
    """
    named = subject if subject is not None else "model"
    if record.weights_sha256 is not None and weights_checksum(tensors) != record.weights_sha256:
        raise ModelMismatchError(
            named,
            "its weights do not match the checksum in its record, so the file was damaged "
            "after it was written",
            "copy the model again from where it was trained, or retrain",
        )
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelMismatchError(
                named,
                f"its weights hold NaN or Inf values (tensor {name}), so the file is damaged",
                "copy the model again from where it was trained, or retrain",
            )


def check_compatible(
    record: ModelRecord,
    *,
    patch: tuple[int, int, int] | None = None,
    subject: str | os.PathLike[str] | None = None,
) -> None:
    """Check that a model can run with the requested patch.

    Only the number of frames is binding (the temporal position embedding is learned for
    exactly ``patch_t`` frames); the network accepts any y and x, so an inference patch may
    be larger or smaller in space than the training patch.

    Parameters
    ----------
    record
        The model's record.
    patch
        Requested ``(t, y, x)`` patch, or ``None`` (nothing to check).
    subject
        The model path, for the message.

    Raises
    ------
    ModelMismatchError
        If ``patch[0]`` differs from the model's ``patch_t``.
    """
    if patch is not None:
        record.network.check_patch(
            patch,
            subject=os.fspath(subject) if subject is not None else "model",
            trained=record.patch,
        )


def model_checksum(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the model file, hex (recorded in the output's provenance).

    Raises
    ------
    StoreNotFoundError
        If the file does not exist.
    """
    file = Path(path)
    if not file.is_file():
        raise StoreNotFoundError(file, "the model file does not exist", "check the path")
    digest = hashlib.sha256()
    with file.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
