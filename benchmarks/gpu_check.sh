#!/usr/bin/env bash
# One-shot check on a machine with an NVIDIA GPU, using only what is installed there (no
# network): build rnnext with its CUDA part, run the CUDA tests, run compute-sanitizer
# memcheck on a small forward+backward of every cell, benchmark rnnext against torch.nn
# (cuDNN) in the same process, profile where one forward+backward spends its GPU time, time
# the small-batch recurrent products through cuBLAS and cuBLASLt and the steps of a long
# small-batch sequence, time a training loop, run benchmarks/sequences.py on the GPU, and time
# the CPU LSTM on all of the host's cores with each way of sharing its time loop.
# Writes gpu_check.log, summary.json, bench_<dtype>/bench.{json,png},
# sequences/sequences.json and cpu_threads/ into the folder given as $1, else $OUT, else
# benchmarks/results/gpu.
# Every stage runs even when an earlier one fails; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
dest=$(mkdir -p "${1:-${OUT:-benchmarks/results/gpu}}" && cd "${1:-${OUT:-benchmarks/results/gpu}}" && pwd)
PYTHON=${PYTHON:-python3}
exec > >(tee "$dest/gpu_check.log") 2>&1
stage() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }
declare -A rc
# timed_stage KEY SECONDS TITLE COMMAND...: runs COMMAND as a stage, its status kept as KEY
timed_stage() {
  local key=$1 seconds=$2 title=$3
  shift 3
  stage "$title"
  timeout "$seconds" "$@"
  rc[$key]=$?
}

stage environment
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name())"
"${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version | tail -n 2

stage build
export RNNEXT_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
"$PYTHON" -m pip install --no-build-isolation --no-deps --disable-pip-version-check -q -e .
rc[build]=$?
"$PYTHON" -c "import rnnext, rnnext.functional as f; print('kernels for', sorted(f.DEVICES_WITH_KERNELS))"

parallel=()
if "$PYTHON" -c "import xdist" 2>/dev/null; then parallel=(-n 8); fi
timed_stage tests 240 "CUDA tests" \
  "$PYTHON" -m pytest -q -p no:cacheprovider "${parallel[@]}" -k cuda tests

for dtype in float32 bfloat16; do
  timed_stage "bench_$dtype" 150 "benchmark $dtype" "$PYTHON" -m rnnext.bench --device cuda \
    --cells lstm,gru --dtype "$dtype" --sizes 100x64x512,500x4x512,50x128x1024 \
    --out "$dest/bench_$dtype"
done
timed_stage profile 120 "profile" "$PYTHON" benchmarks/cuda_profile.py
timed_stage small_gemm 90 "small-batch products: cuBLAS against cuBLASLt" \
  "$PYTHON" benchmarks/cuda_small_gemm.py
timed_stage long_steps 120 "long sequence, small batch: cost per step, eager launches" \
  "$PYTHON" benchmarks/cuda_long_steps.py
timed_stage train_loop 120 "training loop: fresh inputs and an optimizer between calls" \
  "$PYTHON" benchmarks/cuda_train_loop.py
timed_stage sequences 240 "sequences: lengths against PackedSequence, memory at T = 100000" \
  "$PYTHON" benchmarks/sequences.py --device cuda --with-torch-memory --out "$dest/sequences"
# the host's many cores: the CPU time loops' split by rows or by units (benchmarks/results/
# cpu-16-cores/README.md), where the 2-core development machine cannot tell them apart
timed_stage cpu_threads 90 "CPU: LSTM on every core, team split as chosen, by rows, by units" \
  env THREADS="$(nproc)" CELLS=lstm SIZES=200x32x256,100x64x512 \
  bash benchmarks/cpu_threads.sh "$dest/cpu_threads"
# without the caching allocator every tensor is its own allocation, so memcheck sees its bounds
timed_stage memcheck 200 "compute-sanitizer memcheck" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
  compute-sanitizer --tool memcheck --error-exitcode 9 "$PYTHON" benchmarks/cuda_smoke.py

stage summary
status_json=$(for k in "${!rc[@]}"; do printf '"%s": %s, ' "$k" "${rc[$k]}"; done)
"$PYTHON" - "$dest" "{${status_json%, }}" <<'PY'
import json, pathlib, sys, torch
dest, status = pathlib.Path(sys.argv[1]), json.loads(sys.argv[2])
summary = {
    "device": torch.cuda.get_device_name(), "torch": torch.__version__,
    "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
    "exit_status": status, "bench": [],
}
for path in sorted(dest.glob("bench_*/bench.json")):
    for r in json.loads(path.read_text()):
        keys = ("config", "pass", "dtype", "torch_ms", "rnnext_ms", "ratio", "agree", "note")
        summary["bench"].append({k: r[k] for k in keys})
sequences = dest / "sequences" / "sequences.json"
if sequences.exists():
    summary["sequences"] = json.loads(sequences.read_text())
(dest / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary["exit_status"]))
PY
for k in "${!rc[@]}"; do [ "${rc[$k]}" -eq 0 ] || exit 1; done
