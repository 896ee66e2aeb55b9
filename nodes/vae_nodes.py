"""Infinity VAE Decode (codes -> IMAGE) and Infinity VAE Encode (IMAGE -> codes along a schedule)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

import comfy.model_management as mm
from comfy_api.latest import io

from ..infinity_core import schedules
from ..infinity_core.sampler import to_rgb01
from ..infinity_core.vae import preprocess_image
from .common import CATEGORY, Codes, InfinityCodes, InfinityModel, Model, fail
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
        with torch.inference_mode():
            for i in range(codes.batch_size):  # one image at a time bounds the decoder's memory
                mm.throw_exception_if_processing_interrupted()
                img = model.vae.decode(codes.summed_codes[i:i + 1].to(device=device, dtype=dtype))
                out.append(to_rgb01(img).to(mm.intermediate_device()))
        return io.NodeOutput(torch.cat(out))


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
                             "Infinity preprocessing; pixels are read as 8-bit RGB.")),
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
        if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[-1] < 3:
            fail(node, f"image must be a batch of RGB images (B x H x W x 3), got {getattr(image, 'shape', type(image))}")
        h, w = schedules.image_size(sched)
        v = model.vae_config
        vae_sched = schedules.vae_schedule(sched, model.config.patchify)
        if vae_sched[-1][1] * v.patch_size != h or vae_sched[-1][2] * v.patch_size != w:
            fail(node, f"the model's VAE (stride {v.patch_size}) does not match its transformer's patchify setting")
        device = model.load(transformer=False, vae=True, memory_required=h * w * v.base_ch * 4 * 8)
        dtype = next(model.vae.parameters()).dtype
        bits_per_image, summed = [], []
        with torch.inference_mode():
            for i in range(image.shape[0]):
                mm.throw_exception_if_processing_interrupted()
                arr = (image[i, :, :, :3].clamp(0, 1).cpu().float().numpy() * 255).round().astype(np.uint8)
                x = preprocess_image(Image.fromarray(arr), h, w).to(device=device, dtype=dtype)
                _, codes, bits, _ = model.vae.encode(x, vae_sched)
                summed.append(codes.float().cpu())
                bits_per_image.append([b.cpu() for b in bits])
        bits = [torch.cat([per[k] for per in bits_per_image]) for k in range(len(sched))]
        return io.NodeOutput(InfinityCodes(
            bits=bits, summed_codes=torch.cat(summed), schedule=sched, vae_bits=v.bits, vae_stride=v.patch_size,
            patchify=model.config.patchify, height=h, width=w, info={"source": "Infinity VAE Encode"}))


NODES: list[type[io.ComfyNode]] = [InfinityVAEDecode, InfinityVAEEncode]
