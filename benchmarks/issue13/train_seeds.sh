#!/bin/sh
# Issue 13: is photons 2 seed 1's low transient gain (0.894 for the network alone, 0.941 with
# --guide 2) the movie's or the training's? The same movie (simulation seed 1) and the
# acceptance settings (anchor.sh), trained with two other seeds side by side, one per core;
# each run also scores --guide 2.
set -e
cd "$(dirname "$0")/../.."
COMMON="--frames 256 --size 128 --patch-t 32 --patch-yx 64 --batch-size 2 --threads 1 --steps 850 \
    --baselines gaussian2d gaussian --tune-for snr_db trace_r pixel_r --photons 2 --seeds 1 --guide 2"
taskset -c 0 .venv/bin/python benchmarks/quality.py $COMMON --train-seed 11 \
    --workdir /tmp/srdvol-train-seed-11 --keep --json benchmarks/issue13/train-seed-11.json &
taskset -c 1 .venv/bin/python benchmarks/quality.py $COMMON --train-seed 12 \
    --workdir /tmp/srdvol-train-seed-12 --keep --json benchmarks/issue13/train-seed-12.json &
wait
