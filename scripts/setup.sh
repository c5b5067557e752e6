#!/usr/bin/env bash
# Installs what rnnext needs into the current Python environment, then builds rnnext in place
# (editable). Extra arguments are more packages to install. Safe to run again: it installs
# torch only when it is missing and rebuilds only when a source changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
pip_install() { "$PYTHON" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  # RNNEXT_TORCH picks another build, e.g. RNNEXT_TORCH=torch for the newest CUDA build.
  pip_install "${RNNEXT_TORCH:-torch==2.13.0}"
fi
pip_install setuptools wheel ninja numpy "$@"

so=$(ls rnnext/_C*.so 2>/dev/null | head -n 1 || true)
if [ -z "$so" ] || [ -n "$(find csrc setup.py -newer "$so" 2>/dev/null | head -n 1)" ] ||
  ! "$PYTHON" -c "import rnnext" 2>/dev/null; then
  echo "building rnnext (a minute or two on 2 cores)..." >&2
  pip_install --no-build-isolation --no-deps -e .
fi
"$PYTHON" -c "import rnnext, torch; print('rnnext', rnnext.__version__, 'on torch', torch.__version__)"
