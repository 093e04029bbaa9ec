"""Tests of srdvol.simulate.scene: determinism, noise statistics, metadata, bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr
from ome_zarr_models.v05.image import Image
from ome_zarr_models.v05.labels import Labels

from srdvol.errors import ConfigError, OutputExistsError
from srdvol.simulate import simulate
from srdvol.simulate.scene import SceneConfig, _calcium_traces, noisy_frame


def _read(path) -> np.ndarray:
    return zarr.open_array(os.fspath(path) + "/s0", mode="r")[...]


def _labels(path) -> np.ndarray:
    return zarr.open_array(os.fspath(path) + "/labels/cells/s0", mode="r")[...]


def test_same_seed_any_chunking_gives_identical_stores(tmp_path):
    kw = {"frames": 20, "size": (40, 52), "seed": 3}
    simulate(tmp_path / "a", truth=tmp_path / "ta", chunks={"t": 3, "y": 16, "x": 20}, **kw)
    simulate(tmp_path / "b", truth=tmp_path / "tb", chunks={"t": 20, "y": 40, "x": 52}, **kw)
    assert zarr.open_array(os.fspath(tmp_path / "a/s0")).chunks == (3, 16, 20)
    np.testing.assert_array_equal(_read(tmp_path / "a"), _read(tmp_path / "b"))
    np.testing.assert_array_equal(_read(tmp_path / "ta"), _read(tmp_path / "tb"))
    np.testing.assert_array_equal(_labels(tmp_path / "ta"), _labels(tmp_path / "tb"))


def test_different_seeds_differ(tmp_path):
    kw = {"frames": 16, "size": (32, 32)}
    simulate(tmp_path / "a", truth=tmp_path / "ta", seed=0, **kw)
    simulate(tmp_path / "b", truth=tmp_path / "tb", seed=1, **kw)
    assert not np.array_equal(_read(tmp_path / "a"), _read(tmp_path / "b"))
    assert not np.array_equal(_read(tmp_path / "ta"), _read(tmp_path / "tb"))


def test_noise_is_poisson_plus_read_noise_around_the_truth(tmp_path):
    # Var(noisy | truth) = gain² * photons + read_noise² + 1/12 (rounding), E = truth.
    cfg = SceneConfig()
    info = simulate(tmp_path / "n", truth=tmp_path / "t", frames=24, size=(64, 64), photons=5.0)
    noisy = _read(tmp_path / "n").astype(np.float64)
    truth = _read(tmp_path / "t").astype(np.float64)
    assert _read(tmp_path / "n").dtype == np.uint16
    assert truth.min() >= info.offset  # no clipping at 0 to bias the statistics
    resid = noisy - truth
    photons = (truth - info.offset) / info.gain
    assert abs(resid.mean()) < 0.02 * resid.std()
    assert abs(photons.mean() - 5.0) < 2.5  # activity makes the mean brighter than at rest
    # Regress squared residuals on expected photons: the slope is gain².
    slope, _ = np.polyfit(photons.ravel(), (resid**2).ravel(), 1)
    assert slope == pytest.approx(cfg.gain**2, rel=0.05)
    expected_var = cfg.gain**2 * photons.mean() + cfg.read_noise**2 + 1 / 12
    assert (resid**2).mean() == pytest.approx(expected_var, rel=0.02)
    # Without photons only the read noise (and rounding) is left around the offset.
    dark = noisy_frame(np.zeros((256, 256)), seed=0, t=0, z=0, cfg=cfg).astype(np.float64)
    assert dark.mean() == pytest.approx(cfg.offset, abs=0.1)
    assert dark.std() == pytest.approx(np.sqrt(cfg.read_noise**2 + 1 / 12), rel=0.02)


def test_stores_are_valid_ome_zarr_with_physical_metadata_and_labels(tmp_path):
    info = simulate(
        tmp_path / "n",
        truth=tmp_path / "t",
        frames=16,
        planes=3,
        size=(40, 40),
        rate_hz=0.5,
        pixel_size_um=0.8,
    )
    assert info.shape == (16, 3, 40, 40) and info.dims == ("t", "z", "y", "x")
    for name in ("n", "t"):
        group = zarr.open_group(os.fspath(tmp_path / name), mode="r")
        Image.from_zarr(group)
        ms = group.attrs["ome"]["multiscales"][0]
        assert [a["name"] for a in ms["axes"]] == ["t", "z", "y", "x"]
        scale = ms["datasets"][0]["coordinateTransformations"][0]["scale"]
        assert scale[0] == pytest.approx(2.0) and scale[2:] == pytest.approx([0.8, 0.8])
        assert ms["axes"][0]["unit"] == "second" and ms["axes"][3]["unit"] == "micrometer"
    assert _read(tmp_path / "t").dtype == np.float32
    Labels.from_zarr(zarr.open_group(os.fspath(tmp_path / "t/labels"), mode="r"))
    labels = _labels(tmp_path / "t")
    assert labels.shape == (3, 40, 40) and labels.dtype == np.int32
    present = np.unique(labels[labels > 0])
    assert present.size > 0 and present.max() <= info.n_cells
    # Cells are brighter than the background in the truth, on average.
    truth = _read(tmp_path / "t").mean(axis=0)
    assert truth[labels > 0].mean() > truth[labels == 0].mean()


def test_low_volume_rate_makes_frames_nearly_independent():
    cfg = SceneConfig()
    rng = np.random.default_rng(0)
    slow = _calcium_traces(rng, cfg, 50, 2000, 0.3)
    fast = _calcium_traces(np.random.default_rng(0), cfg, 50, 2000, 30.0)

    def lag1(x: np.ndarray) -> float:
        x = x - x.mean(axis=1, keepdims=True)
        x = x[(x * x).sum(1) > 0]  # sources without any event in this stretch
        return float(np.mean((x[:, 1:] * x[:, :-1]).sum(1) / (x * x).sum(1)))

    assert lag1(slow) < 0.2
    assert lag1(fast) > 0.8
    assert (slow > 0).mean() > 0.05  # the traces are not empty


@pytest.mark.parametrize(
    ("kw", "option"),
    [
        ({"photons": -1.0}, "photons"),
        ({"rate_hz": 0.0}, "rate_hz"),
        ({"size": (0, 10)}, "size"),
        ({"frames": 0}, "frames"),
    ],
)
def test_bad_options_raise_config_error_and_write_nothing(tmp_path, kw, option):
    with pytest.raises(ConfigError, match=f"^{option}: ") as info:
        simulate(tmp_path / "n", truth=tmp_path / "t", **kw)
    flag = "--" + option.replace("_", "-")
    assert info.value.command_line_message().startswith(f"{flag}: ")
    assert not (tmp_path / "n").exists() and not (tmp_path / "t").exists()


def test_existing_foreign_store_is_refused_before_anything_is_written(tmp_path):
    simulate(tmp_path / "t", truth=tmp_path / "x", frames=16, size=(24, 24))
    with pytest.raises(OutputExistsError, match="pass overwrite"):
        simulate(tmp_path / "n", truth=tmp_path / "t", frames=16, size=(24, 24))
    assert not (tmp_path / "n").exists()
    # The same simulation again is accepted (it rewrites identical data), --overwrite replaces.
    before = _read(tmp_path / "t")
    simulate(tmp_path / "t", truth=tmp_path / "x", frames=16, size=(24, 24))
    np.testing.assert_array_equal(_read(tmp_path / "t"), before)
    simulate(tmp_path / "n", truth=tmp_path / "t", frames=16, size=(24, 24), overwrite=True)
    assert _read(tmp_path / "t").dtype == np.float32


_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    from srdvol.simulate import simulate
    out, truth, frames = sys.argv[1], sys.argv[2], int(sys.argv[3])
    info = simulate(out, truth=truth, frames=frames, size=(256, 256), chunks={"t": 4})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"peak": peak, "bytes": frames * 256 * 256 * (2 + 4)}))
    """
)


