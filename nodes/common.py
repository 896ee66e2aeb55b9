"""What the Infinity nodes share: the custom socket types, the values they carry, error helpers and
ComfyUI's memory management glue.

Values passed between nodes (all plain Python objects, never mutated by a node once returned, so
ComfyUI's output cache can hand the same object to several nodes):

  INFINITY_MODEL         InfinityModel: the transformer and its VAE, each wrapped in a
                         comfy.model_patcher.ModelPatcher so ComfyUI's model management moves them
                         to the compute device and unloads them when other models need the memory
  INFINITY_TEXT_ENCODER  InfinityTextEncoder: a T5 encoder kept on the offload device between prompts
  INFINITY_CONDITIONING  InfinityConditioning: one encoded prompt (packed T5 features, on the CPU)
  INFINITY_CODES         InfinityCodes: per-scale bits + the summed codes the VAE decodes (CPU)
  INFINITY_SCALE_SCHEDULE  a dict, see schedule_node.py
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

import comfy.model_management as mm
import comfy.model_patcher
from comfy_api.latest import io

log = logging.getLogger("ComfyUI-Infinity")

MODEL_TYPE = "INFINITY_MODEL"
TEXT_ENCODER_TYPE = "INFINITY_TEXT_ENCODER"
CONDITIONING_TYPE = "INFINITY_CONDITIONING"
CODES_TYPE = "INFINITY_CODES"

Model = io.Custom(MODEL_TYPE)
TextEncoder = io.Custom(TEXT_ENCODER_TYPE)
Conditioning = io.Custom(CONDITIONING_TYPE)
Codes = io.Custom(CODES_TYPE)

CATEGORY = "Infinity"


def fail(node: str, message: str, cause: BaseException | None = None):
    """Raise ValueError("<node>: <message>"): a problem the user can fix, named with the node's display
    name. A plain ValueError, so ComfyUI and comfy-cli report its type as "ValueError" (a class of our
    own would be reported under the package's mangled module path)."""
    err = ValueError(f"{node}: {message}")
    if cause is not None:
        raise err from cause
    raise err


def check_choice(node: str, name: str, value, options) -> None:
    """ComfyUI 0.3.75 does not check V3 combo values against their options when a prompt is queued
    (API clients can send anything): refuse unknown values here, naming the input."""
    if value not in options:
        shown = list(options)
        more = f" ... ({len(shown)} in all)" if len(shown) > 12 else ""
        fail(node, f"{name} {value!r} is not one of {shown[:12]}{more}")


def short(e: BaseException) -> str:
    """An exception's message without the class name noise (CheckpointError, ValueError...)."""
    text = str(e).strip()
    return text or type(e).__name__


# --------------------------------------------------------------------------------------- values
@dataclass(eq=False)
class InfinityModel:
    """An Infinity transformer and its BSQ VAE, loaded and paired.

    `transformer_patcher.model` is infinity_core.transformer.Infinity, `vae_patcher.model` is
    infinity_core.vae.BSQVAE. Before using either, call `load(...)` so ComfyUI moves it to the compute
    device (and unloads other models if memory is short)."""
    transformer_patcher: Any
    vae_patcher: Any
    transformer_path: str
    vae_path: str
    dtype: torch.dtype
    attention: str
    label: str = ""
    defaults: dict = field(default_factory=dict)

    @property
    def transformer(self):
        return self.transformer_patcher.model

    @property
    def vae(self):
        return self.vae_patcher.model

    @property
    def config(self):
        return self.transformer.cfg

    @property
    def vae_config(self):
        return self.vae.cfg

    def load(self, transformer: bool = True, vae: bool = True, memory_required: int = 0) -> torch.device:
        """Ask ComfyUI's model management for the models on the compute device; returns that device."""
        patchers = ([self.transformer_patcher] if transformer else []) + ([self.vae_patcher] if vae else [])
        # force_full_load: these are plain torch modules (no comfy.ops casting layers), so they must
        # sit entirely on one device; ComfyUI frees other models first when memory is short.
        mm.load_models_gpu(patchers, memory_required=int(memory_required), force_full_load=True)
        return self.transformer_patcher.load_device if transformer else self.vae_patcher.load_device

    def describe(self) -> str:
        c, v = self.config, self.vae_config
        return (f"{self.label or self.transformer_path}: depth {c.depth}, width {c.width}, "
                f"{c.bits_per_token} bits/token{' (patchify)' if c.patchify else ''}; "
                f"VAE {v.bits} bits, stride {v.patch_size} ({self.vae_path}); {str(self.dtype).replace('torch.', '')}, "
                f"attention {self.attention}")


@dataclass(eq=False)
class InfinityTextEncoder:
    """A T5 encoder (infinity_core.text_encoder.T5TextEncoder) that lives on `offload_device` and is
    moved to `load_device` only while it encodes."""
    encoder: Any
    load_device: torch.device
    offload_device: torch.device
    label: str

    @property
    def width(self) -> int:
        return self.encoder.width

    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.encoder.model.state_dict().values())

    @torch.inference_mode()
    def encode(self, prompt: str):
        """-> TextCondition on the CPU. Frees room on the compute device the ComfyUI way first, and
        puts the encoder back on the offload device afterwards."""
        enc = self.encoder
        if self.load_device != self.offload_device:
            mm.free_memory(self.size_bytes() * 1.2 + mm.minimum_inference_memory(), self.load_device)
        enc.device = self.load_device
        try:
            cond = enc.encode([prompt])
        finally:
            if self.load_device != self.offload_device:
                enc.offload(self.offload_device)
                mm.soft_empty_cache()
        return cond.to("cpu")


@dataclass(eq=False)
class InfinityConditioning:
    """One encoded prompt: `cond` is an infinity_core TextCondition with a single prompt (CPU)."""
    cond: Any
    prompt: str
    tokens: int
    truncated_tokens: int
    encoder: str

    @property
    def width(self) -> int:
        return self.cond.width


@dataclass(eq=False)
class InfinityCodes:
    """What the sampler (or VAE Encode) produced, ready for the VAE decoder.

    bits: per scale [B, 1, h, w, d] uint8 (VAE grid); summed_codes: [B, d, H_lat, W_lat] float32;
    schedule: the token grids [(1, h, w), ...]; vae_bits / vae_stride / patchify: what decodes it."""
    bits: list
    summed_codes: torch.Tensor
    schedule: list
    vae_bits: int
    vae_stride: int
    patchify: bool
    height: int
    width: int
    info: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.summed_codes.shape[0])


def make_patcher(module: torch.nn.Module, load_device, offload_device):
    """A ModelPatcher around a plain torch module, so comfy.model_management can load, offload and
    unload it like ComfyUI's own models (nothing is patched: no LoRA support here)."""
    return comfy.model_patcher.ModelPatcher(module, load_device=load_device, offload_device=offload_device)
