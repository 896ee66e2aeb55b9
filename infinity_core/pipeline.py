"""Text-to-image with Infinity: prompt -> T5 features -> bitwise sampler -> summed codes -> VAE -> RGB.

`InfinityPipeline` holds the three models; `generate` returns RGB floats in [0, 1], BHWC, plus the
per-scale bits and the settings (stored in PNG metadata by the command line).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from . import schedules as S
from .sampler import SampleResult, sample, to_rgb01
from .text_encoder import TextCondition, check_text_width


@dataclass
class GenerationSettings:
    prompt: list
    negative_prompt: list | None
    h_div_w: float
    tier: str
    cfg: object = 3.0
    tau: object = 1.0
    top_k: int = 900
    top_p: float = 0.97
    seed: int = 0
    seed_mode: str = "official"   # "official": one CPU generator for the batch; "per_image": seed + i
    batch_size: int = 1
    cfg_insertion_layer: int = 0
    width: int = 0
    height: int = 0
    model: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass
class Generation:
    images: torch.Tensor | None      # [B, H, W, 3] RGB float in [0, 1]
    sample: SampleResult
    settings: GenerationSettings


class InfinityPipeline:
    def __init__(self, transformer, vae, text_encoder=None):
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        if text_encoder is not None:
            check_text_width(text_encoder.width, transformer.cfg.text_channels,
                             "text encoder", transformer.cfg.name)

    @classmethod
    def from_files(cls, transformer_path, vae_path=None, text_encoder_path=None, *, t5_config=None,
                   tokenizer_path=None, dtype="auto", device="cpu", attn_backend="sdpa",
                   ca_precision="bf16", vae_candidates=()):
        from .checkpoint import find_vae_for, load_pair
        from .text_encoder import T5TextEncoder
        if vae_path is None:
            vae_path = find_vae_for(transformer_path, vae_candidates)
        transformer, vae = load_pair(transformer_path, vae_path, dtype=dtype, device=device,
                                     attn_backend=attn_backend, ca_precision=ca_precision)
        te = None
        if text_encoder_path is not None:
            te = T5TextEncoder(text_encoder_path, config=t5_config, tokenizer_path=tokenizer_path,
                               device=device, dtype=dtype)
        return cls(transformer, vae, te)

    def encode_prompts(self, prompts) -> TextCondition:
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder; pass one or give encoded TextConditions")
        return self.text_encoder.encode(list(prompts))

    def generate(self, prompt, negative_prompt=None, *, h_div_w: float | None = None,
                 width: int | None = None, height: int | None = None, tier: str = "1M",
                 cfg=3.0, tau=1.0, top_k: int = 900, top_p: float = 0.97, seed: int = 0,
                 seed_mode: str = "official", batch_size: int = 1, cfg_insertion_layer: int = 0,
                 callback=None, stop_after=None, decode: bool = True) -> Generation:
        """prompt: a string or list of strings (each repeated `batch_size` times). The image size is
        a template ratio `h_div_w` and a tier, or width/height snapped to the nearest template."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if width is not None or height is not None:
            if width is None or height is None:
                raise ValueError("give both width and height, or neither")
            schedule, h_div_w, tier = S.schedule_for_size(width, height, tier)
        else:
            h_div_w = S.nearest_template(1.0 if h_div_w is None else h_div_w)
            schedule = S.get_schedule(h_div_w, tier)
        cond = self._as_condition(prompts).repeat_each(batch_size)
        negative = None
        negs = None
        if negative_prompt:
            negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negs) != len(prompts):
                raise ValueError(f"{len(negs)} negative prompts for {len(prompts)} prompts")
            neg = self._as_condition(negs).repeat_each(batch_size)
            negative = (neg.kv_compact, neg.cu_seqlens)
        B = len(cond)
        if seed_mode == "official":
            seeds = int(seed)
        elif seed_mode == "per_image":
            seeds = [int(seed) + i for i in range(B)]
        else:
            raise ValueError(f"seed_mode {seed_mode!r}; expected 'official' or 'per_image'")
        result = sample(self.transformer, cond.kv_compact, cond.cu_seqlens, schedule, cfg=cfg, tau=tau,
                        top_k=top_k, top_p=top_p, seed=seeds, negative=negative,
                        cfg_insertion_layer=cfg_insertion_layer, callback=callback,
                        stop_after=stop_after, vae=self.vae)
        images = self.decode(result.summed_codes) if decode else None
        H, W = S.image_size(schedule)
        settings = GenerationSettings(
            prompt=prompts, negative_prompt=negs, h_div_w=h_div_w, tier=tier,
            cfg=cfg if isinstance(cfg, (int, float)) else list(cfg),
            tau=tau if isinstance(tau, (int, float)) else list(tau), top_k=top_k, top_p=top_p,
            seed=int(seed), seed_mode=seed_mode, batch_size=batch_size,
            cfg_insertion_layer=cfg_insertion_layer, width=W, height=H,
            model={"transformer": self.transformer.cfg.name, "vae_bits": self.vae.cfg.bits})
        return Generation(images=images, sample=result, settings=settings)

    def _as_condition(self, prompts) -> TextCondition:
        return prompts if isinstance(prompts, TextCondition) else self.encode_prompts(prompts)

    @torch.inference_mode()
    def decode(self, summed_codes) -> torch.Tensor:
        """summed codes [B, d, h, w] -> [B, H, W, 3] RGB float in [0, 1]."""
        dtype = next(self.vae.parameters()).dtype
        return to_rgb01(self.vae.decode(summed_codes.to(dtype)))
