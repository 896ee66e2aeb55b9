"""Reading Infinity checkpoints in every released layout, validating them, and building models.

Accepted inputs (the format is sniffed from the bytes, not the file name):

* the official flat ``.pth`` (``torch.save(state_dict)``, 2B release), read with
  ``torch.load(weights_only=True, mmap=True)`` (legacy non-zip files: without mmap);
* training checkpoints that wrap the weights (``{'trainer': {'gpt_fsdp' | 'gpt_wo_ddp': sd}, 'args': ...}``).
  Their ``args`` objects are replaced by inert stand-ins (no code runs, see `_STUBBABLE_PREFIXES`);
* VAE files ``{'vae': state_dict}`` (and other common wrappers: ``state_dict``, ``model``, ``module``);
* a single ``.safetensors`` file (memory-mapped, no double copy);
* a sharded folder (or its index file) with ``model.safetensors.index.json`` or
  ``pytorch_model.bin.index.json`` (8B release), or a folder with one ``model.safetensors`` /
  ``pytorch_model.bin``.

Everything that goes wrong raises `CheckpointError` (a ValueError) naming the file, the key, the value
found and what was expected.

Loading (`load_transformer`, `load_vae`) builds the module on the meta device, validates every key and
shape against it (names and shapes only: .pth files are opened memory-mapped, safetensors headers are
parsed), then materialises one tensor at a time in the requested dtype and assigns it, so the weights
are never held twice: ``.safetensors`` tensors are read with positional reads into owned memory; a bare
``.pth`` state dict is read by one plain ``torch.load`` (each storage straight into its own
allocation; a source tensor is freed as soon as it has been cast); wrapped ``.pth`` files (training
checkpoints, ``{'vae': sd}``) are copied out of the map tensor by tensor and the copied pages are given
back (Linux ``madvise(MADV_DONTNEED)`` on the clean, private file mapping that is only ever read).
The resulting modules own their memory (nothing stays backed by the file). Measured on the 2B shapes
(bench/load.py): peak RSS 1.07x the file size when keeping the file dtype, for both formats.

Decisions worth knowing:

* ``cfg_uncond`` rows: the config's ``text_maxlen`` is inferred from the file (all released files have
  512 rows). If a caller forces a different ``text_maxlen``, extra rows are truncated and missing rows
  are padded with zeros (the official loader pads with the model's freshly initialised random rows;
  zeros are deterministic) and a warning is issued.
* Legacy buffers ``lvl_1L``, ``attn_bias_for_masking``, ``Infinity_visible_kvlen``,
  ``Infinity_invisible_qlen`` are dropped silently; every other unknown key is an error (strict=True) or
  a warning (strict=False). Missing ``zero_k_bias`` buffers are filled with zeros (they are always zero);
  every other missing key is an error.
* Patchify: the token width ``d_in`` (``word_embed`` in-features) equals the VAE bits ``d`` without
  spatial patchify, or ``4 d`` with it. The only released patchified model is the 8B (``d_in = 56``,
  14-bit VAE); ``PATCHIFIED_TOKEN_BITS`` lists such widths. Any other width is read as unpatchified.
  Override with ``patchify=True/False`` (or a converted file's metadata, which records the choice).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import mmap as _mmap
import os
import pickle
import re
import struct
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from . import zoo
from .zoo import TransformerConfig, VAEConfig

__all__ = [
    "CheckpointError", "read_state_dict", "detect_kind", "normalize_transformer_state_dict",
    "transformer_config_from_state_dict", "transformer_shapes", "resolve_dtype", "load_transformer",
    "load_vae", "load_pair", "find_vae_for", "read_transformer_config", "read_vae_config",
    "LEGACY_TRANSFORMER_KEYS", "PATCHIFIED_TOKEN_BITS",
]

LEGACY_TRANSFORMER_KEYS = ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen")

# Token width d_in -> VAE bits d for patchified transformers (one token = 2x2 latent cells = 4d bits).
PATCHIFIED_TOKEN_BITS = {56: 14}

# Index files of HF-style sharded folders, in order of preference.
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")

# Globals in training checkpoints that are replaced by inert stand-ins instead of refusing the file.
# A stand-in never runs code (its constructor and __setstate__ only store their arguments), so this
# is a usability choice, not a safety hole; anything else (os.system, builtins.eval, ...) is refused.
_STUBBABLE_PREFIXES = ("argparse.", "infinity.", "tap.", "numpy.", "pathlib.", "omegaconf.", "datetime.")

_WRAPPER_KEYS = ("state_dict", "model", "module", "ema", "net")
_STRIP_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "model.")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)
_DTYPE_TO_SAFETENSORS = {v: k for k, v in _SAFETENSORS_DTYPES.items()}

_DTYPE_NAMES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit what was asked for. The message names the
    file, the key, the value found and what was expected."""


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------

