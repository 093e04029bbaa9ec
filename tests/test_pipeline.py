"""End to end through the command line: denoise with a live dashboard, rerun resumes."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import zarr

from srdvol.pipeline import default_model_path
from srdvol.simulate import simulate


def _srdvol(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "srdvol"), *args]


@pytest.mark.slow
def test_denoise_serves_the_dashboard_while_running_and_a_rerun_resumes(tmp_path):
    noisy, truth, out = tmp_path / "noisy.zarr", tmp_path / "truth.zarr", tmp_path / "den.zarr"
    simulate(noisy, truth=truth, frames=32, size=(48, 48), seed=3)
    argv = _srdvol(
        "denoise",
        str(noisy),
        str(out),
        "--patch",
        "16,32,32",
        "--steps",
        "3",
        "--batch-size",
        "1",
        "--workers",
        "1",
        "--dashboard-address",
        ":0",
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    process = subprocess.Popen(
        argv, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    status = None
    lines = []
    try:
        for line in process.stderr:
            lines.append(line)
            if line.startswith("dashboard: "):
                url = line.split(" ", 1)[1].strip()
                with urllib.request.urlopen(url, timeout=30) as response:
                    status = response.status
                break
        rest, _ = process.communicate(timeout=600)
    finally:
        process.kill()
    assert status == 200, "".join(lines)
    assert process.returncode == 0, "".join(lines) + rest

    model = default_model_path(out)
    assert model.exists()
    group = zarr.open_group(out, mode="r")
    provenance = group.attrs["srdvol"]
    assert provenance["command"] == "denoise"
    assert len(provenance["model_sha256"]) == 64
    assert provenance["training"]["steps"] == 3
    first = np.asarray(group["s0"])
    assert np.isfinite(first).all() and first.shape == (32, 48, 48)

    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "0 block(s) computed" in again.stderr
    np.testing.assert_array_equal(np.asarray(zarr.open_group(out, mode="r")["s0"]), first)


def test_public_api_open_train_denoise(tmp_path):
    import srdvol
    import srdvol.training  # a submodule import must not shadow the function srdvol.train
    from srdvol.model.network import NetworkConfig

    assert srdvol.train is srdvol.training.train

    noisy, truth = tmp_path / "noisy.zarr", tmp_path / "truth.zarr"
    simulate(noisy, truth=truth, frames=32, size=(32, 32), seed=1)
    image = srdvol.open(noisy)
    assert image.dims == ("t", "y", "x") and image.chunks is not None  # lazy, labelled
    record = srdvol.train(
        noisy,
        tmp_path / "m.safetensors",
        patch=(16, 16, 16),
        steps=2,
        batch_size=1,
        network=NetworkConfig.tiny(patch_t=16),
        progress=False,
    )
    assert tuple(record.patch) == (16, 16, 16)
    denoised = srdvol.denoise(image, tmp_path / "m.safetensors")
    assert denoised.dims == image.dims and denoised.dtype == np.float32
    assert denoised.data.dask is not None  # still lazy
    values = denoised.compute().values
    assert values.shape == image.shape and np.isfinite(values).all()
    assert not np.allclose(values, image.values)  # the model changed the data
    assert set(srdvol.__all__) == {"__version__", "open", "train", "denoise"}
