"""Evaluation figure: frames side by side, a difference image, and cell traces with their gain.

Top row: noisy / denoised / truth frames (those given) at the same contrast with one shared
colour bar and a scale bar in the image's physical unit, then the difference denoised - truth
(or noisy - truth without a denoised image) on a symmetric scale with its own colour bar.
Bottom row: the traces of the most active cells (largest truth variance), one panel per cell,
time in the image's time unit (seconds for srdvol's simulations), each estimate labelled with
its correlation ``r`` and transient gain against the truth (:mod:`srdvol.core.traces`).

The figure is drawn with matplotlib's object API on an Agg canvas (no pyplot state, no display
needed) at a fixed size, :data:`FIGURE_SIZE` inches at :data:`DPI`. Only the shown frame and the
cell traces are loaded; the metrics are computed out of core by
:func:`srdvol.core.metrics.evaluate`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from srdvol.core.metrics import as_movie, cell_traces, evaluate
from srdvol.core.traces import fit_traces
from srdvol.errors import ConfigError
from srdvol.ngff.labels import read_masks
from srdvol.ngff.provenance import simulation_record

__all__ = ["DPI", "FIGURE_SIZE", "scale_bar_length", "write_report"]

#: Figure size in inches (width, height) and resolution: the PNG is 1600 x 900 pixels.
FIGURE_SIZE = (16.0, 9.0)
DPI = 100
_MAX_TRACES = 3
_STYLES = {
    "noisy": {"color": "tab:blue", "lw": 0.8, "alpha": 0.7},
    "denoised": {"color": "tab:orange", "lw": 1.3},
    "truth": {"color": "black", "lw": 1.3, "ls": "--"},
}
_UNIT_SYMBOLS = {"micrometer": "µm", "nanometer": "nm", "millimeter": "mm", "second": "s"}


def _open(image: Any) -> Any:
    """Open a store path with :func:`srdvol.ngff.read.open_image`; pass arrays through."""
    if isinstance(image, str | os.PathLike):
        from srdvol.ngff.read import open_image

        return open_image(image)
    return image


def _plane(data: Any) -> tuple[Any, int | None]:
    """The middle plane of every axis between t and (y, x), as a (t, y, x) dask array."""
    a = as_movie(data)
    index = tuple(n // 2 for n in a.shape[1:-2])
    plane = a[(slice(None), *index)] if index else a
    return plane, (index[0] if len(index) == 1 else None)


def _axis_scale(image: Any, axis: str) -> tuple[float, str] | None:
    """(step, unit symbol) of ``axis`` from a DataArray's ``scale`` and ``axes_units``."""
    attrs = getattr(image, "attrs", None) or {}
    step = (attrs.get("scale") or {}).get(axis)
    unit = (attrs.get("axes_units") or {}).get(axis)
    if step is None or not unit:
        return None
    return float(step), _UNIT_SYMBOLS.get(str(unit), str(unit))


def scale_bar_length(width: float) -> float:
    """A round length (1, 2 or 5 times a power of ten) close to a fifth of ``width``."""
    if not width > 0:
        raise ConfigError("width", f"{width!r} is not positive", "give the field of view's width")
    target = width / 5
    power = 10.0 ** np.floor(np.log10(target))
    return float(max(m * power for m in (1, 2, 5) if m * power <= target))


def _label(name: str, m: dict[str, float] | None) -> str:
    if m is None:
        return name
    text = f"{name}\nSNR {m['snr_db']:.2f} dB  SSIM {m['ssim']:.3f}"
    if "trace_r" in m:
        text += (
            f"\ncell r {m['trace_r']:.3f} gain {m['trace_gain']:.2f}"
            f"  pixel r {m['pixel_r']:.3f} gain {m['pixel_gain']:.2f}"
        )
    return text