def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def _fmt_keys(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def resolve_dtype(dtype, device="cpu") -> torch.dtype | None:
    """torch.dtype | 'bf16'/'fp16'/'fp32' (and long names) | 'auto' | None/'keep' -> torch.dtype or None.

    'auto' is fp32 on CPU (bf16 matmuls are 10-400x slower than fp32 on typical CPUs), bf16 on CUDA
    when the device supports it (else fp16), fp16 on MPS."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().replace("torch.", "")
    if name == "keep":
        return None
    if name == "auto":
        dev = torch.device(device)
        if dev.type == "cuda":
            try:
                return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            except Exception:  # pragma: no cover - no driver
                return torch.float16
        if dev.type == "mps":
            return torch.float16
        return torch.float32
    if name in _DTYPE_NAMES:
        return _DTYPE_NAMES[name]
    raise ValueError(f"dtype {dtype!r}: expected a torch dtype, 'auto', 'keep', or one of {sorted(_DTYPE_NAMES)}")


_PAGE = _mmap.PAGESIZE
_libc = None
if sys.platform.startswith("linux"):
    try:
        import ctypes
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _libc.madvise.restype = ctypes.c_int
    except Exception:  # pragma: no cover
        _libc = None


def _drop_mapped_pages(t: torch.Tensor) -> None:
    """Give the pages of a tensor that lives in a private, never-written file mapping back to the
    kernel. Only ever called on tensors of maps this module opened itself and only read: their pages
    are clean copies of the file, so dropping them loses nothing (a later access re-reads the file)."""
    if _libc is None or t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    a = (start + _PAGE - 1) // _PAGE * _PAGE
    b = end // _PAGE * _PAGE
    if b > a:
        _libc.madvise(a, b - a, _mmap.MADV_DONTNEED)


# ---------------------------------------------------------------------------------------------
# format sniffing and low-level readers
# ---------------------------------------------------------------------------------------------

def _sniff(path: Path) -> str:
    """'torch-zip' | 'torch-legacy' | 'safetensors' for a file; raises CheckpointError otherwise."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); expected a PyTorch or safetensors "
                              f"checkpoint. The download or copy probably failed - fetch it again.")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:4] == b"GGUF":
        raise CheckpointError(f"{path}: this is a GGUF file; expected a PyTorch (.pth) or .safetensors "
                              f"checkpoint (GGUF/quantised weights are not supported)")
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{":
            return "safetensors"
        if n > 0 and head[8:9] in (b" ", b"\n") and n < size:
            return "safetensors"
    if head[:1] == b"\x80":
        return "torch-legacy"
    raise CheckpointError(f"{path}: not a PyTorch checkpoint nor a safetensors file (first bytes "
                          f"{head[:8]!r}, size {size} bytes); expected a .pth/.bin saved by torch.save or "
                          f"a .safetensors file")


def _safetensors_header(path: Path) -> tuple[dict, dict, int]:
    """Parse and validate a safetensors header: ({name: (dtype, shape)}, metadata, data_start)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, the 8-byte header "
                                  f"length alone is incomplete)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated or corrupted safetensors file: the header claims "
                                  f"{n} bytes but the file has only {size} bytes")
        blob = f.read(n)
    try:
        header = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupted safetensors header (not valid JSON: {e}); expected "
                              f"a JSON table of tensors - the file is damaged, fetch it again") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors header (a {type(header).__name__}, "
                              f"expected a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    entries = {}
    end_max = 0
    for name, info in header.items():
        try:
            dt = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            b, e = (int(x) for x in info["data_offsets"])
        except KeyError as err:
            raise CheckpointError(f"{path}: tensor {name!r} has an unsupported or missing header field "
                                  f"{err} (entry {info!r})") from None
        except Exception:
            raise CheckpointError(f"{path}: corrupted safetensors header entry for {name!r}: {info!r}") from None
        nbytes = math.prod(shape) * dt.itemsize
        if e - b != nbytes or b < 0:
            raise CheckpointError(f"{path}: corrupted safetensors header: tensor {name!r} {info['dtype']} "
                                  f"{_fmt_shape(shape)} needs {nbytes} bytes but its offsets span {e - b}")
        end_max = max(end_max, e)
        entries[name] = (dt, shape)
    if data_start + end_max > size:
        raise CheckpointError(f"{path}: truncated safetensors file: the tensors need {data_start + end_max} "
                              f"bytes but the file has only {size} ({size * 100 // (data_start + end_max)}% "
                              f"present) - the download probably stopped early")
    return entries, {str(k): str(v) for k, v in meta.items()}, data_start


def _zip_looks_complete(path: Path) -> bool:
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - 65536 - 22))
        tail = f.read()
    return b"PK\x05\x06" in tail


class _Stub:
    """Inert stand-in for a non-tensor object inside a training checkpoint (e.g. its parsed args)."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


def _torch_load(path: Path, fmt: str, mmap: bool = True):
    """torch.load with weights_only=True (mmap for zip files unless mmap=False); every failure ->
    CheckpointError."""
    use_mmap = mmap and fmt == "torch-zip"
    if fmt == "torch-zip" and not _zip_looks_complete(path):
        raise CheckpointError(f"{path}: truncated PyTorch checkpoint: the zip archive has no end record "
                              f"({path.stat().st_size} bytes present) - the download probably stopped early")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap), use_mmap
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower() and "weights_only" not in str(e).lower():
            raise CheckpointError(f"{path}: corrupted PyTorch checkpoint (unpickling failed: "
                                  f"{str(e).splitlines()[0][:200]})") from None
        refusal = e
    except CheckpointError:
        raise
    except Exception as e:
        raise _torch_read_error(path, fmt, e) from None
    # weights_only refused a global: stub known-harmless training-checkpoint objects, refuse the rest.
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:
        names = []
    bad = [n for n in names if not n.startswith(_STUBBABLE_PREFIXES)]
    if bad or not names:
        found = ", ".join(bad or names) or str(refusal).splitlines()[0][:200]
        raise CheckpointError(
            f"{path}: refused for safety - the file contains Python code/objects ({found}) that would be "
            f"executed or constructed while unpickling; expected only tensors (a state dict). Nothing from "
            f"the file was run. Use a .safetensors file or re-save the weights alone from a trusted "
            f"environment.")
    stubs = [(type(n.rsplit(".", 1)[-1], (_Stub,), {"__module__": n.rsplit(".", 1)[0]}), n) for n in names]
    try:
        with torch.serialization.safe_globals(stubs):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap), use_mmap
    except Exception as e:
        raise _torch_read_error(path, fmt, e) from None


def _torch_read_error(path: Path, fmt: str, e: Exception) -> CheckpointError:
    msg = str(e).splitlines()[0].split(". ")[0][:200] if str(e) else type(e).__name__
    if isinstance(e, EOFError) or "Invalid argument" in msg or "central directory" in msg:
        what = "truncated or corrupted"
    else:
        what = "corrupted"
    return CheckpointError(f"{path}: {what} PyTorch checkpoint ({fmt}); torch could not read it "
                           f"({type(e).__name__}: {msg}). Expected a file written by torch.save - "
                           f"fetch it again.")


# ---------------------------------------------------------------------------------------------
# the checkpoint object: keys + shapes up front, tensors one at a time
# ---------------------------------------------------------------------------------------------

