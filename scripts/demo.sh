#!/usr/bin/env bash
# End-to-end demo on simulated data: creates .venv if needed, a private Scipion home, simulated data,
# and runs the deepcryo workflow; results under demo_out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m deepcryo.demo --output-dir demo_out "$@"
