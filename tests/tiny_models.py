"""Tiny random-weight Infinity models for tests that must run on a fresh clone (no fixtures)."""
from __future__ import annotations

import torch

from infinity_core.transformer import Infinity
from infinity_core.vae import BSQVAE
from infinity_core.zoo import TransformerConfig, VAEConfig

TINY_T = TransformerConfig(depth=2, width=64, num_heads=2, vae_bits=16, text_channels=128, block_chunks=2,
                           name="tiny")
TINY_T_PATCHIFY = TINY_T.with_(vae_bits=8, patchify=True, name="tiny_patchify")
TINY_VAE = VAEConfig(bits=16, patch_size=16, ch_mult=(1, 1, 1, 1, 1), base_ch=32, name="tiny_vae")
TINY_VAE_F8 = VAEConfig(bits=8, patch_size=8, ch_mult=(1, 1, 1, 1), base_ch=32, name="tiny_vae_f8")


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Overwrite every parameter with seeded noise (like the fixtures: no zero gates or biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = std if p.dim() < 2 else min(std, 1.5 / p.shape[-1] ** 0.5)
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module


def tiny_transformer(cfg: TransformerConfig = TINY_T, seed: int = 0, **kw) -> Infinity:
    return randomize_(Infinity(cfg, **kw), seed)


def tiny_vae(cfg: VAEConfig = TINY_VAE, seed: int = 1) -> BSQVAE:
    vae = BSQVAE(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if p.dim() == 4:
                torch.nn.init.kaiming_normal_(p, generator=g)
            elif name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return vae


def random_text(B: int, lens=None, width: int = 128, seed: int = 0):
    """Packed stand-in T5 features: (kv_compact [sum L, width], cu_seqlens [B+1] int32)."""
    g = torch.Generator().manual_seed(seed)
    lens = lens or [3 + 2 * i for i in range(B)]
    kv = torch.randn(sum(lens), width, generator=g) * 0.3
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    return kv, cu