def write_report(
    path_png: str | os.PathLike[str],
    *,
    noisy: Any = None,
    denoised: Any = None,
    truth: Any,
    masks: np.ndarray | None = None,
    frame: int | None = None,
    offset: float | None = None,
    metrics: dict[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Write a PNG comparing noisy, denoised and ground-truth data (module docstring).

    Parameters
    ----------
    path_png
        Where to write the figure (a PNG of :data:`FIGURE_SIZE` x :data:`DPI` pixels).
    noisy, denoised, truth
        Images as store paths (opened with :func:`srdvol.ngff.read.open_image`) or (t, ..., y, x)
        arrays / DataArrays of one shape. At least one of ``noisy`` and ``denoised`` is needed.
        Physical units (scale bar, time axis) come from the truth's ``scale`` and
        ``axes_units`` attributes; without them the figure counts pixels and frames.
    masks
        Cell labels (one time point's shape); read from the truth store's ``labels/`` when the
        truth is a path and ``masks`` is not given. Without labels no traces are drawn.
    frame
        Time index to show; default: the frame where the truth is brightest (most activity).
        With z (or c) axes the middle plane is shown.
    offset
        Detector baseline for the SNR; default: the truth store's simulation record, else 0.
    metrics
        Metrics already computed, as :func:`srdvol.app.evaluate.evaluate_stores` returns them
        (``{"estimate": ..., "noisy": ...}``) or keyed ``denoised`` / ``noisy``; only missing
        ones are computed.

    Returns
    -------
    dict
        The metrics shown: ``{"noisy": {...}, "denoised": {...}}`` for the images given (see
        :func:`srdvol.core.metrics.evaluate`).

    Raises
    ------
    ConfigError
        If neither ``noisy`` nor ``denoised`` is given.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if noisy is None and denoised is None:
        raise ConfigError("write_report", "has no image to show", "pass noisy and/or denoised")
    if isinstance(truth, str | os.PathLike):
        if masks is None:
            masks = read_masks(truth)
        if offset is None:
            offset = float((simulation_record(truth) or {}).get("offset", 0.0))
    offset = 0.0 if offset is None else offset
    images = {"noisy": _open(noisy), "denoised": _open(denoised), "truth": _open(truth)}
    shown = {k: v for k, v in images.items() if v is not None}
    known = dict(metrics or {})
    if "estimate" in known:
        known.setdefault("denoised", known["estimate"])
    scores = {
        k: known[k]
        if isinstance(known.get(k), dict)
        else evaluate(v, shown["truth"], masks=masks, offset=offset)
        for k, v in shown.items()
        if k != "truth"
    }
    planes = {k: _plane(v) for k, v in shown.items()}
    truth_plane, z = planes["truth"]
    if frame is None:
        frame = int(np.argmax(truth_plane.mean(axis=(1, 2)).compute()))
    frames = {k: np.asarray(p[frame].compute(), np.float64) for k, (p, _) in planes.items()}

    fig = Figure(figsize=FIGURE_SIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    outer = fig.add_gridspec(
        2, 1, height_ratios=(3, 2), hspace=0.3, left=0.04, right=0.97, top=0.9, bottom=0.07
    )
    _draw_frames(fig, outer[0], frames, scores, shown["truth"])
    when = _axis_scale(shown["truth"], "t")
    at = f"t = {frame * when[0]:.4g} {when[1]}" if when else f"frame {frame}"
    where = at + (f", plane z={z}" if z is not None else "")
    fig.suptitle(f"srdvol evaluation ({where}; one contrast for all frames)", fontsize=11)
    if masks is not None:
        _draw_traces(fig, outer[1], shown, np.asarray(masks), when)
    else:
        ax = fig.add_subplot(outer[1])
        ax.text(0.5, 0.5, "no cell labels: traces not shown", ha="center", va="center")
        ax.set_axis_off()
    fig.savefig(os.fspath(path_png), format="png", dpi=DPI)
    return scores


def _draw_frames(
    fig: Any, cell: Any, frames: dict[str, np.ndarray], scores: dict[str, Any], truth: Any
) -> None:
    """Frames at one contrast with a shared colour bar and a scale bar, then the difference."""
    low, high = np.percentile(frames["truth"], [0.5, 99.5])
    n = len(frames)
    ratios = (*([1.0] * n), 0.05, 0.25, 1.0, 0.05)
    grid = cell.subgridspec(1, n + 4, width_ratios=ratios, wspace=0.05)
    image = None
    for i, (name, data) in enumerate(frames.items()):
        ax = fig.add_subplot(grid[0, i])
        image = ax.imshow(data, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
        ax.set_title(_label(name, scores.get(name)), fontsize=8)
        ax.set_axis_off()
        _scale_bar(ax, data.shape[-1], _axis_scale(truth, "x"), "white")
    fig.colorbar(image, cax=fig.add_subplot(grid[0, n]), label="intensity (input units)")
    estimate = "denoised" if "denoised" in frames else "noisy"
    diff = frames[estimate] - frames["truth"]
    bound = float(np.percentile(np.abs(diff), 99.5)) or 1.0
    ax = fig.add_subplot(grid[0, n + 2])
    shown = ax.imshow(diff, cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest")
    ax.set_title(f"difference: {estimate} - truth\n(red: too bright, blue: too dark)", fontsize=8)
    ax.set_axis_off()
    _scale_bar(ax, diff.shape[-1], _axis_scale(truth, "x"), "black")
    fig.colorbar(shown, cax=fig.add_subplot(grid[0, n + 3]), label="difference")


def _scale_bar(ax: Any, width_px: int, scale: tuple[float, str] | None, colour: str) -> None:
    """A bar of a round physical length in the lower left corner, its length above it."""
    from matplotlib.offsetbox import AnchoredOffsetbox, AuxTransformBox, TextArea, VPacker
    from matplotlib.patches import Rectangle

    step, unit = scale if scale else (1.0, "px")
    length = scale_bar_length(width_px * step)
    box = AuxTransformBox(ax.transData)
    box.add_artist(Rectangle((0, 0), length / step, max(width_px / 80, 1.0), color=colour))
    text = TextArea(f"{length:g} {unit}", textprops={"color": colour, "fontsize": 8})
    packed = VPacker(children=[text, box], align="center", pad=0, sep=2)
    ax.add_artist(AnchoredOffsetbox(loc="lower left", child=packed, frameon=False, pad=0.4))


def _draw_traces(
    fig: Any,
    cell: Any,
    shown: dict[str, Any],
    masks: np.ndarray,
    when: tuple[float, str] | None,
) -> None:
    """One panel per most active cell: each image's trace, with r and gain against the truth."""
    traces = {k: cell_traces(v, masks) for k, v in shown.items()}
    truth = traces["truth"]
    present = np.bincount(masks.ravel(), minlength=truth.shape[1]) > 0
    present[0] = False  # the background
    variance = np.where(present, truth.var(axis=0), -1.0)
    ranked = np.argsort(variance)[::-1][:_MAX_TRACES]
    cells = [int(c) for c in ranked if variance[c] > 0]
    step, unit = when if when else (1.0, "frames")
    time = np.arange(truth.shape[0]) * step
    grid = cell.subgridspec(1, max(len(cells), 1), wspace=0.25)
    for i, label in enumerate(cells):
        ax = fig.add_subplot(grid[0, i])
        for name, trace in traces.items():
            text = name
            if name != "truth":
                r, gain = fit_traces(trace[:, [label]], traces["truth"][:, [label]])
                text += f" (r {r[0]:.3f}, gain {gain[0]:.2f})"
            ax.plot(time, trace[:, label], label=text, **_STYLES[name])
        ax.set_title(f"cell {label}", fontsize=9)
        ax.set_xlabel(f"time ({unit})")
        if i == 0:
            ax.set_ylabel("mean intensity in the cell")
        ax.legend(fontsize=7, loc="upper right")
