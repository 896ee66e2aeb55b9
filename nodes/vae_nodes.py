"""Infinity VAE Decode (codes -> IMAGE) and Infinity VAE Encode (IMAGE -> codes along a schedule).

rgb_images and encode_images (IMAGE -> RGB -> per-scale bits by the official preprocessing) are
shared with Infinity Edit (edit_node.py)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

import comfy.model_management as mm
from comfy_api.latest import io

from ..infinity_core import schedules
from ..infinity_core.edit import encode_source
from ..infinity_core.sampler import to_rgb01
from ..infinity_core.vae import preprocess_image
from .common import CATEGORY, Codes, InfinityCodes, InfinityModel, Model, fail, log
from .interrupt import interruptible
from .memory import release_free_memory
from .sampler_node import schedule_of
from .schedule_node import ScaleSchedule


def _vae_desc(bits: int, stride: int) -> str:
    return f"a {bits}-bit BSQ VAE with stride {stride}"


class InfinityVAEDecode(io.ComfyNode):
    NAME = "Infinity VAE Decode"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InfinityVAEDecode",
            display_name=cls.NAME,
            category=CATEGORY,
            description=("Turns Infinity codes (from the sampler or Infinity VAE Encode) into images with the "
                         "model's BSQ VAE decoder: RGB, values 0..1, one image per code map of the batch. "
                         "Save or preview them with ComfyUI's Save Image / Preview Image."),
            inputs=[
                Model.Input("model", tooltip="The model whose VAE decodes the codes (the one that made them)."),
                Codes.Input("codes", tooltip="Codes from Infinity Sampler or Infinity VAE Encode."),
            ],
            outputs=[io.Image.Output("image", display_name="IMAGE",
                                     tooltip="The decoded images (batch x height x width x RGB, 0..1).")],
        )

    @classmethod
    def execute(cls, model: InfinityModel, codes: InfinityCodes) -> io.NodeOutput:
        node = cls.NAME
        v = model.vae_config
        if (codes.vae_bits, codes.vae_stride) != (v.bits, v.patch_size):
            fail(node, f"these codes were made for {_vae_desc(codes.vae_bits, codes.vae_stride)}, but the "
                       f"model's VAE is {_vae_desc(v.bits, v.patch_size)}; decode them with the model that made them")
        per_image = codes.summed_codes[0].numel() * 4 * v.base_ch * v.patch_size ** 2 // max(v.bits, 1)
        device = model.load(transformer=False, vae=True, memory_required=per_image * 4)
        dtype = next(model.vae.parameters()).dtype
        out = []
        try:
            # Cancel stops the decoder at its next layer (a 1024x1024 decode takes over a minute on a CPU); no
            # image of the batch is returned then, so nothing downstream saves a partial batch
            with torch.inference_mode(), interruptible(model.vae):
                for i in range(codes.batch_size):  # one image at a time bounds the decoder's memory
                    img = model.vae.decode(codes.summed_codes[i:i + 1].to(device=device, dtype=dtype))
                    out.append(to_rgb01(img).to(mm.intermediate_device()))
            images = torch.cat(out)
        finally:
            out = img = None
            # the last Infinity node of a graph: hand the sampler's and the decoder's freed buffers back to
            # the system (memory.py)
            release_free_memory()
        return io.NodeOutput(images)


def rgb_images(node: str, image) -> tuple[torch.Tensor, str | None]:
    """A ComfyUI IMAGE [B, H, W, C] -> [B, H, W, 3] RGB, and a note on what was converted (or None).

    3 channels: as is. 4 (RGBA): the alpha channel is dropped, the colours are used as they are (as
    ComfyUI's own VAE Encode does). 1 (grey): replicated to RGB. 2 (grey + alpha): the grey channel
    replicated, alpha dropped. Anything else is refused."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[0] < 1:
        fail(node, f"image must be a batch of images (B x H x W x channels), got "
                   f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    c = int(image.shape[-1])
    if c == 3:
        return image, None
    if c == 4:
        return image[..., :3], "the image has an alpha channel (RGBA): alpha is ignored, the RGB colours are used"
    if c in (1, 2):
        what = "one channel (grey)" if c == 1 else "two channels (grey + alpha)"
        return image[..., :1].expand(*image.shape[:-1], 3), f"the image has {what}: the grey is used for R, G and B"
    fail(node, f"image has {c} channels per pixel; expected 3 (RGB), 4 (RGBA), 1 (grey) or 2 (grey + alpha)")


def encode_images(node: str, model: InfinityModel, rgb: torch.Tensor, sched) -> tuple[list, torch.Tensor]:
    """RGB images [B, H, W, 3] in 0..1 -> (bits per scale [B, 1, hv, wv, d] uint8, summed codes
    [B, d, H_lat, W_lat] fp32), both on the CPU. Each image is resized and centre-cropped to the schedule's
    size by the official preprocessing (from 8-bit RGB), then quantised scale by scale, one at a time."""
    h, w = schedules.image_size(sched)
    v = model.vae_config
    vae_sched = schedules.vae_schedule(sched, model.config.patchify)
    if vae_sched[-1][1] * v.patch_size != h or vae_sched[-1][2] * v.patch_size != w:
        fail(node, f"the model's VAE (stride {v.patch_size}) does not match its transformer's patchify setting")
    device = model.load(transformer=False, vae=True, memory_required=h * w * v.base_ch * 4 * 8)
    bits_per_image, summed = [], []
    for i in range(rgb.shape[0]):
        mm.throw_exception_if_processing_interrupted()
        arr = (rgb[i].clamp(0, 1).cpu().float().numpy() * 255).round().astype(np.uint8)
        x = preprocess_image(Image.fromarray(arr), h, w).to(device)
        with interruptible(model.vae):  # Cancel stops the encoder at its next layer
            enc = encode_source(model.vae, x, sched, model.config.patchify)
        summed.append(enc.summed_codes.float().cpu())
        bits_per_image.append([b.cpu() for b in enc.bits])
    bits = [torch.cat([per[k] for per in bits_per_image]) for k in range(len(sched))]
    return bits, torch.cat(summed)


class InfinityVAEEncode(io.ComfyNode):
    NAME = "Infinity VAE Encode"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InfinityVAEEncode",
            display_name=cls.NAME,
            category=CATEGORY,
            description=("Encodes images into Infinity codes along a scale schedule with the model's BSQ VAE "
                         "(multi-scale residual quantisation, as in training). Each image is first resized and "
                         "centre-cropped to the schedule's size exactly as the official preprocessing does. "
                         "Decode the codes with Infinity VAE Decode to see what the VAE keeps."),
            inputs=[
                Model.Input("model", tooltip="The model whose VAE encodes the images."),
                io.Image.Input(
                    "image",
                    tooltip=("Images to encode. Each is resized (Lanczos, aspect ratio kept) until it covers the "
                             "schedule's width x height, then centre-cropped to that size - the official "
                             "Infinity preprocessing; pixels are read as 8-bit RGB (an alpha channel is ignored, "
                             "a grey image is replicated to RGB).")),
                ScaleSchedule.Input(
                    "scale_schedule", tooltip="The size and scales to encode at, from Infinity Scale Schedule."),
            ],
            outputs=[Codes.Output("codes", display_name="codes",
                                  tooltip="Per-scale bits and summed codes of the images.")],
        )

    @classmethod
    def execute(cls, model: InfinityModel, image: torch.Tensor, scale_schedule: dict) -> io.NodeOutput:
        node = cls.NAME
        sched, _ = schedule_of(node, scale_schedule)
        rgb, note = rgb_images(node, image)
        if note:
            log.warning("%s: %s", node, note)
        bits, summed = encode_images(node, model, rgb, sched)
        h, w = schedules.image_size(sched)
        v = model.vae_config
        return io.NodeOutput(InfinityCodes(
            bits=bits, summed_codes=summed, schedule=sched, vae_bits=v.bits, vae_stride=v.patch_size,
            patchify=model.config.patchify, height=h, width=w, info={"source": "Infinity VAE Encode"}))


NODES: list[type[io.ComfyNode]] = [InfinityVAEDecode, InfinityVAEEncode]
