"""GPU benchmark: run this first wherever a GPU is available (under 8 minutes on one GPU).

Measures, on the GPU(s) of this machine:

1. model throughput per GPU, default network at the default patch (64, 128, 128), batches that
   fill the device: fp32, bf16 autocast, and bf16 with ``torch.compile`` (a failed or slow
   compile is reported, not fatal), as patch voxels/s and the output voxels/s they mean at
   overlap 0.25;
2. one NCCL training run (``srdvol.dask.ddp_train.train_distributed``, one rank per GPU) on a
   synthetic recording, which gives the trained model for 3 and 4;
3. the bf16-vs-fp32 difference of that trained model's output on real patches;
4. end-to-end ``srdvol predict`` on a multi-GB input: output Mvoxel/s;
5. peak GPU memory of each part (torch's counter in this process, nvidia-smi for the others).

Prints one markdown table. Without a GPU it prints one line saying it skipped and exits 0.
``--device cpu --small`` runs every part on the CPU at small sizes (gloo instead of NCCL): a
check of the script itself, not a measurement.

Run: ``python benchmarks/gpu.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

#: Overlap 0.25 covers each voxel ~(4/3)^3 times: model voxels per output voxel.
COVERAGE = (4 / 3) ** 3


class GPUMemory:
    """Peak ``memory.used`` of the GPUs (nvidia-smi, sampled every 0.2 s), in MiB."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._smi = shutil.which("nvidia-smi")

    def _run(self) -> None:
        while not self._stop.is_set() and self._smi:
            out = subprocess.run(
                [self._smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                check=False,
            )
            used = [int(v) for v in out.stdout.split() if v.isdigit()]
            self.peak = max(self.peak, sum(used))
            time.sleep(0.2)

    def __enter__(self) -> GPUMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def text(self) -> str:
        return f"{self.peak:,} MiB (all GPUs)" if self._smi else "n/a (no nvidia-smi)"


def make_input(path: Path, shape: tuple[int, ...], chunks: tuple[int, ...]) -> None:
    """A uint16 recording: a fixed bright scene with slow changes plus Poisson noise."""
    import zarr

    rng = np.random.default_rng(0)
    arr = zarr.create_array(str(path), shape=shape, chunks=chunks, dtype="uint16")
    y, x = np.ogrid[: shape[2], : shape[3]]
    scene = 40 + 120 * (np.sin(y / 23.0) * np.cos(x / 31.0)) ** 2
    for t0 in range(0, shape[0], chunks[0]):
        n = min(chunks[0], shape[0] - t0)
        level = scene * (1 + 0.3 * np.sin((t0 + np.arange(n)) / 40.0))[:, None, None]
        arr[t0 : t0 + n] = rng.poisson(level[:, None], size=(n, *shape[1:])).astype(np.uint16)


def model_rates(
    config: Any,
    patch: tuple[int, ...],
    device: str,
    seconds: float,
    modes: list[tuple[bool, bool]],
    compile_limit: float = 120.0,
) -> list[dict[str, Any]]:
    """Patch voxels/s of forward passes for each ``(bf16, compiled)`` mode."""
    import torch

    from srdvol.model.network import build_network
    from srdvol.predict.predictors import device_batch

    torch.manual_seed(0)
    network = build_network(config).eval().to(device)
    rows = []
    for amp, compiled in modes:
        batch = device_batch(network, patch, amp=amp) if device != "cpu" else 2
        x = torch.randn((batch, 1, *patch), device=device)
        label = f"{'bf16' if amp else 'fp32'}{', torch.compile' if compiled else ''}"
        try:
            net = torch.compile(network) if compiled else network
            rate, peak = _time_forward(net, x, device, amp, seconds, compile_limit)
        except Exception as exc:  # compile is optional; its errors surface on the first call
            rows.append({"mode": label, "error": f"{type(exc).__name__}: {exc}"[:80]})
            continue
        rows.append({"mode": label, "batch": batch, "voxels_s": rate, "peak": peak})
    return rows


def _time_forward(
    net: Any, x: Any, device: str, amp: bool, seconds: float, warm_limit: float
) -> tuple[float, int]:
    import torch

    def step() -> None:
        with (
            torch.inference_mode(),
            torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp),
        ):
            net(x)
        if device != "cpu":
            torch.cuda.synchronize()

    started = time.perf_counter()
    step()  # warm-up (and compilation)
    step()
    if time.perf_counter() - started > warm_limit:
        raise TimeoutError(f"warm-up took {time.perf_counter() - started:.0f} s")
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        n += 1
    rate = n * x.numel() / (time.perf_counter() - started)
    peak = int(torch.cuda.max_memory_allocated()) if device != "cpu" else 0
    return rate, peak


