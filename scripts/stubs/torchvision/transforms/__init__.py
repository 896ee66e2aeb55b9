"""Import-only stand-in for torchvision.transforms (see ../__init__.py).

transformers >= 4.50 imports `InterpolationMode` (and the submodules next to this file) whenever a
`torchvision` is importable, so the stub provides those names; everything else raises."""
from enum import Enum as _Enum


class InterpolationMode(_Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise AttributeError(
        f"torchvision.transforms.{name} is not available: this is ComfyUI-Infinity's import-only "
        "torchvision stub (scripts/stubs); install a real torch+torchvision pair to use it")
