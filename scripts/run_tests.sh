#!/usr/bin/env bash
# Runs the whole test suite in the project's test environment: a venv with the pinned CPU torch,
# ComfyUI 0.3.75 (for the integration tests) and this project's dependencies, created by
# scripts/setup_comfyui.sh on first use (a few minutes) and reused afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_comfyui.sh --with-cli >&2
PY="${INFINITY_COMFY_HOME:-$HOME/.cache/comfyui-infinity}/venv/bin/python"
exec "$PY" -m pytest -q -rs "$@" tests
