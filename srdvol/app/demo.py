"""``srdvol demo``: simulate a small 0.3 Hz recording, denoise it, evaluate it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from srdvol.app.commands import run_denoise, run_simulate
from srdvol.app.say import say
from srdvol.options import RunOptions, SimulateOptions

__all__ = ["DEMO", "run_demo"]

#: The demo: a small 0.3 Hz recording that trains and denoises in minutes on a laptop CPU
#: (photons 2: noisy about 5 dB, the best oracle-tuned Gaussian filter about 15.6 dB). 200 steps
#: of 2 patches gained 11.5 dB on 2 CPU cores (300 steps of 4 gained 11.7 dB in 2.7x the time);
#: see benchmarks/RESULTS.md.
#: One torch thread in the worker: two threads on two busy cores ran a step 5x slower.
DEMO: dict[str, Any] = {
    "frames": 96,
    "size": (96, 96),
    "photons": 2.0,
    "patch": (16, 64, 64),
    "steps": 200,
    "batch_size": 2,
    "threads": 1,
}


def demo_options(
    *, steps: int | None = None, workers: int | None = None, overwrite: bool = False
) -> RunOptions:
    """The demo's run: its patch, steps and batch on one single-threaded worker (or the GPU)."""
    return RunOptions.from_flat(
        {
            "patch": DEMO["patch"],
            "steps": steps or DEMO["steps"],
            "batch_size": DEMO["batch_size"],
            "seed": 0,
            "overwrite": overwrite,
            "workers": workers,
            "threads_per_worker": DEMO["threads"],
            "dashboard_address": "127.0.0.1:0",
        }
    )


def run_demo(
    workdir: str | os.PathLike[str],
    *,
    steps: int | None = None,
    workers: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Simulate a small 0.3 Hz recording into ``workdir``, denoise it, evaluate it.

    Uses the GPU when one is visible, else one CPU worker. Running it again resumes (or, after
    a finished run, only evaluates again); ``overwrite`` starts the denoising afresh.
    """
    from srdvol.app.evaluate import evaluate_stores, format_metrics
    from srdvol.app.info import info_text
    from srdvol.app.report import write_report

    folder = Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    noisy, truth = folder / "noisy.zarr", folder / "truth.zarr"
    denoised, report = folder / "denoised.zarr", folder / "report.png"
    if not (noisy.exists() and truth.exists()):
        scene = SimulateOptions.create(
            frames=DEMO["frames"], size=DEMO["size"], photons=DEMO["photons"], rate_hz=0.3, seed=0
        )
        run_simulate(os.fspath(noisy), truth=os.fspath(truth), options=scene)
    options = demo_options(steps=steps, workers=workers, overwrite=overwrite)
    say(info_text(noisy, options))
    run_denoise(noisy, denoised, options)
    result = evaluate_stores(denoised, truth=truth, noisy=noisy)
    write_report(report, denoised=denoised, truth=truth, noisy=noisy, metrics=result)
    gain = result["estimate"]["snr_db"] - result["noisy"]["snr_db"]
    say(format_metrics(result))
    say(
        f"SNR gain: {gain:+.1f} dB (noisy {result['noisy']['snr_db']:.1f} dB -> denoised "
        f"{result['estimate']['snr_db']:.1f} dB); report: {report}"
    )
    return result
