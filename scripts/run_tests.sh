#!/usr/bin/env bash
# Runs the whole test suite. Creates/updates the project venv (.venv) first when needed.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_venv.sh >&2
exec .venv/bin/python -m pytest -q -rs "$@"
