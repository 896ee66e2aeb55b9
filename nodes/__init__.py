"""ComfyUI nodes of ComfyUI-Infinity (V3 node API, comfy_api.latest).

Imported only inside ComfyUI (the package root checks that comfy_api exists). The nodes translate
between ComfyUI values and infinity_core calls; the model code never imports ComfyUI.
"""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import model_paths
from .edit_node import NODES as _EDIT_NODES
from .loader_nodes import NODES as _LOADER_NODES
from .sampler_node import NODES as _SAMPLER_NODES
from .schedule_node import NODES as _SCHEDULE_NODES
from .text_nodes import NODES as _TEXT_NODES
from .vae_nodes import NODES as _VAE_NODES

model_paths.register_folders()

# Order of the Infinity menu: loaders, prompt, size, sampling, editing, decoding.
ALL_NODES: list[type[io.ComfyNode]] = [*_LOADER_NODES, *_TEXT_NODES, *_SCHEDULE_NODES, *_SAMPLER_NODES, *_EDIT_NODES,
                                       *_VAE_NODES]


class InfinityExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(ALL_NODES)


async def comfy_entrypoint() -> InfinityExtension:
    return InfinityExtension()
