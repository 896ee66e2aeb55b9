#!/usr/bin/env bash
# Creates .venv with the pinned CPU torch and the project's dependencies (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
stamp=.venv/.deps-$(cat pyproject.toml scripts/setup_venv.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
  .venv/bin/pip install -q --disable-pip-version-check -c <(echo "torch==2.13.0") -e ".[test]"
  touch "$stamp"
fi
echo "venv ready: $(pwd)/.venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
