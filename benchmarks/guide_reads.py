"""What ``--guide``'s mean image costs the engine: chunks read, peak memory, seconds.

The engine runs an identity model (srdvol's ``AffineModel``, given a ``guide`` so the engine
builds the mean image and hands every block its part) on a uint16 input on srdvol's local
cluster, with and without the guide, and writes the output as ``srdvol predict`` does. Per run:
seconds, peak RSS of the whole process tree (client and workers), and how many of the input's
storage chunks the mean image's own graph reads (and whether it waits for the blocks' rechunk),
and how many chunk reads the whole run made.

``--old PATH`` runs the same in a subprocess with ``PYTHONPATH=PATH`` (a checkout of srdvol
from before a change: ``git archive 779583c srdvol | tar -x -C /tmp/srdvol-779583c``), so both
engines read the same input in one run, alternately.

Run: ``python benchmarks/guide_reads.py --old /tmp/srdvol-779583c``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import PeakRSS, make_input


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def child(args: argparse.Namespace) -> None:
    """One engine run in this process (the code on ``sys.path``): a json line on stdout."""
    import dask
    import dask.array as da
    import numpy as np
    import zarr

    import srdvol.dask.graph as graph
    from srdvol.dask.cluster import open_cluster
    from srdvol.predict.predictors import AffineModel

    class GuidedIdentity(AffineModel):
        """The identity, with a guide: the engine computes the mean image for it."""

        guide = 2

        def predict_tensor(self, patches: Any, crops: Any = None) -> Any:
            return patches

    images: list[Any] = []
    own = graph.mean_image

    def keep(*a: Any, **k: Any) -> Any:
        images.append(own(*a, **k))
        return images[-1]

    graph.mean_image = keep
    src = zarr.open_array(args.input, mode="r")
    log = Path(args.output).with_suffix(".reads")

    class CountingReads:
        """The input, each read of a chunk noted in a file (workers are other processes)."""

        shape, dtype, ndim = src.shape, src.dtype, src.ndim

        def __getitem__(self, key: Any) -> Any:
            if all(k.stop > k.start for k in key):  # not dask's empty probe
                with open(log, "a") as f:
                    f.write("1\n")
            return src[key]

    dst = zarr.create_array(
        args.output, shape=src.shape, chunks=src.chunks, dtype="float32", overwrite=True
    )
    model = GuidedIdentity() if args.guide else AffineModel()
    with open_cluster(
        gpus="none", dashboard_address=None, workers=args.workers, threads_per_worker=1
    ) as client:
        data = da.from_array(CountingReads(), chunks=src.chunks, asarray=False)
        lazy = graph.denoise(
            data, model, dims="tzyx", patch=args.patch, chunks=src.chunks, block=args.block
        )
        row: dict[str, Any] = {"guide": args.guide, "blocks": int(np.prod(lazy.numblocks))}
        if images:
            (image,) = images
            culled = image.__dask_graph__().cull(set(dask.core.flatten(image.__dask_keys__())))
            # reads: chunk tasks that need nothing but the array object
            row["chunks_read"] = sum(
                isinstance(k, tuple) and not any(isinstance(d, tuple) for d in deps)
                for k, deps in culled.get_all_dependencies().items()
            )
            names = {k[0] if isinstance(k, tuple) else k for k in culled.keys()}
            row["waits_for_blocks"] = any(n.startswith("rechunk") for n in names)
        row["input_chunks"] = int(np.prod(data.numblocks))
        with PeakRSS() as rss:
            start = time.perf_counter()
            graph.write(lazy, dst, client=client, ledger=Path(args.output) / "ledger.json")
            row["seconds"] = time.perf_counter() - start
        row["peak_mib"] = rss.peak / 2**20
        row["reads"] = len(log.read_text().splitlines())
        log.unlink()
    sample = (slice(0, 8), 0, slice(0, 64), slice(0, 64))
    if not np.array_equal(dst[sample], src[sample].astype(np.float32)):
        raise RuntimeError("the identity model did not reproduce the input")
    print(json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=_ints, default=(2048, 1, 512, 512), help="t,z,y,x")
    parser.add_argument("--chunks", type=_ints, default=(32, 1, 256, 256), help="storage")
    parser.add_argument("--patch", type=_ints, default=(16, 64, 64))
    parser.add_argument("--block", type=_ints, default=(128, 512, 512), help="t,y,x")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--old", help="a checkout of srdvol from before the change")
    parser.add_argument("--tmp", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--guide", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    tmp = Path(tempfile.mkdtemp(prefix="srdvol-guide-reads-", dir=args.tmp))
    try:
        src = make_input(tmp / "in.zarr", args.shape, args.chunks)
        codes = {"this": str(Path(__file__).resolve().parents[1])}
        if args.old:
            codes = {"old": str(Path(args.old).resolve()), **codes}
        print(
            f"input {args.shape} uint16 ({src.nbytes / 2**30:.2f} GiB), storage chunks "
            f"{args.chunks}, patch {args.patch}, blocks {args.block}, {args.workers} CPU "
            f"workers x 1 thread; load average before: {os.getloadavg()}",
            flush=True,
        )
        print("| code | --guide | blocks | chunks read by the mean image (of) | waits for "
              "every block | chunk reads in all | seconds | peak RSS MiB |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        for _ in range(args.repeat):
            for code, path in codes.items():
                for guide in (False, True):
                    argv = [sys.executable, __file__, "--child", "--input", str(tmp / "in.zarr")]
                    argv += ["--output", str(tmp / "out.zarr"), "--workers", str(args.workers)]
                    argv += ["--patch", ",".join(map(str, args.patch))]
                    argv += ["--block", ",".join(map(str, args.block))]
                    argv += ["--guide"] if guide else []
                    env = dict(os.environ, PYTHONPATH=path)
                    done = subprocess.run(
                        argv, env=env, capture_output=True, text=True, check=False
                    )
                    if done.returncode:
                        raise SystemExit(done.stderr[-3000:])
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                    read = f"{row['chunks_read']} ({row['input_chunks']})" if guide else "-"
                    waits = ("yes" if row["waits_for_blocks"] else "no") if guide else "-"
                    print(
                        f"| {code} | {'yes' if guide else 'no'} | {row['blocks']} | {read} | "
                        f"{waits} | {row['reads']} | {row['seconds']:.1f} | "
                        f"{row['peak_mib']:,.0f} |",
                        flush=True,
                    )
                    shutil.rmtree(tmp / "out.zarr", ignore_errors=True)
        print(f"load average after: {os.getloadavg()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
