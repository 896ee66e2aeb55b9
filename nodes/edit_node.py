"""Infinity Edit: a picture + a new prompt -> INFINITY_CODES with infinity_core.edit (training-free
editing by partial-scale re-sampling).

The node translates ComfyUI values (IMAGE, MASK, widgets) into an infinity_core.edit call and shares
the sampler node's settings checks, prompt rows, seeds and progress/preview loop (sampler_node.py)
and the VAE Encode node's image conversion and encoding (vae_nodes.py).

What the node decides (documented in the tooltips and docs/nodes.md):
  - the schedule is the one of the source's own size: nearest aspect-ratio template, tier with the
    nearest pixel count (schedules.schedule_for_size); the source is resized and centre-cropped to
    it by the official preprocessing, and so is the mask (the same geometry);
  - keep_scales -1 takes k from strength (keep_scales_from_strength); the k used is reported;
  - a batch of N source pictures gives N x batch_size edits, source-major; row r uses seed + r;
  - a mask of another size than the source is resized to it (with a warning naming both sizes);
    one mask applies to every source, or one mask per source.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from comfy_api.latest import io

from ..infinity_core import edit as E
from ..infinity_core import schedules
from ..infinity_core.vae import preprocess_image
from .common import CATEGORY, Codes, Conditioning, InfinityConditioning, InfinityModel, Model, fail, log, short
from .sampler_node import (batch_size_input, check_batch_size, codes_of, describe_schedule, guidance_inputs,
                           is_guided, prompt_rows, sample_with_progress, sampling_settings, seed_input, seeds_for)
from .vae_nodes import encode_images, rgb_images

MAX_SCALES = max(schedules.TIERS.values())  # 13, the 1M tier
DEFAULT_STRENGTH = 0.5


def source_schedule(height: int, width: int) -> list:
    """The schedule a source of this size is edited along: nearest template, nearest tier by pixels."""
    sched, _, _ = schedules.schedule_for_size(int(width), int(height))
    return sched


def choose_keep_scales(node: str, keep_scales: int, strength: float, num_scales: int, desc: str) -> tuple[int, str]:
    """(k, how it was chosen): keep_scales itself, or from strength when keep_scales is -1."""
    if keep_scales < 0:
        try:
            k = E.keep_scales_from_strength(float(strength), num_scales)
        except ValueError as e:
            fail(node, short(e), e)
        how = f"from strength {strength:.2f}"
    else:
        k, how = int(keep_scales), "set by keep_scales"
    try:
        E.check_keep_scales(k, num_scales)
    except ValueError as e:
        fail(node, f"{short(e)}: the source is edited along the schedule of its size ({desc}), which has "
                   f"{num_scales} scales. Use keep_scales 0..{num_scales}, or -1 to take it from strength", e)
    return k, how


def mask_at_size(node: str, mask, num_sources: int, source_hw: tuple[int, int], out_hw: tuple[int, int]
                 ) -> tuple[torch.Tensor, list[str]]:
    """ComfyUI MASK [H, W] or [B, H, W] (1 = may change) -> [1 or num_sources, h, w] in 0..1 at the
    schedule's size, through the source's own resize and centre crop. Returns it and the warnings."""
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3) or mask.numel() == 0:
        fail(node, f"mask must be a ComfyUI MASK (B x H x W), got "
                   f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    m = (mask if mask.dim() == 3 else mask.unsqueeze(0)).float()
    if m.shape[0] not in (1, num_sources):
        fail(node, f"mask has {m.shape[0]} masks for {num_sources} source images: give one mask (used for "
                   f"every source) or one per source")
    warnings = []
    (H, W), (Hm, Wm) = source_hw, tuple(m.shape[-2:])
    if (Hm, Wm) != (H, W):
        warnings.append(f"the mask is {Wm}x{Hm} but the source is {W}x{H}: the mask was resized (stretched) "
                        f"to {W}x{H}")
        m = F.interpolate(m.unsqueeze(1), size=(H, W), mode="bilinear", align_corners=False).squeeze(1)
    h, w = out_hw
    out = []
    for i in range(m.shape[0]):
        # the source's geometry exactly: the same official resize and crop, on the mask as 8-bit grey
        u8 = (m[i].clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
        out.append((preprocess_image(Image.fromarray(u8), h, w)[0, 0] + 1) / 2)
    return torch.stack(out), warnings


def describe_mask(pixel_mask: torch.Tensor, vae_sched, keep_scales: int, num_scales: int) -> tuple[str, list[str]]:
    """The report line of a mask at the schedule's size (share re-drawn, border band) and its warnings."""
    hw = tuple(pixel_mask.shape[-2:])
    band = E.border_band_px(pixel_mask, vae_sched, hw, keep_scales)
    share = E.mask_per_scale(pixel_mask, vae_sched)[-1].float().mean().item()
    warnings = []
    if float(pixel_mask.max()) == 0:
        warnings.append("the mask is empty (all 0): nothing is re-drawn, the output is the reconstruction "
                        "(Load Image's MASK is an empty 64x64 mask for a picture without alpha)")
    elif band == 0 and keep_scales < num_scales:
        warnings.append(f"the mask selects nothing to re-draw (no cell is at least half masked from scale "
                        f"{keep_scales + 1} on): the output is the reconstruction")
    return f"mask: {100 * share:.0f}% of the picture may change, border band {band} px", warnings


