"""Tests of the model file: round trip, record, compatibility checks and bad files."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from srdvol.errors import ModelMismatchError, StoreNotFoundError
from srdvol.model.checkpoint import (
    FORMAT,
    ModelRecord,
    Normalization,
    check_compatible,
    load_model,
    load_tensors,
    model_checksum,
    read_record,
    save_model,
    save_tensors,
    weights_checksum,
)
from srdvol.model.config import NetworkConfig
from srdvol.model.network import build_network

torch.set_num_threads(1)


def _record(patch_t: int = 16) -> ModelRecord:
    return ModelRecord(
        network=NetworkConfig.tiny(patch_t=patch_t),
        patch=(patch_t, 32, 32),
        sampling="spatial",
        normalization=Normalization(mean=101.5, std=12.25),
        training_data={"path": "in.zarr", "shape": [64, 128, 128], "dtype": "uint16"},
        steps=7,
        seed=3,
    )


def _trained(record: ModelRecord) -> torch.nn.Module:
    torch.manual_seed(0)
    network = build_network(record.network)
    with torch.no_grad():
        for parameter in network.parameters():  # not the initial values: a real change
            parameter.add_(0.01 * torch.randn_like(parameter))
    return network


def test_round_trip_gives_identical_outputs_and_record(tmp_path: Path) -> None:
    record = _record()
    network = _trained(record)
    path = tmp_path / "model.safetensors"
    written = save_model(path, network, record)
    assert written == record.model_copy(update={"weights_sha256": written.weights_sha256})
    assert written.weights_sha256 == weights_checksum(network.state_dict())
    loaded, loaded_record = load_model(path)
    assert loaded_record == written
    assert not loaded.training
    x = torch.randn(1, 1, 16, 11, 9)
    with torch.no_grad():
        assert torch.equal(loaded(x), network.eval()(x))
    assert read_record(path) == written
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporaries


def test_record_is_plain_json_in_the_header(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_model(path, _trained(_record()), _record())
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    assert json.loads(header["__metadata__"]["format"]) == FORMAT
    stored = json.loads(header["__metadata__"]["srdvol"])
    assert stored["patch"] == [16, 32, 32]
    assert stored["normalization"] == {"mean": 101.5, "std": 12.25}
    assert stored["network"]["patch_t"] == 16


def test_checksum_is_sha256_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_model(path, _trained(_record()), _record())
    assert model_checksum(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(StoreNotFoundError):
        model_checksum(tmp_path / "absent.safetensors")


def test_wrapped_networks_are_saved_bare(tmp_path: Path) -> None:
    record = _record()
    network = _trained(record)

    class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    save_model(tmp_path / "m.safetensors", Wrapper(network), record)
    loaded, _ = load_model(tmp_path / "m.safetensors")
    for (name, a), (other, b) in zip(
        network.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert name == other
        assert torch.equal(a, b)


def test_mismatched_patch_is_a_clear_error() -> None:
    record = _record(patch_t=32)
    check_compatible(record, patch=(32, 128, 96))  # any y, x with the same frames
    check_compatible(record)
    with pytest.raises(ModelMismatchError, match="run with patch 32,32,32") as info:
        check_compatible(record, patch=(16, 32, 32), subject="m.safetensors")
    assert str(info.value).startswith("m.safetensors: was trained with patch 32,32,32")


def test_record_validation() -> None:
    with pytest.raises(ValueError, match="patch_t"):
        ModelRecord(
            network=NetworkConfig.tiny(patch_t=16),
            patch=(32, 8, 8),
            sampling="spatial",
            normalization=Normalization(mean=0, std=1),
        )
    with pytest.raises(ValueError):
        Normalization(mean=0, std=0)
    record = _record()
    assert record.created.endswith("+00:00")
    assert record.srdvol_version


def test_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match="does not exist"):
        load_model(tmp_path / "absent.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a model at all" * 20)
    with pytest.raises(ModelMismatchError, match="not a srdvol model"):
        load_model(junk)
    with pytest.raises(ModelMismatchError, match="directory"):
        load_model(tmp_path)
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, other, metadata={"format": "pt"})
    with pytest.raises(ModelMismatchError, match="not a srdvol model"):
        read_record(other)


def test_damaged_record_or_weights(tmp_path: Path) -> None:
    record = _record()
    bad_record = tmp_path / "bad_record.safetensors"
    save_tensors(
        bad_record,
        {"w": torch.zeros(1)},
        metadata={"format": FORMAT, "srdvol": {"patch": [16, 8, 8]}},
    )
    with pytest.raises(ModelMismatchError, match="record"):
        load_model(bad_record)
    future = tmp_path / "future.safetensors"
    save_tensors(future, {"w": torch.zeros(1)}, metadata={"format": "srdvol-model/99"})
    with pytest.raises(ModelMismatchError, match="srdvol-model/99"):
        read_record(future)
    wrong_weights = tmp_path / "wrong_weights.safetensors"
    save_tensors(
        wrong_weights,
        {"w": torch.zeros(1)},
        metadata={"format": FORMAT, "srdvol": record.model_dump(mode="json")},
    )
    with pytest.raises(ModelMismatchError, match="do not fit"):
        load_model(wrong_weights)


def test_generic_tensors_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "state.safetensors"
    tensors = {"optimizer/step": torch.tensor([5]), "rng/cpu": torch.arange(4, dtype=torch.uint8)}
    save_tensors(path, tensors, metadata={"step": 5, "lr": [1e-4]})
    loaded, metadata = load_tensors(path)
    assert metadata == {"step": 5, "lr": [1e-4]}
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def _corrupt(path: Path, data: bytes) -> None:
    """Overwrite bytes inside the largest float32 tensor's data (after the JSON header)."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    begin, end = max(
        (
            entry["data_offsets"]
            for key, entry in header.items()
            if key != "__metadata__" and entry["dtype"] == "F32"
        ),
        key=lambda span: span[1] - span[0],
    )
    data = data[: end - begin]
    offset = 8 + length + begin
    with path.open("r+b") as stream:
        stream.seek(offset)
        stream.write(data)


