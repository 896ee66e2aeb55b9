"""ComfyUI-Infinity: ComfyUI nodes for Infinity, ByteDance's bitwise autoregressive text-to-image model.

ComfyUI loads this file as the custom-node package. The nodes use ComfyUI's V3 node API
(`comfy_entrypoint`, see nodes/); `WEB_DIRECTORY` is served under /extensions/<folder name>/.
Outside ComfyUI (no `comfy_api` importable) importing this package defines only WEB_DIRECTORY, so
the repository can be imported by tools and tests without ComfyUI installed.
"""
import importlib.util as _ilu

WEB_DIRECTORY = "./web"
__all__ = ["WEB_DIRECTORY"]


def _in_comfyui() -> bool:
    try:
        return _ilu.find_spec("comfy_api") is not None
    except (ImportError, ValueError):
        return False


if _in_comfyui():
    from .nodes import comfy_entrypoint  # noqa: E402,F401  (errors here are logged by ComfyUI in full)

    __all__.append("comfy_entrypoint")
