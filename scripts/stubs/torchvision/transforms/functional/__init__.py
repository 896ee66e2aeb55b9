"""Import-only stand-in (see torchvision/__init__.py)."""


def pil_to_tensor(pic):
    raise ImportError("torchvision.transforms.functional.pil_to_tensor: import-only torchvision stub")
