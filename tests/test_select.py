"""Reading a part of the input (--t/--z/--c/--y/--x): only its chunks are read, the output equals
denoising that part on its own, and it lines up with the whole input (translation, provenance)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from srdvol.app.cli import main
from srdvol.errors import InputError
from srdvol.ngff.read import open_image
from srdvol.ngff.storecheck import check_chunks


def _cli(*args: str) -> None:
    try:
        main(list(args))
    except SystemExit as exc:
        assert not exc.code, exc.code


def _transforms(path: Path) -> dict[str, list[float]]:
    attrs = json.loads((path / "zarr.json").read_text())["attributes"]["ome"]
    dataset = attrs["multiscales"][0]["datasets"][0]
    return {t["type"]: t[t["type"]] for t in dataset["coordinateTransformations"]}


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    """A (t, z, y, x) recording in chunks of (8, 1, 16, 16)."""
    from srdvol.simulate import simulate

    root = tmp_path_factory.mktemp("select")
    simulate(
        root / "in.zarr",
        truth=root / "truth.zarr",
        frames=40,
        planes=3,
        size=(40, 48),
        seed=4,
        chunks={"t": 8, "z": 1, "y": 16, "x": 16},
    )
    return root / "in.zarr"


@pytest.mark.slow
def test_a_selected_run_equals_denoising_that_part_alone_and_lines_up(
    volume, tiny_model, tmp_path, monkeypatch
):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    common = ["--model", str(tiny_model), "--workers", "1", "--dashboard-address", ":0"]
    out = tmp_path / "part.zarr"
    part = ["--t", "4:28", "--z", "1", "--y", "8:40", "--x", "16:"]
    _cli("predict", str(volume), str(out), *part, *common)

    # the same part, cut out with numpy and stored as an array of its own
    data = zarr.open_array(volume / "s0", mode="r")[4:28, 1:2, 8:40, 16:48]
    alone = tmp_path / "alone.zarr"
    zarr.create_array(alone, data=data, chunks=(8, 1, 16, 16))
    reference = tmp_path / "reference.zarr"
    _cli("predict", str(alone), str(reference), "--axes", "tzyx", *common)

    got = zarr.open_array(out / "s0", mode="r")[...]
    expected = zarr.open_array(reference / "s0", mode="r")[...]
    assert got.shape == (24, 1, 32, 32)
    np.testing.assert_array_equal(got, expected)

    whole = _transforms(volume)
    placed = _transforms(out)
    assert placed["scale"] == whole["scale"]
    starts = [4, 1, 8, 16]
    expect = [
        w + s * k for w, s, k in zip(whole["translation"], whole["scale"], starts, strict=True)
    ]
    assert placed["translation"] == pytest.approx(expect)  # lines up with the input in a viewer
    record = json.loads((out / "zarr.json").read_text())["attributes"]["srdvol"]
    assert record["parameters"]["select"] == {"t": "4:28", "z": "1:2", "y": "8:40", "x": "16:"}


def test_only_the_chunks_of_the_part_are_needed(volume, tmp_path):
    import shutil

    copy = tmp_path / "holes.zarr"
    shutil.copytree(volume, copy)
    (copy / "s0" / "c" / "0" / "0" / "0" / "0").unlink()  # t 0:8, z 0, y 0:16, x 0:16
    with pytest.raises(InputError, match="missing"):
        check_chunks(open_image(copy))
    part = open_image(copy, select={"t": "8:", "z": "1:3"})
    assert check_chunks(part).count == 0  # the hole lies outside the part
    assert part.shape == (32, 2, 40, 48)
    assert part.attrs["selection"] == {"t": [8, 40], "z": [1, 3]}
    np.testing.assert_array_equal(part.values, zarr.open_array(volume / "s0", mode="r")[8:, 1:3])


@pytest.mark.parametrize(
    ("select", "words"),
    [
        ({"t": "30:50"}, "t 30:50 is outside the axis (indices 0 to 39)"),
        ({"c": "0"}, "no c axis"),
        ({"t": "0:10"}, "10 frames, fewer than the 16"),
    ],
)
def test_a_part_outside_the_image_is_one_sentence(volume, select, words):
    with pytest.raises(InputError) as info:
        open_image(volume, select=select)
    assert words in str(info.value)
