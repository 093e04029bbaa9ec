#!/bin/sh
# Issue 13: does a larger learning rate (2e-3, with srdvol's gradient clipping) shrink photons 2
# seed 1's transients less at the acceptance budget? Seed 1 (the movie whose transients the
# network shrinks most) and seed 2 (the smallest pixel-r margin with --guide 2), side by side,
# the acceptance settings of anchor.sh otherwise; each run also scores --guide 2.
set -e
cd "$(dirname "$0")/../.."
COMMON="--frames 256 --size 128 --patch-t 32 --patch-yx 64 --batch-size 2 --threads 1 --steps 850 \
    --baselines gaussian2d gaussian --tune-for snr_db trace_r pixel_r --photons 2 --guide 2 --lr 2e-3"
taskset -c 0 .venv/bin/python benchmarks/quality.py $COMMON --seeds 1 \
    --workdir /tmp/srdvol-lr-2-1 --keep --json benchmarks/issue13/lr2e-3-p2-1.json &
taskset -c 1 .venv/bin/python benchmarks/quality.py $COMMON --seeds 2 \
    --workdir /tmp/srdvol-lr-2-2 --keep --json benchmarks/issue13/lr2e-3-p2-2.json &
wait
