"""Infinity Sampler: conditioning + scale schedule -> INFINITY_CODES with infinity_core.sampler.sample.

One ProgressBar step per scale, each with a preview of the partial image (the running sum of codes
decoded at that scale's size, at most PREVIEW_PX pixels); ComfyUI's interrupt is honoured between
scales (the progress hook and the callback both check it).

The helpers before the node class (settings parsing and checks, prompt rows, seeds, the progress
and preview loop, the codes value) are shared with Infinity Edit (edit_node.py).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image

import comfy.model_management as mm
import comfy.utils
from comfy_api.latest import io

from ..infinity_core import sampler as S
from ..infinity_core import schedules
from ..infinity_core import text_encoder as te
from .common import (CATEGORY, Codes, Conditioning, InfinityCodes, InfinityConditioning, InfinityModel, Model,
                     fail, log, short)
from .schedule_node import ScaleSchedule, ratio_label

SEED_MAX = 0xFFFFFFFFFFFFFFFF
MAX_BATCH = 64
PREVIEW_PX = {"cuda": 512, "default": 256}  # largest preview side decoded per scale
PREVIEW_JPEG_MAX = 512


def schedule_of(node: str, value) -> tuple[list, str]:
    """(schedule as [(1, h, w), ...], a short description) from an INFINITY_SCALE_SCHEDULE value."""
    try:
        sched = [tuple(int(v) for v in s) for s in value["schedule"]]
        schedules.template_of(sched)
    except (KeyError, TypeError, ValueError) as e:
        fail(node, f"scale_schedule is not a valid Infinity scale schedule ({short(e)}); connect an Infinity "
                   f"Scale Schedule node", e)
    return sched, describe_schedule(sched)


def describe_schedule(sched) -> str:
    """'1:1, 256x256, tier 0.06M' for a valid schedule."""
    h, w = schedules.image_size(sched)
    return f"{ratio_label(schedules.template_of(sched))}, {w}x{h}, tier {schedules.tier_of(sched)}"


def per_scale_list(node: str, name: str, text: str, scalar_name: str, scalar: float, num_scales: int,
                   desc: str):
    """The scalar, or the parsed per-scale list when `text` is not empty (exactly one value per scale)."""
    text = (text or "").strip()
    if not text:
        return float(scalar)
    try:
        values = S.parse_list(text, name)
    except ValueError as e:
        fail(node, f"{short(e)}. Give {num_scales} numbers separated by commas, or leave {name} empty to use "
                   f"{scalar_name}", e)
    if len(values) != num_scales:
        fail(node, f"{name} has {len(values)} values but the scale schedule ({desc}) has {num_scales} scales: "
                   f"give exactly {num_scales} numbers separated by commas, one per scale from coarse to fine, "
                   f"or leave {name} empty to use {scalar_name} = {scalar:g} on every scale")
    return values


def sampling_settings(node: str, cfg: float, cfg_list: str, tau: float, tau_list: str, num_scales: int,
                      desc: str) -> tuple:
    """(cfg, tau) for infinity_core: each the scalar or its validated per-scale list; tau > 0 everywhere."""
    cfg_value = per_scale_list(node, "cfg_list", cfg_list, "cfg", cfg, num_scales, desc)
    tau_value = per_scale_list(node, "tau_list", tau_list, "tau", tau, num_scales, desc)
    taus = tau_value if isinstance(tau_value, list) else [tau_value]
    if any(t <= 0 for t in taus):
        fail(node, f"tau must be > 0 on every scale, got {tau_value}")
    return cfg_value, tau_value


def is_guided(cfg_value) -> bool:
    """Whether classifier-free guidance runs (cfg 1 on every scale = no unconditional pass)."""
    return any(c != 1 for c in (cfg_value if isinstance(cfg_value, list) else [cfg_value]))


def check_batch_size(node: str, batch_size: int, what: str = "batch_size") -> None:
    if not 1 <= batch_size <= MAX_BATCH:
        fail(node, f"{what} must be between 1 and {MAX_BATCH}, got {batch_size}")


def prompt_rows(node: str, model: InfinityModel, positive: InfinityConditioning,
                negative: InfinityConditioning | None, rows: int):
    """The prompts repeated for `rows` images, checked against the model's text width:
    (positive TextCondition, negative (kv_compact, cu_seqlens) or None)."""
    for name, cond in (("positive", positive), ("negative", negative)):
        if cond is None:
            continue
        try:
            te.check_text_width(cond.width, model.config.text_channels, cond.encoder, model.label)
        except ValueError as e:
            fail(node, f"{name}: {short(e)}", e)
    pos = positive.cond.repeat_each(rows)
    neg = None
    if negative is not None:
        n = negative.cond.repeat_each(rows)
        neg = (n.kv_compact, n.cu_seqlens)
    return pos, neg


def seeds_for(seed: int, batch_size: int) -> list[int]:
    """Image i of a batch uses seed + i (wrapping at 2^64): any image can be re-rendered alone."""
    return [(int(seed) + i) % (SEED_MAX + 1) for i in range(batch_size)]


def memory_estimate(model: InfinityModel, schedule, batch: int, guided: bool) -> int:
    """Bytes the sampler needs beyond the weights: the KV cache of every scale, plus activations."""
    cfg = model.config
    rows = batch * (2 if guided else 1)
    tokens = schedules.token_count(schedule)
    last = schedule[-1][1] * schedule[-1][2]
    elem = torch.finfo(model.dtype).bits // 8
    kv = cfg.depth * 2 * tokens * cfg.width * rows * elem
    act = 6 * last * max(cfg.width, cfg.mlp_hidden) * rows * 4 + last * tokens * cfg.num_heads * rows * 4
    return int(kv + act)


def _preview_image(rgb01: torch.Tensor) -> Image.Image:
    arr = (rgb01[0].clamp(0, 1).cpu().float().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


def sample_with_progress(node: str, model: InfinityModel, schedule, rows: int, guided: bool,
                         run: Callable) -> S.SampleResult:
    """Load the model the ComfyUI way and call `run(callback)`, an infinity_core sampling call (sample
    or edit) that passes `callback` and `vae=model.vae` on. The callback gives one ProgressBar step per
    scale with a preview of the partial image and stops at ComfyUI's interrupt between scales. Errors
    of the sampling call are reported as "<node>: ..."."""
    K = len(schedule)
    device = model.load(memory_required=memory_estimate(model, schedule, rows, guided))
    pbar = comfy.utils.ProgressBar(K)
    cap = max(1, PREVIEW_PX.get(torch.device(device).type, PREVIEW_PX["default"]) // model.vae_config.patch_size)
    preview_failed = []

    def on_scale(si, bits, preview):
        mm.throw_exception_if_processing_interrupted()
        shown = None
        if not preview_failed:
            hv, wv = int(bits.shape[2]), int(bits.shape[3])
            shrink = min(1.0, cap / max(hv, wv))
            # at least 2x2 latent cells: a 1x1 map cannot pass the decoder's GroupNorm in every VAE
            size = (max(2, round(hv * shrink)), max(2, round(wv * shrink)))
            try:
                image = preview(size, slice(0, 1))  # image 0's running sum at this scale, decoded at <= cap latent cells
                if image is not None:
                    pil = _preview_image(image)  # max_size = its own size: ComfyUI would upscale it
                    shown = ("JPEG", pil, min(PREVIEW_JPEG_MAX, max(pil.size)))
            except Exception as e:  # a preview must never cost the image
                preview_failed.append(e)
                log.warning("%s: previews disabled for this run (%s: %s)", node, type(e).__name__, e)
        pbar.update_absolute(si + 1, K, shown)

    try:
        return run(on_scale)
    except (ValueError, S.SamplingInterrupted) as e:
        fail(node, short(e), e)


def codes_of(model: InfinityModel, schedule, result: S.SampleResult, info: dict) -> InfinityCodes:
    """The INFINITY_CODES value of a sampling result (on the CPU)."""
    h, w = schedules.image_size(schedule)
    return InfinityCodes(
        bits=[b.cpu() for b in result.bits], summed_codes=result.summed_codes.float().cpu(), schedule=schedule,
        vae_bits=model.vae_config.bits, vae_stride=model.vae_config.patch_size, patchify=model.config.patchify,
        height=h, width=w, info=info)


def seed_input(tooltip: str) -> io.Int.Input:
    """The seed widget (with ComfyUI's control after generate)."""
    return io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True, tooltip=tooltip)


