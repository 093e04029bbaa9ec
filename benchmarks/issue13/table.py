"""Markdown table of short-budget runs (``benchmarks/short_budget.py`` logs), with a leak column.

Every row shows what the run changed against srdvol's defaults, its scores
(:func:`srdvol.core.metrics.evaluate`), the **neighbour leak** and the training's CPU and wall
seconds with the load average. The leak is a diagnostic of temporal mixing: per cell, the
least-squares fit ``estimate[t] = a * truth[t] + b * (truth[t-1] + truth[t+1]) / 2 + c`` of
the cell traces; at 0.3 Hz consecutive frames share almost no activity, so a perfect denoiser
has ``a = 1, b = 0`` and ``b > 0`` is activity of the neighbouring frames mixed into a frame
(the median ``b`` over cells is shown).

Run from the repository root::

    python benchmarks/issue13/table.py benchmarks/issue13/batch_a.jsonl [...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from short_budget import ensure_movie

from srdvol.core.metrics import cell_traces

DEFAULTS = {
    "patch": "16,64,64",
    "batch_size": 4,
    "lr": 1e-3,
    "loss": "l1mse",
    "schedule": "cosine",
    "transform": "none",
    "no_augment": False,
    "shuffle_frames": False,
    "overlap": 0.25,
    "window": "tent",
    "tta": False,
}


def leak(estimate: np.ndarray, truth: np.ndarray, masks: np.ndarray) -> float:
    """Median over cells of the neighbour-frame coefficient ``b`` (module docstring)."""
    cells = np.nonzero(np.bincount(masks.ravel())[1:])[0] + 1
    e, g = cell_traces(estimate, masks)[:, cells], cell_traces(truth, masks)[:, cells]
    out = []
    for j in range(e.shape[1]):
        x = np.stack([g[1:-1, j], 0.5 * (g[:-2, j] + g[2:, j]), np.ones(len(g) - 2)], axis=1)
        coef, *_ = np.linalg.lstsq(x, e[1:-1, j], rcond=None)
        out.append(coef[1])
    return float(np.median(out))


def changes(settings: dict) -> str:
    diff = [f"{k} {settings[k]}" for k, v in DEFAULTS.items() if settings.get(k, v) != v]
    if settings.get("from_model"):
        diff.append(f"model of {settings['from_model']}")
    return ", ".join(diff) or "srdvol defaults"


def references(photons: float, seed: int, frames: int, size: int) -> list[str]:
    """Rows of the noisy input and of the best 2D Gaussians (picked with the truth per score)."""
    from srdvol.app.evaluate import DEFAULT_SIGMAS, PICKED_FOR, reference_rows
    from srdvol.core.metrics import evaluate, gaussian_frames

    movie = ensure_movie(photons, seed, frames, size)

    def score(image: np.ndarray) -> dict:
        return evaluate(image, movie["truth"], masks=movie["masks"], offset=movie["offset"])

    gaussian = {s: score(gaussian_frames(movie["noisy"], s)) for s in DEFAULT_SIGMAS}
    result = {
        "noisy": score(movie["noisy"]),
        "gaussian": gaussian,
        "gaussian_best": {k: max(gaussian, key=lambda s: gaussian[s][k]) for k in PICKED_FOR},
        "estimate": {},
    }
    out = []
    for name, m in reference_rows(result)[:-1]:
        b = leak(
            np.asarray(gaussian_frames(movie["noisy"], float(name.split("=")[1].split(",")[0])))
            if name.startswith("gaussian")
            else movie["noisy"],
            movie["truth"],
            movie["masks"],
        )
        out.append(
            f"| {name} | reference | - | {photons:g}, {seed} | {m['snr_db']:.2f} "
            f"| {m['ssim']:.3f} | {m['trace_r']:.4f} | {m['trace_gain']:.2f} "
            f"| {m['pixel_r']:.3f} | {m['pixel_gain']:.2f} | {b:.3f} | - | - | - |"
        )
    return out


def main() -> None:
    rows = []
    for log in sys.argv[1:]:
        rows += [json.loads(x) for x in Path(log).read_text().splitlines() if x.strip()]
    movies = sorted(
        {tuple(r["settings"][k] for k in ("photons", "seed", "frames", "size")) for r in rows}
    )
    head = (
        "| run | changed | steps | photons, seed | SNR dB | SSIM | trace r | trace gain "
        "| pixel r | pixel gain | leak | train CPU s | train wall s | load before -> after |"
    )
    print(head)
    print("|" + "---|" * head.count(" | ") + "---|")
    for movie in movies:
        print("\n".join(references(*movie)))
    for r in rows:
        s, m = r["settings"], r["scores"]
        movie = ensure_movie(s["photons"], s["seed"], s["frames"], s["size"])
        b = leak(np.load(r["denoised"]), movie["truth"], movie["masks"])
        cpu = r["train_cpu_s"] if not s.get("from_model") else "-"
        wall = r["train_wall_s"] if not s.get("from_model") else "-"
        print(
            f"| {r['tag']} | {changes(s)} | {s['steps']} | {s['photons']:g}, {s['seed']} "
            f"| {m['snr_db']:.2f} | {m['ssim']:.3f} | {m['trace_r']:.4f} | {m['trace_gain']:.2f} "
            f"| {m['pixel_r']:.3f} | {m['pixel_gain']:.2f} | {b:.3f} | {cpu} | {wall} "
            f"| {r['load_before']} -> {r['load_after']} |"
        )


if __name__ == "__main__":
    main()
