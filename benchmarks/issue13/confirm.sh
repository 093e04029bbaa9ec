#!/bin/sh
# Issue 13, the acceptance runs: srdvol's defaults (MSE loss) at (32, 64, 64) x 2 for 850 steps
# (about 700 s of one thread's CPU), photons 4 and 2, seeds 0-2, 256 frames of 128x128 at
# 0.3 Hz; frame-by-frame and 3D Gaussian baselines tuned with the truth for SNR, cell trace r and
# pixel trace r (not SSIM: its pick widens to the time average, minutes per seed).
set -e
cd "$(dirname "$0")/../.."
taskset -c 1 .venv/bin/python benchmarks/quality.py --photons 4 2 --seeds 0 1 2 \
    --frames 256 --size 128 --patch-t 32 --patch-yx 64 --batch-size 2 --steps 850 \
    --threads 1 --baselines gaussian2d gaussian --tune-for snr_db trace_r pixel_r --json benchmarks/issue13/confirm.json \
    --workdir /tmp/srdvol-short-budget
