"""BSQ-VAE (tokenizer) training at any size of the architecture, single process or torchrun (DDP).

    python -m infinity_core train-vae --out RUN_DIR [--bits 16 --base-ch 32 --ch-mult 1,1,2,2,4
        --num-res-blocks 1] [--data shapes | JSONL_FOLDER] [--steps N] [--crop 128 --crop-until N]

Forward in training: encoder -> features f -> multi-scale residual BSQ along the (official) schedule
of the latent grid, exactly the inference quantiser (area-shrunk residual per scale, l2-normalised,
sign / sqrt(d)) but straight-through (u + sg(q - u)) so the reconstruction loss reaches the encoder
-> decoder on the summed codes.

Loss = L1 + MSE on pixels in [-1, 1]
     + beta * commitment, sum over scales of mean ||u - sg(q)||^2 (u = the normalised residual)
     + w_ent * (mean per-bit entropy H(p(b | u)) - gamma * per-bit entropy of the batch mean of p)
BSQ's entropy terms (Zhao et al. 2024) with the factorised approximation: with codes c = s/sqrt(d),
s in {-1, +1}^d, the soft assignment q(c|u) ~ exp(tau c.u) factorises over bits, p(s_i = +1 | u) =
sigmoid(2 tau u_i / sqrt(d)). Minimising the first term makes each code confident; maximising the
second (codebook entropy, factorised per bit) keeps every bit in use. Defaults: beta 0.25,
w_ent 0.1, gamma 1, tau 100 (the released BSQ settings' inverse temperature).

Crops: --crop S trains on random S x S crops (aligned to the stride) until --crop-until steps, then
on full pictures (the convolutions are translation-equivariant; the last phase adapts GroupNorm to
full-picture statistics). Crops are ~(256/S)^2 times cheaper at 256 x 256.

Outputs in --out: vae-ckpt-last.pth ({'vae': state_dict, 'optimizer', 'step', 'args', 'config'},
the official VAE layout + our resume state), vae.pth ({'vae': state_dict}), vae.safetensors,
log.jsonl, eval.jsonl (PSNR and the shapes analyzer's accuracy on held-out reconstructions).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import bsq
from . import schedules as S
from .train import (DEFAULT_OUT, Dist, _plain, atomic_torch_save, cleanup_distributed, full_state_dict,
                    jsonl_append, load_model_state, load_optimizer_state, lr_at, optimizer_state, save_safetensors,
                    seed_step, start_run, step_seed, wrap_model, command_main)
from .zoo import VAEConfig

HELP = "train a BSQ VAE tokenizer (reconstruction + BSQ commitment and entropy losses)"


# ------------------------------------------------------------------------------------------------
# straight-through multi-scale BSQ with the BSQ losses

def latent_schedule(h: int, w: int, patchify: bool = False):
    """The schedule that quantises a latent of h x w: the official template schedule ending there
    (1:1 prefixes for square crops). With patchify (stride-8 VAEs, 2x2 latent cells per token) the
    latent grids are twice the token grids of the schedule ending at h/2 x w/2, as at inference
    (schedules.vae_schedule)."""
    if patchify:
        return S.vae_schedule(latent_schedule(h // 2, w // 2), True)
    for t, grids in S.TEMPLATES.items():
        for n in range(1, len(grids) + 1):
            if grids[n - 1] == (h, w):
                return [(1, a, b) for a, b in grids[:n]]
    raise ValueError(f"no official schedule ends at a {h}x{w} latent")


def picture_schedule(cfg, img: torch.Tensor):
    """latent_schedule of the latent grid that the VAE `cfg` makes of pictures img [..., H, W]."""
    return latent_schedule(img.shape[-2] // cfg.patch_size, img.shape[-1] // cfg.patch_size, cfg.patchify_vae)


def quantize_train(f: torch.Tensor, schedule, inv_temperature: float = 100.0):
    """Multi-scale residual BSQ of f [B, d, H, W] with straight-through gradients.
    Returns (summed codes [B, d, H, W] (differentiable), stats) where stats holds the commitment loss,
    per-sample and codebook entropies (nats per bit, averaged over scales) and bit balance."""
    B, d, H, W = f.shape
    residual, summed = f, torch.zeros_like(f)
    commit = f.new_zeros(())
    ent_sample = f.new_zeros(())
    ent_book = f.new_zeros(())
    ones_frac = []
    for _, h, w in schedule:
        r = residual if (h, w) == (H, W) else bsq.resize_area(residual, (h, w))
        u = F.normalize(r, dim=1)                                          # [B, d, h, w], unit cells
        q = torch.where(u > 0, 1.0, -1.0) / math.sqrt(d)
        q_st = u + (q - u).detach()
        commit = commit + (u - q.detach()).pow(2).sum(1).mean()
        logit = 2 * inv_temperature * u / math.sqrt(d)                     # p(bit = 1 | u) = sigmoid(logit)
        p = torch.sigmoid(logit)
        ent_sample = ent_sample + _bin_entropy(p, logit).mean()
        p_mean = p.mean(dim=(0, 2, 3))                                     # [d]
        ent_book = ent_book + _bin_entropy(p_mean).mean()
        ones_frac.append(float((u > 0).float().mean()))
        up = q_st if (h, w) == (H, W) else bsq.resize_bilinear(q_st, (H, W))
        residual = residual - up
        summed = summed + up
    K = len(schedule)
    return summed, {"commit": commit, "ent_sample": ent_sample / K, "ent_book": ent_book / K,
                    "ones_frac": sum(ones_frac) / K}


def _bin_entropy(p: torch.Tensor, logit: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy (nats) of Bernoulli(p); from logits when given (numerically stable)."""
    if logit is not None:
        return F.softplus(logit) - p * logit
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log())


