"""ComfyUI's Cancel (POST /interrupt) inside long single calls of infinity_core.

ComfyUI checks its interrupt flag before each node; a node that runs one long call (a T5 forward
over 512 tokens, a VAE decode of a 1024x1024 image: seconds to minutes on a CPU) must check it
itself or Cancel waits for the whole call. `interruptible(module)` makes every leaf layer of the
module check the flag (comfy.model_management.throw_exception_if_processing_interrupted) before it
runs, for the duration of a `with` block only: the same module used elsewhere (e.g. the sampler's
previews, which must never raise) is left as it was.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

import comfy.model_management as mm


def _check(_module, _inputs) -> None:
    mm.throw_exception_if_processing_interrupted()


@contextmanager
def interruptible(*modules: torch.nn.Module):
    """Within the block, a ComfyUI interrupt stops the modules' forward passes at the next leaf layer
    (comfy.model_management.InterruptProcessingException, which ComfyUI reports as an interrupted
    prompt). The hooks are removed on exit, also when the block raises."""
    handles = []
    try:
        for module in modules:
            for sub in module.modules():
                if next(sub.children(), None) is None:  # a leaf: Linear, Conv2d, norm, ...
                    handles.append(sub.register_forward_pre_hook(_check))
        mm.throw_exception_if_processing_interrupted()
        yield
    finally:
        for h in handles:
            h.remove()
