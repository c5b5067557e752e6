#!/usr/bin/env bash
# The CPU benchmark at several thread counts, each with the time loops' team split as rnnext
# chooses it and forced either way (RNNEXT_CPU_TEAM_SPLIT=rows, units; see
# csrc/cpu/layer_driver.h, team_plan), for machines with more cores than the 2 that the main
# benchmark targets. Writes DEST/<threads>-<split>/bench.{json,png} and DEST/cpu_threads.log;
# DEST is $1, else $OUT, else bench-results/threads. Exits non-zero if any run failed.
#
#   THREADS="8 16" SIZES=100x64x512 CELLS=lstm ROUNDS=2 bash benchmarks/cpu_threads.sh [DEST]
#
# Defaults: THREADS all cores, SIZES 500x8x128,200x32x256,100x64x512, CELLS gru,lstm, ROUNDS 1.
set -uo pipefail
cd "$(dirname "$0")/.."
dest=$(mkdir -p "${1:-${OUT:-bench-results/threads}}" && cd "${1:-${OUT:-bench-results/threads}}" && pwd)
PYTHON=${PYTHON:-python3}
exec > >(tee "$dest/cpu_threads.log") 2>&1
"$PYTHON" -c "import os, torch; print('torch', torch.__version__, 'cores', os.cpu_count())"
status=0
for threads in ${THREADS:-$(nproc)}; do
  for split in chosen rows units; do
    echo "=== $threads threads, split: $split"
    split_env=()
    [ "$split" = chosen ] || split_env=(RNNEXT_CPU_TEAM_SPLIT="$split")
    env "${split_env[@]}" "$PYTHON" -m rnnext.bench --device cpu --threads "$threads" \
      --cells "${CELLS:-gru,lstm}" --sizes "${SIZES:-500x8x128,200x32x256,100x64x512}" \
      --rounds "${ROUNDS:-1}" --out "$dest/$threads-$split" 2>/dev/null |
      grep -vE "^wrote "
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  done
done
exit $status
