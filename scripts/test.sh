#!/usr/bin/env bash
# The test command: set-up, lint and format checks, then the test suite. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# onnx, onnxscript and onnxruntime: the ONNX export tests run the exported models
bash scripts/setup.sh pytest hypothesis "ruff==0.17.6" "clang-format==23.1.5" onnx onnxscript onnxruntime

"$PYTHON" -m ruff check .
"$PYTHON" -m ruff format --check .
# clang-format through its PyPI package, which need not be on PATH
files=$(find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' | sort)
"$PYTHON" -c "import clang_format; clang_format.clang_format()" --dry-run -Werror $files
# the CUDA sources compile here too, GPU or not (RNNEXT_CUDA_CHECK=0 skips this step)
if [ "${RNNEXT_CUDA_CHECK:-1}" != 0 ]; then bash scripts/cuda_build_check.sh; fi
"$PYTHON" -m pytest -q "$@"
