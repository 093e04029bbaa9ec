#!/bin/sh
# Issue 13, batch D (acceptance budget, 850 steps of (32, 64, 64) x 2, MSE): frames shuffled in
# every training patch against the confirm run of the same movie (photons 4, seed 0); then the
# acceptance runs left over from confirm.sh (photons 2, seeds 1 and 2). One thread on core 1.
set -e
cd "$(dirname "$0")/../.."
taskset -c 1 .venv/bin/python benchmarks/short_budget.py --log benchmarks/issue13/batch_d.jsonl \
    --photons 4 --seed 0 --steps 850 --patch 32,64,64 --batch-size 2 --loss mse \
    --shuffle-frames --tag d-t32b2-mse-shuffle
taskset -c 1 .venv/bin/python benchmarks/quality.py --photons 2 --seeds 1 2 \
    --frames 256 --size 128 --patch-t 32 --patch-yx 64 --batch-size 2 --steps 850 \
    --threads 1 --baselines gaussian2d gaussian --tune-for snr_db trace_r pixel_r \
    --json benchmarks/issue13/confirm-p2.json --workdir /tmp/srdvol-short-budget
