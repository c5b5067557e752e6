#!/usr/bin/env bash
# Runs the test suite against another torch release (default 2.4.1, the oldest that
# pyproject.toml admits). That torch goes into a virtual environment of its own
# (.venv-torch-VERSION, kept for the next run) and a copy of the working tree into
# .build-torch-VERSION, where the extension is built (CPU part only) and tested. The package's
# own build and environment are left alone. Arguments after the version go to pytest.
#   bash scripts/test_torch_version.sh [VERSION] [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
version=${1:-2.4.1}
shift || true
if ! [[ "$version" =~ ^2\.[0-9]+\.[0-9]+$ ]]; then
  echo "test_torch_version: VERSION must look like 2.4.1, got '$version'" >&2
  exit 2
fi
venv=.venv-torch-$version
if ! "$venv/bin/python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$version')" \
  2>/dev/null; then
  echo "test_torch_version: installing torch $version into $venv (a few GB)..." >&2
  "$PYTHON" -m venv "$venv"
  # numpy 1.x, which every torch release from 2.4 on runs with
  "$venv/bin/python" -m pip install --disable-pip-version-check --no-cache-dir -q \
    "torch==$version" "numpy<2" ninja setuptools wheel pytest hypothesis
fi
tree=.build-torch-$version
rm -rf "$tree"
mkdir -p "$tree"
# the tracked files and the untracked ones git does not ignore, as they are now
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$tree"
cd "$tree"
echo "test_torch_version: building against torch $version..." >&2
if ! RNNEXT_CUDA=0 "../$venv/bin/python" setup.py build_ext --inplace >build.log 2>&1; then
  grep -E -B2 -A8 "error|Error" build.log | head -n 60 >&2
  echo "test_torch_version: build FAILED, full log in $tree/build.log" >&2
  exit 1
fi
env -u PYTHONPATH "../$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
