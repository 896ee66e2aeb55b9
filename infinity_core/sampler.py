"""The KV-cached next-scale bitwise sampler (spec section 5).

For each scale of the schedule: embed the cumulative code map resampled to that scale, run the
blocks (attending to the cached earlier scales), read per-bit logits, apply guidance and
temperature, sample every bit, turn the bits into codes and add them (bilinearly enlarged) to the
running sum. The running sum (`summed_codes`) is what the VAE decodes.

Random numbers: the default reproduces the official CPU sampler exactly: one CPU
`torch.Generator` seeded once, one `torch.multinomial` over all (B*h*w*d_in, 2) bit rows per
scale, so a seed gives the same bits on any device. A list of seeds gives each image its own
generator (image i of a batch equals a single-image run with seeds[i]).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from . import bsq
from . import schedules as S
from .transformer import Infinity


class SamplingInterrupted(Exception):
    """Raised by a callback to stop sampling between scales."""


# -- per-scale settings ------------------------------------------------------------------------
def per_scale(value, num_scales: int, name: str) -> list[float]:
    """One number -> that number on every scale; a list must have exactly one value per scale."""
    if isinstance(value, (int, float)):
        return [float(value)] * num_scales
    values = [float(v) for v in value]
    if len(values) != num_scales:
        raise ValueError(f"{name} has {len(values)} values but the schedule has {num_scales} scales; "
                         f"give one number or exactly {num_scales} values")
    return values


def constant(value: float, num_scales: int) -> list[float]:
    return [float(value)] * num_scales


def linear_ramp(start: float, end: float, num_scales: int) -> list[float]:
    if num_scales == 1:
        return [float(start)]
    return [start + (end - start) * i / (num_scales - 1) for i in range(num_scales)]


def off_from(value: float, scale: int, num_scales: int, off: float = 1.0) -> list[float]:
    """Guidance `value` on scales < `scale`, then `off` (cfg 1 = no guidance) from `scale` on."""
    return [float(value) if i < scale else float(off) for i in range(num_scales)]


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)  # ASCII digits only, no '_'


def parse_list(text: str, name: str = "list") -> list[float]:
    """Strict parse of '3, 3, 2.5' (items separated by one comma and/or spaces). Errors point at the
    bad item: an empty item ('3,,3'), anything but a plain decimal number ('1_000', non-ASCII digits,
    'nan', 'inf'), or a number too large to be finite."""
    items = [t.strip() for t in text.split(",")] if "," in text else text.split()
    items = [u for t in items for u in (t.split() or [""])]
    if items and items[-1] == "" and text.rstrip().endswith(","):
        items.pop()  # one trailing comma is harmless
    out = []
    for i, item in enumerate(items):
        if item == "":
            raise ValueError(f"{name}: item {i + 1} is empty (two commas in a row?)")
        try:
            value = float(item)
        except ValueError:
            value = None
        if value is not None and not math.isfinite(value):  # nan, inf, 1e999
            raise ValueError(f"{name}: item {i + 1} ({item!r}) is not a finite number")
        if value is None or not _NUMBER.fullmatch(item):
            raise ValueError(f"{name}: item {i + 1} ({item!r}) is not a number")
        out.append(value)
    if not out:
        raise ValueError(f"{name} is empty")
    return out


# -- bit sampling rule -------------------------------------------------------------------------
def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The official filter on [..., V] logits (masked entries -> -inf). For 2-class bits, top_k >= 2
    is a no-op, top_k 1 is greedy, top_p 0.97 drops a class whose probability is <= 0.03."""
    logits = logits.clone()
    V = logits.shape[-1]
    if top_k > 0:
        kth = logits.topk(min(top_k, V), dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits.masked_fill_(remove.scatter(-1, sorted_idx, remove), -torch.inf)
    return logits


def sample_bits(bit_logits: torch.Tensor, top_k: int, top_p: float, generators) -> torch.Tensor:
    """bit_logits [B, n, 2*d_in] -> bits [B, n, d_in] (int64), drawn on CPU generators.
    `generators`: one generator (one multinomial for the batch, as official) or one per image."""
    B, n, V = bit_logits.shape
    probs = filter_top_k_top_p(bit_logits.float().view(B, n * V // 2, 2), top_k, top_p).softmax(-1).cpu()
    if isinstance(generators, torch.Generator):
        bits = torch.multinomial(probs.view(-1, 2), 1, replacement=True, generator=generators)
    else:
        bits = torch.cat([torch.multinomial(probs[b], 1, replacement=True, generator=g)
                          for b, g in enumerate(generators)])
    return bits.view(B, n, V // 2).to(bit_logits.device)


# -- the loop ----------------------------------------------------------------------------------
@dataclass
class SampleResult:
    bits: list                     # per scale [B, 1, h_vae, w_vae, d] uint8 (VAE grid order)
    summed_codes: torch.Tensor     # [B, d, H_lat, W_lat] fp32, input of the VAE decoder
    schedule: list
    logits: list = field(default_factory=list)       # per scale [B, h*w, 2*d_in] post-guidance (if asked)
    next_inputs: list = field(default_factory=list)  # per scale >= 1, [B, h*w, d_in] (if asked)
    images: torch.Tensor | None = None                # [B, H, W, 3] RGB float in [0, 1] (if asked)


def _pack_concat(a_kv, a_cu, b_kv, b_cu):
    return torch.cat((a_kv, b_kv)), torch.cat((a_cu, b_cu[1:] + a_cu[-1])).to(torch.int32)


@torch.inference_mode()
def sample(model: Infinity, kv_compact: torch.Tensor, cu_seqlens: torch.Tensor, schedule,
           cfg=3.0, tau=1.0, top_k: int = 900, top_p: float = 0.97, seed=None,
           negative: tuple | None = None, cfg_insertion_layer: int = 0,
           forced_bits: Sequence[torch.Tensor] = (), forced_masks: Sequence[torch.Tensor | None] = (),
           stop_after: int | None = None, callback: Callable | None = None,
           record: bool = False, vae=None, drop_unconditional: bool = False) -> SampleResult:
    """Generate bits along `schedule` for B prompts given as packed T5 features.

    cfg / tau: one number or one value per scale. `negative`: (kv_compact, cu_seqlens) of negative
    prompts that replace the learned null text. `cfg_insertion_layer`: 0 = guidance on the logits
    (released); negative m = mix hidden states after block depth+m. `forced_bits[si]` [B,1,hv,wv,d]
    keeps those bits at scale si instead of the sampled ones (optionally only where
    `forced_masks[si]` [B,1,hv,wv] or [hv,wv] is True); the transformer still runs over the scale
    so its cache holds the forced context. `stop_after=k` stops after scale k (preview).
    `callback(si, bits, preview)` is called after every scale; `preview()` decodes the partial
    result cheaply at that scale's resolution (needs `vae`); it may raise to interrupt.
    `drop_unconditional` (speed mode, not official): once every remaining scale has cfg 1, stop
    running the unconditional half through the blocks (the official sampler keeps running it).
    """
    cfgm = model.cfg
    K = len(schedule)
    S.template_of(schedule)
    cfg_list, tau_list = per_scale(cfg, K, "cfg"), per_scale(tau, K, "tau")
    if any(t <= 0 for t in tau_list):
        raise ValueError(f"tau must be > 0 on every scale, got {tau_list}")
    if cfg_insertion_layer > 0 or cfg_insertion_layer < -cfgm.depth:
        raise ValueError(f"cfg_insertion_layer must be 0 (guidance on logits) or in [-{cfgm.depth}, -1], "
                         f"got {cfg_insertion_layer}")
    if len(forced_bits) > K:
        raise ValueError(f"{len(forced_bits)} forced scales given but the schedule has {K} scales")
    device = model.head.weight.device
    B = cu_seqlens.numel() - 1
    d, patchify = cfgm.vae_bits, cfgm.patchify
    vae_sched = S.vae_schedule(schedule, patchify)
    final_hw = vae_sched[-1][1:]

    use_cfg = any(c != 1 for c in cfg_list)
    kv, cu = kv_compact.to(device).float(), cu_seqlens.to(device).to(torch.int32)
    if use_cfg:
        if negative is not None:
            neg_kv, neg_cu = negative[0].to(device).float(), negative[1].to(device).to(torch.int32)
            if neg_cu.numel() - 1 != B:
                raise ValueError(f"{neg_cu.numel() - 1} negative prompts for {B} prompts")
        else:
            neg_kv, neg_cu = model.null_text(torch.diff(cu).tolist()).to(device), cu
        kv, cu = _pack_concat(kv, cu, neg_kv, neg_cu)
    text = model.encode_text(kv, cu)                 # cond/gss/cross-attention k,v once per image batch
    caches = model.new_caches(S.token_count(schedule))
    mix_after = cfgm.depth + cfg_insertion_layer if cfg_insertion_layer < 0 else None

    if seed is None:
        seed = int(torch.randint(0, 2 ** 31 - 1, ()).item())
    if isinstance(seed, int):
        generators = torch.Generator("cpu").manual_seed(seed)
    else:
        if len(seed) != B:
            raise ValueError(f"{len(seed)} seeds for a batch of {B}")
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seed]

    summed = None                                    # running sum of enlarged codes [B, d, H_lat, W_lat]
    result = SampleResult(bits=[], summed_codes=None, schedule=list(schedule))
    next_tokens = None
    last = K - 1 if stop_after is None else min(stop_after, K - 1)
    for si in range(last + 1):
        if drop_unconditional and use_cfg and all(c == 1 for c in cfg_list[si:]):
            text, use_cfg = _keep_rows(text, caches, B), False
        _, h, w = schedule[si]
        _, hv, wv = vae_sched[si]
        cfg_si, tau_si = cfg_list[si], tau_list[si]
        x = model.embed_scale(si, text, next_tokens)

        after_block = None
        if mix_after is not None and cfg_si != 1:
            def after_block(i, hdn, _c=cfg_si):
                if i != mix_after:
                    return hdn
                mixed = _c * hdn[:B] + (1 - _c) * hdn[B:]
                return torch.cat((mixed, mixed))
        hidden = model.run_blocks(x, si, schedule, text, caches, after_block=after_block)

        if use_cfg and cfg_si != 1 and mix_after is None:
            raw = model.bit_logits(hidden, text.cond) / tau_si             # [2B, n, V]
            logits = cfg_si * raw[:B] + (1 - cfg_si) * raw[B:]
        else:
            logits = model.bit_logits(hidden[:B], text.cond[:B]) / tau_si  # [B, n, V]
        token_bits = sample_bits(logits, top_k, top_p, generators)         # [B, h*w, d_in]
        bits = bsq.tokens_to_bits(token_bits, (h, w), patchify)            # [B, 1, hv, wv, d]
        if si < len(forced_bits) and forced_bits[si] is not None:
            forced = forced_bits[si].to(device).long().view(B, 1, hv, wv, d)
            mask = forced_masks[si] if si < len(forced_masks) else None
            if mask is None:
                bits = forced
            else:
                keep = mask.to(device).bool().view(-1, 1, hv, wv, 1).expand_as(bits)
                bits = torch.where(keep, forced, bits)

        summed = bsq.add_codes(summed, bits, final_hw)                     # [B, d, H_lat, W_lat]
        result.summed_codes = summed
        result.bits.append(bits.to(torch.uint8))
        if record:
            result.logits.append(logits)
        if si < K - 1:
            next_tokens = bsq.next_scale_input(summed, vae_sched[si + 1][1:], patchify)  # [B, n', d_in]
            if record:
                result.next_inputs.append(next_tokens)
        if callback is not None:
            def preview(latent_hw=(hv, wv), images=slice(None)):
                """The partial result decoded at `latent_hw` latent cells (default: this scale's grid),
                for the batch rows `images` (default all; a UI showing one picture asks for slice(0, 1),
                which also keeps the decoder's shapes independent of the batch size)."""
                if vae is None:
                    return None
                small = bsq.resize_bilinear(summed[images], latent_hw)
                return to_rgb01(vae.decode(small.to(next(vae.parameters()).dtype)))
            callback(si, result.bits[-1], preview)
    return result


def _keep_rows(text, caches, B):
    """The text context and KV caches of the first B rows (the conditional half)."""
    for c in caches:
        c.keep_rows(B)
    ca_kv = [(k[:B], v[:B], lens[:B]) for k, v, lens in text.ca_kv]
    return type(text)(cond=text.cond[:B], gss=text.gss[:B], ca_kv=ca_kv, cu_seqlens=text.cu_seqlens[:B + 1])


def to_rgb01(decoded: torch.Tensor) -> torch.Tensor:
    """VAE output [B, 3, H, W] in [-1, 1] -> [B, H, W, 3] RGB float in [0, 1] (not the official
    BGR uint8)."""
    return ((decoded.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).contiguous()


def to_official_bgr_u8(decoded: torch.Tensor) -> torch.Tensor:
    """The official returned picture: clamp, (x+1)/2*255, truncation to uint8, BGR, [B,H,W,3]."""
    img = (decoded.float().clamp(-1, 1) + 1) / 2 * 255
    return img.permute(0, 2, 3, 1).to(torch.uint8).flip(-1)
