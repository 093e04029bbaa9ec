#!/bin/sh
# Issue 13, the acceptance runs again with `--anchor 4` (srdvol's default since 956efe2): the
# settings as confirm.sh (each run also scores the network's own output, "srdvol, --anchor
# 0"; training is deterministic on one machine, but this one's CPU trained models slightly
# different from confirm.json's), photons 4 on
# core 0 and photons 2 on core 1, side by side; then photons 0.5 seed 0 at five times the
# acceptance budget (4250 steps) on core 0.
set -e
cd "$(dirname "$0")/../.."
COMMON="--frames 256 --size 128 --patch-t 32 --patch-yx 64 --batch-size 2 --threads 1 \
    --baselines gaussian2d gaussian --tune-for snr_db trace_r pixel_r --workdir /tmp/srdvol-anchor --keep"
( taskset -c 0 .venv/bin/python benchmarks/quality.py $COMMON --photons 4 --seeds 0 1 2 --steps 850 \
      --json benchmarks/issue13/anchor-p4.json
  taskset -c 0 .venv/bin/python benchmarks/quality.py $COMMON --photons 0.5 --seeds 0 --steps 4250 \
      --json benchmarks/issue13/anchor-dim-4250.json ) &
taskset -c 1 .venv/bin/python benchmarks/quality.py $COMMON --photons 2 --seeds 1 2 0 --steps 850 \
    --json benchmarks/issue13/anchor-p2.json &
wait