def guidance_inputs() -> list:
    """The cfg / cfg_list / tau / tau_list / top_k / top_p widgets, read by sampling_settings."""
    return [
        io.Float.Input(
            "cfg", default=3.0, min=0.0, max=100.0, step=0.1, round=0.01,
            tooltip=("Classifier-free guidance strength: how strongly the image follows the prompt. "
                     "1 = no guidance (half the compute); the official 2B/8B setting is 3. Used on every "
                     "scale unless cfg_list is set.")),
        io.String.Input(
            "cfg_list", default="", multiline=False, placeholder="per-scale cfg, e.g. 4,4,4,3,3,2,1",
            tooltip=("Optional: one cfg per scale, coarse to fine, separated by commas (e.g. strong "
                     "guidance for the layout, weaker for the details). Exactly as many values as the "
                     "schedule has scales (7, 10, 12 or 13 by tier). Empty = cfg on every scale.")),
        io.Float.Input(
            "tau", default=1.0, min=0.01, max=10.0, step=0.05, round=0.01,
            tooltip=("Sampling temperature of the bits: below 1 is more conservative, above 1 more "
                     "varied. The official notebooks use 0.5 for the 2B and 1 for the 8B. Used on every "
                     "scale unless tau_list is set.")),
        io.String.Input(
            "tau_list", default="", multiline=False, placeholder="per-scale tau, e.g. 1,1,1,0.9,0.8,0.7,0.5",
            tooltip=("Optional: one temperature per scale, coarse to fine, separated by commas; exactly "
                     "as many values as the schedule has scales. Empty = tau on every scale.")),
        io.Int.Input(
            "top_k", default=900, min=0, max=100000,
            tooltip=("Top-k filter of the official sampler (0 = off). Each bit has two outcomes, so any "
                     "value >= 2 keeps both and 1 is greedy; 900 is the official setting.")),
        io.Float.Input(
            "top_p", default=0.97, min=0.0, max=1.0, step=0.01, round=0.001,
            tooltip=("Top-p (nucleus) filter (0 = off): a bit value whose probability is at most "
                     "1 - top_p is never drawn. 0.97 is the official setting.")),
    ]


