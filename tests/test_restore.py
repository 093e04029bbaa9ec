"""Tests for ``--restore``: srdvol.predict.restore on arrays, srdvol.dask.restoring on lazy ones."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest

from srdvol.core.traces import fit_traces
from srdvol.dask.restoring import restored, stretches
from srdvol.dask.writer import BlockDataError
from srdvol.predict.restore import noise_variance, restore, restore_halo, tile_starts

OFFSET, GAIN, READ = 100.0, 10.0, 5.0


def _scene(frames: int = 96, size: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """Round cells with their own activity on a flat background, photon counts of a camera
    (``OFFSET + GAIN * Poisson + Normal(0, READ)``) and the truth; ``masks`` labels the cells."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((size, size), np.int32)
    footprints, traces = [], []
    centres = [(14, 14), (14, 46), (46, 20), (44, 48), (30, 32)]
    for label, (cy, cx) in enumerate(centres, start=1):
        r2 = (yy - cy) ** 2 + (xx - cx) ** 2
        footprints.append(np.exp(-r2 / (2 * 4.0**2)))
        masks[r2 <= 16] = label
        spikes = (rng.random(frames) < 0.08) * rng.uniform(1, 3, frames)
        traces.append(np.convolve(spikes, [1.0, 0.4, 0.15])[:frames])
    photons = 0.5 + sum(
        4.0 * f[None] * (1 + c[:, None, None]) for f, c in zip(footprints, traces, strict=True)
    )
    truth = OFFSET + GAIN * photons
    noisy = OFFSET + GAIN * rng.poisson(photons) + rng.normal(0, READ, photons.shape)
    return {"noisy": noisy.astype(np.float32), "truth": truth.astype(np.float32), "masks": masks}


def _shrunk(truth: np.ndarray, keep: float) -> np.ndarray:
    """A denoiser that flattens every transient to ``keep`` of its height, with no noise."""
    mean = truth.mean(axis=0)
    return (mean + keep * (truth - mean)).astype(np.float32)


def _cell_gains(estimate: np.ndarray, truth: np.ndarray, masks: np.ndarray) -> np.ndarray:
    labels = range(1, int(masks.max()) + 1)
    cells = [masks == k for k in labels]
    e = np.stack([estimate[:, m].mean(axis=1) for m in cells], axis=1)
    g = np.stack([truth[:, m].mean(axis=1) for m in cells], axis=1)
    return fit_traces(e, g)[1]


@pytest.fixture(scope="module")
def scene() -> dict[str, np.ndarray]:
    return _scene()


def test_flattened_transients_come_back(scene):
    network = _shrunk(scene["truth"], 0.6)
    out = restore(scene["noisy"], network, scale=float(scene["noisy"].std()), tile=32, rank=4)
    before = _cell_gains(network, scene["truth"], scene["masks"])
    after = _cell_gains(out, scene["truth"], scene["masks"])
    np.testing.assert_allclose(before, 0.6, atol=1e-3)
    assert np.all((after > 0.9) & (after < 1.1)), after
    # and the noise does not come back with it: far closer to the truth than the input
    err_out = np.mean((out - scene["truth"]) ** 2)
    err_in = np.mean((scene["noisy"] - scene["truth"]) ** 2)
    assert err_out < 0.1 * err_in


def test_rank_zero_keeps_the_networks_amplitude(scene):
    network = _shrunk(scene["truth"], 0.6)
    out = restore(scene["noisy"], network, scale=float(scene["noisy"].std()), rank=0)
    gains = _cell_gains(out, scene["truth"], scene["masks"])
    assert np.all(gains < 0.7), gains


def test_static_image_is_the_inputs_level_in_the_networks_shape(scene):
    # a network whose mean is 5 % too bright: the static image follows the input's level
    network = _shrunk(scene["truth"], 1.0) * 1.05
    out = restore(scene["noisy"], network, scale=float(scene["noisy"].std()), rank=0)
    truth_mean = scene["truth"].mean(axis=0)
    assert abs(out.mean() / truth_mean.mean() - 1) < 0.01
    assert abs(network.mean() / truth_mean.mean() - 1) > 0.04


def test_noise_variance_finds_the_cameras_line():
    rng = np.random.default_rng(3)
    level = rng.uniform(0.1, 20, (32, 32))
    shape = (4000, 32, 32)
    counts = OFFSET + GAIN * rng.poisson(level, shape) + rng.normal(0, READ, shape)
    residual = counts - counts.mean(axis=0)
    variance = noise_variance(residual, counts.mean(axis=0), floor=1e-6)
    expected = GAIN * GAIN * level + READ * READ
    np.testing.assert_allclose(variance, expected, rtol=0.08)


