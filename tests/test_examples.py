"""The examples run as documented (at small sizes) and leave what they promise."""

from __future__ import annotations

import os
import py_compile
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


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
    result = subprocess.run(
        ["bash", str(EXAMPLES / "neural_volume_0p3hz.sh"), str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import srdvol

    denoised = srdvol.open(tmp_path / "run" / "denoised.zarr")
    assert denoised.dims == ("t", "z", "y", "x")
    assert denoised.shape == (32, 2, 48, 48)
    assert np.isfinite(denoised.values).all()
    assert "snr_db" in result.stdout
    assert (tmp_path / "run" / "report.png").stat().st_size > 10_000


@pytest.mark.slow
def test_attach_scheduler_example(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "attach_scheduler.py"), str(tmp_path / "run")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "scheduler running at tcp://" in result.stdout
    assert (tmp_path / "run" / "denoised.zarr" / "zarr.json").exists()


def test_slurm_example_compiles():
    # Needs SLURM and dask-jobqueue: documented, compiled here, not run.
    py_compile.compile(str(EXAMPLES / "slurm_gpu_cluster.py"), doraise=True)
