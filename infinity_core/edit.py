"""Training-free editing by partial-scale re-sampling.

The coarse scales of an image's bits carry layout and colour masses, the fine scales carry detail.
Editing keeps the source's own bits on the first `keep_scales` scales and re-samples the others
under a new prompt. With a mask (1 = may change), cells outside the mask keep the source bits on
every scale, cells inside are re-sampled from `keep_scales` on.

Mask rule per scale: the mask is averaged over each latent cell of that scale (area resampling of
the pixel mask to the scale's VAE grid); a cell is re-sampled when at least half of its area is
masked. Coarse cells that are mostly outside a small mask therefore keep the source bits (the
layout around the edit stays). A re-sampled cell sticks out of the mask by at most half a cell and
its bilinear enlargement reaches half a cell further: the border band is one cell of the coarsest
re-sampled scale (`border_band_px`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import schedules as S
from .sampler import SampleResult, sample


def keep_scales_from_strength(strength: float, num_scales: int) -> int:
    """Edit strength 0..1 -> number of coarse scales kept from the source (0 = re-sample all,
    1.0 strength keeps none; 0.0 keeps all, i.e. the reconstruction)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return int(round((1.0 - strength) * num_scales))


def check_keep_scales(keep_scales: int, num_scales: int) -> None:
    if not 0 <= keep_scales <= num_scales:
        raise ValueError(f"keep_scales {keep_scales} is outside 0..{num_scales} "
                         f"(this schedule has {num_scales} scales)")


def mask_per_scale(mask: torch.Tensor, vae_schedule) -> list[torch.Tensor]:
    """Pixel mask [H, W] or [B, H, W] in [0, 1] (1 = may change) -> per scale a bool grid
    [B, hv, wv]: True where the cell is re-sampled (>= half of its area masked)."""
    m = mask.float()
    if m.dim() == 2:
        m = m.unsqueeze(0)
    out = []
    for _, hv, wv in vae_schedule:
        cover = F.adaptive_avg_pool2d(m.unsqueeze(1), (hv, wv)).squeeze(1)   # [B, hv, wv]
        out.append(cover >= 0.5)
    return out


def border_band_px(mask: torch.Tensor, vae_schedule, image_hw, keep_scales: int = 0) -> int:
    """Width in pixels of the band around the mask where re-sampled cells can reach into the summed
    codes: one cell of the coarsest re-sampled scale (a cell at least half inside the mask can stick
    out by half a cell, and its bilinear enlargement reaches half a cell further; scales before
    `keep_scales` are never re-sampled). The VAE decoder's receptive field adds to this in
    pixels; for a trained decoder it is a few pixels."""
    H, W = image_hw
    grids = mask_per_scale(mask, vae_schedule)
    for si, ((_, hv, wv), changed) in enumerate(zip(vae_schedule, grids)):
        if si >= keep_scales and changed.any():
            return int(max(H / hv, W / wv) + 0.999)
    return 0


def grow_mask(mask: torch.Tensor, band_px: int) -> torch.Tensor:
    """Pixel mask [H, W] -> bool [H, W]: the mask and every pixel within band_px of it (square
    neighbourhood), i.e. what a masked edit may touch (see border_band_px)."""
    m = mask.float()[None, None]
    return F.max_pool2d(m, 2 * band_px + 1, 1, band_px)[0, 0].bool() if band_px else m[0, 0].bool()


@dataclass
class SourceEncoding:
    bits: list                 # per scale [B, 1, hv, wv, d] uint8
    summed_codes: torch.Tensor
    schedule: list


@torch.inference_mode()
def encode_source(vae, image: torch.Tensor, schedule, patchify: bool) -> SourceEncoding:
    """image [B, 3, H, W] in [-1, 1] at the schedule's pixel size -> bits of every scale."""
    vae_sched = S.vae_schedule(schedule, patchify)
    dtype = next(vae.parameters()).dtype
    _, summed, bits, _ = vae.encode(image.to(dtype), vae_sched)
    return SourceEncoding(bits=bits, summed_codes=summed, schedule=list(schedule))


def edit(model, source: SourceEncoding, kv_compact, cu_seqlens, keep_scales: int, mask=None,
         **sample_kwargs) -> SampleResult:
    """Re-sample `source` under a new prompt. keep_scales: coarse scales forced to the source's
    bits. mask: pixel mask [H, W] / [B, H, W] at the image size (1 = may change) or None."""
    schedule = source.schedule
    K = len(schedule)
    check_keep_scales(keep_scales, K)
    B = cu_seqlens.numel() - 1
    bits = [b.expand(B, *b.shape[1:]) if b.shape[0] == 1 else b for b in source.bits]
    if mask is None:
        return sample(model, kv_compact, cu_seqlens, schedule, forced_bits=bits[:keep_scales], **sample_kwargs)
    changed = mask_per_scale(mask, S.vae_schedule(schedule, model.cfg.patchify))
    # keep = source bits everywhere on the first keep_scales scales, outside the mask afterwards
    masks = [None if si < keep_scales else ~changed[si].expand(B, -1, -1) for si in range(K)]
    return sample(model, kv_compact, cu_seqlens, schedule, forced_bits=bits, forced_masks=masks, **sample_kwargs)
