"""Sharpen a BSQ VAE's decoder with its encoder frozen: the bits every picture encodes to stay exactly
the same, so a transformer trained on them needs no retraining.

    python -m infinity_core train-decoder --vae VAE.safetensors --features POOL.pt --out DIR [--steps N]

Why a separate trainer: with the encoder frozen, its features can come from the feature cache the
transformer training already computed (`train --feature-cache`, FeaturePool files), so a step costs
only the decoder. The summed codes of a whole picture are computed once per picture with the
inference quantiser (vae.quantize: exactly what encode() gives), and each step decodes random
crops of them (`--crop` latent cells, e.g. 8 -> 128x128 pixels) against the same crop of the
picture, which is re-rendered from the synthetic source (scene i of the pool's seed). The decoder
is convolutional, so crops train the same weights at a fraction of the cost of whole pictures;
the evaluation decodes whole held-out pictures (PSNR + the shapes analyzer on reconstructions).

Writes vae.safetensors / vae.pth (whole VAE, encoder untouched), log.jsonl, eval.jsonl and
summary.json in the layout train-vae writes.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from . import schedules as S
from .train import DEFAULT_OUT, FeaturePool, command_main, jsonl_append, lr_at, start_run, step_seed
from .train_vae import evaluate_vae, write_vae_files

HELP = "sharpen a BSQ VAE decoder on a feature cache, the encoder (so every bit) frozen"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae", required=True, help="the VAE whose decoder is trained (its encoder stays as is)")
    p.add_argument("--features", required=True,
                   help="a FeaturePool file of this VAE's encoder features (train --feature-cache writes them)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the shapes source the pool was built from")
    p.add_argument("--pn", default="0.06M", choices=list(S.TIERS))
    p.add_argument("--out", default=str(DEFAULT_OUT / "vae_decoder"))
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--max-minutes", type=float, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=8, help="latent cells per side of a training crop (0: whole)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--l1", type=float, default=1.0)
    p.add_argument("--l2", type=float, default=1.0)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--eval-samples", type=int, default=24)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)


def run(args) -> int:
    return 0 if train_decoder(args) is not None else 1


def train_decoder(args) -> dict:
    from . import data as D
    from .checkpoint import load_vae

    dist, out, t_start = start_run(args)
    device = dist.device
    vae = load_vae(args.vae, torch.float32, device)
    cfg, p = vae.cfg, vae.cfg.patch_size
    vae.encoder.requires_grad_(False).eval()
    vae.decoder.requires_grad_(True).train()
    vae.to(memory_format=torch.channels_last)

    pool = FeaturePool.load(args.features)
    if set(pool.templates) != {1.0}:
        raise ValueError(f"--features {args.features}: templates {sorted(set(pool.templates))}; "
                         "the decoder trainer reads 1:1 shapes pools only")
    source = D.SyntheticShapes(args.data_seed, "train", args.pn)
    vsched = S.vae_schedule(S.get_schedule(1.0, args.pn), cfg.patchify_vae)
    with torch.no_grad():  # summed codes of every pool picture, once: [N, d, h, w]
        feats = torch.stack(pool.feats).float()
        codes = torch.cat([vae.quantize(feats[a:a + 64].to(device), vsched)[0].cpu()
                           for a in range(0, len(feats), 64)])
    h, w = codes.shape[-2:]
    crop = min(args.crop or h, h, w)
    held = D.SyntheticShapes(args.data_seed, "heldout", args.pn)
    ev = [held.item(i) for i in range(args.eval_samples)]
    eval_images = torch.stack([e["image"] for e in ev]).to(device) if ev else None
    eval_scenes = [e["scene"] for e in ev]

    params = list(vae.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    dist.print(f"decoder of {args.vae}: {sum(q.numel() for q in params) / 1e6:.2f}M params; "
               f"{len(codes)} pictures, crops of {crop}x{crop} cells ({crop * p} px), batch {args.batch_size}")
    log_path, eval_path = out / "log.jsonl", out / "eval.jsonl"
    for pth in (log_path, eval_path):
        pth.unlink(missing_ok=True)

    def batch(step):
        rng = random.Random(step_seed(args.seed, step, dist.rank, "decoder"))
        ix = [rng.randrange(len(codes)) for _ in range(args.batch_size)]
        zs, ims = [], []
        for i in ix:
            img = source.item(i)["image"]                              # [3, H, W], the pool's picture i
            y, x = rng.randrange(h - crop + 1), rng.randrange(w - crop + 1)
            zs.append(codes[i, :, y:y + crop, x:x + crop])
            ims.append(img[:, y * p:(y + crop) * p, x * p:(x + crop) * p])
        return (torch.stack(zs).to(device).contiguous(memory_format=torch.channels_last),
                torch.stack(ims).to(device))

    def evaluate(step):
        if eval_images is None:
            return None
        r = evaluate_vae(vae, eval_images, eval_scenes)
        vae.decoder.train()
        r["step"] = step
        jsonl_append(eval_path, r)
        a = r.get("analyzer", {})
        dist.print(f"[eval {step}] PSNR {r['psnr']:.2f} dB, analyzer on reconstructions: colour "
                   f"{a.get('colour', 0):.3f} shape {a.get('shape', 0):.3f} position {a.get('position', 0):.3f}")
        return r

    last = evaluate(0)
    step = 0
    for step in range(args.steps):
        if args.max_minutes and (time.time() - t_start) / 60 > args.max_minutes:
            dist.print(f"time budget of {args.max_minutes} min reached at step {step}")
            break
        ts = time.time()
        cur_lr = lr_at(step, args.steps, args.lr, args.warmup_steps, "linear-decay", 0.7)
        for g in opt.param_groups:
            g["lr"] = cur_lr
        z, img = batch(step)
        rec = vae.decoder(z)                                               # [B, 3, crop*p, crop*p]
        l1 = (rec - img).abs().mean()
        l2 = (rec - img).pow(2).mean()
        loss = args.l1 * l1 + args.l2 * l2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = float(torch.nn.utils.clip_grad_norm_(params, args.clip))
        opt.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            psnr = 10 * math.log10(4 / max(l2.item(), 1e-12))
            jsonl_append(log_path, {"step": step, "loss": loss.item(), "l1": l1.item(), "l2": l2.item(),
                                    "psnr": psnr, "lr": cur_lr, "grad_norm": gn, "sec": time.time() - ts,
                                    "elapsed_min": (time.time() - t_start) / 60})
            print(f"step {step:5d} loss {loss.item():.4f} psnr {psnr:.2f} {time.time() - ts:.2f}s/step "
                  f"{(time.time() - t_start) / 60:.1f}min", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            last = evaluate(step + 1)
    else:
        step = args.steps
    write_vae_files({k: v.detach().cpu() for k, v in vae.state_dict().items()}, cfg, out)
    if not last or last.get("step") != step:
        last = evaluate(step)
    summary = {"steps": step, "seconds": time.time() - t_start, "crop": crop, "eval": last, "out": str(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    dist.print(f"done: {step} steps in {summary['seconds'] / 60:.1f} min -> {out}")
    return summary


if __name__ == "__main__":
    raise SystemExit(command_main(HELP, add_arguments, run))
