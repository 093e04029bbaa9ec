"""Evaluation figure: noisy / denoised / truth frames side by side, cell traces, metrics.

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
from srdvol.errors import ConfigError
from srdvol.ngff.labels import read_masks
from srdvol.ngff.provenance import simulation_record

__all__ = ["DPI", "FIGURE_SIZE", "write_report"]

#: Figure size in inches (width, height) and resolution: the PNG is 1400 x 800 pixels.
FIGURE_SIZE = (14.0, 8.0)
DPI = 100
_MAX_TRACES = 3


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


def _label(name: str, m: dict[str, float] | None) -> str:
    if m is None:
        return name
    text = f"{name}\nSNR {m['snr_db']:.2f} dB  PSNR {m['psnr_db']:.2f} dB  SSIM {m['ssim']:.3f}"
    if "trace_r" in m:
        text += f"  trace r {m['trace_r']:.3f}"
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
    """Write a PNG comparing noisy, denoised and ground-truth data.

    Parameters
    ----------
    path_png
        Where to write the figure (a PNG of :data:`FIGURE_SIZE` x :data:`DPI` pixels).
    noisy, denoised, truth
        Images as store paths (opened with :func:`srdvol.ngff.read.open_image`) or (t, ..., y, x)
        arrays / DataArrays of one shape. At least one of ``noisy`` and ``denoised`` is needed.
    masks
        Cell labels (one time point's shape); read from the truth store's ``labels/`` when the
        truth is a path and ``masks`` is not given. Without labels no traces are drawn.
    frame
        Time index to show; default: the frame where the truth is brightest (most activity).
        With z (or c) axes the middle plane is shown.
    offset
        Detector baseline for the SNR; default: the truth store's simulation record, else 0.
    metrics
        Metrics already computed, as :func:`srdvol.core.metrics.evaluate_stores` returns them
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
    low, high = np.percentile(frames["truth"], [0.5, 99.5])

    fig = Figure(figsize=FIGURE_SIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, len(shown), height_ratios=(3, 2))
    for i, (name, image) in enumerate(frames.items()):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(image, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
        ax.set_title(_label(name, scores.get(name)), fontsize=9)
        ax.set_axis_off()
    where = f"frame t={frame}" + (f", plane z={z}" if z is not None else "")
    fig.suptitle(f"srdvol evaluation ({where}; same contrast in every panel)", fontsize=11)
    ax = fig.add_subplot(grid[1, :])
    if masks is not None:
        _draw_traces(ax, shown, np.asarray(masks))
    else:
        ax.text(0.5, 0.5, "no cell labels: traces not shown", ha="center", va="center")
        ax.set_axis_off()
    fig.savefig(os.fspath(path_png), format="png", dpi=DPI)
    return scores


def _draw_traces(ax: Any, shown: dict[str, Any], masks: np.ndarray) -> None:
    """Mean traces of the most active cells (largest truth variance), one colour per cell."""
    traces = {k: cell_traces(v, masks) for k, v in shown.items()}
    truth = traces["truth"][:, 1:]
    variance = np.nan_to_num(np.nanvar(truth, axis=0), nan=-1.0)
    cells = np.argsort(variance)[::-1][:_MAX_TRACES] + 1
    styles = {"noisy": (":", 0.8), "denoised": ("--", 1.2), "truth": ("-", 1.8)}
    colours = ["tab:blue", "tab:orange", "tab:green"]
    for colour, cell in zip(colours, cells, strict=False):
        for name, trace in traces.items():
            style, width = styles[name]
            ax.plot(trace[:, cell], style, color=colour, lw=width, label=f"cell {cell} {name}")
    ax.set_xlabel("frame")
    ax.set_ylabel("mean intensity in the cell")
    ax.legend(fontsize=7, ncol=len(cells), loc="upper right")
