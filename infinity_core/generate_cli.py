"""`python -m infinity_core generate ...`: headless text-to-image, PNGs with settings in metadata."""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from . import schedules as S
from .sampler import parse_list

HELP = "text-to-image: render PNGs from a prompt (settings stored in the PNG metadata)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transformer", required=True, help="transformer checkpoint (.pth, .safetensors or shard folder)")
    p.add_argument("--vae", default=None, help="VAE checkpoint (default: found next to the transformer)")
    p.add_argument("--text-encoder", required=True, help="flan-t5-xl folder, or an encoder-only .safetensors")
    p.add_argument("--t5-config", default=None, help="config.json for a single-file text encoder")
    p.add_argument("--tokenizer", default=None, help="folder with spiece.model / tokenizer.json")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--ratio", type=float, default=None, help="height/width, snapped to the nearest template")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--tier", default="1M", choices=list(S.TIERS))
    p.add_argument("--cfg", default="3", help="one number or one per scale: '3' or '4,4,3,3,...'")
    p.add_argument("--tau", default="1", help="one number or one per scale")
    p.add_argument("--top-k", type=int, default=900)
    p.add_argument("--top-p", type=float, default=0.97)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seed-mode", default="official", choices=["official", "per_image"])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--cfg-insertion-layer", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--attn", default="sdpa", choices=["auto", "sdpa", "xformers", "flash"])
    p.add_argument("--out", default="infinity_{i:03d}.png", help="output path; {i} is the image index")


def _number_or_list(text: str, name: str):
    values = parse_list(text, name)
    return values[0] if len(values) == 1 else values


def save_png(image01, path: Path, settings_json: str) -> None:
    """Write one [H, W, 3] float image atomically (temp file + rename) with the settings as text."""
    arr = (np.clip(image01.cpu().numpy(), 0, 1) * 255).round().astype(np.uint8)
    info = PngImagePlugin.PngInfo()
    info.add_text("infinity", settings_json)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(arr).save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def run(args: argparse.Namespace) -> int:
    from .pipeline import InfinityPipeline
    pipe = InfinityPipeline.from_files(args.transformer, args.vae, args.text_encoder, t5_config=args.t5_config,
                                       tokenizer_path=args.tokenizer, dtype=args.dtype, device=args.device,
                                       attn_backend=args.attn)
    gen = pipe.generate(args.prompt, args.negative_prompt or None, h_div_w=args.ratio, width=args.width,
                        height=args.height, tier=args.tier, cfg=_number_or_list(args.cfg, "--cfg"),
                        tau=_number_or_list(args.tau, "--tau"), top_k=args.top_k, top_p=args.top_p,
                        seed=args.seed, seed_mode=args.seed_mode, batch_size=args.batch_size,
                        cfg_insertion_layer=args.cfg_insertion_layer)
    settings = gen.settings.to_json()
    for i, img in enumerate(gen.images):
        path = Path(args.out.format(i=i))
        save_png(img, path, settings)
        print(path)
    return 0
