#!/bin/sh
# Issue 13, batch C: the loss at the dim condition (0.5 photons/px), and the inference lattice,
# seed 0, 200 steps of (32, 64, 64) x 2, one torch thread on core 1.
set -e
cd "$(dirname "$0")/../.."
RUN="taskset -c 1 .venv/bin/python benchmarks/short_budget.py --log benchmarks/issue13/batch_c.jsonl --seed 0 --steps 200"
$RUN --tag c-p0.5-t32b2 --photons 0.5 --patch 32,64,64 --batch-size 2
$RUN --tag c-p0.5-t32b2-mse --photons 0.5 --patch 32,64,64 --batch-size 2 --loss mse
$RUN --tag c-t32b2-mse-ov50 --photons 4 --patch 32,64,64 --from-model b-t32b2-mse --overlap 0.5
$RUN --tag c-t32b2-mse-cos2 --photons 4 --patch 32,64,64 --from-model b-t32b2-mse --window cos2