def bf16_difference(model: Path, source: Path, patch: tuple[int, ...], device: str) -> dict:
    """Largest and typical |bf16 - fp32| of the trained model on patches of the recording."""
    import torch
    import zarr

    from srdvol.predict.predictors import ModelPredictor

    data = zarr.open_array(str(source), mode="r")
    t, y, x = patch
    patches = np.stack(
        [data[i * t : (i + 1) * t, 0, :y, :x] for i in range(min(4, data.shape[0] // t))]
    ).astype(np.float32)
    fp32 = ModelPredictor(model, device=device, autocast=False, batch_size=len(patches))
    bf16 = ModelPredictor(model, device=device, autocast=True, batch_size=len(patches))
    a = fp32.predict_tensor(torch.from_numpy(patches).to(fp32.tensor_device)).cpu().numpy()
    b = bf16.predict_tensor(torch.from_numpy(patches).to(bf16.tensor_device)).cpu().numpy()
    diff = np.abs(a - b)
    return {
        "max": float(diff.max()),
        "mean": float(diff.mean()),
        "signal_std": float(a.std()),
        "noise_std": float((patches - a).std()),
    }


def train_nccl(source: Path, model: Path, patch: tuple[int, ...], args: argparse.Namespace) -> dict:
    """One distributed training run, one rank per GPU (NCCL; gloo on CPU workers)."""
    from srdvol.dask.cluster import open_cluster
    from srdvol.dask.ddp_train import train_distributed
    from srdvol.dask.workers import live_workers
    from srdvol.model.config import NetworkConfig
    from srdvol.options import ReadOptions

    network = NetworkConfig.tiny(patch[0]) if args.small else None
    gpus = "none" if args.device == "cpu" else "all"
    started = time.perf_counter()
    with (
        GPUMemory() as memory,
        open_cluster(gpus=gpus, workers=1 if args.device == "cpu" else None) as client,
    ):
        ranks = len(live_workers(client))
        record = train_distributed(
            client,
            str(source),
            str(model),
            read=ReadOptions(axes="tzyx"),
            patch=patch,
            steps=args.steps,
            network=network,
            progress=False,
            overwrite=True,
        )
    seconds = time.perf_counter() - started
    return {"ranks": ranks, "steps": record.steps, "seconds": seconds, "memory": memory.text()}


def predict_end_to_end(source: Path, model: Path, out: Path, args: argparse.Namespace) -> dict:
    """``srdvol predict`` in a subprocess, as a user runs it."""
    srdvol = shutil.which("srdvol") or str(Path(sys.executable).with_name("srdvol"))
    cmd = [
        srdvol,
        "predict",
        str(source),
        str(out),
        "--model",
        str(model),
        "--axes",
        "tzyx",
        "--overwrite",
    ]
    if args.device == "cpu":
        cmd += ["--gpus", "none", "--workers", "1"]
    started = time.perf_counter()
    with GPUMemory() as memory:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    return {"seconds": seconds, "memory": memory.text()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--small", action="store_true", help="small sizes: a check, not figures")
    parser.add_argument("--steps", type=int, default=None, help="training steps")
    parser.add_argument("--frames", type=int, default=None, help="frames of the predict input")
    parser.add_argument("--tmp", default=None, help="folder for the temporary stores")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: skipped: no CUDA GPU is visible to torch on this machine")
        return
    if args.small:
        patch, size, frames, steps, seconds = (16, 32, 32), 64, args.frames or 64, 2, 1.0
    else:
        patch, size, frames, steps, seconds = (64, 128, 128), 1024, args.frames or 1024, 200, 10.0
    args.steps = args.steps or steps
    from srdvol.model.config import NetworkConfig

    config = NetworkConfig.tiny(patch[0]) if args.small else NetworkConfig(patch_t=patch[0])
    started = time.perf_counter()

    def say(line: str) -> None:
        print(line, flush=True)  # line by line: a run cut short keeps what it measured

    say(f"load average {os.getloadavg()}, torch {torch.__version__}")
    if args.device == "cuda":
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        say(f"GPUs: {', '.join(names)}")
    say("\n| measurement | value |\n|---|---|")

    def rates(modes: list[tuple[bool, bool]]) -> None:
        for row in model_rates(config, patch, args.device, seconds, modes):
            if "error" in row:
                say(f"| model {row['mode']}, patch {patch} | failed: {row['error']} |")
                continue
            say(
                f"| model {row['mode']}, patch {patch}, batch {row['batch']} | "
                f"{row['voxels_s'] / 1e6:,.1f} Mvoxel/s of patches = "
                f"{row['voxels_s'] / COVERAGE / 1e6:,.1f} Mvoxel/s of output; peak "
                f"{row['peak'] / 2**20:,.0f} MiB |"
            )

    rates([(False, False), (True, False)])
    tmp = Path(tempfile.mkdtemp(prefix="srdvol-gpu-", dir=args.tmp))
    try:
        source, model = tmp / "in.zarr", tmp / "model.safetensors"
        shape = (frames, 1, size, size)
        make_input(source, shape, (min(64, frames), 1, min(512, size), min(512, size)))
        gib = np.prod(shape) * 2 / 2**30
        trained = train_nccl(source, model, patch, args)
        say(
            f"| training, {trained['ranks']} rank(s) ({'gloo' if args.device == 'cpu' else 'NCCL'}"
            f"), {trained['steps']} steps | {trained['seconds']:.0f} s incl. cluster start; peak "
            f"GPU memory {trained['memory']} |"
        )
        diff = bf16_difference(model, source, patch, args.device)
        say(
            f"| bf16 vs fp32, trained model | max {diff['max']:.3g}, mean {diff['mean']:.3g} "
            f"(output std {diff['signal_std']:.3g}, removed noise std {diff['noise_std']:.3g}) |"
        )
        result = predict_end_to_end(source, model, tmp / "out.zarr", args)
        if "error" in result:
            say(f"| srdvol predict, {shape} ({gib:.1f} GiB) | failed: {result['error']} |")
        else:
            rate = np.prod(shape) / result["seconds"] / 1e6
            say(
                f"| srdvol predict, {shape} uint16 ({gib:.1f} GiB) | {result['seconds']:.0f} s, "
                f"{rate:,.1f} Mvoxel/s end to end (cluster start, pyramid included); peak GPU "
                f"memory {result['memory']} |"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not args.no_compile:
        rates([(True, True)])  # last: a slow compile costs only itself
    say(f"| whole script | {time.perf_counter() - started:.0f} s |")
    if args.small:
        say(json.dumps({"checked": True}))


if __name__ == "__main__":
    main()
