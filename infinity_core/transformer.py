"""The Infinity transformer: text -> condition -> next-scale bit logits.

Parameter names and shapes equal the official checkpoints (spec 2.11), so `infinity_2b_reg.pth`
and the 8B shards load as they are. Data flow of one pass:

  packed T5 features --text_norm--> kv --attentive pool--> cond [B, C] (start token, adaLN condition)
                                      --text_proj_for_ca--> cross-attention memory
  cond --shared_ada_lin--> gss [B, 1, 6, C] (shared adaLN table; each block adds its own ada_gss)
  tokens: [cond + pos_start, word_embed(bits of coarser scales)] + lvl_embed[scale] (before block 0)
  blocks (adaLN self-attention with 2-D RoPE, cross-attention, adaLN FFN) -> head_nm -> head
  -> bit_logits [B, L, 2 * bits_per_token] laid out [bit0 class0, bit0 class1, bit1 class0, ...]

Two ways to run it: `forward` (teacher forcing over a whole schedule with the block-causal mask;
training and the loss) and the KV-cached per-scale API (`encode_text`, `embed_scale`,
`run_blocks`, `bit_logits`) that the sampler drives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import schedules as S
from .attention import attend, attend_varlen, resolve_backend
from .rope import apply_rope, rope_rotation
from .zoo import TransformerConfig

LN_EPS = 1e-6
MAX_SCALE_MUL = math.log(100.0)  # the learned attention temperature is clamped at 100
NUM_LVL = 15
CA_PRECISIONS = ("bf16", "fp32")


def _linear32(x, lin: nn.Linear):
    """A linear layer evaluated in fp32 whatever the weights are stored in (head and text path)."""
    b = None if lin.bias is None else lin.bias.float()
    return F.linear(x.float(), lin.weight.float(), b)


_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def block_linear(x, weight, bias=None):
    """F.linear for the blocks' layers. On the CPU in fp32 inference, inputs of 4 to 256 rows (the
    early scales, where the weights are streamed for few tokens) go through oneDNN, which streams
    them 1.2-1.7x faster than MKL's sgemm at these row counts (2B shapes, scales 1-3: about a third
    less time, and the same bits at the same seed in that run); everything else is F.linear."""
    rows = x.numel() // x.shape[-1]
    if (_ONEDNN_LINEAR and 4 <= rows <= 256 and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not torch.is_grad_enabled()):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class BlockLinear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) evaluated through block_linear."""

    def forward(self, x):
        return block_linear(x, self.weight, self.bias)


def _round_bf16(x, precision: str):
    # Official quirk (spec 2.6, fixtures Q1): cross-attention and the text pool cast fp32 q/kv to
    # bf16 before flash-attn and the output back. "bf16" reproduces it, "fp32" is exact math.
    return x.to(torch.bfloat16).to(x.dtype) if precision == "bf16" and x.dtype == torch.float32 else x


def modulate(x, scale, shift):
    """Non-affine LayerNorm in fp32, then x*(1+scale)+shift (the official fused-norm path)."""
    y = F.layer_norm(x.float(), x.shape[-1:], eps=LN_EPS)
    return torch.addcmul(shift.float(), y, 1 + scale.float()).to(x.dtype)


def pad_packed(packed: torch.Tensor, cu_seqlens: torch.Tensor):
    """[sum L_i, D] rows of B sequences -> ([B, Lmax, D] zero-padded, [B, Lmax] bool valid)."""
    cu = cu_seqlens.tolist()
    lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    B, Lmax = len(lens), max(lens)
    out = packed.new_zeros(B, Lmax, packed.shape[-1])
    valid = torch.zeros(B, Lmax, dtype=torch.bool, device=packed.device)
    for i, (a, n) in enumerate(zip(cu[:-1], lens)):
        out[i, :n] = packed[a:a + n]
        valid[i, :n] = True
    return out, valid


