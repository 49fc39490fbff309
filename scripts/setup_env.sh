#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment .venv with CPU torch 2.13.0, faiss-cpu, the Scipion
# packages, deepcryo itself (editable, from pyproject.toml, extra "engines": torch and faiss in the same Python)
# and its test tools (extra "test": pytest, ruff, the chimera and facilities plugins the tests use).
# Idempotent: a second run only checks the install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, faiss, pyworkflow, pwem, deepcryo, pytest, chimera, emfacilities" 2>/dev/null \
   || [ ! -x .venv/bin/ruff ]; then
  # torch first and pinned: 2.13.0 resolves to the local CPU build; an unpinned torch pulls CUDA wheels
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[engines,test]"
fi
