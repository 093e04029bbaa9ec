"""The examples run as documented (at small sizes) and leave a valid, denoised OME-Zarr.

The SLURM example needs SLURM: its cluster part runs here with a stand-in ``sbatch`` that
executes the job script dask-jobqueue writes on this machine (and ``scancel`` that stops it), so
the workers it starts are the ones a SLURM job would start.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _metrics(stdout: str) -> dict[str, dict[str, float]]:
    """The rows of ``srdvol evaluate``'s table by name: {"noisy": {...}, "gaussian σ=1.5,
    best snr": {...}, "estimate": {...}} (names may hold spaces; the values are the last
    columns)."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["snr_db"])
    names = lines[header].split()
    rows = {}
    for line in lines[header + 1 :]:
        parts = line.split()
        if len(parts) <= len(names):
            break
        try:
            values = [float(v) for v in parts[-len(names) :]]
        except ValueError:
            break  # the notes under the table
        rows[" ".join(parts[: -len(names)])] = dict(zip(names, values, strict=True))
    return rows


def assert_valid_denoised(out: Path, *, noisy: Path) -> np.ndarray:
    """``out`` is a valid NGFF 0.5 image like ``noisy``, written by srdvol from it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from ome_zarr_models import v05

    import srdvol
    from srdvol.ngff.write import read_provenance

    v05.Image.from_zarr(zarr.open_group(str(out), mode="r"))  # raises if not valid NGFF
    image, source = srdvol.open(out), srdvol.open(noisy)
    assert image.dims == source.dims and image.shape == source.shape
    assert image.dtype == np.float32
    assert image.attrs["scale"] == pytest.approx(source.attrs["scale"])
    assert image.attrs["axes_units"] == source.attrs["axes_units"]
    values = image.values
    assert np.isfinite(values).all()
    assert np.abs(values - source.values.astype(np.float32)).max() > 1.0  # it did something
    record = read_provenance(out)
    assert record is not None
    assert Path(record["input"]).resolve() == noisy.resolve()
    assert re.fullmatch(r"[0-9a-f]{64}", record["model_sha256"])
    return values


@pytest.mark.slow
def test_neural_volume_example_denoises_a_tzyx_recording(tmp_path):
    env = _env() | {
        "FRAMES": "32",
        "PLANES": "2",
        "SIZE": "48 48",
        "STEPS": "4",
        "PATCH": "16,32,32",
        "WORKERS": "1",
    }
    run = tmp_path / "run"
    result = subprocess.run(
        ["bash", str(EXAMPLES / "neural_volume_0p3hz.sh"), str(run)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    values = assert_valid_denoised(run / "denoised.zarr", noisy=run / "noisy.zarr")
    assert values.shape == (32, 2, 48, 48)
    # the scores it printed are those of the files it left
    from srdvol.app.evaluate import evaluate_stores

    printed = _metrics(result.stdout)
    scores = evaluate_stores(
        str(run / "denoised.zarr"), truth=str(run / "truth.zarr"), noisy=str(run / "noisy.zarr")
    )
    for role in ("noisy", "estimate"):
        assert printed[role]["snr_db"] == pytest.approx(scores[role]["snr_db"], abs=1e-3)
    report = (run / "report.png").read_bytes()
    assert report.startswith(b"\x89PNG\r\n\x1a\n") and len(report) > 10_000


@pytest.mark.slow
def test_attach_scheduler_example(tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "attach_scheduler.py"), str(run)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "scheduler running at tcp://" in result.stdout
    values = assert_valid_denoised(run / "denoised.zarr", noisy=run / "noisy.zarr")
    assert values.shape == (32, 64, 64)
    roles = set(_metrics(result.stdout))
    assert {"noisy", "estimate"} <= roles
    assert all(role.startswith("gaussian σ=") for role in roles - {"noisy", "estimate"})


SBATCH = """#!/usr/bin/env bash
# Stand-in for SLURM's sbatch: run the job script here, in the background, in its own session.
here=$(dirname "$0")
cp "$1" "$here/job-$$.sh"  # the caller deletes its script as soon as sbatch returns
setsid bash "$here/job-$$.sh" > "$here/job-$$.log" 2>&1 < /dev/null &
echo $! >> "$here/jobs"
echo "Submitted batch job $!"
"""
SCANCEL = """#!/usr/bin/env bash
kill -TERM -- "-$1" 2>/dev/null || true
"""


@pytest.mark.slow
def test_slurm_example_starts_one_single_task_gpu_worker_per_job(tmp_path, monkeypatch):
    pytest.importorskip("dask_jobqueue")
    import dask
    from distributed import Client

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", SBATCH), ("scancel", SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from slurm_gpu_cluster import slurm_cluster

    local = {"host": "127.0.0.1", "dashboard_address": ":0"}  # a real job uses the network
    with dask.config.set({"jobqueue.slurm.scheduler-options": local}):
        cluster = slurm_cluster(partition="gpu", walltime="00:10:00")
    try:
        script = cluster.job_script()
        assert "#SBATCH --gres=gpu:1" in script  # SLURM gives each job one GPU
        assert "#SBATCH -p gpu" in script and "#SBATCH -t 00:10:00" in script
        cluster.scale(jobs=2)
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=120)
            workers = client.scheduler_info(n_workers=-1)["workers"].values()
            assert len(workers) == 2  # one worker process per job
            for worker in workers:
                assert worker["resources"] == {"GPU": 1}
                assert worker["nthreads"] == 1  # one model task at a time per GPU
    finally:
        cluster.close()
        jobs = bin_dir / "jobs"
        for pid in jobs.read_text().split() if jobs.exists() else []:
            with contextlib.suppress(ProcessLookupError):  # a job the cluster did not cancel
                os.killpg(int(pid), signal.SIGTERM)
