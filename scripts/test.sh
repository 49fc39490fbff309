#!/usr/bin/env bash
# Lint (ruff, configured in pyproject.toml; any finding fails the run) then run the whole deepcryo test suite
# headless on CPU: tests/ (engine tests, RELION convention tests, Scipion through a one-node SLURM queue) and
# deepcryo/tests (the plugin's Scipion tests: protocols, conversions; also run by `scipion tests deepcryo.tests`).
# Creates .venv if needed and installs RELION 3.1 and SLURM (Debian packages) when possible.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
if ! command -v relion_project >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq relion >/dev/null) \
    || echo "warning: could not install RELION; its convention tests will be skipped"
fi
if ! command -v slurmctld >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null) \
    || echo "warning: could not install slurm-wlm/munge; the SLURM queue tests will be skipped"
fi
.venv/bin/ruff check deepcryo benchmarks scripts tests
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests deepcryo/tests "$@"