def test_corrupted_weights_fail_the_checksum(tmp_path: Path) -> None:
    import numpy as np

    path = tmp_path / "model.safetensors"
    save_model(path, _trained(_record()), _record())
    read_record(path)  # the header is intact
    _corrupt(path, np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelMismatchError, match="do not match the checksum") as info:
        load_model(path)
    assert str(info.value).startswith(f"{path}: its weights")


def _without_checksum(path: Path, network: torch.nn.Module, record: ModelRecord) -> None:
    """Write a model file the way srdvol did before records held a weights checksum."""
    old = record.model_dump(mode="json")
    old.pop("weights_sha256")
    save_tensors(path, network.state_dict(), metadata={"format": FORMAT, "srdvol": old})


def test_old_model_files_without_a_checksum_still_load(tmp_path: Path) -> None:
    record = _record()
    network = _trained(record)
    path = tmp_path / "old.safetensors"
    _without_checksum(path, network, record)
    assert (
        "weights_sha256"
        not in json.loads(path.read_bytes()[8 : 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])[
            "__metadata__"
        ]["srdvol"]
    )
    loaded, loaded_record = load_model(path)
    assert loaded_record.weights_sha256 is None
    x = torch.randn(1, 1, 16, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), network.eval()(x))


def test_old_model_with_nan_bytes_is_refused(tmp_path: Path) -> None:
    import numpy as np

    path = tmp_path / "old.safetensors"
    _without_checksum(path, _trained(_record()), _record())
    _corrupt(path, np.full(1024, np.nan, dtype="<f4").tobytes())
    with pytest.raises(ModelMismatchError, match="NaN or Inf values"):
        load_model(path)
