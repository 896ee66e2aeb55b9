"""Write MODEL_CARD.md of the bundled model from the logs of scripts/train_bundled.sh.

    python scripts/write_model_card.py RUN_DIR BUNDLE_DIR

Every number in the card is read from a file the training run wrote (summary.json, log.jsonl,
eval.jsonl, eval/<model>.json, stages.log); nothing is typed in by hand.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def bit_acc_row(eval_rows: list[dict]) -> list[float]:
    """Held-out clean bit accuracy per scale at the last evaluation (the 1:1 template)."""
    if not eval_rows:
        return []
    clean = eval_rows[-1].get("clean", {})
    return next((v for k, v in clean.items() if k != "loss"), [])


def card(run: Path, bundle: Path) -> str:
    vae_sum = read_jsonl(run / "vae" / "eval.jsonl")
    vae_log = read_jsonl(run / "vae" / "log.jsonl")
    dec_sum = read_jsonl(run / "vae_decoder" / "eval.jsonl")
    dec_log = read_jsonl(run / "vae_decoder" / "log.jsonl")
    t_sum = read_json(run / "transformer" / "summary.json")
    nb_sum = read_json(run / "transformer_no_bsc" / "summary.json")
    ev = read_json(run / "eval" / "transformer.json")
    ev_nb = read_json(run / "eval" / "transformer_no_bsc.json")
    defaults = read_json(bundle / "defaults.json")
    sizes = {p.name: p.stat().st_size for p in bundle.rglob("*") if p.is_file()}
    total_mb = sum(sizes.values()) / 1e6
    vae_minutes = vae_log[-1]["elapsed_min"] if vae_log else None
    dec_minutes = dec_log[-1]["elapsed_min"] if dec_log else 0.0
    t_minutes = (t_sum.get("seconds") or 0) / 60
    cfg = t_sum.get("config", {})

    lines = ["# Infinity tiny shapes (bundled)", "",
             "A small Infinity (bitwise visual autoregressive text-to-image) model with the architecture, "
             "file formats and code paths of the released 2B: a BSQ VAE tokenizer, a tiny flan-T5-style "
             "text encoder, and a transformer with the bitwise head, trained from scratch on this "
             "repository's synthetic shapes data by `./scripts/train_bundled.sh`.", "",
             "## Data", "",
             "`infinity_core.data.SyntheticShapes` (seed 0): 256x256 pictures of one or two upright circles, "
             "squares, triangles or stars in 8 colours, small or large, on the left/right/top/bottom/centre, "
             "on a background colour, captioned in plain English (\"a small red circle on the left, blue "
             "background\"). Objects whose (shape, colour, background) satisfy the held-out rule never "
             "appear in training; every evaluation prompt is such an unseen combination.", "",
             "## Configuration", "",
             f"- transformer: depth {cfg.get('depth')}, width {cfg.get('width')}, heads {cfg.get('num_heads')}, "
             f"{cfg.get('vae_bits')} bits per token, text width {cfg.get('text_channels')}; "
             f"{(t_sum.get('params') or 0) / 1e6:.2f}M parameters",
             "- VAE: 16 bits, stride 16, base 32 channels x (1, 1, 2, 2, 4), 1 res block, GroupNorm with 8 "
             "groups (4 channels per group, as in the released VAEs' 128-channel layers; 32 groups on 32 "
             "channels would be a per-channel instance norm that erases colours before the last "
             "convolution); multi-scale BSQ along the official 1:1 0.06M schedule (7 scales, 1x1 .. 16x16)",
             "- text encoder: T5 encoder, d_model 128, sentencepiece tokenizer trained on the caption vocabulary",
             f"- default sampling (defaults.json, chosen on a separate prompt set): {json.dumps(defaults)}",
             f"- files: {', '.join(f'{k} {v / 1e6:.1f} MB' for k, v in sorted(sizes.items()) if v > 1e5)}; "
             f"{total_mb:.1f} MB in all", "",
             "## Training", "",
             "```bash", "./scripts/train_bundled.sh", "```", "",
             f"- VAE: {vae_log[-1]['step'] + 1 if vae_log else 'n/a'} steps in "
             f"{vae_minutes if vae_minutes is None else f'{vae_minutes:.1f}'} min; held-out reconstruction "
             f"PSNR {vae_sum[-1]['psnr']:.2f} dB (64 px crops, then whole pictures)" if vae_sum
             else "- VAE: no evaluation recorded",
             f"- VAE decoder sharpened on whole 256 px pictures with the encoder frozen (so the bits the "
             f"transformer learned stay the same): {dec_log[-1]['step'] + 1} steps in {dec_minutes:.1f} min; "
             f"held-out PSNR {dec_sum[-1]['psnr']:.2f} dB" if dec_log and dec_sum else "- VAE decoder: not sharpened",
             f"- transformer (with bitwise self-correction): {t_sum.get('steps')} steps, "
             f"{t_sum.get('samples_seen')} samples, {t_minutes:.1f} min (one core; the ablation run "
             "without self-correction trained at the same time on the other core)",
             f"- training time of the bundled model, VAE + transformer + decoder: "
             f"{(vae_minutes or 0) + t_minutes + dec_minutes:.1f} min on this machine's 2 CPU cores "
             "(the stages' wall-clock times from their logs; evaluation and export come after)", ""]

    lines += ["## Held-out prompt following (`python -m infinity_core eval-shapes`)", ""]
    if ev:
        m = ev["metrics"]
        lines += [f"{len(ev.get('per_prompt', []))} held-out prompts (prompt seed {ev.get('prompt_seed')}), "
                  f"settings {json.dumps(ev.get('settings'))}:", "",
                  "| | colour | background | object colour | shape | position | counting | size | all correct |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, e in (("with self-correction (bundled)", ev), ("without self-correction", ev_nb)):
            if e:
                mm = e["metrics"]
                lines.append(f"| {name} | " + " | ".join(pct(mm.get(k)) for k in (
                    "colour", "background", "object_colour", "shape", "position", "counting", "size", "overall"))
                    + " |")
        lines += ["", "Targets: colour >= 90%, shape >= 80%, position >= 80%: "
                  + ", ".join(f"{k} {'met' if m[k] >= v else 'NOT met'}"
                              for k, v in (("colour", .9), ("shape", .8), ("position", .8))), ""]
    else:
        lines += ["Not evaluated yet.", ""]

    acc, acc_nb = bit_acc_row(read_jsonl(run / "transformer" / "eval.jsonl")), \
        bit_acc_row(read_jsonl(run / "transformer_no_bsc" / "eval.jsonl"))
    if acc:
        lines += ["## Ablation: bitwise self-correction (same budget)", "",
                  "Held-out bit accuracy of the transformer's teacher-forced predictions per scale:", "",
                  "| scale | " + " | ".join(str(i) for i in range(len(acc))) + " |",
                  "|---|" + "---|" * len(acc),
                  "| with BSC | " + " | ".join(f"{a:.3f}" for a in acc) + " |"]
        if acc_nb:
            lines.append("| without BSC | " + " | ".join(f"{a:.3f}" for a in acc_nb) + " |")
        if nb_sum:
            lines.append(f"\nWithout BSC: {nb_sum.get('steps')} steps, {(nb_sum.get('seconds') or 0) / 60:.1f} min.")
        lines.append("")
    lines += ["## Limits", "",
              "Trained on 1:1 pictures at 256x256 (tier 0.06M) only; other aspect ratios and tiers run but "
              "were never trained. It knows only the caption grammar above.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__)
        return 2
    run, bundle = Path(argv[0]), Path(argv[1])
    text = card(run, bundle)
    (bundle / "MODEL_CARD.md").write_text(text)
    print(f"wrote {bundle / 'MODEL_CARD.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
