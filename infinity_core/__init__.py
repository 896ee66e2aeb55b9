"""infinity_core: a plain-PyTorch implementation of Infinity (bitwise visual autoregressive
text-to-image), checkpoint-compatible with the official release. Never imports ComfyUI."""
__version__ = "0.1.0"
