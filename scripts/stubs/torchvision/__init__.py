"""Import-only stand-in for torchvision, used only to start ComfyUI in tests and CI.

ComfyUI 0.3.75 imports torchvision at module level (comfy/sd.py -> Stable Cascade's stage C coder,
and a few other model files), so the server does not start without it, but it only *uses* it when
those models run. PyPI's torchvision cannot be imported beside the local torch==2.13.0+cpu wheel,
so tests/comfy_server.py puts scripts/stubs/ on the server's PYTHONPATH when no real torchvision
is importable. Any attribute access raises an ImportError-like AttributeError that says so.
Nothing in ComfyUI-Infinity itself uses torchvision.
"""

__version__ = "0.0.0+comfyui-infinity-stub"
IS_COMFYUI_INFINITY_STUB = True


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise AttributeError(
        f"torchvision.{name} is not available: this is ComfyUI-Infinity's import-only torchvision "
        "stub (scripts/stubs); install a real torch+torchvision pair to run models that need it")
