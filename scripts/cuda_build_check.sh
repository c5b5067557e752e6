#!/usr/bin/env bash
# Compiles rnnext's CUDA sources where no GPU is needed: against a CUDA build of torch in its
# own virtual environment (.venv-cuda), for TORCH_CUDA_ARCH_LIST (default 9.0, H100/H200), into
# .build-cuda/, then loads the library and checks that it registered CUDA kernels. Leaves the
# package's own build alone. Needs nvcc (CUDA_HOME, or /usr/local/cuda). Safe to run again:
# the environment is kept and ninja recompiles only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
cuda_home=${CUDA_HOME:-/usr/local/cuda}
if [ ! -x "$cuda_home/bin/nvcc" ]; then
  echo "cuda build check: skipped, no nvcc in $cuda_home (set CUDA_HOME)" >&2
  exit 0
fi
if "$PYTHON" -c "import sys, rnnext.functional as f; sys.exit('cuda' not in f.DEVICES_WITH_KERNELS)" \
  2>/dev/null; then
  echo "cuda build check: skipped, the installed rnnext was itself built with CUDA" >&2
  exit 0
fi
venv=.venv-cuda
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  # The CUDA build of torch and its nvidia wheels take about 5.5 GB, and pip unpacks them
  # through a temporary folder as well: a disk too full for that is this machine's state, not
  # a fault in the CUDA sources, so say so and leave the check out rather than fail halfway.
  need_gb=${RNNEXT_CUDA_CHECK_MIN_FREE_GB:-12}
  if ! [[ "$need_gb" =~ ^[0-9]+$ ]]; then
    echo "cuda build check: RNNEXT_CUDA_CHECK_MIN_FREE_GB must be a whole number of GB," \
      "got '$need_gb'" >&2
    exit 1
  fi
  tmp=${TMPDIR:-/tmp}
  [ -d "$tmp" ] || tmp=/tmp
  # the smaller of the two filesystems' free space (the same one twice is fine)
  free_gb=$(df -Pk . "$tmp" | awk 'NR > 1 { kb = (NR == 2 || $4 < kb) ? $4 : kb }
    END { print int(kb / 1048576) }')
  if [ "$free_gb" -lt "$need_gb" ]; then
    echo "cuda build check: skipped, ${free_gb} GB free on disk where the CUDA build of torch" \
      "would go, and it needs about ${need_gb} GB (RNNEXT_CUDA_CHECK_MIN_FREE_GB sets that)" >&2
    exit 0
  fi
  echo "cuda build check: installing a CUDA build of torch into $venv (a few minutes)..." >&2
  "$PYTHON" -m venv "$venv"
  # (no copy of the wheels in pip's cache: several GB more on the same disk)
  "$venv/bin/python" -m pip install --disable-pip-version-check --no-cache-dir -q \
    "${RNNEXT_CUDA_TORCH:-torch}" numpy ninja setuptools wheel
fi
echo "cuda build check: compiling (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0})..." >&2
mkdir -p .build-cuda
if ! CUDA_HOME="$cuda_home" RNNEXT_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
  "$venv/bin/python" setup.py build_ext --build-lib .build-cuda/lib \
  --build-temp .build-cuda/temp >.build-cuda/build.log 2>&1; then
  grep -E -B2 -A8 "error|Error" .build-cuda/build.log | head -n 80 >&2
  echo "cuda build check: FAILED, full log in .build-cuda/build.log" >&2
  exit 1
fi
"$venv/bin/python" - <<'PY'
import glob
import torch

(library,) = glob.glob(".build-cuda/lib/rnnext/_C*.so")
torch.ops.load_library(library)
for op in ("layer_forward", "layer_backward"):
    for key in ("CPU", "CUDA"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"rnnext::{op}", key):
            raise SystemExit(f"cuda build check: {library} registers no {key} kernel for {op}")
print(f"cuda build check: ok, {library} built against torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}) registers CPU and CUDA kernels")
PY
