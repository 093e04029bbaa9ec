#!/bin/sh
# Issue 13: fresh movies for choosing nothing on. Simulation seeds 3-5 at photons 4 (core 0)
# and 2 (core 1), the acceptance settings (anchor.sh) otherwise, each run also scoring
# --guide 2; the models stay in /tmp/srdvol-holdout for inference.py / shape_anchor.py.
set -e
cd "$(dirname "$0")/../.."
COMMON="--frames 256 --size 128 --patch-t 32 --patch-yx 64 --batch-size 2 --threads 1 --steps 850 \
    --baselines gaussian2d gaussian --tune-for snr_db trace_r pixel_r --guide 2 \
    --workdir /tmp/srdvol-holdout --keep"
taskset -c 0 .venv/bin/python benchmarks/quality.py $COMMON --photons 4 --seeds 3 4 5 \
    --json benchmarks/issue13/holdout-p4.json &
taskset -c 1 .venv/bin/python benchmarks/quality.py $COMMON --photons 2 --seeds 3 4 5 \
    --json benchmarks/issue13/holdout-p2.json &
wait