class SelfAttention(nn.Module):
    """Cosine attention (unit q/k, learned per-head temperature) with 2-D RoPE; SDPA scale 1."""

    def __init__(self, C: int, H: int):
        super().__init__()
        self.H, self.c = H, C // H
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), math.log(4.0)))
        self.proj = BlockLinear(C, C)

    def forward(self, x, rotation, mask=None, cache=None, backend="sdpa"):
        """x [B, L, C]; rotation: the RoPE of these L tokens, complex [L, c/2]."""
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = block_linear(x, self.mat_qkv.weight, bias.to(x.dtype)).view(B, L, 3, self.H, self.c)
        # q and k together: unit length (F.normalize's eps), q times the learned temperature, RoPE
        qk = qkv[:, :, :2].float()                                      # [B, L, 2, H, c]
        temperature = self.scale_mul_1H11.float().clamp_max(MAX_SCALE_MUL).exp().view(1, self.H, 1)
        gain = torch.cat((temperature, torch.ones_like(temperature)))   # [2, H, 1]: q, k
        qk = qk * (gain / torch.linalg.vector_norm(qk, dim=-1, keepdim=True).clamp_min(1e-12))
        qk = apply_rope(qk, rotation[:, None, None]).to(qkv.dtype)     # fp32 math
        q, k = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2)  # [B, H, L, c] views
        v = qkv[:, :, 2].transpose(1, 2)
        if cache is not None:                                           # KV-cached inference
            k, v = cache.append(k, v)                                   # [B, H, L_sofar, c]
        o = attend(q, k, v, mask=mask, scale=1.0, backend=backend)      # [B, H, L, c]
        return self.proj(o.transpose(1, 2).reshape(B, L, C))


class CrossAttention(nn.Module):
    """Image queries attend to their own sample's text rows (varlen semantics via key masks)."""

    def __init__(self, C: int, H: int):
        super().__init__()
        self.H, self.c = H, C // H
        self.mat_q = BlockLinear(C, C)
        self.mat_kv = nn.Linear(C, 2 * C, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.proj = BlockLinear(C, C)

    def text_kv(self, ca_memory, cu_seqlens, precision):
        """Keys/values of the packed text memory [N, C] -> ([B,H,Lk,c], [B,H,Lk,c] zero-padded, lens)."""
        bias = torch.cat((self.zero_k_bias, self.v_bias)).to(ca_memory.dtype)
        kv = _round_bf16(F.linear(ca_memory.to(self.mat_kv.weight.dtype), self.mat_kv.weight, bias.to(self.mat_kv.weight.dtype)), precision)
        kv, valid = pad_packed(kv, cu_seqlens)                          # [B, Lk, 2C]
        B, Lk, _ = kv.shape
        k, v = kv.view(B, Lk, 2, self.H, self.c).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v, valid.sum(1).tolist()

    def forward(self, x, text_kv, precision="bf16", backend="sdpa"):
        B, L, C = x.shape
        k, v, lens = text_kv
        q = _round_bf16(self.mat_q(x), precision).view(B, L, self.H, self.c).transpose(1, 2)
        o = attend_varlen(q, k.to(q.dtype), v.to(q.dtype), lens, scale=1 / math.sqrt(self.c), backend=backend)
        o = _round_bf16(o, precision)
        return self.proj(o.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    def __init__(self, C: int, hidden: int):
        super().__init__()
        self.fc1 = BlockLinear(C, hidden)
        self.fc2 = BlockLinear(hidden, C)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DropPath(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class CrossAttnBlock(nn.Module):
    def __init__(self, C: int, H: int, mlp_hidden: int, drop_path: float = 0.0):
        super().__init__()
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C ** 0.5)
        self.sa = SelfAttention(C, H)
        self.ca = CrossAttention(C, H)
        self.ca_norm = nn.LayerNorm(C, eps=LN_EPS)
        self.ffn = FFN(C, mlp_hidden)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, gss, text_kv, rotation, mask=None, cache=None, ca_precision="bf16", backend="sdpa"):
        # rows of the 6C table: gamma1 (SA gate), gamma2 (FFN gate), scale1, scale2, shift1, shift2
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss.float() + gss).unbind(2)  # [B,1,C]
        dt = x.dtype
        sa = self.sa(modulate(x, scale1, shift1), rotation, mask=mask, cache=cache, backend=backend)
        x = self._add_gated(x, sa, gamma1.to(dt))
        x = x + self.ca(self.ca_norm(x), text_kv, precision=ca_precision, backend=backend).to(dt)
        ffn = self.ffn(modulate(x, scale2, shift2))
        return self._add_gated(x, ffn, gamma2.to(dt))

    def _add_gated(self, x, branch, gate):
        """x + drop_path(branch * gate): one fused pass when drop-path is off (inference)."""
        if self.drop_path.training and self.drop_path.p > 0:
            return x + self.drop_path(branch * gate)
        return torch.addcmul(x, branch, gate)