class _VAETrainForward(torch.nn.Module):
    def __init__(self, vae, inv_temperature):
        super().__init__()
        self.vae, self.inv_temperature = vae, inv_temperature

    def forward(self, img, schedule):
        f = self.vae.encode_features(img)
        summed, stats = quantize_train(f, schedule, self.inv_temperature)
        return self.vae.decoder(summed), stats


# ------------------------------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate_vae(vae, images: torch.Tensor, scenes=None, batch: int = 8) -> dict:
    """PSNR of the inference path (vae.encode -> summed codes -> decode) on fixed pictures, and, for
    shapes scenes, the pixel analyzer's accuracy on the reconstructions (upper bound for generation)."""
    from . import shapes_eval as E
    vae.eval()
    mse_sum, n = 0.0, 0
    rows = []
    for a in range(0, len(images), batch):
        x = images[a:a + batch]
        sched = picture_schedule(vae.cfg, x)
        _, summed, _, _ = vae.encode(x, sched)
        y = vae.decode(summed)
        mse_sum += float(((y - x) / 2).pow(2).mean(dim=(1, 2, 3)).sum())
        n += len(x)
        if scenes is not None:
            u8 = ((y.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            for sc, im in zip(scenes[a:a + batch], u8):
                rows.append(E.score(sc, E.analyze(im), *im.shape[:2]))
    mse = mse_sum / max(n, 1)
    out = {"psnr": 10 * math.log10(1 / max(mse, 1e-12)), "mse01": mse}
    if rows:
        out["analyzer"] = E.aggregate(rows)
    return out


# ------------------------------------------------------------------------------------------------
# command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("architecture")
    g.add_argument("--bits", type=int, default=16)
    g.add_argument("--patch-size", type=int, default=16, choices=[8, 16])
    g.add_argument("--base-ch", type=int, default=32)
    g.add_argument("--ch-mult", default="1,1,2,2,4")
    g.add_argument("--num-res-blocks", type=int, default=1, help="encoder; the decoder has one more")
    g.add_argument("--norm-groups", type=int, default=8,
                   help="GroupNorm groups (released VAEs: 32 with 128 channels; with 32 channels use 8 so "
                        "each group holds 4 channels, or the decoder cannot keep colours)")
    g.add_argument("--init-from", default=None, help="start from these VAE weights (fine-tuning)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="shapes", help="'shapes' or a folder of official jsonl files")
    g.add_argument("--image-root", default=None)
    g.add_argument("--data-seed", type=int, default=0)
    g.add_argument("--pn", default="0.06M", choices=list(S.TIERS))
    g.add_argument("--templates", default="1.0")
    g.add_argument("--crop", type=int, default=0, help="train on random crops of this size (0: full pictures)")
    g.add_argument("--crop-until", type=int, default=-1, help="use crops before this step (-1: always)")
    g.add_argument("--full-batch-size", type=int, default=0,
                   help="per-process batch once crops stop (0: --batch-size)")
    g.add_argument("--crop-schedule", default="",
                   help="phases 'SIZE:UNTIL_STEP:BATCH,...': SIZE = crops of SIZE px, rSIZE = whole pictures shrunk "
                        "to SIZE px, e.g. 'r128:600:8'; full pictures (--full-batch-size) afterwards. "
                        "Overrides --crop/--crop-until")
    g.add_argument("--eval-samples", type=int, default=32)
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=8, help="per process")
    g.add_argument("--steps", type=int, default=1000)
    g.add_argument("--max-minutes", type=float, default=0)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--encoder-lr-mult", type=float, default=0.1,
                   help="encoder lr = lr * this: a slower encoder keeps the decoder's input from drifting "
                        "(with flat-colour data and equal rates the pair collapses to the mean colour)")
    g.add_argument("--lr-schedule", default="linear-decay", choices=["constant", "linear-decay"])
    g.add_argument("--decay-start", type=float, default=0.7)
    g.add_argument("--warmup-steps", type=int, default=50)
    g.add_argument("--betas", default="0.9,0.99")
    g.add_argument("--wd", type=float, default=0.0)
    g.add_argument("--clip", type=float, default=1.0)
    g.add_argument("--l1", type=float, default=1.0)
    g.add_argument("--l2", type=float, default=1.0)
    g.add_argument("--commit", type=float, default=0.25, help="BSQ commitment weight (beta)")
    g.add_argument("--entropy", type=float, default=0.1, help="BSQ entropy-penalty weight")
    g.add_argument("--entropy-gamma", type=float, default=1.0, help="weight of the codebook-entropy term")
    g.add_argument("--inv-temperature", type=float, default=100.0)
    g = p.add_argument_group("run")
    g.add_argument("--out", default=str(DEFAULT_OUT / "vae"))
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    g.add_argument("--threads", type=int, default=0)
    g.add_argument("--resume", default="auto")
    g.add_argument("--channels-last", type=int, default=1,
                   help="channels-last memory format (oneDNN convolutions ~1.5x faster on CPU)")
    g.add_argument("--ckpt-every", type=int, default=200)
    g.add_argument("--eval-every", type=int, default=200)
    g.add_argument("--log-every", type=int, default=10)


def run(args) -> int:
    return 0 if train_vae(args) is not None else 1


def write_vae_files(sd: dict, cfg: VAEConfig, out: Path):
    from . import __version__
    atomic_torch_save({"vae": sd, "config": _plain(dataclasses.asdict(cfg))}, out / "vae.pth")
    meta = {"infinity.kind": "vae", "infinity.config": json.dumps(dataclasses.asdict(cfg)),
            "infinity.source": "infinity_core.train_vae", "infinity.dtype": "float32",
            "infinity.converter": f"infinity_core {__version__}"}
    save_safetensors(sd, out / "vae.safetensors", meta)


def train_vae(args) -> dict:
    from . import data as D
    from .vae import BSQVAE

    dist, out, t_start = start_run(args)
    device = dist.device
    cfg = VAEConfig(bits=args.bits, patch_size=args.patch_size,
                    ch_mult=tuple(int(c) for c in args.ch_mult.replace(",", " ").split()),
                    base_ch=args.base_ch, num_res_blocks=args.num_res_blocks, norm_groups=args.norm_groups,
                    name="custom")
    torch.manual_seed(args.seed)
    if args.init_from:
        from .checkpoint import load_vae
        loaded = load_vae(args.init_from)
        cfg = dataclasses.replace(loaded.cfg, name="custom")
        vae = BSQVAE(cfg)
        vae.load_state_dict(loaded.state_dict())
    else:
        vae = BSQVAE(cfg)
        vae.init_for_training()
    vae.to(device).train()
    mf = torch.channels_last if args.channels_last else torch.contiguous_format
    vae.to(memory_format=mf)
    fwd = wrap_model(_VAETrainForward(vae, args.inv_temperature), dist, fsdp=False)
    params = [p for p in fwd.parameters() if p.requires_grad]
    betas = tuple(float(b) for b in args.betas.split(","))
    enc_ids = {id(p) for p in vae.encoder.parameters()}
    opt = torch.optim.AdamW([{"params": [p for p in params if id(p) not in enc_ids], "lr_mult": 1.0},
                             {"params": [p for p in params if id(p) in enc_ids], "lr_mult": args.encoder_lr_mult}],
                            lr=args.lr, betas=betas, weight_decay=args.wd)
    nparams = sum(p.numel() for p in vae.parameters())
    dist.print(f"BSQ VAE {cfg.bits} bits, stride {cfg.patch_size}, ch {cfg.base_ch} x {cfg.ch_mult}, "
               f"{cfg.num_res_blocks} res blocks: {nparams / 1e6:.2f}M params; world {dist.world}")

    templates = [S.nearest_template(float(t)) for t in args.templates.replace(",", " ").split()]
    if args.data == "shapes":
        source = D.SyntheticShapes(args.data_seed, "train", args.pn, templates)
        held = D.SyntheticShapes(args.data_seed, "heldout", args.pn, templates[:1])
        ev = [held.item(i) for i in range(args.eval_samples)]
        eval_images = torch.stack([e["image"] for e in ev]) if ev else None
        eval_scenes = [e["scene"] for e in ev]
        sampler = None
    else:
        source = D.JsonlImageText(args.data, args.pn, args.image_root, 0.5, templates)
        sampler = D.TemplateBatchSampler(source.groups, args.batch_size, args.seed, dist.rank, dist.world)
        eval_images, eval_scenes = None, None

    phases = []  # (until_step, kind 'crop' | 'resize', size, batch)
    for item in filter(None, args.crop_schedule.replace(" ", "").split(",")):
        size, until, bsz = item.split(":")
        kind = "resize" if size.startswith("r") else "crop"
        phases.append((int(until), kind, int(size.lstrip("r")), int(bsz)))
    if not phases and args.crop:
        phases.append((args.crop_until if args.crop_until >= 0 else 1 << 62, "crop", args.crop, args.batch_size))

    def phase(step):
        for until, kind, size, bsz in phases:
            if step < until:
                return kind, size, bsz
        return None, 0, (args.full_batch_size or args.batch_size)

    max_bs = max([args.batch_size, args.full_batch_size] + [p[3] for p in phases])

    def get_images(step):
        kind, crop, bs = phase(step)
        cropping = kind == "crop"
        if sampler is None:
            k = len(templates)
            base = (step * dist.world + dist.rank) * max_bs
            b = source.batch([(base + j) * k + step % k for j in range(bs)])
        else:
            _, ix = sampler.batch_at(step)
            b = source.batch(ix, random.Random(step))
        img = b["image"]
        if cropping:
            H, W = img.shape[-2:]
            c, st = crop, cfg.patch_size
            if c < H or c < W:
                rng = random.Random(step_seed(args.seed, step, dist.rank, "crop"))
                crops = []
                for im in img:
                    y = rng.randrange(0, (H - c) // st + 1) * st
                    x = rng.randrange(0, (W - c) // st + 1) * st
                    crops.append(im[:, y:y + c, x:x + c])
                img = torch.stack(crops)
        elif kind == "resize":  # the whole picture, shrunk (area filter): every sample keeps its context
            H, W = img.shape[-2:]
            s_ = crop / max(H, W)
            hw = (max(cfg.patch_size, round(H * s_ / cfg.patch_size) * cfg.patch_size),
                  max(cfg.patch_size, round(W * s_ / cfg.patch_size) * cfg.patch_size))
            img = F.interpolate(img, size=hw, mode="area")
        return img.to(device).contiguous(memory_format=mf)

    start = 0
    ckpt_path = out / "vae-ckpt-last.pth"
    resume = None if args.resume == "no" else (ckpt_path if args.resume == "auto" else Path(args.resume))
    if resume is not None and resume.is_file():
        ck = torch.load(resume, map_location="cpu", weights_only=True)
        load_model_state(fwd, {"vae." + k: v for k, v in ck["vae"].items()})
        load_optimizer_state(fwd, opt, ck["optimizer"])
        start = int(ck["step"])
        dist.print(f"resumed from {resume} at step {start}")
    log_path, eval_path = out / "log.jsonl", out / "eval.jsonl"
    if dist.main and start == 0:
        for pth in (log_path, eval_path):
            pth.unlink(missing_ok=True)

    def save(step):
        sd = {k[len("vae."):]: v for k, v in full_state_dict(fwd).items()}
        osd = optimizer_state(fwd, opt)
        if dist.main:
            atomic_torch_save({"vae": sd, "optimizer": osd, "step": step, "args": _plain(vars(args)),
                               "config": _plain(dataclasses.asdict(cfg))}, ckpt_path)
            write_vae_files(sd, cfg, out)
        dist.barrier()

    def evaluate(step):
        if eval_images is None or not dist.main:
            return None
        r = evaluate_vae(vae, eval_images.to(device), eval_scenes)
        vae.train()
        r["step"] = step
        jsonl_append(eval_path, r)
        a = r.get("analyzer", {})
        dist.print(f"[eval {step}] PSNR {r['psnr']:.2f} dB" + (
            f", analyzer on reconstructions: colour {a['colour']:.3f} shape {a['shape']:.3f} "
            f"position {a['position']:.3f} counting {a['counting']:.3f}" if a else ""))
        return r

    last = None
    step = start
    for step in range(start, args.steps):
        if args.max_minutes and (time.time() - t_start) / 60 > args.max_minutes:
            dist.print(f"time budget of {args.max_minutes} min reached at step {step}")
            break
        ts = time.time()
        cur_lr = lr_at(step, args.steps, args.lr, args.warmup_steps, args.lr_schedule, args.decay_start)
        for g in opt.param_groups:
            g["lr"] = cur_lr * g.get("lr_mult", 1.0)
        img = get_images(step)
        seed_step(args.seed, step, dist.rank)
        sched = picture_schedule(cfg, img)
        rec, st = fwd(img, sched)
        l1 = (rec - img).abs().mean()
        l2 = (rec - img).pow(2).mean()
        loss = (args.l1 * l1 + args.l2 * l2 + args.commit * st["commit"]
                + args.entropy * (st["ent_sample"] - args.entropy_gamma * st["ent_book"]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = float(torch.nn.utils.clip_grad_norm_(params, args.clip if args.clip > 0 else float("inf")))
        opt.step()
        if dist.main and (step % args.log_every == 0 or step == args.steps - 1):
            loss, l1, l2 = loss.detach(), l1.detach(), l2.detach()
            psnr = 10 * math.log10(4 / max(float(l2), 1e-12))
            row = {"step": step, "loss": float(loss), "l1": float(l1), "l2": float(l2), "psnr": psnr,
                   "commit": float(st["commit"]), "ent_sample": float(st["ent_sample"]),
                   "ent_book": float(st["ent_book"]), "ones_frac": st["ones_frac"], "lr": cur_lr,
                   "grad_norm": gn, "sec": time.time() - ts, "res": list(img.shape[-2:]),
                   "elapsed_min": (time.time() - t_start) / 60,
                   "cpu_min": time.process_time() / 60}
            jsonl_append(log_path, row)
            print(f"step {step:5d} loss {float(loss):.4f} l1 {float(l1):.4f} psnr {psnr:.2f} commit "
                  f"{float(st['commit']):.3f} H(b|u) {float(st['ent_sample']):.3f} H(b) {float(st['ent_book']):.3f} "
                  f"{tuple(img.shape[-2:])} {time.time() - ts:.2f}s/step {(time.time() - t_start) / 60:.1f}min",
                  flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            last = evaluate(step + 1)
        if args.ckpt_every and (step + 1) % args.ckpt_every == 0 and step + 1 < args.steps:
            save(step + 1)
    else:
        step = args.steps
    if step > start or not ckpt_path.exists():
        save(step)
        last = evaluate(step)
    summary = {"steps": step, "seconds": time.time() - t_start, "cpu_seconds": time.process_time(), "params": nparams,
               "config": _plain(dataclasses.asdict(cfg)), "eval": last, "out": str(out)}
    if dist.main:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        dist.print(f"done: {step} steps in {summary['seconds'] / 60:.1f} min -> {out}")
    cleanup_distributed(dist)
    return summary


if __name__ == "__main__":
    raise SystemExit(command_main(HELP, add_arguments, run))
