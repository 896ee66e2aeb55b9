"""Attention backends. PyTorch SDPA by default; xformers or flash-attn only when installed and
the tensors live on CUDA. Layout everywhere in this project: q, k, v as [B, H, L, c].

`backend` is a choice: "sdpa", "xformers", "flash" or "auto" (flash > xformers > sdpa on CUDA,
sdpa elsewhere). A backend that cannot serve a call (no CUDA, a mask flash cannot express, a
dtype it does not take) falls back to SDPA for that call, so results never depend on it.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "xformers", "flash")


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def available_backends() -> list[str]:
    out = ["sdpa"]
    if torch.cuda.is_available():
        out += [b for b, mod in (("xformers", "xformers"), ("flash", "flash_attn")) if _installed(mod)]
    return out


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} unknown; expected one of {BACKENDS}")
    avail = available_backends()
    if backend == "auto":
        return next(b for b in ("flash", "xformers", "sdpa") if b in avail)
    if backend not in avail:
        raise ValueError(f"attention backend {backend!r} is not available here (needs CUDA and the "
                         f"{'flash_attn' if backend == 'flash' else backend} package); available: {avail}")
    return backend


def attend(q, k, v, mask=None, scale=None, backend: str = "sdpa"):
    """softmax(q k^T * scale + mask) v. q: [B,H,Lq,c], k/v: [B,H,Lk,c]; mask: bool (True = visible),
    broadcastable to [B,H,Lq,Lk], or None."""
    if q.is_cuda and backend == "flash" and mask is None and q.dtype in (torch.float16, torch.bfloat16):
        from flash_attn import flash_attn_func
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
        return out.transpose(1, 2)
    if q.is_cuda and backend == "xformers" and mask is None:
        import xformers.ops as xops
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def attend_varlen(q, k, v, lens, scale=None, backend: str = "sdpa"):
    """Each sample b attends to its first lens[b] keys only (flash-attn varlen semantics).
    q: [B,H,Lq,c]; k/v: [B,H,Lk_max,c] zero-padded; lens: list of ints. Computed per sample on the
    unpadded keys, as the official varlen kernel does, so the reduction order does not depend on
    the longest prompt of the batch."""
    if all(n == k.shape[2] for n in lens):
        return attend(q, k, v, scale=scale, backend=backend)
    return torch.cat([attend(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], scale=scale, backend=backend)
                      for b, n in enumerate(lens)])