def test_noise_variance_without_shot_noise_is_flat():
    rng = np.random.default_rng(4)
    residual = rng.normal(0, 2.0, (500, 16, 16))
    mean = np.linspace(0, 1, 256).reshape(16, 16)[::-1]  # no relation to the variance
    variance = noise_variance(residual, mean, floor=1e-6)
    assert variance.std() / variance.mean() < 0.1
    np.testing.assert_allclose(variance.mean(), 4.0, rtol=0.05)


@pytest.mark.parametrize(
    ("size", "tile", "expected"),
    [(64, 32, [0, 16, 32]), (70, 32, [0, 16, 32, 38]), (20, 32, [0]), (32, 32, [0])],
)
def test_tile_starts(size, tile, expected):
    starts = tile_starts(size, tile)
    assert starts == expected
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()


def test_a_region_with_its_halo_gives_the_whole_frames_values(scene):
    noisy, network = scene["noisy"], _shrunk(scene["truth"], 0.6)
    whole = restore(noisy, network, scale=50.0, tile=16)
    halo = restore_halo(16)
    y0, y1, x0, x1 = 24, 40, 8, 30  # a core away from the frame's edges on three sides
    region = np.s_[:, y0 - halo if y0 >= halo else 0 : y1 + halo, 0 : x1 + halo]
    origin = (region[1].start, 0)
    part = restore(
        noisy[region], network[region], scale=50.0, tile=16, origin=origin, frame=(64, 64)
    )
    core = part[:, y0 - origin[0] : y1 - origin[0], x0:x1]
    np.testing.assert_allclose(core, whole[:, y0:y1, x0:x1], rtol=1e-5, atol=1e-3)


def test_stretches():
    assert stretches(256, 16) == (256,)
    assert stretches(600, 16) == (256, 344)  # a remainder of 88 joins the stretch before
    assert stretches(700, 16) == (256, 256, 188)
    assert stretches(100, 16) == (100,)
    assert stretches(1000, 100) == (300, 300, 400)
    assert sum(stretches(12345, 7)) == 12345
    assert all(s % 7 == 0 for s in stretches(12345, 7)[:-1])


@pytest.mark.parametrize(
    ("dims", "blocks", "frame"),
    [
        ("tyx", (32, 16, 16), 64),
        ("tyx", (96, 64, 64), 64),
        ("tcyx", (16, 1, 32, 24), 64),
        ("tyx", (16, 8, 8), 12),  # a frame smaller than a tile and the halo
    ],
)
def test_lazy_restore_equals_one_whole_frame_pass(scene, dims, blocks, frame):
    noisy, network = scene["noisy"], _shrunk(scene["truth"], 0.6)
    noisy, network = noisy[:, :frame, :frame], network[:, :frame, :frame]
    if "c" in dims:  # two channels: the second the first upside down
        noisy = np.stack([noisy, noisy[:, ::-1]], axis=1)
        network = np.stack([network, network[:, ::-1]], axis=1)
    chunks = tuple(16 if a == "t" else 1 if a == "c" else 8 for a in dims)
    lazy = restored(
        da.from_array(noisy, chunks=blocks),
        da.from_array(network, chunks=blocks),
        dims=dims,
        scale=50.0,
        chunks=chunks,
    )
    assert all(c % 8 == 0 for c in lazy.chunks[-1][:-1])  # whole output chunks
    assert lazy.shape == noisy.shape
    with dask.config.set(scheduler="threads"):
        out = lazy.compute()
    t = dims.index("t")
    for lo, hi in zip(np.cumsum((0, *lazy.chunks[t][:-1])), np.cumsum(lazy.chunks[t]), strict=True):
        if "c" in dims:
            for c in range(2):
                whole = restore(noisy[lo:hi, c], network[lo:hi, c], scale=50.0)
                np.testing.assert_allclose(out[lo:hi, c], whole, rtol=1e-5, atol=1e-3)
        else:
            whole = restore(noisy[lo:hi], network[lo:hi], scale=50.0)
            np.testing.assert_allclose(out[lo:hi], whole, rtol=1e-5, atol=1e-3)


