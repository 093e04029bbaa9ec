"""Tests of srdvol.app.report: the evaluation figure is written, sized and filled as documented."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr
from matplotlib.image import imread
from scipy import ndimage

from srdvol.app.report import DPI, FIGURE_SIZE, write_report
from srdvol.simulate import simulate

WIDTH, HEIGHT = int(FIGURE_SIZE[0] * DPI), int(FIGURE_SIZE[1] * DPI)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    simulate(root / "noisy", truth=root / "truth", frames=16, planes=2, size=(48, 48), seed=2)
    return root


def _read(path) -> np.ndarray:
    return zarr.open_array(os.fspath(path) + "/s0", mode="r")[...]


def test_report_from_store_paths_is_a_png_of_the_documented_size(stores, tmp_path):
    noisy = _read(stores / "noisy").astype(np.float32)
    denoised = ndimage.gaussian_filter(noisy, (0, 0, 1.0, 1.0))  # a crude but real denoiser
    png = tmp_path / "report.png"
    metrics = write_report(png, noisy=stores / "noisy", denoised=denoised, truth=stores / "truth")
    assert png.stat().st_size > 10_000
    image = imread(png)
    assert image.shape[:2] == (HEIGHT, WIDTH)
    assert image[..., :3].std() > 0.05  # frames and traces were drawn, not a blank canvas
    assert set(metrics) == {"noisy", "denoised"}
    assert "trace_r" in metrics["noisy"]  # labels were found in the truth store
    assert metrics["denoised"]["snr_db"] > metrics["noisy"]["snr_db"]


def test_report_without_denoised_or_labels_still_draws(stores, tmp_path):
    noisy = _read(stores / "noisy")[:, 0]
    truth = _read(stores / "truth")[:, 0]
    png = tmp_path / "plain.png"
    metrics = write_report(png, noisy=noisy, truth=truth, frame=3)
    assert imread(png).shape[:2] == (HEIGHT, WIDTH)
    assert set(metrics) == {"noisy"} and "trace_r" not in metrics["noisy"]


def test_report_traces_differ_from_a_blank_trace_panel(stores, tmp_path):
    # The trace panel (lower part) has drawn lines only when labels are given.
    noisy, truth = _read(stores / "noisy"), _read(stores / "truth")
    labels = zarr.open_array(os.fspath(stores / "truth/labels/cells/s0"))[...]
    with_traces, without = tmp_path / "a.png", tmp_path / "b.png"
    write_report(with_traces, noisy=noisy, truth=truth, masks=labels, frame=0)
    write_report(without, noisy=noisy, truth=truth, frame=0)
    lower = slice(int(HEIGHT * 0.65), int(HEIGHT * 0.95))
    a, b = imread(with_traces)[lower, :, :3], imread(without)[lower, :, :3]
    coloured = lambda im: (im.max(axis=-1) - im.min(axis=-1) > 0.2).mean()  # noqa: E731
    assert coloured(a) > 0.001 and coloured(b) < coloured(a) / 10


def test_pipeline_call_style_with_estimate_and_precomputed_metrics(stores, tmp_path):
    from srdvol.app.evaluate import evaluate_stores
    from srdvol.errors import ConfigError

    result = evaluate_stores(stores / "noisy", truth=stores / "truth", noisy=stores / "noisy")
    result["estimate"] = {**result["estimate"], "snr_db": 99.0}  # shown as given, not recomputed
    png = tmp_path / "p.png"
    shown = write_report(
        png, denoised=stores / "noisy", truth=stores / "truth", noisy=None, metrics=result
    )
    assert shown["denoised"]["snr_db"] == 99.0 and "noisy" not in shown
    assert imread(png).shape[:2] == (HEIGHT, WIDTH)
    with pytest.raises(ConfigError, match="no image"):
        write_report(png, truth=stores / "truth")