def batch_size_input(tooltip: str) -> io.Int.Input:
    return io.Int.Input("batch_size", default=1, min=1, max=MAX_BATCH, tooltip=tooltip)


class InfinitySampler(io.ComfyNode):
    NAME = "Infinity Sampler"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InfinitySampler",
            display_name=cls.NAME,
            category=CATEGORY,
            description=(
                "Draws an image with Infinity's next-scale bitwise prediction: for each scale of the schedule "
                "(1x1 token up to the full grid) the transformer predicts every bit of every token, guided by "
                "the prompt (classifier-free guidance), and the codes add up into the image. Outputs the codes; "
                "decode them with Infinity VAE Decode. Shows a preview after every scale; Cancel stops after "
                "the scale in progress. Same inputs and seed -> the same image on any device."),
            inputs=[
                Model.Input("model", tooltip="The transformer and VAE from Load Infinity Model."),
                Conditioning.Input("positive", tooltip="The prompt, from Infinity Text Encode."),
                Conditioning.Input(
                    "negative", optional=True,
                    tooltip=("Optional negative prompt (Infinity Text Encode). Unconnected, guidance pushes away "
                             "from the model's learned empty prompt, as the official sampler does.")),
                ScaleSchedule.Input(
                    "scale_schedule",
                    tooltip="Output size and its scales, from Infinity Scale Schedule (it sets the number of scales)."),
                seed_input(
                    "Random seed of the bit sampling (a CPU generator, so results do not depend on the "
                    "device). With batch_size > 1, image i uses seed + i, so any image of a batch "
                    "can be re-rendered alone with batch_size 1 and seed + i."),
                *guidance_inputs(),
                io.Int.Input(
                    "cfg_insertion_layer", default=0, min=-128, max=0,
                    tooltip=("Where guidance is applied: 0 = on the output logits (the released models). A "
                             "negative n mixes the hidden states after block depth+n instead (-1 = after the "
                             "last block); must be at least -depth of the model.")),
                batch_size_input(
                    "Images drawn at once from the same prompt. Image i uses seed + i, so each one can "
                    "be re-rendered alone. Memory grows with the batch."),
            ],
            outputs=[Codes.Output("codes", display_name="codes",
                                  tooltip="Per-scale bits and summed codes; decode with Infinity VAE Decode.")],
        )

    @classmethod
    def execute(cls, model: InfinityModel, positive: InfinityConditioning, scale_schedule: dict, seed: int,
                cfg: float, cfg_list: str, tau: float, tau_list: str, top_k: int, top_p: float,
                cfg_insertion_layer: int, batch_size: int, negative: InfinityConditioning | None = None
                ) -> io.NodeOutput:
        node = cls.NAME
        tcfg = model.config
        sched, desc = schedule_of(node, scale_schedule)
        cfg_value, tau_value = sampling_settings(node, cfg, cfg_list, tau, tau_list, len(sched), desc)
        if not -tcfg.depth <= cfg_insertion_layer <= 0:
            fail(node, f"cfg_insertion_layer {cfg_insertion_layer} is out of range for this model (depth "
                       f"{tcfg.depth}): use 0 (guidance on the logits) or a value from -{tcfg.depth} to -1")
        check_batch_size(node, batch_size)
        pos, neg = prompt_rows(node, model, positive, negative, batch_size)
        seeds = seeds_for(seed, batch_size)
        result = sample_with_progress(
            node, model, sched, batch_size, is_guided(cfg_value),
            lambda callback: S.sample(model.transformer, pos.kv_compact, pos.cu_seqlens, sched, cfg=cfg_value,
                                      tau=tau_value, top_k=int(top_k), top_p=float(top_p), seed=seeds, negative=neg,
                                      cfg_insertion_layer=int(cfg_insertion_layer), callback=callback,
                                      vae=model.vae))
        codes = codes_of(model, sched, result, info={
            "seeds": seeds, "cfg": cfg_value, "tau": tau_value, "top_k": int(top_k), "top_p": float(top_p),
            "cfg_insertion_layer": int(cfg_insertion_layer), "prompt": positive.prompt,
            "negative_prompt": negative.prompt if negative is not None else None, "model": model.label})
        return io.NodeOutput(codes)


NODES: list[type[io.ComfyNode]] = [InfinitySampler]
