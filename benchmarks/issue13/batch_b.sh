#!/bin/sh
# Issue 13, batch B: combinations of what batch A found, photons 4, seed 0, 200 steps, one
# torch thread on core 1. (MSE with lr 3e-3 at (32, 64, 64) x 2 went through a loss spike of
# 2e4 and came out worse on every score: the first row; the same at (64, 64, 64) x 1 was
# stopped before it ended.)
set -e
cd "$(dirname "$0")/../.."
RUN="taskset -c 1 .venv/bin/python benchmarks/short_budget.py --log benchmarks/issue13/batch_b.jsonl --photons 4 --seed 0 --steps 200"
# $RUN --tag b-t32b2-mse-lr3 --patch 32,64,64 --batch-size 2 --loss mse --lr 3e-3
$RUN --tag b-t64b1-mse --patch 64,64,64 --batch-size 1 --loss mse
$RUN --tag b-t32b2-mse --patch 32,64,64 --batch-size 2 --loss mse
$RUN --tag b-t16b4-shuffle --shuffle-frames
$RUN --tag b-t64b1 --patch 64,64,64 --batch-size 1
