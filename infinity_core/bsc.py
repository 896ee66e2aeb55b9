"""Bitwise self-correction (spec 6.1): the teacher-forcing inputs and bit labels of training.

Walk the scales coarse to fine keeping a running sum of enlarged codes. At each scale the label is
the bits of (features - running sum), area-shrunk to the scale (not resampled at the last scale).
On the first `noise_layers` scales a random subset of those bits is inverted before their codes
enter the running sum, so later scales learn to correct earlier mistakes; the label of the flipped
scale itself stays the clean bit (quirk Q18). Each scale's input is the running sum of the scales
before it, shrunk bilinearly (bsq.next_scale_input).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

from . import bsq

FlipSource = Callable[[int, Tensor], Tensor]  # (scale index, bits [B,1,h,w,d]) -> bool mask, same shape


def random_flip_mask(bits: Tensor, strength: float) -> Tensor:
    """The official draw: flip probability p uniform on {0, 0.01, ..., strength} from NumPy's global
    RNG (one p per scale for the whole batch), then an independent torch.rand < p per bit on the CPU
    generator. Seeding np.random and torch with the same values replays the official masks."""
    p = np.random.randint(0, 100 * strength + 1) * 0.01
    return torch.rand(*bits.shape).to(bits.device) < p


def bitwise_self_correction(features: Tensor, vae_schedule, patchify: bool, noise_layers: int,
                            strength: float, requant: bool = True,
                            flip_source: FlipSource | None = None) -> tuple[Tensor, list[Tensor]]:
    """features [B, d, H, W] (VAE encoder output, fp32), vae_schedule [(1, h_k, w_k)] ending at (H, W).
    Returns
      x_BLC_wo_prefix [B, L-1, d_in]: inputs of scales 1..K-1 (scale 0 is the start token), fp32,
      labels: per scale [B, h*w, d_in] uint8 bits (2x2-folded to d_in = 4d when patchify).
    Noise: scales si < noise_layers get their bits inverted where flip_source(si, bits) is True
    (default: random_flip_mask with `strength`); with requant the inverted bits' codes are summed,
    without it the clean codes are (the flips then change nothing)."""
    if flip_source is None:
        flip_source = lambda si, bits: random_flip_mask(bits, strength)  # noqa: E731
    full = tuple(features.shape[-2:])
    last = len(vae_schedule) - 1
    cum = torch.zeros_like(features)                                        # [B, d, H, W] running sum
    inputs, labels = [], []
    for si, (_, h, w) in enumerate(vae_schedule):
        residual = features - cum  # recomputed from the sum (the VAE quantiser subtracts successively)
        if si != last:
            residual = bsq.resize_area(residual, (h, w)).contiguous()       # [B, d, h, w]
        codes, bits = bsq.quantize_latent(residual)                         # bits [B, 1, h, w, d]
        labels.append(bsq.bits_to_tokens(bits, patchify))                   # [B, h*w, d_in]
        if si < noise_layers:
            flip = flip_source(si, bits)
            if flip.shape != bits.shape:
                raise ValueError(f"flip mask of scale {si} has shape {tuple(flip.shape)}, "
                                 f"expected {tuple(bits.shape)}")
            if requant:
                codes = bsq.codes_from_bits(torch.where(flip, 1 - bits, bits))
        cum = cum + bsq.resize_bilinear(codes, full).contiguous()           # kept channels-first, as officially
        if si != last:
            inputs.append(bsq.next_scale_input(cum, vae_schedule[si + 1][-2:], patchify))
    return torch.cat(inputs, 1), labels