class _Shard:
    """One file. `meta` maps the names inside the file to meta tensors (shape + dtype, no data)."""

    def __init__(self, path: Path):
        self.path = path
        self.fmt = _sniff(path)
        self.metadata: dict = {}
        self.wrapper: str | None = None
        self.mmapped = False
        self._tensors: dict | None = None
        self._owned: dict | None = None
        self._st_mmap = None
        self._st_pread = None
        if self.fmt == "safetensors":
            entries, self.metadata, _ = _safetensors_header(path)
            self.meta = {k: torch.empty(s, dtype=d, device="meta") for k, (d, s) in entries.items()}
        else:
            obj, self.mmapped = _torch_load(path, self.fmt)
            self._tensors, self.wrapper = _unwrap(obj, path)
            self.meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in self._tensors.items()}

    # -- safetensors handles (opened lazily, errors -> CheckpointError) --
    def _open_st(self, backend: str):
        from safetensors import safe_open
        try:
            try:
                return safe_open(str(self.path), framework="pt", device="cpu", backend=backend)
            except TypeError:  # safetensors without the backend argument
                if backend != "mmap":
                    return None
                return safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as e:
            if backend != "mmap" and "backend" in str(e).lower():
                return None
            raise CheckpointError(f"{self.path}: corrupted safetensors file ({type(e).__name__}: "
                                  f"{str(e)[:200]})") from None

    def view(self, name: str) -> torch.Tensor:
        """The tensor as stored (memory-mapped when possible; do not write to it)."""
        if self._tensors is not None:
            return self._tensors[name]
        if self._st_mmap is None:
            self._st_mmap = self._open_st("mmap")
        try:
            return self._st_mmap.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{self.path}: could not read tensor {name!r} ({type(e).__name__}: "
                                  f"{str(e)[:200]}); the file looks corrupted") from None

    def owned(self, name: str) -> tuple[torch.Tensor, bool]:
        """(tensor, owned): the tensor in owned memory when that is cheap, else the mapped view.
        Each name may be taken once (the shard drops its reference so memory can be reused).

        safetensors: positional reads into fresh memory. torch zip files that are a bare state dict:
        one plain (non-mmap) torch.load, which reads every storage straight into its own allocation
        (~2x faster than copying out of the map here, same peak). Wrapped files (training checkpoints
        may also hold optimizer state) stay memory-mapped and are copied tensor by tensor."""
        if self._tensors is not None:
            if not self.mmapped:  # legacy format: already loaded into memory
                return self._tensors.pop(name), True
            if self.wrapper is None:
                if self._owned is None:
                    obj, _ = _torch_load(self.path, self.fmt, mmap=False)
                    self._owned, _ = _unwrap(obj, self.path)
                if name in self._owned:
                    return self._owned.pop(name), True
        else:
            if self._st_pread is None:
                self._st_pread = self._open_st("pread") or False
            if self._st_pread:
                try:
                    return self._st_pread.get_tensor(name), True
                except Exception as e:
                    raise CheckpointError(f"{self.path}: could not read tensor {name!r} ({type(e).__name__}: "
                                          f"{str(e)[:200]}); the file looks corrupted") from None
        t = self.view(name)
        return t, not self.is_mapped()

    def is_mapped(self) -> bool:
        return self.mmapped if self._tensors is not None else True

    def release(self, t: torch.Tensor) -> None:
        if self.is_mapped():
            _drop_mapped_pages(t)

    def close(self):
        self._tensors = None
        self._owned = None
        self._st_mmap = None
        self._st_pread = None