def bits_changed(result_bits: list, source_bits: list) -> tuple[int, int]:
    """(bits that differ from the source's, all bits), over every scale and image."""
    changed = sum(int((a.cpu() != b.cpu()).sum()) for a, b in zip(result_bits, source_bits))
    return changed, sum(b.numel() for b in source_bits)


class InfinityEdit(io.ComfyNode):
    NAME = "Infinity Edit"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InfinityEdit",
            display_name=cls.NAME,
            category=CATEGORY,
            description=(
                "Edits a picture with a new prompt, without training: the picture is encoded into Infinity's "
                "per-scale bits, the first keep_scales (coarse) scales are kept - they hold the layout and the "
                "large colour masses - and the finer scales are drawn again under the new prompt. With a mask, "
                "everything outside the mask keeps the picture's bits on every scale and only the masked region "
                "is re-drawn. keep_scales = number of scales gives back the VAE reconstruction of the picture, "
                "0 is plain text-to-image. The node shows the k it used. Outputs codes for Infinity VAE Decode; "
                "a preview after every scale, Cancel stops after the scale in progress."),
            inputs=[
                Model.Input("model", tooltip="The transformer and VAE from Load Infinity Model."),
                io.Image.Input(
                    "source",
                    tooltip=("The picture to edit. It is edited at the Infinity size nearest its own: the nearest "
                             "of the 15 aspect-ratio templates and the tier with the nearest pixel count (7 to 13 "
                             "scales), after the official preprocessing (Lanczos resize until it covers that size, "
                             "centre crop); the output has that size. RGBA: alpha is ignored; grey: used for R, G "
                             "and B. A batch of N pictures gives N x batch_size edits.")),
                Conditioning.Input("positive", tooltip="The new prompt, from Infinity Text Encode."),
                Conditioning.Input(
                    "negative", optional=True,
                    tooltip=("Optional negative prompt (Infinity Text Encode). Unconnected, guidance pushes away "
                             "from the model's learned empty prompt, as the official sampler does.")),
                io.Mask.Input(
                    "mask", optional=True,
                    tooltip=("Optional: the region allowed to change (1 = re-draw, 0 = keep), at the picture's "
                             "size (another size is stretched to it, with a warning); e.g. the mask painted in "
                             "Load Image's mask editor. Outside it the picture's bits are kept on every scale. "
                             "On each scale a cell is re-drawn when at least half of it is masked, so changes "
                             "reach up to one coarse cell past the mask's edge (the node shows this band in "
                             "pixels). One mask for every picture, or one per picture.")),
                io.Int.Input(
                    "keep_scales", default=-1, min=-1, max=MAX_SCALES,
                    tooltip=("How many coarse scales are kept from the picture (k): 0 = re-draw everything "
                             "(text to image), the number of scales (7, 10, 12 or 13 by the picture's size) = "
                             "keep everything (the VAE reconstruction). -1 = take k from strength. The node shows "
                             "the k it used.")),
                io.Float.Input(
                    "strength", default=DEFAULT_STRENGTH, min=0.0, max=1.0, step=0.05, round=0.01,
                    tooltip=("Used when keep_scales is -1: how much to change, 0..1. k = round((1 - strength) x "
                             "number of scales): 0 keeps every scale (no change), 1 keeps none.")),
                seed_input(
                    "Random seed of the bit sampling (a CPU generator, so results do not depend on the device). "
                    "Edit r of the output (source-major: every edit of the first picture, then the second...) "
                    "uses seed + r."),
                *guidance_inputs(),
                batch_size_input(
                    "Edits drawn per source picture. Output r uses seed + r, so each one can be re-drawn alone. "
                    "Memory grows with the batch."),
            ],
            outputs=[Codes.Output("codes", display_name="codes",
                                  tooltip="Per-scale bits and summed codes of the edits; decode with Infinity VAE "
                                          "Decode.")],
        )

    @classmethod
    def execute(cls, model: InfinityModel, source: torch.Tensor, positive: InfinityConditioning,
                keep_scales: int, strength: float, seed: int, cfg: float, cfg_list: str, tau: float,
                tau_list: str, top_k: int, top_p: float, batch_size: int,
                negative: InfinityConditioning | None = None, mask: torch.Tensor | None = None) -> io.NodeOutput:
        node = cls.NAME
        rgb, channel_note = rgb_images(node, source)
        n_src, H, W = int(rgb.shape[0]), int(rgb.shape[1]), int(rgb.shape[2])
        sched = source_schedule(H, W)
        desc, K = describe_schedule(sched), len(sched)
        h, w = schedules.image_size(sched)
        k, how = choose_keep_scales(node, keep_scales, strength, K, desc)
        cfg_value, tau_value = sampling_settings(node, cfg, cfg_list, tau, tau_list, K, desc)
        check_batch_size(node, batch_size)
        rows = n_src * batch_size
        check_batch_size(node, rows, f"source images x batch_size ({n_src} x {batch_size})")
        warnings = [channel_note] if channel_note else []

        lines = [f"keep_scales {k} of {K} ({how})", f"source {W}x{H} -> {desc}"]
        pixel_mask = None
        if mask is not None:
            pixel_mask, mask_warnings = mask_at_size(node, mask, n_src, (H, W), (h, w))
            line, mask_notes = describe_mask(pixel_mask, schedules.vae_schedule(sched, model.config.patchify), k, K)
            lines.append(line)
            warnings += mask_warnings + mask_notes
            if pixel_mask.shape[0] > 1:
                pixel_mask = pixel_mask.repeat_interleave(batch_size, dim=0)
        for text in warnings:
            log.warning("%s: %s", node, text)

        pos, neg = prompt_rows(node, model, positive, negative, rows)
        bits, summed = encode_images(node, model, rgb, sched)
        src = E.SourceEncoding(bits=[b.repeat_interleave(batch_size, dim=0) for b in bits],
                               summed_codes=summed.repeat_interleave(batch_size, dim=0), schedule=sched)
        seeds = seeds_for(seed, rows)
        result = sample_with_progress(
            node, model, sched, rows, is_guided(cfg_value),
            lambda callback: E.edit(model.transformer, src, pos.kv_compact, pos.cu_seqlens, k, mask=pixel_mask,
                                    cfg=cfg_value, tau=tau_value, top_k=int(top_k), top_p=float(top_p),
                                    seed=seeds, negative=neg, callback=callback, vae=model.vae))
        changed, total = bits_changed(result.bits, src.bits)
        lines.append(f"{changed:,} of {total:,} source bits changed ({100 * changed / total:.1f}%)")
        log.info("%s: %s", node, "; ".join(lines))
        codes = codes_of(model, sched, result, info={
            "seeds": seeds, "cfg": cfg_value, "tau": tau_value, "top_k": int(top_k), "top_p": float(top_p),
            "prompt": positive.prompt, "negative_prompt": negative.prompt if negative is not None else None,
            "model": model.label, "edit": {"keep_scales": k, "num_scales": K, "source_size": (W, H),
                                           "masked": mask is not None}})
        # shown under the node by web/infinity.js and kept in the prompt's history
        report = "\n".join(lines + [f"⚠ {t}" for t in warnings])
        return io.NodeOutput(codes, ui={"text": [report]})


NODES: list[type[io.ComfyNode]] = [InfinityEdit]
