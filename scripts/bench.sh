#!/usr/bin/env bash
# The main job: set-up, then rnnext against torch.nn. Arguments go to `python -m rnnext.bench`
# (try --help); results land in bench-results/ (table, bench.json, bench.png).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bash scripts/setup.sh tqdm matplotlib
"$PYTHON" -m rnnext.bench "$@"
