"""Does ``--guide``'s motion check (:mod:`srdvol.predict.motion`) see the motion that costs
SNR, and stay quiet on a still recording?

For every noisy movie of ``WORKDIR`` (``noisy-TAG.zarr``, what ``benchmarks/quality.py
--workdir --keep`` leaves; 256 frames of 128x128 at photons 0.5, 2 and 4), the check's
sampled frames (:func:`~srdvol.predict.motion.sampled_frames`) as they are, shifted by random
whole-pixel offsets in ``[-J, J]`` (``guide_motion.py``'s motion, which costs ``--guide``
0.45 dB at J 2), and drifting linearly by 3 px down the rows over the recording. One JSON line
per movie and motion: how many sampled frames the check counts as shifted, the largest shift,
whether it warns, and the check's CPU time. A last line times the check on 32 frames of
2048x2048 (the reading not included)::

    python benchmarks/issue13/motion_check.py /tmp/srdvol-anchor
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guide_motion import shifted

from srdvol.ngff.read import open_image
from srdvol.predict.motion import SAMPLED_FRAMES, frame_shifts, sampled_frames


def report(name: str, frames: np.ndarray) -> dict:
    """The check's verdict on ``frames`` as one JSON-able dict."""
    started = time.process_time()
    motion = frame_shifts(frames)
    seconds = time.process_time() - started
    return {
        "movie": name,
        "shifted": motion.shifted,
        "of": len(motion.shifts),
        "largest_px": motion.largest,
        "warns": motion.moving,
        "check_cpu_s": round(seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--jitter", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for path in sorted(args.workdir.glob("noisy-*.zarr")):
        tag = re.fullmatch(r"noisy-(.+)\.zarr", path.name).group(1)
        movie = np.asarray(open_image(path).data, dtype=np.float32)
        frames = movie[sampled_frames(len(movie))]
        print(json.dumps({"motion": "still", **report(tag, frames)}), flush=True)
        for jitter in args.jitter:
            offsets = rng.integers(-jitter, jitter + 1, size=(len(frames), 2))
            line = {"motion": f"jitter {jitter} px", **report(tag, shifted(frames, offsets))}
            print(json.dumps(line), flush=True)
        drift = np.round(np.linspace(0, 3, len(frames))).astype(np.int64)
        offsets = np.stack([drift, np.zeros_like(drift)], axis=1)
        print(json.dumps({"motion": "drift 3 px", **report(tag, shifted(frames, offsets))}))
    large = rng.poisson(4.0, size=(SAMPLED_FRAMES, 2048, 2048)).astype(np.float32)
    print(json.dumps({"motion": "noise only, timing", **report("2048x2048", large)}))


if __name__ == "__main__":
    main()