def test_lazy_restore_across_blocks_in_y_and_x_equals_one_whole_frame_pass():
    """Blocks in y and x each with the default tile's halo (the 64-px frames above fit in one):
    their cores join into exactly what one whole-frame pass gives."""
    scene = _scene(frames=32, size=128, seed=3)
    noisy, network = scene["noisy"], _shrunk(scene["truth"], 0.6)
    lazy = restored(
        da.from_array(noisy, chunks=(32, 48, 48)),
        da.from_array(network, chunks=(32, 48, 48)),
        dims="tyx",
        scale=50.0,
        chunks=(16, 8, 8),
    )
    assert lazy.numblocks == (1, 2, 2)  # 48 + 48 + 32 px, the last merged to hold a halo
    out = lazy.compute(scheduler="threads")
    whole = restore(noisy, network, scale=50.0)
    np.testing.assert_allclose(out, whole, rtol=1e-5, atol=1e-3)


def test_a_restored_block_with_nan_is_refused_naming_the_block(monkeypatch):
    import srdvol.dask.restoring as restoring

    def broken(noisy, denoised, **kwargs):
        out = restore(noisy, denoised, **kwargs)
        if kwargs["origin"][1] > 0:  # the right-hand blocks only
            out[3, 2, -1] = np.nan
        return out

    monkeypatch.setattr(restoring, "restore", broken)
    scene = _scene(frames=32, size=128)
    noisy, network = scene["noisy"], _shrunk(scene["truth"], 0.6)
    lazy = restored(  # 64-px blocks in x: the right one's region starts past x = 0
        da.from_array(noisy, chunks=(32, 128, 64)),
        da.from_array(network, chunks=(32, 128, 64)),
        dims="tyx",
        scale=50.0,
        chunks=(16, 8, 8),
    )
    assert lazy.numblocks == (1, 1, 2)
    left = lazy.blocks[0, 0, 0].compute(scheduler="sync")
    assert np.isfinite(left).all()
    with pytest.raises(
        BlockDataError, match=r"restore block \(0, 0, 1\) \(t=0:32, y=0:128, x=64:128\)"
    ):
        lazy.compute(scheduler="sync")


@pytest.mark.slow
def test_predict_restore_is_the_restored_network_output_and_is_recorded(
    tiny_model, tmp_path, monkeypatch, capsys
):
    """``srdvol predict --restore 2`` on a real cluster: the network's own output (``--anchor
    0``) restored as one whole-frame pass, and the option in the output's provenance."""
    import json

    import zarr
    from cli_run import run_cli

    from srdvol.model.checkpoint import read_record
    from srdvol.ngff.read import open_image
    from srdvol.simulate import simulate

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    noisy = tmp_path / "in.zarr"
    simulate(noisy, truth=tmp_path / "truth.zarr", frames=48, size=(40, 48), seed=5)
    common = ["--model", str(tiny_model), "--workers", "1", "--dashboard-address", ":0"]
    outputs = {"restore": ["--restore", "2", "--block", "16,24,24"], "plain": ["--anchor", "0"]}
    for name, extra in outputs.items():
        code, _, err = run_cli(
            capsys, "predict", str(noisy), str(tmp_path / f"{name}.zarr"), *common, *extra
        )
        assert code == 0, err
    written = {n: zarr.open_array(tmp_path / f"{n}.zarr" / "s0", mode="r")[...] for n in outputs}
    data = np.asarray(open_image(noisy).data, dtype=np.float32)
    scale = float(read_record(tiny_model).normalization.std)
    expected = restore(data, written["plain"].reshape(data.shape), scale=scale, rank=2)
    np.testing.assert_allclose(written["restore"].reshape(data.shape), expected, rtol=0, atol=1e-3)
    assert np.abs(expected - written["plain"].reshape(data.shape)).max() > 1e-2
    recorded = json.loads((tmp_path / "restore.zarr" / "zarr.json").read_text())["attributes"]
    parameters = recorded["srdvol"]["parameters"]
    assert parameters["restore"] == 2 and "anchor" not in parameters and "guide" not in parameters


@pytest.mark.parametrize(
    ("extra", "other"), [(["--guide", "2"], "--guide"), (["--anchor", "4"], "--anchor")]
)
def test_restore_with_guide_or_anchor_is_refused_in_one_sentence(tmp_path, capsys, extra, other):
    from cli_run import assert_one_clear_sentence, run_cli

    from srdvol.simulate import simulate

    noisy = tmp_path / "in.zarr"
    simulate(noisy, truth=tmp_path / "truth.zarr", frames=16, size=(32, 32), seed=1)
    out = tmp_path / "out.zarr"
    code, stdout, err = run_cli(
        capsys,
        "predict",
        str(noisy),
        str(out),
        "--model",
        "m.safetensors",
        "--restore",
        "4",
        *extra,
    )
    assert_one_clear_sentence(code, stdout, err, subject="--restore", words=f"leave out {other}")
    assert not out.exists()
