#!/usr/bin/env bash
# `make demo` under load, as issue 8 asks: a fresh clone of this repository, two CPU burners
# beside it, five runs in a row (the first installs; reruns find the output finished), then
# four full runs with demo-output deleted first. Prints exit code, wall time and load per run.
# usage: benchmarks/demo_under_load.sh [WORKDIR]
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-/tmp/srdvol-demo-under-load}
rm -rf "$W"; mkdir -p "$W"; cd "$W"
git clone -q "$REPO" repo && cd repo
python3 -c 'while True: pass' & B1=$!
python3 -c 'while True: pass' & B2=$!
trap 'kill $B1 $B2 2>/dev/null' EXIT
for i in 1 2 3 4 5 6 7 8 9; do
  [ "$i" -gt 5 ] && rm -rf demo-output
  before=$(cut -d' ' -f1-3 /proc/loadavg)
  start=$(date +%s.%N)
  make demo > "../demo$i.log" 2>&1; rc=$?
  end=$(date +%s.%N)
  echo "run $i rc=$rc wall=$(python3 -c "print(round($end - $start, 1))") s" \
    "load=[$before] -> [$(cut -d' ' -f1-3 /proc/loadavg)] $(grep 'SNR gain' "../demo$i.log" | tail -1)"
done
