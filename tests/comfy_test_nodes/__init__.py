"""Test-only ComfyUI nodes, loaded by the test server next to ComfyUI-Infinity (tests/stand_ins.py).
They make inputs no core ComfyUI node makes, and show values no core node can show, so the Infinity
nodes can be tested through the real server. Never shipped: ComfyUI loads only the pack's root."""
import base64
import io

import numpy as np
import torch


class InfinityTestImageChannels:
    """IMAGE [B, H, W, 3] -> the same pictures with 1 channel (grey: the mean of R, G, B) or 2 channels
    (grey + an opaque alpha)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "channels": ("INT", {"default": 1, "min": 1, "max": 2})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "convert"
    CATEGORY = "testing"

    def convert(self, image, channels):
        grey = image[..., :3].mean(dim=-1, keepdim=True)
        return (grey if channels == 1 else torch.cat([grey, torch.ones_like(grey)], dim=-1),)


class InfinityTestCodesProbe:
    """INFINITY_CODES -> its per-scale bits and summed codes in the history (ui "codes": one base64 .npz
    with bits_0 .. bits_{K-1} [B, 1, h, w, d] uint8 and summed [B, d, H, W] float32)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"codes": ("INFINITY_CODES",)}}

    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def probe(self, codes):
        arrays = {f"bits_{k}": b.numpy() for k, b in enumerate(codes.bits)}
        buf = io.BytesIO()
        np.savez_compressed(buf, summed=codes.summed_codes.numpy(), **arrays)
        return {"ui": {"codes": [base64.b64encode(buf.getvalue()).decode("ascii")]}}


NODE_CLASS_MAPPINGS = {"InfinityTestImageChannels": InfinityTestImageChannels,
                       "InfinityTestCodesProbe": InfinityTestCodesProbe}