@pytest.mark.slow
def test_memory_stays_flat_when_the_store_grows(tmp_path):
    def run(frames: int) -> dict[str, int]:
        args = [
            sys.executable,
            "-c",
            _CHILD,
            str(tmp_path / f"n{frames}"),
            str(tmp_path / f"t{frames}"),
            str(frames),
        ]
        done = subprocess.run(args, capture_output=True, text=True, check=True, timeout=240)
        return json.loads(done.stdout.strip().splitlines()[-1])

    small, big = run(200), run(1000)
    grown = big["bytes"] - small["bytes"]
    assert big["bytes"] >= 380e6  # uint16 noisy + float32 truth actually written
    assert zarr.open_array(os.fspath(tmp_path / "n1000/s0")).shape == (1000, 256, 256)
    # 5x the output, same peak memory (within 10 % of the growth; measured: ~1 %).
    assert big["peak"] - small["peak"] < 0.1 * grown, (small, big)


def test_a_frame_much_smaller_than_the_neuropil_scale_simulates(tmp_path):
    """12 x 12 pixels against neuropil fields tens of pixels wide: once an overflow (a smooth
    field divided by its tiny std), an internal error and a half-written store."""
    info = simulate(tmp_path / "n.zarr", truth=tmp_path / "t.zarr", frames=16, size=(12, 12))
    truth = np.asarray(zarr.open_array(tmp_path / "t.zarr" / "s0", mode="r")[...])
    assert truth.shape == (16, 12, 12) and np.isfinite(truth).all()
    assert truth.min() >= info.offset
