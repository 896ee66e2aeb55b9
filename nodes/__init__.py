"""ComfyUI nodes of ComfyUI-Infinity (V3 node API, comfy_api.latest).

Imported only inside ComfyUI (the package root checks that comfy_api exists). The nodes translate
between ComfyUI values and infinity_core calls; the model code never imports ComfyUI.
"""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .schedule_node import NODES as _SCHEDULE_NODES


class InfinityExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*_SCHEDULE_NODES]


async def comfy_entrypoint() -> InfinityExtension:
    return InfinityExtension()
