"""Bits and codes of Infinity's BSQ latents: the math shared by the VAE, training (BSC) and the sampler.

A latent cell holds d bits; bit 1 <=> code +1/sqrt(d) on that channel, bit 0 <=> -1/sqrt(d).
A picture is coded coarse to fine: each scale's codes are enlarged (bilinear) to the full latent
grid and summed; the next scale's input is that running sum shrunk (bilinear) to the next grid.

Layouts (the official code carries a time axis T=1; we drop it and put it back only around resampling):
  map     [B, C, H, W]     fp32, channels-first dims (features, residuals, codes, summed codes)
  bits    [B, 1, H, W, d]  uint8 0/1, channels-last: the official bit-label layout
  tokens  [B, h*w, d_in]   row-major over the grid; d_in = d, or 4d when 2x2 cells are folded (8B)

Memory layout is part of the numerics: PyTorch's CPU resampling kernels for channels-last and
channels-first memory round differently (~1 ulp), and so do the 4-D and 5-D kernels. Codes are
channels-last views in memory, exactly as in the official code, resampling goes through the same
5-D calls, and callers keep running sums in the official layout, so the fixtures are matched bit
for bit. All functions keep tensors in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _resize(x: Tensor, hw, mode: str) -> Tensor:
    # [B, C, H, W] -> [B, C, 1, H, W] -> resample -> [B, C, h, w]. The official code resamples 5-D
    # tensors; the 4-D kernels give different roundings, so we go through the very same 5-D calls.
    h, w = hw
    return F.interpolate(x.unsqueeze(2), size=(1, int(h), int(w)), mode=mode).squeeze(2)


def resize_area(x: Tensor, hw) -> Tensor:
    """[B, C, H, W] -> [B, C, h, w], adaptive average pooling (F.interpolate 'area'): output cell i
    averages input cells floor(i*H/h) .. ceil((i+1)*H/h)-1 (windows overlap for non-integer ratios)."""
    return _resize(x, hw, "area")


def resize_bilinear(x: Tensor, hw) -> Tensor:
    """[B, C, H, W] -> [B, C, h, w], bilinear, align_corners=False, no antialias (also when shrinking).
    Bit for bit the official 'trilinear' on [B, C, 1, H, W]."""
    return _resize(x, hw, "trilinear")


def quantize_latent(z: Tensor) -> tuple[Tensor, Tensor]:
    """One-scale BSQ as the official quantiser computes it.
    z [B, d, h, w] -> (codes [B, d, h, w] fp32, bits [B, 1, h, w, d] uint8).
    Each d-vector is l2-normalised, then code = +-1/sqrt(d) by sign, in the straight-through form
    z + (zhat - z) which equals +-1/sqrt(d) only up to one ulp (quirk Q17). Zero -> bit 0."""
    # The official code packs the cells into a contiguous channels-last copy before normalising;
    # normalising a strided view rounds differently, so the copy is part of the numerics.
    z = F.normalize(z.permute(0, 2, 3, 1).contiguous(), dim=-1)            # [B, h, w, d]
    zhat = torch.where(z > 0, 1.0, -1.0) * (1.0 / z.shape[-1] ** 0.5)
    q = z + (zhat - z)
    bits = (q > 0).to(torch.uint8).unsqueeze(1)                             # [B, 1, h, w, d]
    codes = q.permute(0, 3, 1, 2)                                           # [B, d, h, w] (channels-last view)
    return codes, bits


def bits_from_latent(z: Tensor) -> Tensor:
    """z [B, d, h, w] -> bits [B, 1, h, w, d] uint8: 1 where the (shrunk) latent is > 0, 0 otherwise
    (an exact zero gives bit 0)."""
    return quantize_latent(z)[1]


def codes_from_bits(bits: Tensor, d: int | None = None) -> Tensor:
    """bits [B, 1, h, w, d] (any integer dtype) -> codes [B, d, h, w] fp32, (2b - 1)/sqrt(d).
    Computed like the official indices_to_codes: +-fl32(1/sqrt(d)), then l2-normalised. The
    normalisation is mathematically a no-op but moves the value by one ulp (d=32: 0.17677670717
    instead of 0.17677669227); the fixtures demand it. Returned as a channels-last view, as officially."""
    d = bits.shape[-1] if d is None else d
    if bits.shape[-1] != d:
        raise ValueError(f"bits have {bits.shape[-1]} channels, expected d={d}")
    codes = (bits.squeeze(1).float() * 2 - 1) * (1.0 / d ** 0.5)            # [B, h, w, d]
    return F.normalize(codes, dim=-1).permute(0, 3, 1, 2)                   # [B, d, h, w]


def patchify(x: Tensor) -> Tensor:
    """Fold every 2x2 block of latent cells into one cell of 4x the channels (pixel_unshuffle by 2);
    new channel 4c + 2dy + dx holds channel c of sub-cell (row dy, column dx).
      map  [B, C, 2h, 2w]    -> [B, 4C, h, w]       (any dtype)
      bits [B, 1, 2h, 2w, d] -> [B, 1, h, w, 4d]"""
    if x.dim() == 5:
        return patchify(x.squeeze(1).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).unsqueeze(1)
    return F.pixel_unshuffle(x, 2)


def unpatchify(x: Tensor) -> Tensor:
    """Inverse of patchify (pixel_shuffle by 2).
      map  [B, 4C, h, w]    -> [B, C, 2h, 2w]
      bits [B, 1, h, w, 4d] -> [B, 1, 2h, 2w, d]"""
    if x.dim() == 5:
        return unpatchify(x.squeeze(1).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).unsqueeze(1)
    return F.pixel_shuffle(x, 2)


# The functions below take the official flag under the name `patchify`; they reach the ops by these names.
_fold, _unfold = patchify, unpatchify


def bits_to_tokens(bits: Tensor, patchify: bool = False) -> Tensor:
    """bits [B, 1, H, W, d] -> tokens [B, h*w, d_in] (h, w = H/2, W/2 and d_in = 4d when patchify)."""
    if patchify:
        bits = _fold(bits)                                                  # [B, 1, H/2, W/2, 4d]
    return bits.reshape(bits.shape[0], -1, bits.shape[-1])


def tokens_to_bits(tokens: Tensor, hw, patchify: bool = False) -> Tensor:
    """tokens [B, h*w, d_in] on the token grid hw=(h, w) -> bits [B, 1, H, W, d] on the VAE grid
    (H, W = 2h, 2w and d = d_in/4 when patchify)."""
    h, w = hw
    bits = tokens.reshape(tokens.shape[0], 1, h, w, tokens.shape[-1])       # [B, 1, h, w, d_in]
    return _unfold(bits) if patchify else bits


def add_codes(summed: Tensor | None, bits: Tensor, final_hw) -> Tensor:
    """One step of the sampler's running sum: summed [B, d, H, W] (None before the first scale) plus
    the codes of bits [B, 1, h, w, d] enlarged bilinearly to final_hw. The sum stays channels-last,
    the official layout, so next_scale_input on it resamples exactly like the official sampler
    (a sum started from contiguous zeros would differ by ~1 ulp)."""
    up = resize_bilinear(codes_from_bits(bits), final_hw)                  # [B, d, H, W]
    return up if summed is None else summed + up


def summed_codes_from_bits(bits_per_scale: list[Tensor], final_hw) -> Tensor:
    """Sum over scales of the codes of each bit map [B, 1, h_k, w_k, d], enlarged bilinearly to
    final_hw -> summed codes [B, d, H, W] (the latent the decoder receives)."""
    summed = None
    for bits in bits_per_scale:
        summed = add_codes(summed, bits, final_hw)
    return summed


def next_scale_input(summed_codes: Tensor, hw, patchify: bool = False) -> Tensor:
    """The transformer input of the next scale: the running sum of codes [B, d, H, W] shrunk
    bilinearly to that scale's VAE grid hw, optionally 2x2-folded, flattened row-major.
    -> [B, h*w, d_in] (h*w of the token grid; d_in = 4d when patchify)."""
    x = resize_bilinear(summed_codes, hw)                                   # [B, d, h, w]
    if patchify:
        x = _fold(x)                                                        # [B, 4d, h/2, w/2]
    return x.flatten(2).transpose(1, 2)                                     # [B, h*w, d_in]
