"""`python -m infinity_core convert INPUT OUTPUT.safetensors [--dtype bf16|fp16|fp32|keep]`

Turns any accepted transformer or VAE checkpoint (official .pth, training checkpoint, {'vae': sd} file,
.safetensors, sharded folder or its index file) into one .safetensors file whose keys are exactly the
names our modules use: legacy transformer buffers dropped, flat `blocks.{i}` renamed, VAE conv/norm
names normalised (one bit-mask buffer kept per module name). The header metadata records what was
detected:

    infinity.kind    "transformer" | "vae"
    infinity.config  JSON of the TransformerConfig / VAEConfig fields
    infinity.source  the input's file name
    infinity.dtype   the dtype the floating-point tensors were written in
    infinity.converter  "infinity_core <version>"

Tensors are streamed one at a time (peak memory ~ the largest tensor) into a temporary file that is
renamed over OUTPUT only when everything was written, so a failure never leaves a partial file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from . import __version__
from . import checkpoint as ck_mod
from .checkpoint import CheckpointError

HELP = "convert a transformer or VAE checkpoint (any accepted layout) into one .safetensors file"


def convert(input_path, output_path, dtype="keep", kind: str = "auto", *, overwrite: bool = False,
            patchify: bool | None = None) -> dict:
    """Convert and return a summary dict (kind, config, tensors, bytes, dtype)."""
    src, out = Path(input_path), Path(output_path)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"{out}: the output must be a .safetensors file")
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: already exists (pass --force / overwrite=True to replace it)")
    if out.resolve() == src.resolve():
        raise CheckpointError(f"{out}: the output would overwrite the input")
    target = ck_mod.resolve_dtype(dtype)
    if kind == "auto":
        probe = ck_mod._Checkpoint(src)
        detected, desc = ck_mod.detect_kind(probe.meta_state_dict())
        probe.close()
        if detected == "other":
            raise CheckpointError(f"{src}: this looks like {desc}; expected an Infinity transformer or BSQ VAE")
        kind = detected
    if kind == "transformer":
        ck = ck_mod._transformer_checkpoint(src)
        cfg = ck_mod.transformer_config_from_state_dict(ck.meta_state_dict(), str(src), patchify=patchify,
                                                        metadata=ck.metadata)
        from .transformer import Infinity
        with torch.device("meta"):
            expected = ck_mod._expected_tensors(Infinity(cfg))
        to_fill, _ = ck_mod._plan(ck, expected, "the Infinity transformer", ck_mod._cfg_desc(cfg), strict=True,
                                  fillable=lambda k: k.endswith("zero_k_bias"),
                                  tolerated="the legacy buffers " + ", ".join(ck_mod.LEGACY_TRANSFORMER_KEYS))
    elif kind == "vae":
        ck, cfg = ck_mod._vae_checkpoint(src)
        from .vae import BSQVAE
        with torch.device("meta"):
            expected = ck_mod._expected_tensors(BSQVAE(cfg))
        to_fill, _ = ck_mod._plan(ck, expected, "the BSQ VAE", ck_mod._vae_desc(cfg), strict=True,
                                  fillable=ck_mod._is_mask, ignorable=ck_mod._is_mask,
                                  tolerated="the bit-mask aliases *.lfq.mask")
    else:
        raise ValueError(f"kind {kind!r}: expected 'auto', 'transformer' or 'vae'")

    have = ck.meta_state_dict()
    specs = {}
    for k, ref in expected.items():
        meta = have.get(k, ref)
        dt = target if (target is not None and meta.is_floating_point()) else meta.dtype
        if k in to_fill and ck_mod._is_mask(k):
            dt = ref.dtype
        specs[k] = (dt, tuple(meta.shape))

    def items():
        stored = ck.stream([k for k in specs if k not in to_fill],
                           {k: dt if dt.is_floating_point else None for k, (dt, _) in specs.items()})
        for k in specs:
            if k not in to_fill:
                yield next(stored)
            elif ck_mod._is_mask(k):
                yield k, (2 ** torch.arange(cfg.bits - 1, -1, -1, dtype=torch.int64)).to(specs[k][0])
            else:
                yield k, torch.zeros(specs[k][1], dtype=specs[k][0])
        for _ in stored:  # let the stream release its last tensor
            pass

    written_dtype = str(target).replace("torch.", "") if target is not None else "keep"
    metadata = {
        "format": "pt",
        "infinity.kind": kind,
        "infinity.config": json.dumps(dataclasses.asdict(cfg)),
        "infinity.source": src.name,
        "infinity.dtype": written_dtype,
        "infinity.converter": f"infinity_core {__version__}",
    }
    try:
        ck_mod.write_safetensors(out, items(), specs, metadata)
    finally:
        ck.close()
    return {"kind": kind, "config": cfg, "tensors": len(specs), "bytes": out.stat().st_size,
            "dtype": written_dtype, "output": str(out)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="checkpoint file (.pth/.bin/.safetensors), sharded folder, or index .json")
    p.add_argument("output", help="output .safetensors file")
    p.add_argument("--dtype", default="keep", choices=["keep", "bf16", "fp16", "fp32"],
                   help="dtype of the floating-point tensors in the output (default: keep the input's)")
    p.add_argument("--kind", default="auto", choices=["auto", "transformer", "vae"],
                   help="what the input is (default: detect from the key names)")
    p.add_argument("--patchify", default=None, choices=["yes", "no"],
                   help="transformers only: override the patchify inference (default: 56 bits/token -> yes)")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")


def run(args: argparse.Namespace) -> int:
    try:
        info = convert(args.input, args.output, args.dtype, args.kind, overwrite=args.force,
                       patchify=None if args.patchify is None else args.patchify == "yes")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = info["config"]
    print(f"wrote {info['output']}: {info['kind']} ({cfg.name}), {info['tensors']} tensors, "
          f"{info['bytes'] / 2**20:.1f} MiB, dtype {info['dtype']}")
    return 0
