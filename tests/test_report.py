"""Tests of srdvol.app.report: the evaluation figure is written, sized and filled as documented."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr
from matplotlib.image import imread
from scipy import ndimage

from srdvol.app.report import DPI, FIGURE_SIZE, scale_bar_length, write_report
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


@pytest.fixture
def drawn(monkeypatch):
    """The matplotlib Figure each write_report call saves, for inspection."""
    from matplotlib.figure import Figure

    figures = []
    save = Figure.savefig

    def keep(self, *args, **kwargs):
        figures.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def _texts(fig) -> list[str]:
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text)]


def test_report_shows_three_frames_a_difference_seconds_micrometres_and_gains(
    stores, tmp_path, drawn
):
    noisy = _read(stores / "noisy").astype(np.float32)
    denoised = ndimage.gaussian_filter(noisy, (0, 0, 2.0, 2.0))
    write_report(
        tmp_path / "r.png", noisy=stores / "noisy", denoised=denoised, truth=stores / "truth"
    )
    fig = drawn[-1]
    texts = _texts(fig)
    titles = [ax.get_title() for ax in fig.axes]
    for name in ("noisy", "denoised", "truth"):
        assert any(t.startswith(name) for t in titles), name
    assert any(t.startswith("difference: denoised - truth") for t in titles)
    # The simulation's pixels are 1 µm: a 48 px frame gets a round 5 µm bar, one per frame.
    assert sum(t == "5 µm" for t in texts) == 4
    # One shared colour bar for the three frames, one for the difference.
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert labels.count("intensity (input units)") == 1 and labels.count("difference") == 1
    traces = [ax for ax in fig.axes if ax.get_xlabel()]
    assert traces and all(ax.get_xlabel() == "time (s)" for ax in traces)
    # 16 frames at 0.3 Hz: the time axis runs to 15 / 0.3 = 50 s, not to frame 15.
    line = traces[0].get_lines()[0]
    assert line.get_xdata()[-1] == pytest.approx(50.0)
    legend = [t.get_text() for t in traces[0].get_legend().get_texts()]
    assert any(t.startswith("denoised (r ") and ", gain " in t for t in legend)
    assert any(t.startswith("noisy (r ") for t in legend) and "truth" in legend


def test_report_of_plain_arrays_counts_pixels_and_frames(stores, tmp_path, drawn):
    noisy, truth = _read(stores / "noisy")[:, 0], _read(stores / "truth")[:, 0]
    labels = zarr.open_array(os.fspath(stores / "truth/labels/cells/s0"))[0]
    write_report(tmp_path / "r.png", noisy=noisy, truth=truth, masks=labels, frame=2)
    fig = drawn[-1]
    assert "5 px" in _texts(fig)
    assert any(t.startswith("difference: noisy - truth") for t in (a.get_title() for a in fig.axes))
    assert {ax.get_xlabel() for ax in fig.axes if ax.get_xlabel()} == {"time (frames)"}


@pytest.mark.parametrize(
    ("width", "bar"), [(48, 5), (128, 20), (100, 20), (1000, 200), (7, 1), (0.3, 0.05)]
)
def test_scale_bar_is_a_round_length_near_a_fifth_of_the_width(width, bar):
    assert scale_bar_length(width) == pytest.approx(bar)


def test_scale_bar_of_nothing_is_refused():
    from srdvol.errors import ConfigError

    with pytest.raises(ConfigError, match="width"):
        scale_bar_length(0.0)
