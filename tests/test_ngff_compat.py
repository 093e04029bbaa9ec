"""Stores written by srdvol 0.1.0 (tests/data/stores-v0.1.0.zip) still read, and new outputs keep
their layout: the same files, the same array metadata, the same attributes and run id, and
chunk files byte for byte, for NGFF 0.4 and 0.5."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from conftest import validate_ngff

from srdvol.ngff.labels import read_masks
from srdvol.ngff.provenance import make_run_id, read_provenance, simulation_record
from srdvol.ngff.read import describe_image, open_image
from srdvol.ngff.write import create_output, open_output_array
from srdvol.options import OutputOptions

ARCHIVE = Path(__file__).parent / "data" / "stores-v0.1.0.zip"
#: Written by each run, not part of the layout: the writer's ledger of finished blocks.
LEDGER = ".srdvol-ledger.json"
#: Keys the record adds on its own: srdvol's input facts and the creation time.
ADDED = ("version", "input", "input_level", "input_channel", "dtype", "ngff", "run_id", "created")


@pytest.fixture
def old_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The 0.1.0 stores, unpacked; the working directory is theirs (they name ``in.zarr``)."""
    with zipfile.ZipFile(ARCHIVE) as archive:
        archive.extractall(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _files(root: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(root)): p
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != LEDGER
    }


def _document(path: Path) -> Any:
    document = json.loads(path.read_text())
    attrs = document.get("attributes", document)
    if isinstance(attrs, dict) and "srdvol" in attrs:
        attrs["srdvol"].pop("created")
    return document


@pytest.mark.parametrize("name", ["in.zarr", "out-0.5.zarr", "out-0.4.zarr"])
def test_old_stores_read_and_validate(old_stores, name):
    image = open_image(name)
    version = "0.4" if name.endswith("0.4.zarr") else "0.5"
    assert image.attrs["ngff_version"] == version
    assert image.dims == ("t", "y", "x") and image.shape == (32, 24, 24)
    assert image.attrs["scale"] == pytest.approx({"t": 1 / 0.3, "y": 1.0, "x": 1.0})
    assert image.attrs["axes_units"] == {"t": "second", "y": "micrometer", "x": "micrometer"}
    assert image.attrs["levels"] == 1
    raw = zarr.open_group(name, mode="r")["s0"][...]
    np.testing.assert_array_equal(image.values, raw)
    assert describe_image(name)["problems"] == []
    validate_ngff(name)
    record = read_provenance(name)
    assert record is not None and record["ngff"] == version
    assert make_run_id(record) == record["run_id"]  # the id still derives from the record


def test_old_simulation_record_and_outputs_reopen(old_stores):
    record = simulation_record("in.zarr")
    assert record is not None and record["offset"] == 100.0 and record["role"] == "noisy"
    assert simulation_record("out-0.5.zarr") is None
    assert read_masks("in.zarr") is None  # the noisy store has no labels
    for name in ("out-0.5.zarr", "out-0.4.zarr"):
        array = open_output_array(name)
        assert not array.read_only and array.shape == (32, 24, 24)


@pytest.mark.parametrize("ngff", ["0.5", "0.4"])
def test_new_output_has_the_old_layout(old_stores, ngff):
    old = old_stores / f"out-{ngff}.zarr"
    old_record = read_provenance(old)
    assert old_record is not None
    new = old_stores / f"new-{ngff}.zarr"
    array = create_output(
        new,
        like=open_image("in.zarr"),
        options=OutputOptions(ngff=ngff),
        provenance={k: v for k, v in old_record.items() if k not in ADDED},
    )
    array[...] = zarr.open_group(old, mode="r")["s0"][...]
    # the same run: a rerun after the upgrade resumes the old output rather than refusing it
    assert read_provenance(new)["run_id"] == old_record["run_id"]
    old_files, new_files = _files(old), _files(new)
    assert list(new_files) == list(old_files)
    for name, path in old_files.items():
        if path.name in ("zarr.json", ".zattrs", ".zarray", ".zgroup"):
            assert _document(new_files[name]) == _document(path), name
        else:  # chunks: the same codec writes the same bytes
            assert new_files[name].read_bytes() == path.read_bytes(), name
    validate_ngff(new)


MODEL = Path(__file__).parent / "data" / "model-v0.1.0.safetensors"


def test_a_model_written_by_010_loads_and_predicts_what_010_wrote(old_stores):
    """The 0.1.0 model file loads (its checksum is checked) and, run by today's engine, gives
    the output 0.1.0 wrote with it (the engine's rounding, not its blocks, may differ)."""
    from srdvol.dask.graph import denoise
    from srdvol.model.checkpoint import load_model, read_record
    from srdvol.predict.predictors import ModelPredictor, check_model

    record = read_record(MODEL)
    assert tuple(record.patch) == (16, 16, 16) and record.weights_sha256
    network, _ = load_model(MODEL)  # checks the weights against the recorded checksum
    assert sum(p.numel() for p in network.parameters()) > 0
    check_model(MODEL)
    image = open_image(old_stores / "in.zarr")
    lazy = denoise(image, ModelPredictor(MODEL, device="cpu"), patch=(16, 16, 16))
    written = zarr.open_array(old_stores / "out-0.5.zarr" / "s0", mode="r")[...]
    np.testing.assert_allclose(
        np.asarray(lazy.data.compute(scheduler="threads")), written, rtol=1e-5, atol=1e-3
    )
