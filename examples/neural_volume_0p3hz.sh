#!/usr/bin/env bash
# A 0.3 Hz two-photon recording of a neural volume (T, Z, Y, X), end to end:
# simulate it with ground truth, look at it, denoise it, and score the result.
#
#   bash examples/neural_volume_0p3hz.sh [WORKDIR]
#
# Sizes can be set from the environment; the defaults (the settings of benchmarks/quality.py)
# take several minutes on a laptop CPU. On a GPU, raise STEPS (e.g. 2000) and the sizes;
# WORKERS=2 trains on two CPU worker processes joined by torch.distributed (gloo).
set -euo pipefail
WORKDIR=${1:-neural-volume}
FRAMES=${FRAMES:-96}
PLANES=${PLANES:-3}
SIZE=${SIZE:-"96 96"}
PHOTONS=${PHOTONS:-2}
STEPS=${STEPS:-300}
PATCH=${PATCH:-16,64,64}
WORKERS=${WORKERS:-1}

mkdir -p "$WORKDIR"
srdvol simulate "$WORKDIR/noisy.zarr" --truth "$WORKDIR/truth.zarr" \
    --frames "$FRAMES" --planes "$PLANES" --size $SIZE --rate-hz 0.3 --photons "$PHOTONS" --seed 1
srdvol info "$WORKDIR/noisy.zarr" --patch "$PATCH"
# Each z plane is an independent (t, y, x) movie: one model learns from all of them.
srdvol denoise "$WORKDIR/noisy.zarr" "$WORKDIR/denoised.zarr" \
    --patch "$PATCH" --steps "$STEPS" --workers "$WORKERS" --dashboard-address :0
srdvol evaluate "$WORKDIR/denoised.zarr" --truth "$WORKDIR/truth.zarr" \
    --noisy "$WORKDIR/noisy.zarr" --report "$WORKDIR/report.png"
