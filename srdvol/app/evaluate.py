"""``srdvol evaluate``: score image stores against a ground-truth store, with references.

Every figure of the denoised image comes with the same figure for the noisy input and for a
plain Gaussian filter of the noisy input (2D, frame by frame), so a number is never read alone.
The Gaussian's sigma is picked **with the truth**, separately for each score in
:data:`PICKED_FOR`, from a grid (:data:`DEFAULT_SIGMAS`): the strongest Gaussian a user could
have had for that score. The metrics themselves, out of core, are
:mod:`srdvol.core.metrics`'s.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from srdvol.core.metrics import evaluate, gaussian_frames
from srdvol.errors import ConfigError, flag

__all__ = [
    "COLUMNS",
    "DEFAULT_SIGMAS",
    "PICKED_FOR",
    "evaluate_stores",
    "format_metrics",
    "parse_sigmas",
    "reference_rows",
]

#: Gaussian sigmas (pixels) tried for the reference filter.
DEFAULT_SIGMAS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)
#: Scores the Gaussian reference is picked for (higher is better for each).
PICKED_FOR = ("snr_db", "ssim", "trace_r", "pixel_r")
#: Columns of the table :func:`format_metrics` prints.
COLUMNS = ("snr_db", "psnr_db", "ssim", "trace_r", "trace_gain", "pixel_r", "pixel_gain")
_SHORT = {"snr_db": "SNR", "ssim": "SSIM", "trace_r": "trace r", "pixel_r": "pixel r"}


def evaluate_stores(
    path: str | os.PathLike[str],
    *,
    truth: str | os.PathLike[str],
    noisy: str | os.PathLike[str] | None = None,
    sigmas: Sequence[float] | None = DEFAULT_SIGMAS,
) -> dict[str, Any]:
    """Evaluate an image store (and the noisy input, and Gaussian filters of it) against a
    ground-truth store.

    Parameters
    ----------
    path
        The OME-Zarr image to score (usually the denoised output).
    truth
        The ground-truth OME-Zarr image. Its cell labels (``labels/``) give the trace scores,
        its ``simulation`` record the detector ``offset`` for the SNR (0 when absent).
    noisy
        The noisy input, scored too so the gain is visible, and the input of the Gaussian
        reference.
    sigmas
        Gaussian sigmas (pixels) to try when ``noisy`` is given; ``None`` or empty: no
        Gaussian reference.

    Returns
    -------
    dict
        ``{"estimate": metrics, "noisy": metrics, "gaussian": {sigma: metrics},
        "gaussian_best": {score: sigma}, "offset": float, "truth": str, "path": str}``
        (``noisy`` and the Gaussian entries only with ``noisy``); metrics as
        :func:`srdvol.core.metrics.evaluate` returns them.

    Raises
    ------
    InputError
        If an image's shape differs from the truth's (message names both stores).
    StoreNotFoundError
        If a path is not an image store.
    ConfigError
        If a sigma is negative or not finite.
    """
    from srdvol.ngff.labels import read_masks
    from srdvol.ngff.provenance import simulation_record
    from srdvol.ngff.read import open_image

    sigmas = _check_sigmas(sigmas)
    truth_img = open_image(truth)
    masks = read_masks(truth)
    record = simulation_record(truth) or {}
    offset = float(record.get("offset", 0.0))
    result: dict[str, Any] = {"path": os.fspath(path), "truth": os.fspath(truth), "offset": offset}
    result["estimate"] = evaluate(open_image(path), truth_img, masks=masks, offset=offset)
    if noisy is not None:
        noisy_img = open_image(noisy)
        result["noisy"] = evaluate(noisy_img, truth_img, masks=masks, offset=offset)
        if sigmas:
            scores = {
                s: evaluate(gaussian_frames(noisy_img, s), truth_img, masks=masks, offset=offset)
                for s in sigmas
            }
            result["gaussian"] = scores
            result["gaussian_best"] = _best(scores)
    return result


def parse_sigmas(text: str | None) -> tuple[float, ...] | None:
    """``--gaussian``: ``None`` (the default grid), ``"none"`` (no reference) or comma-separated
    sigmas in pixels.

    Raises
    ------
    ConfigError
        If a value is not a positive number.
    """
    if text is None:
        return DEFAULT_SIGMAS
    if text.strip().lower() == "none":
        return ()
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(
            flag("gaussian"), f"{text!r} is not a list of numbers", "give e.g. 1,1.5,2 or none"
        ) from None
    return _check_sigmas(values)


def _check_sigmas(sigmas: Sequence[float] | None) -> tuple[float, ...]:
    values = tuple(float(s) for s in (sigmas or ()))
    for s in values:
        if not (math.isfinite(s) and s > 0):
            raise ConfigError(
                flag("gaussian"), f"sigma {s!r} is not a positive number", "give sigmas > 0"
            )
    return tuple(sorted(set(values)))


def _best(scores: dict[float, dict[str, float]]) -> dict[str, float]:
    """For each score of :data:`PICKED_FOR` the sigma that maximises it (NaN scores lose)."""
    best: dict[str, float] = {}
    for key in PICKED_FOR:
        finite = {s: m[key] for s, m in scores.items() if math.isfinite(m.get(key, math.nan))}
        if finite:
            best[key] = max(finite, key=finite.__getitem__)
    return best


def reference_rows(result: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """The rows to show, in order: noisy, one Gaussian per distinct picked sigma, estimate."""
    rows: list[tuple[str, dict[str, float]]] = []
    if "noisy" in result:
        rows.append(("noisy", result["noisy"]))
    picked: dict[float, list[str]] = {}
    for key, sigma in result.get("gaussian_best", {}).items():
        picked.setdefault(sigma, []).append(_SHORT[key])
    grid = sorted(result.get("gaussian", {}))
    for sigma, keys in sorted(picked.items()):
        edge = " (grid edge)" if grid and sigma in (grid[0], grid[-1]) else ""
        name = f"gaussian σ={sigma:g}, best {'/'.join(keys)}{edge}"
        rows.append((name, result["gaussian"][sigma]))
    rows.append(("estimate", result["estimate"]))
    return rows


def format_metrics(result: dict[str, Any]) -> str:
    """A small text table of :func:`evaluate_stores`' result for the command line."""
    table = [("", *COLUMNS)]
    for name, m in reference_rows(result):
        table.append((name, *(f"{m.get(k, math.nan):.4g}" for k in COLUMNS)))
    width = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, width, strict=True))
        )
        for r in table
    ]
    notes = (
        "trace: mean of a cell's pixels; pixel: each pixel inside the cells; r: correlation "
        "with the truth; gain: slope of ΔF on the truth's ΔF (1 = amplitudes kept)"
    )
    return "\n".join([f"{result['path']} vs {result['truth']}", *lines, notes])