class TextPool(nn.Module):
    """Attentive pooling of the text: one learned query per head (`text_proj_for_sos.ca.*`)."""

    def __init__(self, Ct5: int, C: int, heads: int):
        super().__init__()
        self.H, self.c = heads, C // heads
        self.mat_q = nn.Parameter(torch.zeros(1, heads, C // heads))
        self.mat_kv = nn.Linear(Ct5, 2 * C, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.proj = nn.Linear(C, C)

    def forward(self, kv_text, cu_seqlens, precision="bf16"):
        B = cu_seqlens.numel() - 1
        bias = torch.cat((self.zero_k_bias, self.v_bias)).float()
        kv = _round_bf16(F.linear(kv_text.float(), self.mat_kv.weight.float(), bias), precision)
        kv, valid = pad_packed(kv, cu_seqlens)                           # [B, Lk, 2C]
        Lk = kv.shape[1]
        k, v = kv.view(B, Lk, 2, self.H, self.c).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, Lk, c]
        q = _round_bf16(self.mat_q.float(), precision).expand(B, -1, -1).unsqueeze(2)  # [B, H, 1, c]
        o = attend_varlen(q, k, v, valid.sum(1).tolist(), scale=1 / math.sqrt(self.c))
        o = _round_bf16(o, precision).transpose(1, 2).reshape(B, self.H * self.c)
        return _linear32(o, self.proj)                                   # [B, C]


class TextProjForSos(nn.Module):
    def __init__(self, Ct5, C, heads):
        super().__init__()
        self.ca = TextPool(Ct5, C, heads)

    def forward(self, kv_text, cu_seqlens, precision="bf16"):
        return self.ca(kv_text, cu_seqlens, precision)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, D: int):
        super().__init__()
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * C))

    def forward(self, x, cond):
        scale, shift = _linear32(F.silu(cond.float()), self.ada_lin[1]).view(-1, 1, 2, x.shape[-1]).unbind(2)
        return modulate(x.float(), scale, shift)


class MultipleLayers(nn.Module):
    """One block chunk (the official checkpoint groups blocks as block_chunks.{i}.module.{j})."""

    def __init__(self, blocks):
        super().__init__()
        self.module = nn.ModuleList(blocks)


@dataclass
class TextContext:
    """Everything the blocks need from the text, computed once per prompt batch."""
    cond: torch.Tensor                 # [bs, C] pooled text: start token and adaLN/head condition
    gss: torch.Tensor                  # [bs, 1, 6, C] shared adaLN table
    ca_kv: list                        # per block (k, v, lens), k/v [bs, H, Lk_max, c] zero-padded
    cu_seqlens: torch.Tensor


class KVCache:
    """Per-block self-attention keys/values of all scales seen so far (post-RoPE), kept in
    buffers [B, capacity, H, c] allocated at the first append: a scale's keys are written once
    instead of the whole cache being re-copied at every scale. Grows if `capacity` is exceeded."""

    def __init__(self, capacity: int = 0):
        self.capacity, self.length = capacity, 0
        self.k_buf = self.v_buf = None

    def append(self, k, v):
        """k, v [B, H, n, c] -> all keys/values so far, [B, H, length, c] views of the buffers."""
        start, end = self.length, self.length + k.shape[2]
        if self.k_buf is None or end > self.k_buf.shape[1]:
            B, H, _, c = k.shape
            size = max(end, self.capacity)
            k_buf, v_buf = k.new_empty(B, size, H, c), v.new_empty(B, size, H, c)
            if self.k_buf is not None:
                k_buf[:, :start], v_buf[:, :start] = self.k_buf[:, :start], self.v_buf[:, :start]
            self.k_buf, self.v_buf = k_buf, v_buf
        self.k_buf[:, start:end] = k.transpose(1, 2)
        self.v_buf[:, start:end] = v.transpose(1, 2)
        self.length = end
        return self.k_buf[:, :end].transpose(1, 2), self.v_buf[:, :end].transpose(1, 2)

    def keep_rows(self, B: int) -> None:
        """Keep the first B samples (the conditional half when guidance stops)."""
        if self.k_buf is not None:
            self.k_buf, self.v_buf = self.k_buf[:B], self.v_buf[:B]