def _unwrap(obj, path: Path) -> tuple[dict, str | None]:
    """Find the state dict inside a loaded .pth object -> (flat {name: tensor}, wrapper path)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: contains a {type(obj).__name__}, expected a dict of tensors "
                              f"(a state dict)")
    wrapper = None
    if not _all_tensors(obj):
        if "trainer" in obj and isinstance(obj["trainer"], Mapping):
            for k in ("gpt_fsdp", "gpt_wo_ddp", "gpt_ema_fsdp", "gpt_ema_for_vis"):
                if isinstance(obj["trainer"].get(k), Mapping):
                    obj, wrapper = obj["trainer"][k], f"trainer.{k}"
                    break
            else:
                raise CheckpointError(f"{path}: training checkpoint without model weights: 'trainer' has keys "
                                      f"{_fmt_keys(obj['trainer'].keys())}, expected 'gpt_fsdp' or 'gpt_wo_ddp'")
        elif isinstance(obj.get("vae"), Mapping):
            obj, wrapper = obj["vae"], "vae"
        else:
            for k in _WRAPPER_KEYS:
                if isinstance(obj.get(k), Mapping) and _all_tensors(obj[k]):
                    obj, wrapper = obj[k], k
                    break
    bad = [(k, v) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        k, v = bad[0]
        raise CheckpointError(f"{path}{' [' + wrapper + ']' if wrapper else ''}: not a dict of tensors: entry "
                              f"{k!r} is a {type(v).__name__} ({len(bad)} of {len(obj)} entries are not "
                              f"tensors); expected a state dict mapping names to tensors")
    out = {str(k): v for k, v in obj.items()}
    return out, wrapper


def _all_tensors(d: Mapping) -> bool:
    return len(d) > 0 and all(isinstance(v, torch.Tensor) for v in d.values())


class _Checkpoint:
    """All tensors of a file or sharded folder: names and shapes up front, data on demand.

    `keys` maps our (possibly renamed) key -> (shard, name in file)."""

    def __init__(self, path):
        self.path = Path(path)
        self.shards: list[_Shard] = []
        self.keys: dict[str, tuple[_Shard, str]] = {}
        self.metadata: dict = {}
        self.wrapper: str | None = None
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file or folder (expected a transformer/VAE "
                                  f"checkpoint: .pth, .safetensors, or a sharded folder)")
        if self.path.is_dir() or self.path.name.endswith(".index.json"):
            self._open_folder()
        else:
            self._add_shard(_Shard(self.path))
            self.metadata = self.shards[0].metadata
            self.wrapper = self.shards[0].wrapper
        self._strip_common_prefix()

    def _add_shard(self, shard: _Shard, only: Iterable[str] | None = None):
        self.shards.append(shard)
        for name in shard.meta:
            if name in self.keys:
                raise CheckpointError(f"{self.path}: key {name!r} appears in two shards: "
                                      f"{self.keys[name][0].path.name} and {shard.path.name}")
            self.keys[name] = (shard, name)

    def _open_folder(self):
        if self.path.is_dir():
            index = next((self.path / n for n in INDEX_NAMES if (self.path / n).is_file()), None)
            if index is None:
                single = next((self.path / n for n in SINGLE_NAMES if (self.path / n).is_file()), None)
                if single is not None:
                    self._add_shard(_Shard(single))
                    return
                found = sorted(p.name for p in self.path.iterdir())[:10]
                raise CheckpointError(f"{self.path}: folder without an index file; expected one of "
                                      f"{', '.join(INDEX_NAMES)} (or {', '.join(SINGLE_NAMES)}); found "
                                      f"{found or 'nothing'}")
        else:
            index = self.path
        try:
            data = json.loads(index.read_text())
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError("empty weight_map")
        except FileNotFoundError:
            raise CheckpointError(f"{index}: no such index file") from None
        except Exception as e:
            raise CheckpointError(f"{index}: corrupted shard index ({type(e).__name__}: {e}); expected a "
                                  f"JSON object with a non-empty 'weight_map' {{key: shard file}}") from None
        folder = index.parent
        by_shard: dict[str, list[str]] = {}
        for key, shard_name in weight_map.items():
            by_shard.setdefault(shard_name, []).append(key)
        for shard_name, keys in by_shard.items():
            shard_path = folder / shard_name
            if not shard_path.is_file():
                raise CheckpointError(f"{index}: shard {shard_name!r} is missing (the index maps {len(keys)} "
                                      f"keys to it, e.g. {keys[0]!r}); expected the file {shard_path}")
            shard = _Shard(shard_path)
            absent = [k for k in keys if k not in shard.meta]
            if absent:
                raise CheckpointError(f"{index}: the index maps {_fmt_keys(absent, 5)} to shard {shard_name!r}, "
                                      f"but that shard does not contain them")
            self._add_shard(shard)
        self.metadata = {"index": str(index.name)}

    def _strip_common_prefix(self):
        for prefix in _STRIP_PREFIXES:
            if self.keys and all(k.startswith(prefix) for k in self.keys):
                if prefix == "model." and any(k.startswith("model.diffusion_model.") for k in self.keys):
                    continue  # a Stable Diffusion checkpoint: keep it recognisable
                self.keys = {k[len(prefix):]: v for k, v in self.keys.items()}

    # -- access --
    def meta_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: shard.meta[name] for k, (shard, name) in self.keys.items()}

    def view(self, key: str) -> torch.Tensor:
        shard, name = self.keys[key]
        return shard.view(name)

    def release(self, key: str, t: torch.Tensor):
        shard, _ = self.keys[key]
        shard.release(t)

    def materialize(self, key: str, dtype: torch.dtype | None, device) -> torch.Tensor:
        """One tensor in owned memory on `device`, floating-point ones cast to `dtype`."""
        shard, name = self.keys[key]
        device = torch.device(device)
        if device.type == "cpu":
            src, owned = shard.owned(name)
        else:
            src, owned = shard.view(name), False
        target = dtype if (dtype is not None and src.is_floating_point()) else src.dtype
        if device.type != "cpu":
            out = src.to(device).to(target)
        elif src.dtype != target:
            out = src.to(target, memory_format=torch.contiguous_format)
        elif owned and src.is_contiguous():
            out = src
        else:
            out = torch.empty(src.shape, dtype=src.dtype).copy_(src)
        if not owned:
            shard.release(src)
        return out

    def stream(self, keys: Iterable[str], dtypes: Mapping[str, torch.dtype | None]):
        """Yield (key, CPU tensor) one at a time for copying elsewhere (e.g. into a file), holding about
        one tensor at a time: safetensors via positional reads, .pth via the memory map, whose pages
        are dropped once the consumer has taken the tensor (i.e. when the generator resumes)."""
        for k in keys:
            shard, name = self.keys[k]
            dt = dtypes.get(k)
            if shard.fmt == "safetensors" or not shard.is_mapped():
                yield k, self.materialize(k, dt, "cpu")
                continue
            src = shard.view(name)
            out = src.to(dt) if (dt is not None and src.is_floating_point() and src.dtype != dt) else src
            yield k, out
            del out
            shard.release(src)

    def rename(self, mapping: Mapping[str, str | None]):
        """Apply {old key: new key or None (drop)}; keys not in the mapping are kept."""
        new = {}
        for k, v in self.keys.items():
            nk = mapping.get(k, k)
            if nk is None:
                continue
            if nk in new:
                raise CheckpointError(f"{self.path}: keys {k!r} and another key both map to {nk!r}")
            new[nk] = v
        self.keys = new

    def close(self):
        for s in self.shards:
            s.close()


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint file / sharded folder / index file, as a flat dict.

    Tensors of .pth (zip) and .safetensors files are memory-mapped (pages are read on first access;
    treat them as read-only). Wrappers are removed: {'vae': sd} -> sd, training checkpoints ->
    trainer.gpt_fsdp / gpt_wo_ddp, {'state_dict'|'model'|'module': sd} -> sd, and a prefix shared by all
    keys ('module.', '_orig_mod.', ...) is stripped. Key names are otherwise untouched (use
    `normalize_transformer_state_dict` / `vae.normalize_vae_state_dict` for our module names)."""
    ck = _Checkpoint(path)
    return {k: ck.view(k) for k in ck.keys}


# ---------------------------------------------------------------------------------------------
# what is this state dict?
# ---------------------------------------------------------------------------------------------

