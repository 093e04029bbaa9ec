"""``srdvol evaluate``: score image stores against a ground-truth store (the metrics themselves,
out of core, are :mod:`srdvol.core.metrics`'s)."""

from __future__ import annotations

import math
import os
from typing import Any

from srdvol.core.metrics import evaluate

__all__ = ["evaluate_stores", "format_metrics"]


def evaluate_stores(
    path: str | os.PathLike[str],
    *,
    truth: str | os.PathLike[str],
    noisy: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Evaluate an image store (and optionally the noisy input) against a ground-truth store.

    Parameters
    ----------
    path
        The OME-Zarr image to score (usually the denoised output).
    truth
        The ground-truth OME-Zarr image. Its cell labels (``labels/``) give ``trace_r``, its
        ``simulation`` record the detector ``offset`` for the SNR (0 when absent).
    noisy
        The noisy input, scored too so the gain is visible.

    Returns
    -------
    dict
        ``{"estimate": metrics, "noisy": metrics (if given), "offset": float, "truth": str,
        "path": str}``; metrics as :func:`srdvol.core.metrics.evaluate` returns them.

    Raises
    ------
    InputError
        If an image's shape differs from the truth's (message names both stores).
    StoreNotFoundError
        If a path is not an image store.
    """
    from srdvol.ngff.labels import read_masks
    from srdvol.ngff.provenance import simulation_record
    from srdvol.ngff.read import open_image

    truth_img = open_image(truth)
    masks = read_masks(truth)
    record = simulation_record(truth) or {}
    offset = float(record.get("offset", 0.0))
    result: dict[str, Any] = {"path": os.fspath(path), "truth": os.fspath(truth), "offset": offset}
    result["estimate"] = evaluate(open_image(path), truth_img, masks=masks, offset=offset)
    if noisy is not None:
        result["noisy"] = evaluate(open_image(noisy), truth_img, masks=masks, offset=offset)
    return result


def format_metrics(result: dict[str, Any]) -> str:
    """A small text table of :func:`evaluate_stores`' result for the command line."""
    rows = [("", "snr_db", "psnr_db", "ssim", "pearson_r", "trace_r")]
    for role in ("noisy", "estimate"):
        if role in result:
            m = result[role]
            rows.append((role, *(f"{m.get(k, math.nan):.4g}" for k in rows[0][1:])))
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, width, strict=True)) for r in rows]
    return "\n".join([f"{result['path']} vs {result['truth']}", *lines])
