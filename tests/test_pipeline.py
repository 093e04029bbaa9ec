"""End to end through the command line (denoise with a live dashboard, a rerun of a finished run
does nothing), and ``srdvol info``: what will be written (levels, dtype, chunks, size) and what
it costs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import validate_ngff

from srdvol.app.checks import default_model_path
from srdvol.options import RunOptions
from srdvol.simulate import simulate


def _srdvol(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "srdvol"), *args]


@pytest.mark.slow
def test_denoise_serves_the_dashboard_while_running_and_a_finished_run_is_not_redone(tmp_path):
    # A rerun of a *finished* run: nothing is computed again and nothing changes. Resuming a
    # run killed mid-write is tests/test_interrupt.py::test_a_predict_killed_mid_write_...
    noisy, truth, out = tmp_path / "noisy.zarr", tmp_path / "truth.zarr", tmp_path / "den.zarr"
    simulate(noisy, truth=truth, frames=32, size=(48, 48), seed=3)
    argv = _srdvol(
        "denoise",
        str(noisy),
        str(out),
        "--patch",
        "16,32,32",
        "--steps",
        "3",
        "--batch-size",
        "1",
        "--workers",
        "1",
        "--dashboard-address",
        ":0",
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    process = subprocess.Popen(
        argv, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    status = None
    lines = []
    try:
        for line in process.stderr:
            lines.append(line)
            if line.startswith("dashboard: "):
                url = line.split(" ", 1)[1].strip()
                with urllib.request.urlopen(url, timeout=30) as response:
                    status = response.status
                break
        rest, _ = process.communicate(timeout=600)
    finally:
        process.kill()
    assert status == 200, "".join(lines)
    assert process.returncode == 0, "".join(lines) + rest

    model = default_model_path(out)
    assert model.exists()
    group = zarr.open_group(out, mode="r")
    provenance = group.attrs["srdvol"]
    assert provenance["command"] == "denoise"
    assert len(provenance["model_sha256"]) == 64
    assert provenance["training"]["steps"] == 3
    first = np.asarray(group["s0"])
    assert np.isfinite(first).all() and first.shape == (32, 48, 48)

    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "0 block(s) computed" in again.stderr
    np.testing.assert_array_equal(np.asarray(zarr.open_group(out, mode="r")["s0"]), first)


def test_public_api_open_train_denoise(tmp_path):
    import srdvol
    import srdvol.training.loop  # a submodule import must not shadow the function srdvol.train
    from srdvol.model.config import NetworkConfig

    assert srdvol.train is srdvol.training.loop.train

    noisy, truth = tmp_path / "noisy.zarr", tmp_path / "truth.zarr"
    simulate(noisy, truth=truth, frames=32, size=(32, 32), seed=1)
    image = srdvol.open(noisy)
    assert image.dims == ("t", "y", "x") and image.chunks is not None  # lazy, labelled
    record = srdvol.train(
        noisy,
        tmp_path / "m.safetensors",
        patch=(16, 16, 16),
        steps=2,
        batch_size=1,
        network=NetworkConfig.tiny(patch_t=16),
        progress=False,
    )
    assert tuple(record.patch) == (16, 16, 16)
    denoised = srdvol.denoise(image, tmp_path / "m.safetensors")
    assert denoised.dims == image.dims and denoised.dtype == np.float32
    assert denoised.data.dask is not None  # still lazy
    values = denoised.compute().values
    assert values.shape == image.shape and np.isfinite(values).all()
    assert not np.allclose(values, image.values)  # the model changed the data
    assert set(srdvol.__all__) == {"__version__", "open", "train", "denoise"}


# ---- srdvol info says what will be written and what it costs


def _levels(text: str) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """The (path, shape, chunks) of every level ``info`` lists."""
    found = re.findall(r"(s\d+) \(([\d, ]+)\) in chunks \(([\d, ]+)\)", text)
    return [(name, _ints(shape), _ints(chunks)) for name, shape, chunks in found]


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _number(text: str, pattern: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in:\n{text}"
    return float(match.group(1))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("size", "ngff", "dtype", "expected"),
    [
        ((40, 40), "0.5", "float32", [(40, 40)]),  # at most 64 px: level 0 only
        ((96, 80), "0.4", "input", [(96, 80), (48, 40)]),  # the demo's kind of frame
        ((130, 70), "0.5", "float32", [(130, 70), (65, 35), (33, 18)]),
    ],
)
def test_info_lists_exactly_the_levels_predict_writes(
    tmp_path, make_image, tiny_model, one_worker, size, ngff, dtype, expected
):
    from srdvol.app.commands import run_predict
    from srdvol.app.info import info_text

    source, _ = make_image(axes="tyx", shape=(16, *size), dtype="uint16", chunks=(16, 32, 32))
    options = RunOptions.from_flat({"patch": (16, 16, 16), "dtype": dtype, "ngff": ngff})
    text = info_text(source, options)
    written_dtype = "uint16" if dtype == "input" else dtype
    assert f"write      {written_dtype} OME-Zarr, NGFF {ngff}" in text
    assert "blosc-zstd level 3, bitshuffle" in text
    listed = _levels(text)
    assert [shape[1:] for _, shape, _ in listed] == expected

    out = str(tmp_path / "out.zarr")
    report = run_predict(source, out, options, model=tiny_model, client=one_worker)
    group = zarr.open_group(out, mode="r")
    written = [(name, group[name].shape, group[name].chunks) for name in sorted(group.array_keys())]
    assert written == listed
    assert all(group[name].dtype == np.dtype(written_dtype) for name, _, _ in listed)
    assert max(listed[-1][1][1:]) <= 64
    assert report.total == int(_number(text, r"blocks: (\d+) of"))
    # the task count is that of the graph predict builds
    from srdvol.dask.graph import denoise
    from srdvol.ngff.read import open_image
    from srdvol.predict.predictors import AffineModel

    lazy = denoise(open_image(source), AffineModel(), patch=(16, 16, 16), chunks=group["s0"].chunks)
    assert len(lazy.data.__dask_graph__()) == int(_number(text, r"(\d+) dask tasks"))
    model = validate_ngff(out)
    assert [d.path for d in model.ome_attributes.multiscales[0].datasets] == [n for n, *_ in listed]
    # The size estimate is an estimate: it must be the right order of magnitude.
    stored = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    estimate = _number(text, r"about ([\d.]+) KiB on disk") * 1024
    assert stored / 3 < estimate < stored * 3


def test_info_shows_what_a_high_overlap_costs(make_plain_array, capsys):
    from srdvol.app.cli import main
    from srdvol.core.cost import plan_cost
    from srdvol.core.tiling import plan_blocks

    source, _ = make_plain_array(shape=(32, 64, 64), chunks=(16, 64, 64))
    costs = {}
    for overlap in (0.25, 0.95):
        try:
            main(
                ["info", source, "--axes", "tyx", "--patch", "16,32,32", "--overlap", f"{overlap}"]
            )
        except SystemExit as exited:  # typer may exit 0 after printing
            assert exited.code in (0, None)
        text = capsys.readouterr().out
        plan = plan_blocks(
            (32, 64, 64),
            dims="tyx",
            patch={"t": 16, "y": 32, "x": 32},
            overlap=overlap,
            chunks=(16, 64, 64),
        )
        cost = plan_cost(plan)
        shown = _number(text, r"([\d.]+) model voxels per output voxel in one whole-array pass")
        assert shown == pytest.approx(cost.lattice_ratio, abs=0.005)
        assert _number(text, r"([\d.]+) as computed now") == pytest.approx(
            cost.computed_ratio, abs=0.005
        )
        assert _number(text, r"([\d.]+) bytes read per input byte") == pytest.approx(
            cost.read_ratio, abs=0.005
        )
        assert f"overlap {overlap:g}" in text
        costs[overlap] = shown
    # stride 1 along t and 2 along y, x: 17 x 17 x 17 patches of 16 x 32 x 32 voxels
    assert costs[0.95] == pytest.approx(17**3 * 16 * 32 * 32 / (32 * 64 * 64), abs=0.005)
    assert costs[0.95] > 100 * costs[0.25] / 3


def test_info_says_when_the_patch_is_larger_than_the_movie(make_image):
    from srdvol.app.info import info_text

    source, _ = make_image(axes="tyx", shape=(32, 96, 96), chunks=(16, 96, 96))
    text = info_text(source)  # the default patch (64, 128, 128)
    assert "patch (64, 128, 128)" in text
    assert "padding    y 96 -> 128, x 96 -> 128 (reflect)" in text
    assert "the movie has 32 frames, fewer than patch_t 64" in text
    assert "--patch 32,128,128" in text
    # an image that fits the patch has neither note
    quiet = info_text(source, RunOptions.from_flat({"patch": (16, 64, 64)}))
    assert "padding" not in quiet and "problem" not in quiet


def test_info_refuses_an_unknown_output_format(make_image):
    from srdvol.app.info import info_text
    from srdvol.errors import ConfigError

    source, _ = make_image(axes="tyx", shape=(16, 32, 32))
    with pytest.raises(ConfigError, match=r"^ngff: "):
        info_text(source, RunOptions.from_flat({"ngff": "0.3"}))
    with pytest.raises(ConfigError, match=r"^dtype: "):
        info_text(source, RunOptions.from_flat({"dtype": "complex64"}))


@pytest.mark.slow
def test_demo_runs_end_to_end_on_one_single_threaded_worker(tmp_path, monkeypatch, capsys):
    # The demo's own sizes take minutes; a smaller recording runs the same code path.
    from srdvol.app import commands, demo

    monkeypatch.setitem(demo.DEMO, "frames", 32)
    monkeypatch.setitem(demo.DEMO, "size", (32, 32))
    monkeypatch.setitem(demo.DEMO, "patch", (16, 32, 32))
    started = []
    opened = commands.cluster_session

    def spy(cluster, client=None):
        if client is None:  # a cluster is started, not reused
            started.append(cluster)
        return opened(cluster, client)

    monkeypatch.setattr(commands, "cluster_session", spy)
    result = demo.run_demo(tmp_path / "demo", steps=2, workers=1)
    assert len(started) == 1  # one cluster trains and predicts
    assert started[0].workers == 1
    assert started[0].threads_per_worker == 1  # one torch thread: robust on a busy machine
    assert started[0].dashboard_address == "127.0.0.1:0"
    assert np.isfinite(result["estimate"]["snr_db"]) and np.isfinite(result["noisy"]["snr_db"])
    err = capsys.readouterr().err
    assert "SNR gain:" in err and "levels     s0 (32, 32, 32)" in err
    assert (tmp_path / "demo" / "report.png").stat().st_size > 0


def test_info_scales_the_task_count_of_a_large_plan_from_a_corner(tmp_path, monkeypatch):
    from srdvol.app import info

    source = str(tmp_path / "large.zarr")  # no chunk written: info reads metadata and one chunk
    zarr.create_array(source, shape=(320, 2, 640, 640), chunks=(16, 1, 128, 128), dtype="uint16")
    options = RunOptions.from_flat({"axes": "tzyx", "patch": (16, 32, 32), "block": (32, 128, 128)})
    exact = info.info_text(source, options)
    blocks = int(_number(exact, r"blocks: (\d+) of"))
    assert blocks == 10 * 2 * 2 * 2  # blocks align to the output's 512 px plane chunks
    monkeypatch.setattr(info, "_EXACT_TASK_BLOCKS", 10)
    scaled = info.info_text(source, options)
    assert "about" in scaled and "about" not in exact.split("dask tasks")[0].splitlines()[-1]
    tasks = _number(exact, r"(\d+) dask tasks")
    estimate = _number(scaled, r"about (\d+) dask tasks")
    assert 0.8 * tasks <= estimate <= tasks