_BLOCK_RE = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.(.+)$")
_FLAT_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def detect_kind(sd: Mapping[str, torch.Tensor]) -> tuple[str, str]:
    """('transformer' | 'vae' | 'other', human description) from key names only."""
    keys = list(sd.keys())
    ks = set(keys)

    def has(pat):
        return any(pat in k for k in keys)

    if any(_BLOCK_RE.match(k) or _FLAT_BLOCK_RE.match(k) for k in keys if k.endswith("sa.mat_qkv.weight")) \
            or {"word_embed.weight", "head.weight", "cfg_uncond"} <= ks:
        return "transformer", "an Infinity transformer"
    if has("model.diffusion_model."):
        return "other", "a Stable Diffusion checkpoint (UNet weights under model.diffusion_model.*)"
    if has("input_blocks.") and has("time_embed."):
        return "other", "a Stable Diffusion UNet (input_blocks/time_embed keys)"
    if has("down_blocks.") and (has("time_embedding.") or has("conv_in.")):
        return "other", "a diffusers UNet/VAE (down_blocks.* keys)"
    if has("double_blocks.") or has("single_blocks."):
        return "other", "a Flux transformer (double_blocks/single_blocks keys)"
    if has("joint_blocks."):
        return "other", "an SD3 MMDiT transformer (joint_blocks keys)"
    if has("SelfAttention.q.weight") or has("layer.0.SelfAttention") or "shared.weight" in ks:
        return "other", "a T5 text encoder (encoder.block.*.layer.*.SelfAttention keys)"
    if has("text_model.encoder.layers.") or has("transformer.resblocks."):
        return "other", "a CLIP text encoder"
    if has("lora_up") or has("lora_down") or has("lora_A") or has("lora_B"):
        return "other", "a LoRA"
    if has("encoder.conv_in") and has("decoder.conv_out"):
        if has("quant_conv") or has(".attn_1.") or has("mid.attn"):
            return "other", ("a KL/VQ autoencoder of the Stable Diffusion/Flux kind (quant_conv or attention "
                             "keys), not an Infinity BSQ VAE")
        return "vae", "an Infinity BSQ VAE"
    if has("lfq.mask"):
        return "vae", "an Infinity BSQ VAE"
    return "other", f"an unrecognised state dict ({len(keys)} tensors, e.g. {_fmt_keys(keys, 4)})"


def _expect(sd, what: str, source: str):
    kind, desc = detect_kind(sd)
    if kind != what:
        example = ("'word_embed.weight', 'block_chunks.0.module.0.sa.mat_qkv.weight'" if what == "transformer"
                   else "'encoder.conv_in.conv.weight', 'decoder.conv_out.conv.weight'")
        name = "an Infinity transformer" if what == "transformer" else "an Infinity BSQ VAE"
        raise CheckpointError(f"{source or '<state dict>'}: this looks like {desc}, but {name} was expected "
                              f"(keys such as {example})")


def normalize_transformer_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our module names: legacy buffers dropped, flat `blocks.{i}.` keys (a block_chunks=1 training run)
    renamed to `block_chunks.0.module.{i}.`. Other keys pass through unchanged."""
    return {nk: sd[k] for k, nk in _transformer_key_map(sd.keys()).items() if nk is not None}


def _transformer_key_map(keys) -> dict[str, str | None]:
    out = {}
    for k in keys:
        if k in LEGACY_TRANSFORMER_KEYS:
            out[k] = None
            continue
        m = _FLAT_BLOCK_RE.match(k)
        out[k] = f"block_chunks.0.module.{m.group(1)}.{m.group(2)}" if m else k
    return out


def transformer_config_from_state_dict(sd: Mapping[str, torch.Tensor], source: str = "", *,
                                       patchify: bool | None = None, metadata: Mapping | None = None
                                       ) -> TransformerConfig:
    """Infer the TransformerConfig from key names and shapes only (meta tensors are fine).

    depth / block_chunks from the `block_chunks.{c}.module.{j}` names, width and d_in from
    `word_embed.weight` [C, d_in], heads from `sa.scale_mul_1H11` [1, H, 1, 1], mlp_hidden from
    `ffn.fc1.weight`, text_channels / text_maxlen from `cfg_uncond` [text_maxlen, Ct5].
    vae_bits / patchify: d_in in PATCHIFIED_TOKEN_BITS -> (d_in/4, patchify) else (d_in, no patchify);
    `patchify=` overrides, and so does the 'infinity.config' entry of a converted file's metadata."""
    src = source or "<state dict>"
    _expect(sd, "transformer", source)
    sd = normalize_transformer_state_dict(sd)
    for k in ("word_embed.weight", "head.weight", "cfg_uncond"):
        if k not in sd:
            raise CheckpointError(f"{src}: key {k!r} is missing; every Infinity transformer has it")
    grid = {}
    for k in sd:
        m = _BLOCK_RE.match(k)
        if m:
            grid.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not grid:
        raise CheckpointError(f"{src}: no transformer blocks found (expected keys "
                              f"'block_chunks.<c>.module.<j>.*')")
    chunks = max(grid) + 1
    per = max(max(v) for v in grid.values()) + 1
    for c in range(chunks):
        if grid.get(c) != set(range(per)):
            have = sorted(grid.get(c, ()))
            raise CheckpointError(f"{src}: incomplete blocks: chunk {c} has modules {have}, expected 0..{per - 1} "
                                  f"like the others ({chunks} chunks x {per} blocks)")
    b0 = "block_chunks.0.module.0."
    for suffix in ("sa.scale_mul_1H11", "ffn.fc1.weight"):
        if b0 + suffix not in sd:
            raise CheckpointError(f"{src}: key {b0 + suffix!r} is missing; expected in every block")
    width, d_in = (int(s) for s in sd["word_embed.weight"].shape)
    heads = int(sd[b0 + "sa.scale_mul_1H11"].shape[1])
    mlp_hidden = int(sd[b0 + "ffn.fc1.weight"].shape[0])
    text_maxlen, text_channels = (int(s) for s in sd["cfg_uncond"].shape)
    head_rows = int(sd["head.weight"].shape[0])
    if head_rows != 2 * d_in:
        raise CheckpointError(f"{src}: key 'head.weight' has {head_rows} rows but 'word_embed.weight' takes "
                              f"{d_in} bits per token; expected {2 * d_in} rows (2 logits per bit)")
    if width % heads:
        raise CheckpointError(f"{src}: width {width} (word_embed.weight) is not divisible by the {heads} heads "
                              f"of {b0}sa.scale_mul_1H11")
    meta_cfg = None
    if metadata and metadata.get("infinity.config") and metadata.get("infinity.kind") == "transformer":
        try:
            meta_cfg = json.loads(metadata["infinity.config"])
        except Exception:
            meta_cfg = None
    if patchify is None and meta_cfg is not None and "patchify" in meta_cfg:
        patchify = bool(meta_cfg["patchify"])
    if patchify is None:
        patchify = d_in in PATCHIFIED_TOKEN_BITS
    if patchify:
        if d_in % 4:
            raise CheckpointError(f"{src}: patchify requested but the token width {d_in} (word_embed.weight "
                                  f"in-features) is not a multiple of 4")
        vae_bits = d_in // 4
    else:
        vae_bits = d_in
    try:
        cfg = TransformerConfig(depth=chunks * per, width=width, num_heads=heads, vae_bits=vae_bits,
                                patchify=patchify, text_channels=text_channels, block_chunks=chunks,
                                mlp_hidden=mlp_hidden, text_maxlen=text_maxlen)
    except ValueError as e:
        raise CheckpointError(f"{src}: inconsistent transformer shapes: {e}") from None
    for name, ref in zoo.TRANSFORMERS.items():
        if _same_structure(cfg, ref):
            cfg = dataclasses.replace(cfg, name=name, drop_path_rate=ref.drop_path_rate)
            break
    if meta_cfg is not None and meta_cfg.get("name") and cfg.name == "custom":
        cfg = dataclasses.replace(cfg, name=str(meta_cfg["name"]))
    return cfg


