"""Training with and without reading the next batch ahead, on a recording stored one frame per
chunk.

Storage is read whole chunks at a time: a training patch of T frames of a recording stored one
frame per chunk (bioformats2raw's and many microscopes' layout) decompresses T whole frames.
Training reads the next batch in a background thread while a step trains
(``PatchSampler(read_ahead=True)``); this runs ``srdvol.train`` on the same input with it and
with it switched off (the sampler's class patched), alternately, and prints seconds per step,
the reading time per batch on its own, and whether the two models are identical (they must be:
the same patches in the same order).

Run: ``python benchmarks/read_ahead.py`` (``--help`` for the sizes); ``--reads-only`` times
reading a batch and stops (for patches too large to train on a CPU).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import make_input


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=_ints, default=(256, 1, 1024, 1024), help="t,z,y,x")
    parser.add_argument("--chunks", type=_ints, default=(1, 1, 1024, 1024))
    parser.add_argument("--patch", type=_ints, default=(32, 64, 64))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--tmp", default=None)
    parser.add_argument(
        "--reads-only", action="store_true", help="only time reading a batch (no training)"
    )
    args = parser.parse_args()

    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    import srdvol.training.loop as loop
    from srdvol.training.patches import PatchSampler

    tmp = Path(tempfile.mkdtemp(prefix="srdvol-read-ahead-", dir=args.tmp))
    try:
        make_input(tmp / "in.zarr", args.shape, args.chunks)
        import xarray as xr
        import zarr
        from dask import array as da

        stored = zarr.open_array(str(tmp / "in.zarr"), mode="r")
        image = xr.DataArray(da.from_zarr(stored), dims=("t", "z", "y", "x"), name="in.zarr")
        image = image.isel(z=0)
        sampler = PatchSampler(image, patch=args.patch, seed=0, batch_size=args.batch_size)
        sampler.sample()
        start = time.perf_counter()
        for _ in range(5):
            sampler.sample()
        read = (time.perf_counter() - start) / 5
        print(
            f"input {args.shape} uint16 in chunks {args.chunks}; patch {args.patch} x "
            f"{args.batch_size}, {args.steps} steps, {args.threads} torch thread(s); reading one "
            f"batch alone: {read:.3f} s; load average before: {os.getloadavg()}",
            flush=True,
        )
        if args.reads_only:
            return
        print("| read ahead | seconds per step | model identical to the first run's |")
        print("|---|---|---|")
        first = None
        original = loop.PatchSampler
        for i in range(args.repeat):
            for ahead in (False, True):
                loop.PatchSampler = (
                    original if ahead else functools.partial(_without_read_ahead, original)  # type: ignore[assignment]
                )
                model = tmp / f"m{i}{int(ahead)}.safetensors"
                start = time.perf_counter()
                loop.train(
                    image,
                    model,
                    patch=args.patch,
                    batch_size=args.batch_size,
                    steps=args.steps,
                    progress=False,
                    device="cpu",
                )
                per_step = (time.perf_counter() - start) / args.steps
                weights = load_file(str(model))  # the tensors (the metadata holds times)
                first = weights if first is None else first
                same = weights.keys() == first.keys() and all(
                    torch.equal(weights[k], first[k]) for k in weights
                )
                print(
                    f"| {'yes' if ahead else 'no'} | {per_step:.3f} | {'yes' if same else 'NO'} |",
                    flush=True,
                )
        loop.PatchSampler = original
        print(f"load average after: {os.getloadavg()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _without_read_ahead(cls, *args, **kwargs):
    kwargs["read_ahead"] = False
    return cls(*args, **kwargs)


if __name__ == "__main__":
    main()
