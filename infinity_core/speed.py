"""Opt-in speed modes that trade exactness for time (measured by bench/generate.py).

- `quantize_int8(model)`: int8 dynamic quantization (CPU) of the linear layers that the blocks call
  as modules (FFN, attention output projections, cross-attention queries): about two thirds of the
  transformer's multiply-adds. Weights become int8 per tensor, activations are quantized on the fly.
- Guidance off from scale N: `sample(..., cfg=sampler.off_from(cfg, N, K), drop_unconditional=True)`;
  from scale N on only the conditional half runs through the blocks (the later scales hold most
  of the tokens). The official sampler keeps running both halves where cfg is 1.
"""
from __future__ import annotations

import torch
import torch.nn as nn

INT8_TARGETS = ("ffn.fc1", "ffn.fc2", "sa.proj", "ca.mat_q", "ca.proj")


def quantize_int8(model):
    """Replace the targeted nn.Linear modules of every block by dynamically quantized int8 ones
    (in place; CPU only). Returns the model."""
    if model.head.weight.device.type != "cpu":
        raise ValueError("int8 dynamic quantization runs on the CPU only")
    from torch.ao.quantization import quantize_dynamic
    for block in model.blocks:
        for name in INT8_TARGETS:
            parent_name, leaf = name.rsplit(".", 1)
            parent = block.get_submodule(parent_name)
            lin = getattr(parent, leaf)
            if isinstance(lin, nn.Linear):
                plain = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
                plain.load_state_dict(lin.float().state_dict())  # BlockLinear -> the type quantize_dynamic maps
                q = quantize_dynamic(nn.Sequential(plain), {nn.Linear}, dtype=torch.qint8)[0]
                setattr(parent, leaf, q)
    return model