_STRUCT_FIELDS = ("depth", "width", "num_heads", "vae_bits", "patchify", "text_channels", "block_chunks",
                  "mlp_hidden", "text_maxlen")


def _same_structure(a: TransformerConfig, b: TransformerConfig) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in _STRUCT_FIELDS)


def transformer_shapes(cfg: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Official key -> shape for a config (spec 2.11), in the official state_dict order. Written from the
    spec independently of `transformer.Infinity` (the tests compare the two). Keys ending in
    `zero_k_bias` are buffers; all others are parameters."""
    C, Ct5, d_in, H = cfg.width, cfg.text_channels, cfg.bits_per_token, cfg.num_heads
    hp = cfg.text_pool_heads
    s = {
        "cfg_uncond": (cfg.text_maxlen, Ct5), "pos_start": (1, 1, C), "text_norm.weight": (Ct5,),
        "text_proj_for_sos.ca.mat_q": (1, hp, C // hp), "text_proj_for_sos.ca.v_bias": (C,),
        "text_proj_for_sos.ca.zero_k_bias": (C,), "text_proj_for_sos.ca.mat_kv.weight": (2 * C, Ct5),
        "text_proj_for_sos.ca.proj.weight": (C, C), "text_proj_for_sos.ca.proj.bias": (C,),
        "text_proj_for_ca.0.weight": (C, Ct5), "text_proj_for_ca.0.bias": (C,),
        "text_proj_for_ca.2.weight": (C, C), "text_proj_for_ca.2.bias": (C,),
        "lvl_embed.weight": (15, C), "word_embed.weight": (C, d_in), "word_embed.bias": (C,),
        "shared_ada_lin.1.weight": (6 * C, C), "shared_ada_lin.1.bias": (6 * C,),
        "head_nm.ada_lin.1.weight": (2 * C, C), "head_nm.ada_lin.1.bias": (2 * C,),
        "head.weight": (2 * d_in, C), "head.bias": (2 * d_in,),
    }
    n = cfg.blocks_per_chunk
    block = {
        "ada_gss": (1, 1, 6, C), "sa.scale_mul_1H11": (1, H, 1, 1), "sa.q_bias": (C,), "sa.v_bias": (C,),
        "sa.zero_k_bias": (C,), "sa.mat_qkv.weight": (3 * C, C), "sa.proj.weight": (C, C), "sa.proj.bias": (C,),
        "ca.v_bias": (C,), "ca.zero_k_bias": (C,), "ca.mat_q.weight": (C, C), "ca.mat_q.bias": (C,),
        "ca.mat_kv.weight": (2 * C, C), "ca.proj.weight": (C, C), "ca.proj.bias": (C,),
        "ffn.fc1.weight": (cfg.mlp_hidden, C), "ffn.fc1.bias": (cfg.mlp_hidden,),
        "ffn.fc2.weight": (C, cfg.mlp_hidden), "ffn.fc2.bias": (C,),
        "ca_norm.weight": (C,), "ca_norm.bias": (C,),
    }
    for i in range(cfg.depth):
        for k, shape in block.items():
            s[f"block_chunks.{i // n}.module.{i % n}.{k}"] = shape
    return s


# ---------------------------------------------------------------------------------------------
# validation + assignment
# ---------------------------------------------------------------------------------------------

def _expected_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.state_dict(keep_vars=True))


def _plan(ck: _Checkpoint, expected: Mapping[str, torch.Tensor], what: str, cfg_desc: str, *,
          strict: bool, fillable: Callable[[str], bool], ignorable: Callable[[str], bool] = lambda k: False,
          reshape_ok: Callable[[str], bool] = lambda k: False, tolerated: str = "") -> tuple[list[str], list[str]]:
    """Compare checkpoint keys/shapes with the module's. Returns (keys to fill, unexpected keys ignored)."""
    have = ck.meta_state_dict()
    missing = [k for k in expected if k not in have]
    unexpected = [k for k in have if k not in expected and not ignorable(k)]
    to_fill = [k for k in missing if fillable(k)]
    missing = [k for k in missing if not fillable(k)]
    if missing:
        raise CheckpointError(f"{ck.path}: {len(missing)} key(s) of {what} ({cfg_desc}) are missing from the "
                              f"checkpoint: {_fmt_keys(missing)}")
    if unexpected:
        msg = (f"{ck.path}: {len(unexpected)} key(s) in the checkpoint are not part of {what} ({cfg_desc}): "
               f"{_fmt_keys(unexpected)}")
        if strict:
            raise CheckpointError(msg + f" ({'only ' + tolerated + ' are ignored; ' if tolerated else ''}"
                                  f"pass strict=False to drop unknown keys)")
        warnings.warn(msg + "; ignored (strict=False)", stacklevel=3)
    for k, ref in expected.items():
        if k not in have:
            continue
        got = have[k]
        if tuple(got.shape) != tuple(ref.shape) and not reshape_ok(k):
            raise CheckpointError(f"{ck.path}: key {k!r} has shape {_fmt_shape(got.shape)} but {what} "
                                  f"({cfg_desc}) expects {_fmt_shape(ref.shape)}")
        if ref.is_floating_point() and not got.is_floating_point():
            raise CheckpointError(f"{ck.path}: key {k!r} has dtype {got.dtype} but a floating-point tensor is "
                                  f"expected (quantised checkpoints are not supported)")
    return to_fill, [k for k in have if k not in expected]


def _assign(module: torch.nn.Module, sd: dict[str, torch.Tensor], source) -> torch.nn.Module:
    module.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: internal error - tensors still unset after loading: {_fmt_keys(left)}")
    return module


def _cfg_desc(cfg: TransformerConfig) -> str:
    name = f"{cfg.name}: " if cfg.name != "custom" else ""
    return (f"{name}depth {cfg.depth}, width {cfg.width}, {cfg.num_heads} heads, {cfg.bits_per_token} bits/token"
            f"{' (patchify)' if cfg.patchify else ''}, {cfg.block_chunks} block chunks")


def _transformer_checkpoint(path) -> _Checkpoint:
    ck = _Checkpoint(path)
    _expect(ck.meta_state_dict(), "transformer", str(ck.path))
    ck.rename(_transformer_key_map(ck.keys))
    return ck


def read_transformer_config(path, *, patchify: bool | None = None) -> TransformerConfig:
    """The config of a transformer checkpoint from its names and shapes only (no weights read)."""
    ck = _transformer_checkpoint(path)
    try:
        return transformer_config_from_state_dict(ck.meta_state_dict(), str(ck.path), patchify=patchify,
                                                  metadata=ck.metadata)
    finally:
        ck.close()


def load_transformer(path, dtype=torch.float32, device="cpu", *, config: TransformerConfig | None = None,
                     patchify: bool | None = None, text_maxlen: int | None = None, strict: bool = True,
                     **model_kwargs):
    """Build `transformer.Infinity` from any accepted checkpoint layout.

    dtype: torch dtype, 'bf16'/'fp16'/'fp32', 'auto' (see `resolve_dtype`) or None/'keep' (file dtype).
    config: skip inference and use this config (it must still match every shape).
    patchify: override the patchify inference (see module docstring).
    text_maxlen: force the number of `cfg_uncond` rows (truncate / zero-pad with a warning).
    strict: unknown keys are an error (True) or a warning (False); missing keys are always an error.
    model_kwargs: passed to `Infinity(cfg, **model_kwargs)` (e.g. attn_backend, ca_precision).
    Returns the model in eval mode with requires_grad False, on `device`."""
    from .transformer import Infinity

    dtype = resolve_dtype(dtype, device)
    ck = _transformer_checkpoint(path)
    try:
        inferred = transformer_config_from_state_dict(ck.meta_state_dict(), str(ck.path), patchify=patchify,
                                                      metadata=ck.metadata)
        cfg = config or inferred
        if text_maxlen is not None and text_maxlen != cfg.text_maxlen:
            cfg = dataclasses.replace(cfg, text_maxlen=int(text_maxlen))
        with torch.device("meta"):
            model = Infinity(cfg, **model_kwargs)
        expected = _expected_tensors(model)
        to_fill, _ = _plan(ck, expected, "the Infinity transformer", _cfg_desc(cfg), strict=strict,
                           fillable=lambda k: k.endswith("zero_k_bias"),
                           reshape_ok=lambda k: k == "cfg_uncond",
                           tolerated="the legacy buffers " + ", ".join(LEGACY_TRANSFORMER_KEYS))
        rows = int(ck.meta_state_dict()["cfg_uncond"].shape[0])
        if rows != cfg.text_maxlen:
            warnings.warn(f"{ck.path}: cfg_uncond has {rows} rows, the model uses text_maxlen={cfg.text_maxlen}: "
                          f"{'truncating' if rows > cfg.text_maxlen else 'padding with zero rows'}", stacklevel=2)
        device = torch.device(device)
        sd = {}
        for k, ref in expected.items():
            if k in to_fill:
                sd[k] = torch.zeros(ref.shape, dtype=dtype or torch.float32, device=device)
                continue
            t = ck.materialize(k, dtype, device)
            if k == "cfg_uncond" and t.shape[0] != cfg.text_maxlen:
                t = _fit_rows(t, cfg.text_maxlen)
            sd[k] = t
        _assign(model, sd, ck.path)
    finally:
        ck.close()
    model.eval().requires_grad_(False)
    return model


def _fit_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] >= rows:
        return t[:rows].clone()
    return torch.cat((t, t.new_zeros(rows - t.shape[0], *t.shape[1:])))


