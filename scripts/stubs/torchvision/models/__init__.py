"""Import-only stand-in for torchvision.models (see ../__init__.py)."""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise AttributeError(
        f"torchvision.models.{name} is not available: this is ComfyUI-Infinity's import-only "
        "torchvision stub (scripts/stubs); install a real torch+torchvision pair to use it")
