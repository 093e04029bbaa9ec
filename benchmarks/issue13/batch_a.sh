#!/bin/sh
# Issue 13, batch A: one change at a time against srdvol's defaults, photons 4, seed 0,
# 256 frames of 128x128, 200 steps of (16, 64, 64) x 4, one torch thread on core 1.
set -e
cd "$(dirname "$0")/../.."
RUN="taskset -c 1 .venv/bin/python benchmarks/short_budget.py --log benchmarks/issue13/batch_a.jsonl --photons 4 --seed 0 --steps 200"
$RUN --tag a-base
$RUN --tag a-base-ov50 --from-model a-base --overlap 0.5
$RUN --tag a-mse --loss mse
$RUN --tag a-lr3e-3 --lr 3e-3
$RUN --tag a-t32b2 --patch 32,64,64 --batch-size 2
$RUN --tag a-anscombe --transform anscombe
$RUN --tag a-noaug --no-augment