# ---------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------

def _is_mask(k: str) -> bool:
    return k.endswith("lfq.mask")


def _vae_checkpoint(path) -> tuple[_Checkpoint, VAEConfig]:
    from . import vae as V

    ck = _Checkpoint(path)
    meta = ck.meta_state_dict()
    _expect(meta, "vae", str(ck.path))
    # normalise the names with vae.normalize_vae_state_dict; recover the mapping through tensor identity
    ids = {id(t): k for k, t in meta.items()}
    try:
        normalized = V.normalize_vae_state_dict(meta)
    except Exception as e:
        raise CheckpointError(f"{ck.path}: VAE key names could not be normalised ({type(e).__name__}: {e})") from None
    mapping: dict[str, str | None] = {k: None for k in meta}
    for nk, t in normalized.items():
        ok = ids.get(id(t))
        if ok is None:
            raise CheckpointError(f"{ck.path}: internal error - normalize_vae_state_dict created a new tensor "
                                  f"for {nk!r}")
        if mapping.get(ok) is not None:  # one tensor under two names (the mask alias) -> keep the first
            continue
        mapping[ok] = nk
    ck.rename(mapping)
    try:
        cfg = V.vae_config_from_state_dict(ck.meta_state_dict())
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{ck.path}: could not infer the VAE configuration ({type(e).__name__}: {e})") from None
    return ck, cfg


