#!/usr/bin/env bash
# Train the bundled "Infinity tiny shapes" model from scratch on this machine's CPUs, evaluate it
# and export it into bundled/infinity_tiny_shapes/ (weights + defaults.json + MODEL_CARD.md).
#
#   ./scripts/train_bundled.sh [RUN_DIR]        (default ~/.cache/comfyui-infinity/train/bundled)
#
# Stages (each resumes from its own checkpoint, and is skipped when its output exists, so the
# command can be re-run after an interruption and continues where it stopped):
#   1. BSQ VAE (16 bits, stride 16) on 64 px crops, then whole pictures shrunk to 128 px, then 256 px
#   2. tiny T5 (tokenizer trained on the caption vocabulary) + transformer with bitwise self-correction
#   3. the same transformer budget without self-correction (the paper's ablation)        [ABLATION=1]
#   4. held-out evaluation (cfg/tau sweep -> defaults.json, then 200 prompts) of both transformers
#   5. export into bundled/infinity_tiny_shapes/ and write MODEL_CARD.md from the logs
#
# Budgets are environment variables (steps; wall-clock caps in minutes end a stage early and save):
#   VAE_STEPS=2800 VAE_MINUTES=40  T_STEPS=3000 T_MINUTES=45  THREADS=0 (torch default)  ABLATION=1
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-${INFINITY_COMFY_HOME:-$HOME/.cache/comfyui-infinity}/train/bundled}
PY=${PYTHON:-${INFINITY_COMFY_PYTHON:-}}
if [ -z "$PY" ]; then
  ENV_FILE="${INFINITY_COMFY_HOME:-$HOME/.cache/comfyui-infinity}/venv/comfyui-infinity.env"
  [ -f "$ENV_FILE" ] || bash scripts/setup_comfyui.sh >&2
  # shellcheck disable=SC1090
  source "$ENV_FILE"
  PY="$INFINITY_COMFY_PYTHON"
fi
VAE_STEPS=${VAE_STEPS:-2800}; VAE_MINUTES=${VAE_MINUTES:-40}
T_STEPS=${T_STEPS:-3000}; T_MINUTES=${T_MINUTES:-45}
THREADS=${THREADS:-0}; ABLATION=${ABLATION:-1}
BUNDLE=bundled/infinity_tiny_shapes
mkdir -p "$RUN"
stamp() { date -u +%FT%TZ; }
log() { echo "[$(stamp)] $*" | tee -a "$RUN/stages.log" >&2; }

# 1. VAE -----------------------------------------------------------------------------------------
if [ ! -f "$RUN/vae/done" ]; then
  log "stage 1: VAE ($VAE_STEPS steps, at most $VAE_MINUTES min)"
  "$PY" -m infinity_core train-vae --out "$RUN/vae" --threads "$THREADS" \
    --bits 16 --base-ch 32 --ch-mult 1,1,2,2,4 --num-res-blocks 1 \
    --crop-schedule "64:$((VAE_STEPS * 6 / 7)):16,r128:$((VAE_STEPS * 27 / 28)):4" --full-batch-size 2 \
    --steps "$VAE_STEPS" --max-minutes "$VAE_MINUTES" --lr 1e-3 --warmup-steps 50 \
    --eval-every 400 --ckpt-every 200 --log-every 50 --eval-samples 24
  touch "$RUN/vae/done"; log "stage 1 done"
fi

# 2. T5 + transformer with bitwise self-correction -----------------------------------------------
train_transformer() {  # OUT, extra args...
  local out=$1; shift
  "$PY" -m infinity_core train --vae "$RUN/vae/vae.safetensors" --out "$out" --threads "$THREADS" \
    --text-encoder "$RUN/text_encoder_init" --create-text-encoder --train-text-encoder --t5-width 128 \
    --depth 6 --width 256 --heads 4 --block-chunks 2 --name infinity_tiny_shapes \
    --batch-size 16 --steps "$T_STEPS" --max-minutes "$T_MINUTES" --lr 1e-3 --warmup-steps 100 \
    --lr-schedule linear-decay --feature-cache 4000 --cache-dir "$RUN/cache" \
    --eval-every 500 --ckpt-every 250 --log-every 25 --eval-samples 64 "$@"
  touch "$out/done"
}
if [ ! -f "$RUN/transformer/done" ]; then
  log "stage 2: transformer with bitwise self-correction ($T_STEPS steps, at most $T_MINUTES min)"
  train_transformer "$RUN/transformer"; log "stage 2 done"
fi

# 3. ablation: same budget, no self-correction ---------------------------------------------------
if [ "$ABLATION" = 1 ] && [ ! -f "$RUN/transformer_no_bsc/done" ]; then
  log "stage 3: ablation without bitwise self-correction"
  train_transformer "$RUN/transformer_no_bsc" --noise-apply-layers 0; log "stage 3 done"
fi

# 4. evaluation ----------------------------------------------------------------------------------
stage_dir() {  # a model folder the evaluator reads: transformer + VAE + trained T5
  local d=$RUN/eval/$1; mkdir -p "$d"
  ln -sfn "$(realpath "$RUN/$1/transformer.safetensors")" "$d/transformer.safetensors"
  ln -sfn "$(realpath "$RUN/vae/vae.safetensors")" "$d/vae.safetensors"
  ln -sfn "$(realpath "$RUN/$1/text_encoder")" "$d/text_encoder"
  echo "$d"
}
D_BSC=$(stage_dir transformer)
if [ ! -f "$D_BSC/defaults.json" ]; then
  log "stage 4a: choose cfg/tau on 40 held-out prompts of prompt seed 1 (not the reported set)"
  "$PY" -m infinity_core eval-shapes --model-dir "$D_BSC" --num-prompts 40 --prompt-seed 1 \
    --sweep-cfg 1,2,3,4 --sweep-tau 0.5,1.0 --report "$RUN/eval/sweep.json" --write-defaults "$D_BSC/defaults.json"
fi
for m in transformer transformer_no_bsc; do
  [ -f "$RUN/$m/transformer.safetensors" ] || continue
  D=$(stage_dir "$m"); [ "$m" = transformer ] || cp "$D_BSC/defaults.json" "$D/defaults.json"
  if [ ! -f "$RUN/eval/$m.json" ]; then
    log "stage 4b: evaluate $m on 200 held-out prompts (prompt seed 0)"
    "$PY" -m infinity_core eval-shapes --model-dir "$D" --num-prompts 200 --prompt-seed 0 \
      --report "$RUN/eval/$m.json" | tee "$RUN/eval/$m.txt"
  fi
done

# 5. export --------------------------------------------------------------------------------------
log "stage 5: export into $BUNDLE"
mkdir -p "$BUNDLE"
cp "$RUN/transformer/transformer.safetensors" "$BUNDLE/transformer.safetensors"
cp "$RUN/vae/vae.safetensors" "$BUNDLE/vae.safetensors"
rm -rf "$BUNDLE/text_encoder"; cp -r "$RUN/transformer/text_encoder" "$BUNDLE/text_encoder"
cp "$D_BSC/defaults.json" "$BUNDLE/defaults.json"
"$PY" scripts/write_model_card.py "$RUN" "$BUNDLE"
du -sh "$BUNDLE"
log "done: $BUNDLE"
