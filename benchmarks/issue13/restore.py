"""``srdvol predict --restore`` on the models of the acceptance runs (issue 13).

For every ``model-P-S.safetensors`` in ``WORKDIR`` (what ``benchmarks/quality.py --workdir
--keep`` leaves: the model, its noisy movie and truth) the script runs the command itself,
``srdvol predict noisy-P-S.zarr OUT --model model-P-S.safetensors --restore R`` for every R of
``--ranks`` (0: ``--anchor 0``, the network's own output), on a local cluster of one worker,
and scores the output against the truth (:func:`srdvol.core.metrics.evaluate`, the truth's cell
masks and offset). One JSON line per model and run on stdout, with the command's wall time,
readable by ``acceptance.py`` beside the ``quality.py`` file that holds the movie's baselines::

    python benchmarks/issue13/restore.py /tmp/srdvol-anchor --ranks 0 3 4 > restore.jsonl
    python benchmarks/issue13/acceptance.py benchmarks/issue13/anchor-dim-4250.json restore.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from srdvol.core.metrics import evaluate
from srdvol.ngff.labels import read_masks
from srdvol.ngff.provenance import simulation_record
from srdvol.ngff.read import open_image

SCORES = ("snr_db", "ssim", "trace_r", "trace_gain", "pixel_r", "pixel_gain")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--ranks", type=int, nargs="+", default=[4])
    parser.add_argument("--models", nargs="+", default=None, help="tags P-S (default: all)")
    args = parser.parse_args()
    srdvol = str(Path(sys.executable).with_name("srdvol"))
    for model in sorted(args.workdir.glob("model-*.safetensors")):
        tag = model.name.removeprefix("model-").removesuffix(".safetensors")
        if args.models and tag not in args.models:
            continue
        noisy = args.workdir / f"noisy-{tag}.zarr"
        truth_path = args.workdir / f"truth-{tag}.zarr"
        truth = np.asarray(open_image(truth_path).data, dtype=np.float32)
        masks = read_masks(truth_path)
        offset = float((simulation_record(truth_path) or {}).get("offset", 0.0))
        for rank in args.ranks:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "out.zarr"
                option = ["--restore", str(rank)] if rank else ["--anchor", "0"]
                command = [srdvol, "predict", str(noisy), str(out), "--model", str(model)]
                command += [*option, "--workers", "1", "--dashboard-address", ":0"]
                started = time.monotonic()
                subprocess.run(command, check=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
                seconds = time.monotonic() - started
                estimate = np.asarray(open_image(out).data, dtype=np.float32)
            scores = evaluate(estimate, truth, masks=masks, offset=offset)
            method = f"srdvol, --restore {rank}" if rank else "srdvol, --anchor 0"
            line = {"model": tag, "method": f"{method} (srdvol predict)", "seconds": seconds}
            print(json.dumps(line | {k: scores[k] for k in SCORES}), flush=True)


if __name__ == "__main__":
    main()