def read_vae_config(path) -> VAEConfig:
    """The VAEConfig of a VAE checkpoint from its names and shapes only."""
    ck, cfg = _vae_checkpoint(path)
    ck.close()
    return cfg


def _vae_desc(cfg: VAEConfig) -> str:
    name = f"{cfg.name}: " if cfg.name != "custom" else ""
    return f"{name}{cfg.bits}-bit BSQ VAE, stride {cfg.patch_size}, ch_mult {tuple(cfg.ch_mult)}, base {cfg.base_ch}"


def load_vae(path, dtype=torch.float32, device="cpu", *, strict: bool = True):
    """Build `vae.BSQVAE` from a VAE checkpoint ({'vae': sd} .pth, safetensors, plain or wrapped
    conv/norm key names). The bit-mask buffer may appear under `quantizer.lfq.mask`, `quantize.lfq.mask`
    or both; a missing one is recomputed (2^(d-1) ... 2^0). The VAE normally runs in fp32."""
    from . import vae as V

    dtype = resolve_dtype(dtype, device)
    ck, cfg = _vae_checkpoint(path)
    try:
        with torch.device("meta"):
            model = V.BSQVAE(cfg)
        expected = _expected_tensors(model)
        to_fill, _ = _plan(ck, expected, "the BSQ VAE", _vae_desc(cfg), strict=strict, fillable=_is_mask,
                           ignorable=_is_mask, tolerated="the bit-mask aliases *.lfq.mask")
        device = torch.device(device)
        sd = {}
        for k, ref in expected.items():
            if k in to_fill:
                sd[k] = (2 ** torch.arange(cfg.bits - 1, -1, -1, dtype=torch.int64)).to(ref.dtype).to(device)
            else:
                sd[k] = ck.materialize(k, dtype, device)
        _assign(model, sd, ck.path)
    finally:
        ck.close()
    model.eval().requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------
# pairing
# ---------------------------------------------------------------------------------------------

def _check_pair(tcfg: TransformerConfig, vcfg: VAEConfig, transformer_path, vae_path):
    if not zoo.vae_fits(tcfg, vcfg):
        raise CheckpointError(
            f"VAE {vae_path} does not fit transformer {transformer_path}: the transformer "
            f"({_cfg_desc(tcfg)}) needs {zoo.describe_needed_vae(tcfg)}, but the VAE is a {vcfg.bits}-bit BSQ VAE "
            f"with stride {vcfg.patch_size}. A mismatched pair produces garbage images.")


def load_pair(transformer_path, vae_path, dtype="auto", device="cpu", *, vae_dtype=torch.float32,
              vae_strict: bool = True, **kwargs):
    """(transformer, vae), refusing a VAE that does not fit the transformer (checked from the names and
    shapes before any weight is read). kwargs go to `load_transformer`."""
    tcfg = kwargs.get("config") or read_transformer_config(transformer_path, patchify=kwargs.get("patchify"))
    vcfg = read_vae_config(vae_path)
    _check_pair(tcfg, vcfg, transformer_path, vae_path)
    model = load_transformer(transformer_path, dtype, device, **kwargs)
    vae = load_vae(vae_path, vae_dtype, device, strict=vae_strict)
    return model, vae


def find_vae_for(transformer_path, candidates: Iterable, *, patchify: bool | None = None):
    """The best-fitting VAE among `candidates` (paths) for a transformer checkpoint, or None.

    Fit = same bits per latent cell and patchify <=> stride 8 (zoo.vae_fits). Among fitting files the
    released pairing's official name wins (e.g. infinity_vae_d32reg for the 2B), then any other official
    VAE name, then the rest in name order. Unreadable candidates are skipped."""
    tcfg = read_transformer_config(transformer_path, patchify=patchify)
    preferred = {v for t, v in zoo.RELEASED_PAIRS.values() if _same_structure(zoo.TRANSFORMERS[t], tcfg)}
    if not preferred:  # e.g. a small custom model: prefer the released VAE of the same kind
        preferred = {v for t, v in zoo.RELEASED_PAIRS.values() if zoo.vae_fits(tcfg, zoo.VAES[v])}
    ranked = []
    for c in candidates:
        try:
            vcfg = read_vae_config(c)
        except Exception:
            continue
        if not zoo.vae_fits(tcfg, vcfg):
            continue
        stem = Path(c).name.split(".")[0]
        rank = 0 if stem in preferred else 1 if stem in zoo.VAES else 2
        ranked.append((rank, Path(c).name, c))
    return min(ranked)[2] if ranked else None


# ---------------------------------------------------------------------------------------------
# streaming safetensors writer (used by convert)
# ---------------------------------------------------------------------------------------------

def write_safetensors(path, items: Iterable[tuple[str, torch.Tensor]], specs: Mapping[str, tuple],
                      metadata: Mapping[str, str] | None = None, *, on_written=None) -> None:
    """Write a .safetensors file one tensor at a time (peak memory: one tensor).

    specs: {name: (dtype, shape)} for every tensor, in write order (the header comes first).
    items: yields (name, tensor) in the same order; `on_written(name, tensor)` is called after each.
    The file is written to a temporary name next to `path` and renamed on success only."""
    path = Path(path)
    header = {}
    offset = 0
    for name, (dt, shape) in specs.items():
        if dt not in _DTYPE_TO_SAFETENSORS:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dt}, which safetensors cannot store")
        nbytes = math.prod(shape) * dt.itemsize
        header[name] = {"dtype": _DTYPE_TO_SAFETENSORS[dt], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-(len(blob) + 8) % 8)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, t in items:
                dt, shape = specs[name]
                if t.dtype != dt or tuple(t.shape) != tuple(shape):
                    raise CheckpointError(f"{path}: tensor {name!r} is {t.dtype} {_fmt_shape(t.shape)}, the "
                                          f"header promised {dt} {_fmt_shape(shape)}")
                t = t.detach().to("cpu").contiguous()
                if t.numel():
                    f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
                if on_written is not None:
                    on_written(name, t)
            if f.tell() != 8 + len(blob) + offset:
                raise CheckpointError(f"{path}: wrote {f.tell()} bytes, expected {8 + len(blob) + offset}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
