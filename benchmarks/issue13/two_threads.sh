#!/bin/sh
# Issue 13: the acceptance runs as a user on this 2-core machine trains them, with torch's two
# threads (srdvol's default here) and nothing else running, timed in wall seconds.
#   STEPS=850 sh benchmarks/issue13/two_threads.sh 2:1 4:1      # photons:seed pairs
# One json per run (two-threads-STEPS-pPHOTONS-SEED.json); models kept in
# /tmp/srdvol-two-threads-STEPS for inference.py.
set -e
cd "$(dirname "$0")/../.."
STEPS=${STEPS:-1000}
COMMON="--frames 256 --size 128 --patch-t 32 --patch-yx 64 --batch-size 2 --threads 2 \
    --steps $STEPS --baselines gaussian2d gaussian --tune-for snr_db trace_r pixel_r --guide 2 \
    --workdir /tmp/srdvol-two-threads-$STEPS --keep"
mkdir -p "/tmp/srdvol-two-threads-$STEPS"
for run in "$@"; do
    photons=${run%:*}
    seed=${run#*:}
    .venv/bin/python benchmarks/quality.py $COMMON --photons "$photons" --seeds "$seed" \
        --json "benchmarks/issue13/two-threads-$STEPS-p$photons-$seed.json"
done