class Infinity(nn.Module):
    def __init__(self, cfg: TransformerConfig, attn_backend: str = "sdpa", ca_precision: str = "bf16"):
        super().__init__()
        self.cfg = cfg
        C, Ct5 = cfg.width, cfg.text_channels
        self.attn_backend = resolve_backend(attn_backend)
        self.ca_precision = ca_precision
        if ca_precision not in CA_PRECISIONS:
            raise ValueError(f"ca_precision {ca_precision!r}; expected one of {CA_PRECISIONS}")
        self.cfg_uncond = nn.Parameter(torch.zeros(cfg.text_maxlen, Ct5))
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.text_norm = RMSNorm(Ct5)
        self.text_proj_for_sos = TextProjForSos(Ct5, C, cfg.text_pool_heads)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(Ct5, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        self.lvl_embed = nn.Embedding(NUM_LVL, C)
        self.word_embed = nn.Linear(cfg.bits_per_token, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        drop = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        blocks = [CrossAttnBlock(C, cfg.num_heads, cfg.mlp_hidden, drop[i]) for i in range(cfg.depth)]
        n = cfg.blocks_per_chunk
        self.block_chunks = nn.ModuleList(MultipleLayers(blocks[i:i + n]) for i in range(0, cfg.depth, n))
        self.head_nm = AdaLNBeforeHead(C, C)
        self.head = nn.Linear(C, cfg.head_width)
        self._rope_cache: dict = {}
        self.eval()  # inference-first: drop-path only runs when a trainer calls .train()

    # -- structure -------------------------------------------------------------------------
    @property
    def blocks(self) -> list[CrossAttnBlock]:
        return [b for chunk in self.block_chunks for b in chunk.module]

    @property
    def block_dtype(self):
        return self.block_chunks[0].module[0].sa.mat_qkv.weight.dtype

    def rope(self, schedule, device) -> torch.Tensor:
        key = (tuple(tuple(int(v) for v in s) for s in schedule), str(device))
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_rotation(schedule, self.cfg.head_dim).to(device)
        return self._rope_cache[key]                                    # [L, c/2] complex

    # -- text -> condition -----------------------------------------------------------------
    def null_text(self, lens) -> torch.Tensor:
        """The learned unconditional text, length-matched to each prompt: packed [sum L_i, Ct5]."""
        return torch.cat([self.cfg_uncond[:int(n)].float() for n in lens])

    def encode_text(self, kv_compact, cu_seqlens) -> TextContext:
        """Packed T5 features [sum L_i, Ct5] fp32 + cu_seqlens [B+1] -> TextContext."""
        cu_seqlens = cu_seqlens.to(kv_compact.device)
        kv = self.text_norm(kv_compact)                                  # [N, Ct5] fp32
        cond = self.text_proj_for_sos(kv, cu_seqlens, self.ca_precision)  # [B, C]
        ca_memory = _linear32(F.gelu(_linear32(kv, self.text_proj_for_ca[0]), approximate="tanh"),
                              self.text_proj_for_ca[2])                  # [N, C]
        gss = _linear32(F.silu(cond), self.shared_ada_lin[1]).view(-1, 1, 6, self.cfg.width)
        ca_kv = [b.ca.text_kv(ca_memory, cu_seqlens, self.ca_precision) for b in self.blocks]
        return TextContext(cond=cond, gss=gss, ca_kv=ca_kv, cu_seqlens=cu_seqlens)

    # -- per-scale API (KV-cached inference) -----------------------------------------------
    def new_caches(self, capacity: int = 0) -> list[KVCache]:
        """One cache per block; `capacity`: the schedule's token count (buffers sized once)."""
        return [KVCache(capacity) for _ in range(self.cfg.depth)]

    def embed_scale(self, si: int, text: TextContext, next_input=None) -> torch.Tensor:
        """Tokens entering block 0 at scale si: [bs, h*w, C]. Scale 0 is the start token
        (pooled text + pos_start); later scales embed `next_input` [B, h*w, d_in], repeated to
        the rows of the text batch (cond and uncond halves see the same input)."""
        bs = text.cond.shape[0]
        if si == 0:
            x = text.cond.unsqueeze(1) + self.pos_start.float()
        else:
            x = _linear32(next_input, self.word_embed)
            x = x.repeat(bs // x.shape[0], 1, 1)
        return (x + self.lvl_embed.weight[si].float()).to(self.block_dtype)

    def run_blocks(self, x, si: int, schedule, text: TextContext, caches, after_block=None):
        """All blocks over the tokens of scale si, attending to the cached earlier scales.
        `after_block(i, x) -> x` may replace the hidden states after block i (hidden-state CFG)."""
        start = sum(h * w for _, h, w in schedule[:si])
        rotation = self.rope(schedule, x.device)[start:start + x.shape[1]]
        for i, block in enumerate(self.blocks):
            x = block(x, text.gss, text.ca_kv[i], rotation, cache=caches[i],
                      ca_precision=self.ca_precision, backend=self.attn_backend)
            if after_block is not None:
                x = after_block(i, x)
        return x

    def bit_logits(self, hidden, cond) -> torch.Tensor:
        """[bs, n, C] hidden, [bs, C] cond -> [bs, n, 2*d_in] logits (fp32)."""
        return _linear32(self.head_nm(hidden, cond), self.head)

    # -- teacher forcing -------------------------------------------------------------------
    def forward(self, kv_compact, cu_seqlens, x_BLC_wo_prefix, schedule, drop_text=None,
                return_intermediates=False):
        """Block-causal forward over a whole schedule.

        kv_compact [N, Ct5], cu_seqlens [B+1]; x_BLC_wo_prefix [B, L-1, d_in] (inputs of scales
        1..K-1); `drop_text` [B] bool replaces a sample's text by the null text (training's
        condition dropout). Unlike the official code this never mutates the caller's tensor and
        is explicit (the official forward also drops text in eval mode, spec 9.2 item 10).
        Returns bit_logits [B, L, 2*d_in] (and a dict of intermediates when asked).
        """
        S.template_of(schedule)  # validates: only the 60 official schedules have RoPE positions
        if drop_text is not None and bool(torch.as_tensor(drop_text).any()):
            kv_compact = kv_compact.clone()
            cu = cu_seqlens.tolist()
            for i, dropped in enumerate(torch.as_tensor(drop_text).tolist()):
                if dropped:
                    kv_compact[cu[i]:cu[i + 1]] = self.cfg_uncond[:cu[i + 1] - cu[i]].to(kv_compact)
        text = self.encode_text(kv_compact, cu_seqlens)
        B = text.cond.shape[0]
        sizes = [h * w for _, h, w in schedule]
        L = sum(sizes)
        scale_of_token = torch.repeat_interleave(torch.arange(len(schedule)), torch.tensor(sizes))
        sos = text.cond.unsqueeze(1) + self.pos_start.float()                     # [B, 1, C]
        x = torch.cat((sos, _linear32(x_BLC_wo_prefix, self.word_embed)), dim=1)  # [B, L, C]
        x = (x + self.lvl_embed.weight.float()[scale_of_token.to(x.device)]).to(self.block_dtype)
        inter = {"cond_BD": text.cond, "gss": text.gss, "block_in": x}
        g = scale_of_token.to(x.device)
        mask = g[None, :] <= g[:, None]                                           # [L, L] block-causal
        rotation = self.rope(schedule, x.device)
        for i, block in enumerate(self.blocks):
            x = block(x, text.gss, text.ca_kv[i], rotation, mask=mask,
                      ca_precision=self.ca_precision, backend=self.attn_backend)
            inter[f"block_out.{i}"] = x
        hn = self.head_nm(x, text.cond)
        inter["head_nm_out"] = hn
        logits = _linear32(hn, self.head)
        return (logits, inter) if return_intermediates else logits


def bit_cross_entropy(bit_logits, bits, schedule, reweight: bool = False, label_smoothing: float = 0.0):
    """Per-bit two-class cross-entropy. bit_logits [B, L, 2*d_in], bits [B, L, d_in] in {0,1}.
    Returns (loss scalar, per_token [B, L]). `reweight` weights tokens of scale (h,w) by
    sqrt(h_K w_K / (h w)) normalised to sum 1 (the intended formula; the official trainer crashes
    on this option, spec 6.2)."""
    B, L, V = bit_logits.shape
    ce = F.cross_entropy(bit_logits.float().reshape(-1, 2), bits.reshape(-1).long(),
                         reduction="none", label_smoothing=label_smoothing)
    per_token = ce.view(B, L, V // 2).mean(-1)                                   # [B, L]
    if reweight:
        last = schedule[-1][1] * schedule[-1][2]
        w = torch.cat([torch.full((h * w_,), math.sqrt(last / (h * w_))) for _, h, w_ in schedule])
        w = (w / w.sum()).to(per_token)
    else:
        w = per_token.new_full((L,), 1.0 / L)
    return (per_token * w).sum(-1).mean(), per_token
