"""Give the C allocator's free memory back to the system once a prompt's large temporary tensors are gone.

CPU tensors below glibc's mmap threshold (a threshold that rises to 32 MB as large blocks are freed)
come from malloc's heaps, and memory freed there mostly stays resident. With batch sizes and image
sizes that change from prompt to prompt, the server's resident memory climbed in steps from 0.6 to
1.06 GB over 200 prompts of bench/sustained.py while the memory in use stayed at 0.6 GB
(malloc_trim(0) called from a debugger brought the process back to 0.59 GB). Infinity VAE Decode, the
last Infinity node of a graph, calls release_free_memory() when it is done: the sampler's and the
decoder's freed buffers go back to the system (a few milliseconds).

glibc only (Linux); elsewhere, and with other C libraries, it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_trim = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _trim = getattr(_libc, "malloc_trim", None)  # absent in musl
        if _trim is not None:
            _trim.argtypes = [ctypes.c_size_t]
            _trim.restype = ctypes.c_int
    except OSError:
        _trim = None


def release_free_memory() -> bool:
    """malloc_trim(0): return the free pages of every malloc heap to the system. True when it ran."""
    if _trim is None:
        return False
    _trim(0)
    return True
