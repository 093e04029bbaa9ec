"""Wall and CPU time of each phase of ``srdvol demo``, with the calls ``run_demo`` makes.

Phases: simulate, info, cluster start, training (start-up and steps), prediction (with the
pyramid), evaluation, report. CPU time is that of this process and its worker processes
(psutil), so a machine that other jobs load still gives comparable figures; the script prints
the load average with them. Training CPU time includes the start-up: run it with ``--steps 5``
and with the demo's steps to split fixed cost from per-step cost::

    python benchmarks/demo_phases.py --steps 5
    python benchmarks/demo_phases.py            # the demo's settings
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live children."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


@contextmanager
def phase(name: str, rows: list[tuple[str, float, float]]) -> Iterator[None]:
    wall, cpu = time.perf_counter(), _cpu_seconds()
    yield
    rows.append((name, time.perf_counter() - wall, _cpu_seconds() - cpu))


def main() -> None:
    from srdvol.app.commands import run_predict, run_simulate, run_train
    from srdvol.app.demo import DEMO, demo_options
    from srdvol.app.evaluate import evaluate_stores
    from srdvol.app.info import info_text
    from srdvol.app.report import write_report
    from srdvol.app.session import cluster_session
    from srdvol.options import SimulateOptions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEMO["steps"])
    parser.add_argument("--batch-size", type=int, default=DEMO["batch_size"])
    parser.add_argument("--threads", type=int, default=DEMO["threads"])
    args = parser.parse_args()
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        noisy, truth, out = root / "noisy.zarr", root / "truth.zarr", root / "denoised.zarr"
        model = root / "model.safetensors"
        with phase("simulate", rows):
            scene = {k: DEMO[k] for k in ("frames", "size", "photons")}
            run_simulate(str(noisy), truth=str(truth), options=SimulateOptions.create(**scene))
        options = demo_options(steps=args.steps)
        options = options.replace(
            train=options.train.replace(batch_size=args.batch_size),
            cluster=options.cluster.replace(threads_per_worker=args.threads),
        )
        with phase("info", rows):
            info_text(noisy, options)
        wall, cpu = time.perf_counter(), _cpu_seconds()
        with cluster_session(options.cluster) as client:
            rows.append(("cluster start", time.perf_counter() - wall, _cpu_seconds() - cpu))
            with phase(f"train {args.steps} steps", rows):
                run_train(noisy, model, options, client=client)
            with phase("predict + pyramid", rows):
                run_predict(noisy, out, options, model=model, client=client)
        with phase("evaluate", rows):
            result = evaluate_stores(out, truth=truth, noisy=noisy)
        with phase("report", rows):
            write_report(
                root / "report.png", denoised=out, truth=truth, noisy=noisy, metrics=result
            )
    gain = result["estimate"]["snr_db"] - result["noisy"]["snr_db"]
    print(f"load average {os.getloadavg()[0]:.1f}; SNR gain {gain:+.2f} dB")
    print("| phase | wall s | CPU s |\n|---|---|---|")
    for name, wall, cpu in rows:
        print(f"| {name} | {wall:.1f} | {cpu:.1f} |")


if __name__ == "__main__":
    main()
