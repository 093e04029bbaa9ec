#!/bin/sh
# Issue 13, dim data: photons 0.5, the acceptance budget (850 steps of (32, 64, 64) x 2, MSE),
# seeds 0-2, on core 1; and seed 0 at three times that budget (2550 steps), on core 0 (the two
# run side by side: CPU seconds do not depend on it, wall seconds do).
set -e
cd "$(dirname "$0")/../.."
COMMON="--photons 0.5 --frames 256 --size 128 --patch-t 32 --patch-yx 64 --batch-size 2 \
    --threads 1 --baselines gaussian2d gaussian --tune-for snr_db trace_r pixel_r \
    --workdir /tmp/srdvol-short-budget"
taskset -c 1 .venv/bin/python benchmarks/quality.py $COMMON --seeds 0 1 2 --steps 850 \
    --json benchmarks/issue13/dim-850.json &
taskset -c 0 .venv/bin/python benchmarks/quality.py $COMMON --seeds 0 --steps 2550 \
    --json benchmarks/issue13/dim-2550.json &
wait
