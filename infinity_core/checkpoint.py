"""Reading Infinity checkpoints in every released layout, validating them, and building models.

Accepted inputs (the format is sniffed from the bytes, not the file name):

* the official flat ``.pth`` (``torch.save(state_dict)``, 2B release): the zip archive is validated by
  `_inspect_torch_zip` (one parser, plain names, no duplicates/overlaps/compression) and unpickled with
  torch's weights-only unpickler onto memory-mapped storages, each checked against its record - the
  equivalent of ``torch.load(weights_only=True, mmap=True)``; legacy non-zip files go through
  ``torch.load(weights_only=True)`` after their pickles were walked opcode by opcode;
* training checkpoints that wrap the weights (``{'trainer': {'gpt_fsdp' | 'gpt_wo_ddp': sd}, 'args': ...}``).
  Their ``args`` objects are replaced by inert stand-ins (no code runs, see `_STUBBABLE_PREFIXES`);
* VAE files ``{'vae': state_dict}`` (and other common wrappers: ``state_dict``, ``model``, ``module``);
* a single ``.safetensors`` file (memory-mapped, no double copy);
* a sharded folder (or its index file) with ``model.safetensors.index.json`` or
  ``pytorch_model.bin.index.json`` (8B release), or a folder with one ``model.safetensors`` /
  ``pytorch_model.bin``.

Everything that goes wrong raises `CheckpointError` (a ValueError) naming the file, the key, the value
found and what was expected.

Hostile or damaged files (tests/test_fuzz_loaders.py) are refused before anything is allocated from what
they declare: safetensors headers are checked like the reference implementation does (known dtypes,
integer shapes, spans = shape x dtype size, tensors packed back to back up to the end of the file) and
capped (MAX_SAFETENSORS_HEADER_BYTES, JSON density); zip archives and pickles are capped
(MAX_ZIP_DIRECTORY_BYTES, MAX_PICKLE_BYTES, MAX_PICKLE_OPS); a tensor may not need more bytes than the
files hold (zero strides, shared storages); the shapes that drive the model config are bounded
(MAX_DEPTH, the transformer limits, VAE_LIMITS); pickled code is refused (nothing runs; only inert
stand-ins for known training-checkpoint argument classes). Weights holding NaN/Inf - in the file, or
after the cast to the requested dtype - are refused with the key named unless ``allow_nonfinite=True``.

Loading (`load_transformer`, `load_vae`) builds the module on the meta device, validates every key and
shape against it (names and shapes only: .pth files are opened memory-mapped, safetensors headers are
parsed), then materialises one tensor at a time in the requested dtype and assigns it, so the weights
are never held twice: ``.safetensors`` tensors are read with positional reads into owned memory; a bare
``.pth`` state dict is unpickled once more without the map (each storage read straight into its own
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
import io
import json
import math
import mmap as _mmap
import os
import pickle
import pickletools
import re
import stat as _stat
import struct
import sys
import warnings
import zipfile
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
# limits on what a file may declare (damaged or hostile files are refused before anything is
# allocated; every limit is far above what a real Infinity checkpoint needs)
# ---------------------------------------------------------------------------------------------

MAX_SAFETENSORS_HEADER_BYTES = 4 << 20   # the 8B model's tensor table is ~0.15 MB
MAX_PICKLE_BYTES = 2 << 20               # data.pkl: ~0.07 MB for the 2B state dict, ~0.5 MB for a training ckpt
MAX_PICKLE_OPS = 200_000                 # pickle opcodes: ~30 per tensor (2B state dict 21k, training ckpt 85k)
MAX_ZIP_DIRECTORY_BYTES = 4 << 20        # zip central directory: ~0.1 MB for the 8B model (~1000 entries)
MAX_TENSOR_NDIM = 32
MAX_TENSOR_ELEMENTS = 1 << 40            # per tensor (2B model: the largest has 12.6M elements)
MAX_INDEX_BYTES = 64 << 20               # model.safetensors.index.json
MAX_DEPTH = 1024                         # transformer blocks (20B: 58)
VAE_LIMITS = {"bits": 64, "base_ch": 8192, "ch_mult": 64, "levels": 16, "num_res_blocks": 64}


def _short(value, limit: int = 80) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[:limit - 3] + "..."


class _DuplicateName(Exception):
    pass


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateName(k)
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# format sniffing and low-level readers
# ---------------------------------------------------------------------------------------------

def _sniff(path: Path) -> str:
    """'torch-zip' | 'torch-legacy' | 'safetensors' for a file; raises CheckpointError otherwise."""
    try:
        st = path.stat()
        if not _stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: not a regular file (a device, pipe, socket or similar); expected a "
                                  f"checkpoint file (.pth or .safetensors)")
        size = st.st_size
        if size == 0:
            raise CheckpointError(f"{path}: the file is empty (0 bytes); expected a PyTorch or safetensors "
                                  f"checkpoint. The download or copy probably failed - fetch it again.")
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e.strerror or e})") from None
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
    """Parse and validate a safetensors header: ({name: (dtype, shape)}, metadata, data_start).

    Everything is checked before a byte of tensor data is touched, with the rules of the reference
    implementation: every entry has a known dtype, a shape of non-negative integers and offsets whose
    span is exactly shape x dtype size; the tensors are packed back to back from the start of the data
    area (no overlap, no gap) and the last one ends where the file ends."""
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
        if n > MAX_SAFETENSORS_HEADER_BYTES:
            raise CheckpointError(f"{path}: the safetensors header is {n} bytes; at most "
                                  f"{MAX_SAFETENSORS_HEADER_BYTES} are accepted (the 8B model's is ~0.15 MB) - "
                                  f"the file is damaged or not an Infinity checkpoint")
        blob = f.read(n)
    # Parsed JSON costs up to ~25x its size in Python objects when it is made of tiny arrays or strings;
    # a tensor table has one object and two arrays per entry of 50+ bytes and a quote every ~10 bytes.
    containers, quotes = blob.count(b"{") + blob.count(b"["), blob.count(b'"')
    if containers > n // 16 + 64 or quotes > n // 6 + 4096:
        raise CheckpointError(f"{path}: implausible safetensors header: {containers} JSON objects/arrays and {quotes} "
                              f"quote characters in {n} bytes; expected a flat table of tensors (one object and two "
                              f"arrays per entry of 50+ bytes, a quote every ~10 bytes)")
    try:
        header = json.loads(blob.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateName as e:
        raise CheckpointError(f"{path}: corrupted safetensors header: the name {e.args[0]!r} appears twice; "
                              f"expected unique names") from None
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError, huge integers
        raise CheckpointError(f"{path}: corrupted safetensors header (not valid JSON: {str(e)[:160]}); expected "
                              f"a JSON table of tensors - the file is damaged, fetch it again") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors header (a {type(header).__name__}, "
                              f"expected a JSON object)")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: corrupted safetensors header: '__metadata__' is {_short(meta)}; "
                              f"expected a JSON object mapping names to strings")
    data_start = 8 + n
    entries = {}
    spans = []
    for name, info in header.items():
        where = f"{path}: corrupted safetensors header: tensor {name!r}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where} is described by {_short(info)}; expected an object with "
                                  f"'dtype', 'shape' and 'data_offsets'")
        for field in ("dtype", "shape", "data_offsets"):
            if field not in info:
                raise CheckpointError(f"{where} has no {field!r} field (entry {_short(info)}); expected "
                                      f"'dtype', 'shape' and 'data_offsets'")
        dts, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dts, str) or dts not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{where} has the unsupported dtype {_short(dts)}; expected one of "
                                  f"{', '.join(_SAFETENSORS_DTYPES)}")
        if (not isinstance(shape, list) or len(shape) > MAX_TENSOR_NDIM
                or not all(type(s) is int and s >= 0 for s in shape)):
            raise CheckpointError(f"{where} has the shape {_short(shape)}; expected a list of at most "
                                  f"{MAX_TENSOR_NDIM} non-negative integers")
        if math.prod(max(s, 1) for s in shape) > MAX_TENSOR_ELEMENTS:
            raise CheckpointError(f"{where} declares the shape {_short(shape)}; expected at most 2^40 elements "
                                  f"(the largest weight of the 8B model has 38.5M)")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
                and 0 <= offs[0] <= offs[1]):
            raise CheckpointError(f"{where} has the data_offsets {_short(offs)}; expected [begin, end] with "
                                  f"0 <= begin <= end")
        dt = _SAFETENSORS_DTYPES[dts]
        nbytes = math.prod(shape) * dt.itemsize
        b, e = offs
        if e - b != nbytes:
            raise CheckpointError(f"{where} {dts} {_fmt_shape(shape)} needs {nbytes} bytes but its "
                                  f"data_offsets [{b}, {e}] span {e - b}")
        spans.append((b, e, name))
        entries[name] = (dt, tuple(shape))
    spans.sort()
    pos, prev = 0, None
    for b, e, name in spans:
        if b < pos:
            raise CheckpointError(f"{path}: corrupted safetensors header: tensor {name!r} (data_offsets [{b}, {e}]) "
                                  f"overlaps tensor {prev!r}, which ends at {pos}; expected every tensor in its "
                                  f"own byte range")
        if b > pos:
            raise CheckpointError(f"{path}: corrupted safetensors header: a gap of {b - pos} bytes before tensor "
                                  f"{name!r} (data_offsets [{b}, {e}]; the data before it ends at {pos}); expected "
                                  f"the tensors packed back to back")
        pos, prev = e, name
    end = data_start + pos
    if end > size:
        raise CheckpointError(f"{path}: truncated safetensors file: the tensors need {end} bytes but the file "
                              f"has only {size} ({size * 100 // end}% present) - the download probably stopped "
                              f"early")
    if end < size:
        raise CheckpointError(f"{path}: corrupted safetensors file: {size - end} unexplained bytes follow the "
                              f"last tensor (the header accounts for {end} of the {size} bytes); expected the "
                              f"file to end with the last tensor")
    return entries, dict(meta), data_start


# -- PyTorch zip archives ---------------------------------------------------------------------

@dataclasses.dataclass
class _TorchZip:
    prefix: str                          # the archive's single top-level folder
    records: dict                        # record name (without prefix) -> (data offset, size)
    pickle: bytes                        # data.pkl


def _zip_directory_extent(path: Path, size: int) -> tuple[int, int]:
    """(entries, central directory bytes) declared by the end records, without reading the directory."""
    with open(path, "rb") as f:
        f.seek(max(0, size - 65535 - 22))
        tail_start = f.tell()
        tail = f.read()
        i = tail.rfind(b"PK\x05\x06")
        if i < 0 or len(tail) - i < 22:
            raise CheckpointError(f"{path}: truncated PyTorch checkpoint: the zip archive has no end record "
                                  f"({size} bytes present) - the download probably stopped early")
        entries, cd_size, cd_offset = struct.unpack("<xxxxxxxxxxHII", tail[i:i + 20])
        if entries == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:  # zip64
            loc = tail[i - 20:i] if i >= 20 else b""
            if loc[:4] != b"PK\x06\x07":
                raise CheckpointError(f"{path}: corrupted PyTorch checkpoint: the zip64 end-record locator is "
                                      f"missing (at offset {tail_start + i - 20})")
            (z64,) = struct.unpack("<Q", loc[8:16])
            if z64 > size - 56:
                raise CheckpointError(f"{path}: corrupted PyTorch checkpoint: the zip64 end record would lie at "
                                      f"offset {z64}, past the end of the {size}-byte file")
            f.seek(z64)
            rec = f.read(56)
            if rec[:4] != b"PK\x06\x06":
                raise CheckpointError(f"{path}: corrupted PyTorch checkpoint: no zip64 end record at offset {z64}")
            entries, cd_size = struct.unpack("<QQ", rec[32:48])
    return entries, cd_size


def _inspect_torch_zip(path: Path) -> _TorchZip:
    """Validate the archive structure before anything is unpickled: one top-level folder, plain relative
    names (no '..', absolute paths, drive letters, backslashes, NUL bytes), no duplicate names, no
    symlink entries, stored (uncompressed, unencrypted) records whose bytes lie inside the file without
    overlapping, local names equal to the directory names, a bounded directory and data.pkl."""
    size = path.stat().st_size
    entries, cd_size = _zip_directory_extent(path, size)
    if cd_size > MAX_ZIP_DIRECTORY_BYTES:
        raise CheckpointError(f"{path}: the zip directory is {cd_size} bytes ({entries} entries); at most "
                              f"{MAX_ZIP_DIRECTORY_BYTES} are accepted (the 8B model's is ~0.1 MB) - the file is "
                              f"damaged or not a checkpoint")
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            cd_start = int(getattr(z, "start_dir", size))
    except Exception as e:
        raise CheckpointError(f"{path}: corrupted PyTorch checkpoint: the zip directory is unreadable "
                              f"({type(e).__name__}: {str(e)[:160]}) - fetch the file again") from None
    refused = f"{path}: refused: the zip archive"
    expected = "expected the entries torch.save writes ('archive/data.pkl', 'archive/data/0', ...)"
    prefix = None
    seen: set[str] = set()
    spans = []
    records = {}
    try:
        f = open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e.strerror or e})") from None
    with f:
        for zi in infos:
            name = zi.orig_filename
            parts = name.split("/")
            if ("\x00" in name or "\\" in name or name.startswith("/") or re.match(r"[A-Za-z]:", name)
                    or any(p in ("", ".", "..") for p in parts) or len(parts) < 2):
                raise CheckpointError(f"{refused} has an entry named {name!r}; {expected}: relative names inside "
                                      f"one folder, without '..', absolute paths, drive letters or backslashes. "
                                      f"Nothing was extracted or written.")
            if name in seen:
                raise CheckpointError(f"{refused} lists the entry {name!r} twice; expected unique names "
                                      f"(duplicates let different readers see different data)")
            seen.add(name)
            if prefix is None:
                prefix = parts[0]
            elif parts[0] != prefix:
                raise CheckpointError(f"{refused} has entries under two folders, {prefix!r} and {parts[0]!r} "
                                      f"(entry {name!r}); expected a single top-level folder as torch.save writes")
            if _stat.S_ISLNK(zi.external_attr >> 16):
                raise CheckpointError(f"{refused} entry {name!r} is a symbolic link; {expected}")
            if zi.flag_bits & 0x1:
                raise CheckpointError(f"{refused} entry {name!r} is encrypted; {expected}")
            if zi.compress_type != zipfile.ZIP_STORED or zi.compress_size != zi.file_size:
                raise CheckpointError(f"{refused} entry {name!r} is compressed (method {zi.compress_type}, "
                                      f"{zi.compress_size} -> {zi.file_size} bytes); expected stored entries, as "
                                      f"torch.save writes them")
            if not 0 <= zi.header_offset < min(cd_start, size):
                raise CheckpointError(f"{path}: corrupted PyTorch checkpoint: entry {name!r} would start at offset "
                                      f"{zi.header_offset}, outside the {size}-byte file's data area")
            f.seek(zi.header_offset)
            local = f.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise CheckpointError(f"{path}: corrupted PyTorch checkpoint: entry {name!r} has no local header at "
                                      f"offset {zi.header_offset}")
            nlen, xlen = struct.unpack("<HH", local[26:30])
            raw_name = f.read(nlen)
            want = name.encode("utf-8" if zi.flag_bits & 0x800 else "cp437", "replace")
            if raw_name != want:
                raise CheckpointError(f"{refused} entry {name!r} is called {raw_name[:80]!r} in its local header; "
                                      f"expected the same name in both places")
            start = zi.header_offset + 30 + nlen + xlen
            end = start + zi.compress_size
            if end > cd_start:
                raise CheckpointError(f"{path}: corrupted PyTorch checkpoint: entry {name!r} would span bytes "
                                      f"{start}..{end}, past the start of the zip directory at {cd_start}")
            spans.append((zi.header_offset, end, name))
            records[name[len(prefix) + 1:]] = (start, zi.file_size)
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{refused} entries {n0!r} (bytes {b0}..{e0}) and {n1!r} (from byte {b1}) "
                                  f"overlap; expected every entry in its own byte range")
    if "data.pkl" not in records:
        raise CheckpointError(f"{path}: not a torch.save archive: no '{prefix or 'archive'}/data.pkl' entry "
                              f"(entries: {_fmt_keys(seen, 6)}); {expected}")
    start, n = records["data.pkl"]
    if n > MAX_PICKLE_BYTES:
        raise CheckpointError(f"{path}: '{prefix}/data.pkl' is {n} bytes; at most {MAX_PICKLE_BYTES} are accepted "
                              f"(a state dict's is well under 1 MB) - the file is damaged or not a checkpoint")
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(n)
    _count_pickle_ops(path, data, f"'{prefix}/data.pkl'")
    return _TorchZip(prefix, records, data)


def _count_pickle_ops(path: Path, data: bytes, what: str) -> int:
    """Walk the opcodes (nothing is built; ~8x faster than unpickling) and refuse a pickle of more than
    MAX_PICKLE_OPS operations: torch's weights-only unpickler is pure Python, its time grows with the
    opcode count, and a few hundred KB of hostile opcodes would keep it busy for seconds."""
    ops = 0
    try:
        for _ in pickletools.genops(io.BytesIO(data)):
            ops += 1
            if ops > MAX_PICKLE_OPS:
                raise CheckpointError(f"{path}: {what} holds more than {MAX_PICKLE_OPS} pickle operations; a state "
                                      f"dict needs ~30 per tensor (a 2B training checkpoint ~85,000) - the file is "
                                      f"damaged or not a checkpoint")
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: corrupted PyTorch checkpoint: {what} is not a valid pickle "
                              f"({type(e).__name__}: {str(e)[:160]})") from None
    return ops


def _unpickle_torch_zip(path: Path, info: _TorchZip, mmap: bool):
    """Load a torch.save zip archive from the records `_inspect_torch_zip` validated, as
    torch.load(weights_only=True, map_location='cpu') does - the same weights-only unpickler, storages
    that are slices of one private read-only file map (mmap=True) or read into their own memory
    (mmap=False) - but with a single zip parser (torch's miniz reader never sees the file, so names,
    duplicates or overlaps cannot be read differently by two parsers) and with every storage checked:
    its record must exist and hold exactly the bytes the pickle declares, and every record must be used.
    Tensor geometry is checked by torch when each tensor is set onto its storage."""
    try:
        from torch import _weights_only_unpickler as W
        unpickler_cls = W.Unpickler
    except Exception:  # pragma: no cover - a torch without it
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    order = b"little"
    if "byteorder" in info.records:
        start, n = info.records["byteorder"]
        with open(path, "rb") as f:
            f.seek(start)
            order = f.read(min(n, 16))
        if order not in (b"little", b"big"):
            raise CheckpointError(f"{path}: corrupted PyTorch checkpoint: '{info.prefix}/byteorder' is {order!r}; "
                                  f"expected b'little' or b'big'")
    swap = order.decode() != sys.byteorder
    overall = torch.UntypedStorage.from_file(str(path), False, path.stat().st_size) if mmap else None
    f = None if mmap else open(path, "rb")
    loaded: dict[str, torch.UntypedStorage] = {}

    def persistent_load(pid):
        if not (isinstance(pid, tuple) and len(pid) == 5):
            raise CheckpointError(f"{path}: corrupted PyTorch checkpoint: a storage reference in data.pkl is "
                                  f"{_short(pid)}; expected ('storage', type, key, location, numel)")
        _, storage_type, key, location, numel = pid
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else getattr(storage_type, "dtype", None)
        if not isinstance(dtype, torch.dtype) or not isinstance(key, str) or type(numel) is not int or numel < 0:
            shown = (getattr(storage_type, "__name__", None) or getattr(storage_type, "_dtype", None) or
                     type(storage_type).__name__, key, location, numel)
            raise CheckpointError(f"{path}: corrupted PyTorch checkpoint: the storage reference "
                                  f"(type, key, location, count) = {_short(shown)} in data.pkl is malformed; "
                                  f"expected a storage type, a string key and a count >= 0")
        rec = f"data/{key}"
        if rec not in info.records:
            raise CheckpointError(f"{path}: corrupted PyTorch checkpoint: data.pkl refers to storage {key!r} but "
                                  f"the archive has no record {info.prefix + '/' + rec!r}")
        start, have = info.records[rec]
        need = numel * torch._utils._element_size(dtype)
        if have != need:
            raise CheckpointError(f"{path}: corrupted PyTorch checkpoint: storage {key!r} is declared as {numel} x "
                                  f"{dtype} = {need} bytes but its record {info.prefix + '/' + rec!r} holds {have} "
                                  f"bytes")
        storage = loaded.get(key)
        if storage is None:
            if overall is not None:
                storage = overall[start:start + need]
            else:
                t = torch.empty(need, dtype=torch.uint8)
                f.seek(start)
                if need and f.readinto(t.numpy()) != need:
                    raise CheckpointError(f"{path}: truncated PyTorch checkpoint: record "
                                          f"{info.prefix + '/' + rec!r} ends past the end of the file")
                storage = t.untyped_storage()
            if swap and need:
                storage.byteswap(dtype)
            loaded[key] = storage
        return torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)

    tls = getattr(torch.serialization, "_serialization_tls", None)
    previous = getattr(tls, "map_location", None)
    pending = getattr(torch._utils, "_sparse_tensors_to_validate", None)
    n0 = len(pending) if isinstance(pending, list) else 0
    try:
        if tls is not None:
            tls.map_location = "cpu"
        u = unpickler_cls(io.BytesIO(info.pickle), encoding="utf-8")
        u.persistent_load = persistent_load
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = u.load()
        if isinstance(pending, list) and len(pending) > n0 and hasattr(torch._utils, "_validate_loaded_sparse_tensors"):
            torch._utils._validate_loaded_sparse_tensors()
    finally:
        if tls is not None:
            tls.map_location = previous
        if isinstance(pending, list):
            del pending[n0:]
        if f is not None:
            f.close()
    orphans = sorted(r for r in info.records if r.startswith("data/") and r[5:] not in loaded)
    if orphans:
        raise CheckpointError(f"{path}: corrupted PyTorch checkpoint: {len(orphans)} storage record(s) are not used by "
                              f"data.pkl ({_fmt_keys([info.prefix + '/' + r for r in orphans], 4)}); torch.save writes "
                              f"only referenced storages - the pickle was altered")
    return result


def _inspect_legacy_pickles(path: Path) -> list[str]:
    """A legacy (non-zip) torch file starts with five pickles (magic number, protocol, system info,
    objects, storage keys) before the raw storages. Walk their opcodes (nothing is built), refuse
    pickles larger than MAX_PICKLE_BYTES (unpickling cost and memory grow with them) and return the
    globals they name ('module.name'; '?' for one that cannot be resolved statically)."""
    with open(path, "rb") as f:
        window = f.read(MAX_PICKLE_BYTES + 1)
    bio = io.BytesIO(window)
    found: list[str] = []
    ops = 0
    for i in range(5):
        strings: list = []
        memo: dict = {}
        try:
            for op, arg, _ in pickletools.genops(bio):
                ops += 1
                if ops > MAX_PICKLE_OPS:
                    raise CheckpointError(f"{path}: the pickles of this legacy PyTorch file hold more than "
                                          f"{MAX_PICKLE_OPS} operations; a state dict needs ~30 per tensor - the "
                                          f"file is damaged or not a checkpoint")
                if op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", ".", 1))
                elif op.name == "STACK_GLOBAL":
                    found.append(f"{strings[-2]}.{strings[-1]}" if len(strings) >= 2 and all(
                        isinstance(x, str) for x in strings[-2:]) else "?")
                elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
                    strings.append(arg)
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                    memo[arg] = strings[-1] if strings else None
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = strings[-1] if strings else None
                elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                    strings.append(memo.get(arg))
                else:
                    strings.append(None)
                del strings[:-2]
        except CheckpointError:
            raise
        except Exception as e:
            if len(window) > MAX_PICKLE_BYTES and bio.tell() >= MAX_PICKLE_BYTES:
                break
            raise CheckpointError(f"{path}: corrupted PyTorch checkpoint (legacy format): pickle {i + 1} of 5 is "
                                  f"unreadable at byte {bio.tell()} ({type(e).__name__}: {str(e)[:120]})") from None
        if bio.tell() > MAX_PICKLE_BYTES:
            break
    else:
        return found
    raise CheckpointError(f"{path}: the pickled part of this legacy PyTorch file exceeds {MAX_PICKLE_BYTES} bytes; "
                          f"a state dict's is well under 1 MB - the file is damaged or not a checkpoint")


class _Stub:
    """Inert stand-in for a non-tensor object inside a training checkpoint (e.g. its parsed args)."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


def _torch_load(path: Path, fmt: str, mmap: bool = True):
    """Read a .pth like torch.load(weights_only=True, map_location='cpu'): zip archives through
    `_inspect_torch_zip` + `_unpickle_torch_zip` (memory-mapped unless mmap=False), legacy files through
    torch.load after `_inspect_legacy_pickles`. Refused globals -> stand-ins or a refusal (see
    `_stubs_or_refuse`); every failure -> CheckpointError."""
    use_mmap = mmap and fmt == "torch-zip"
    legacy_globals = info = None
    if fmt == "torch-zip":
        info = _inspect_torch_zip(path)

        def load():
            return _unpickle_torch_zip(path, info, use_mmap)
    else:
        legacy_globals = _inspect_legacy_pickles(path)

        def load():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    stubs: list = []
    for attempt in (0, 1):
        try:
            with torch.serialization.safe_globals(stubs):
                return load(), use_mmap
        except CheckpointError:
            raise
        except pickle.UnpicklingError as e:
            if attempt:
                raise _torch_read_error(path, fmt, e) from None
            stubs = _stubs_or_refuse(path, e, legacy_globals, info.pickle if info is not None else None)
        except Exception as e:
            raise _torch_read_error(path, fmt, e) from None
    raise AssertionError("unreachable")  # pragma: no cover


def _stubs_or_refuse(path: Path, e: pickle.UnpicklingError, legacy_globals: list[str] | None = None,
                     data_pkl: bytes | None = None) -> list:
    """The weights-only unpickler refused a global: stub known-harmless training-checkpoint objects
    (see `_STUBBABLE_PREFIXES`), refuse everything else."""
    text = str(e)
    try:
        from torch import _weights_only_unpickler as W
        if legacy_globals is None and data_pkl is not None:
            legacy_globals = list(W.get_globals_in_pkl(io.BytesIO(data_pkl)))
        if legacy_globals is not None:
            allowed = W._get_allowed_globals()
            names = sorted({g for g in legacy_globals if g not in allowed})
        else:
            names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:
        names = []
    if not names and not re.search(r"weights.only|global|reduce|allowlist", text, re.I):
        raise CheckpointError(f"{path}: corrupted PyTorch checkpoint (unpickling failed: "
                              f"{text.splitlines()[0][:200] if text else type(e).__name__})") from None
    bad = [n for n in names if not n.startswith(_STUBBABLE_PREFIXES)]
    if bad or not names:
        found = ", ".join(bad or names) or text.splitlines()[0][:200]
        raise CheckpointError(
            f"{path}: refused for safety - the file contains Python code/objects ({found}) that would be "
            f"executed or constructed while unpickling; expected only tensors (a state dict). Nothing from "
            f"the file was run. Use a .safetensors file or re-save the weights alone from a trusted "
            f"environment.")
    return [(type(n.rsplit(".", 1)[-1], (_Stub,), {"__module__": n.rsplit(".", 1)[0]}), n) for n in names]


def _torch_read_error(path: Path, fmt: str, e: Exception) -> CheckpointError:
    msg = str(e).splitlines()[0].split(". ")[0][:200] if str(e) else type(e).__name__
    known = {"storage has wrong": "a storage's size in the pickle differs from the size stored with its data",
             "resize storage that is not resizable": "a tensor's size, strides or offset reach past the end of "
                                                     "its storage",
             "integer multiplication overflow": "a tensor's declared shape overflows"}
    for needle, text in known.items():  # torch's wording -> what it means for a checkpoint
        if needle in msg:
            msg = f"{text} ({msg[:120]})"
            break
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
            if isinstance(obj, Mapping) and isinstance(obj.get("config"), Mapping):
                # our .pth files carry their config beside the weights (safetensors: in the metadata)
                self.metadata = {"infinity.config": json.dumps(_jsonable(obj["config"]))}
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


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


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
    where = f"{path}{' [' + wrapper + ']' if wrapper else ''}"
    bad = [(k, v) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        k, v = bad[0]
        raise CheckpointError(f"{where}: not a dict of tensors: entry "
                              f"{k!r} is a {type(v).__name__} ({len(bad)} of {len(obj)} entries are not "
                              f"tensors); expected a state dict mapping names to tensors")
    for k, v in obj.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{where}: the entry {_short(k)} has a {type(k).__name__} name; expected a state "
                                  f"dict with string names")
        if v.layout != torch.strided or v.is_quantized or v.device.type != "cpu":
            what = (f"layout {v.layout}" if v.layout != torch.strided else f"dtype {v.dtype}" if v.is_quantized
                    else f"device {v.device} (no data)" if v.device.type == "meta" else f"device {v.device}")
            raise CheckpointError(f"{where}: key {k!r} is a tensor with {what}; expected a plain dense tensor")
    return dict(obj), wrapper


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
        self._check_sizes()
        self._strip_common_prefix()

    def _check_sizes(self):
        """A tensor can never need more bytes than the files hold: zero strides or storages shared by
        many tensors would otherwise multiply a small file into huge allocations when it is loaded."""
        total = sum(s.path.stat().st_size for s in self.shards)
        for key, (shard, name) in self.keys.items():
            t = shard.meta[name]
            nbytes = t.numel() * t.element_size()
            if nbytes > total:
                raise CheckpointError(f"{shard.path}: key {key!r} declares {t.dtype} {_fmt_shape(t.shape)} = "
                                      f"{nbytes} bytes, but the checkpoint file(s) hold only {total} bytes (zero "
                                      f"strides or a shared storage); expected every tensor stored in full")
        self.file_bytes = total

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
            if index.stat().st_size > MAX_INDEX_BYTES:
                raise ValueError(f"{index.stat().st_size} bytes, at most {MAX_INDEX_BYTES} are accepted")
            data = json.loads(index.read_bytes().decode("utf-8"))
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError("empty weight_map")
        except FileNotFoundError:
            raise CheckpointError(f"{index}: no such index file") from None
        except Exception as e:
            raise CheckpointError(f"{index}: corrupted shard index ({type(e).__name__}: {str(e)[:200]}); expected "
                                  f"a JSON object with a non-empty 'weight_map' {{key: shard file}}") from None
        folder = index.parent
        by_shard: dict[str, list[str]] = {}
        for key, shard_name in weight_map.items():
            if (not isinstance(shard_name, str) or not shard_name or shard_name in (".", "..") or "/" in shard_name
                    or "\\" in shard_name or "\x00" in shard_name or re.match(r"[A-Za-z]:", shard_name)):
                raise CheckpointError(f"{index}: refused: the index maps {key!r} to the shard {_short(shard_name)}; "
                                      f"expected a plain file name inside {folder} (no paths, '..' or drive "
                                      f"letters)")
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

    def materialize(self, key: str, dtype: torch.dtype | None, device, *,
                    allow_nonfinite: bool = True) -> torch.Tensor:
        """One tensor in owned memory on `device`, floating-point ones cast to `dtype`.
        allow_nonfinite=False: a NaN/Inf value (in the file, or produced by the cast) -> CheckpointError."""
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
        if not allow_nonfinite and out.is_floating_point() and not _all_finite(out):
            raise _nonfinite_error(shard.path, key, src, out)
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


def _all_finite(t: torch.Tensor) -> bool:
    """True when no element is NaN or +-Inf (one vectorised min/max pass, no temporary copy)."""
    if t.numel() == 0:
        return True
    try:
        lo, hi = torch.aminmax(t)
        return math.isfinite(float(lo)) and math.isfinite(float(hi))
    except (RuntimeError, NotImplementedError, TypeError):  # dtypes without aminmax (float8): chunked
        flat = t.reshape(-1)
        step = 1 << 22
        return all(bool(torch.isfinite(flat[i:i + step].float()).all()) for i in range(0, flat.numel(), step))


def _nonfinite_error(path, key: str, src: torch.Tensor, out: torch.Tensor) -> CheckpointError:
    flat = out.reshape(-1)
    nan = inf = 0
    first = None
    step = 1 << 22
    for i in range(0, flat.numel(), step):
        c = flat[i:i + step].float()
        bad = ~torch.isfinite(c)
        if first is None and bool(bad.any()):
            first = i + int(bad.nonzero()[0, 0])
        nan += int(torch.isnan(c).sum())
        inf += int(torch.isinf(c).sum())
    head = f"{path}: key {key!r} ({out.dtype} {_fmt_shape(out.shape)})"
    if src.dtype != out.dtype and _all_finite(src):
        big = float(src.float().abs().max()) if src.numel() <= (1 << 26) else float("nan")
        return CheckpointError(f"{head}: {inf} value(s) overflow {out.dtype} when cast from the file's "
                               f"{src.dtype} (largest magnitude {big:.4g}, first at flat index {first}); expected "
                               f"weights that fit the requested dtype - load it in bfloat16 or float32")
    return CheckpointError(f"{head} holds {nan + inf} non-finite value(s) ({nan} NaN, {inf} Inf; first at flat "
                           f"index {first}); expected finite weights - the file is damaged or comes from a "
                           f"diverged training run. Pass allow_nonfinite=True to load it anyway.")


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

_BLOCK_RE = re.compile(r"^block_chunks\.(\d{1,6})\.module\.(\d{1,6})\.(.+)$")
_FLAT_BLOCK_RE = re.compile(r"^blocks\.(\d{1,6})\.(.+)$")


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
    if chunks * per > MAX_DEPTH:
        raise CheckpointError(f"{src}: the key names declare {chunks} chunks x {per} blocks = {chunks * per} blocks; "
                              f"expected at most {MAX_DEPTH} (the largest released model has 58)")
    for c in range(chunks):
        if len(grid.get(c, ())) != per:
            have = sorted(grid.get(c, ()))
            raise CheckpointError(f"{src}: incomplete blocks: chunk {c} has modules {have}, expected 0..{per - 1} "
                                  f"like the others ({chunks} chunks x {per} blocks)")
    b0 = "block_chunks.0.module.0."
    for suffix in ("sa.scale_mul_1H11", "ffn.fc1.weight"):
        if b0 + suffix not in sd:
            raise CheckpointError(f"{src}: key {b0 + suffix!r} is missing; expected in every block")
    for key, ndim in (("word_embed.weight", 2), ("cfg_uncond", 2), ("head.weight", 2), (b0 + "ffn.fc1.weight", 2),
                      (b0 + "sa.scale_mul_1H11", 4)):
        if sd[key].dim() != ndim:
            raise CheckpointError(f"{src}: key {key!r} has shape {_fmt_shape(sd[key].shape)}; expected {ndim} "
                                  f"dimensions")
    width, d_in = (int(s) for s in sd["word_embed.weight"].shape)
    heads = int(sd[b0 + "sa.scale_mul_1H11"].shape[1])
    mlp_hidden = int(sd[b0 + "ffn.fc1.weight"].shape[0])
    text_maxlen, text_channels = (int(s) for s in sd["cfg_uncond"].shape)
    head_rows = int(sd["head.weight"].shape[0])
    for what, value, key, hi in (("width", width, "word_embed.weight", 32768),
                                 ("bits per token", d_in, "word_embed.weight", 4096),
                                 ("heads", heads, b0 + "sa.scale_mul_1H11", 1024),
                                 ("MLP width", mlp_hidden, b0 + "ffn.fc1.weight", 1 << 18),
                                 ("text length", text_maxlen, "cfg_uncond", 1 << 16),
                                 ("text channels", text_channels, "cfg_uncond", 1 << 15)):
        if not 1 <= value <= hi:
            raise CheckpointError(f"{src}: key {key!r} ({_fmt_shape(sd[key].shape)}) implies {what} {value}; "
                                  f"expected 1..{hi} - the file is damaged or not an Infinity transformer")
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
        if not ref.is_floating_point() and got.is_floating_point():
            raise CheckpointError(f"{ck.path}: key {k!r} has dtype {got.dtype} but {what} keeps an integer buffer "
                                  f"({ref.dtype}) there")
    total = sum(have[k].numel() * have[k].element_size() for k in expected if k in have)
    file_bytes = getattr(ck, "file_bytes", None)
    if file_bytes is not None and total > file_bytes:
        raise CheckpointError(f"{ck.path}: the {sum(k in have for k in expected)} tensors of {what} declare {total} "
                              f"bytes in all, more than the {file_bytes} bytes the file(s) hold (tensors sharing "
                              f"storage or with zero strides); expected every tensor stored once")
    return to_fill, [k for k in have if k not in expected]


def _build(factory, cfg, source, what: str, describe: str):
    """Build a module on the meta device; a config the constructor rejects -> CheckpointError."""
    try:
        with torch.device("meta"):
            return factory(cfg)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{source}: the shapes in the file describe {what} that cannot be built ({describe}; "
                              f"{type(e).__name__}: {str(e)[:200]})") from None


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
                     allow_nonfinite: bool = False, **model_kwargs):
    """Build `transformer.Infinity` from any accepted checkpoint layout.

    dtype: torch dtype, 'bf16'/'fp16'/'fp32', 'auto' (see `resolve_dtype`) or None/'keep' (file dtype).
    config: skip inference and use this config (it must still match every shape).
    patchify: override the patchify inference (see module docstring).
    text_maxlen: force the number of `cfg_uncond` rows (truncate / zero-pad with a warning).
    strict: unknown keys are an error (True) or a warning (False); missing keys are always an error.
    allow_nonfinite: False (default) refuses a weight holding NaN/Inf (after the cast to `dtype`), naming
        the key; True loads such files as they are.
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
        model = _build(lambda c: Infinity(c, **model_kwargs), cfg, ck.path, "an Infinity transformer", _cfg_desc(cfg))
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
            t = ck.materialize(k, dtype, device, allow_nonfinite=allow_nonfinite)
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
    meta = ck.meta_state_dict()
    for k, t in meta.items():
        m = re.match(r"encoder\.down\.(\d+)\.(?:block\.(\d+)\.)?", k)
        if m and (len(m.group(1)) > 3 or int(m.group(1)) >= VAE_LIMITS["levels"]):
            raise CheckpointError(f"{ck.path}: key {k!r} names encoder level {m.group(1)}; expected at most "
                                  f"{VAE_LIMITS['levels']} levels (released VAEs have 4 or 5)")
        if m and m.group(2) and (len(m.group(2)) > 3 or int(m.group(2)) >= VAE_LIMITS["num_res_blocks"]):
            raise CheckpointError(f"{ck.path}: key {k!r} names residual block {m.group(2)}; expected at most "
                                  f"{VAE_LIMITS['num_res_blocks']} per level (released VAEs have 2)")
        if re.fullmatch(r"(encoder\.(conv_in|conv_out|down\.\d+\.block\.0\.conv1)|decoder\.conv_in)\.conv\.weight", k) \
                and t.dim() != 4:
            raise CheckpointError(f"{ck.path}: key {k!r} has shape {_fmt_shape(t.shape)}; expected a 4-D convolution "
                                  f"weight (out, in, kh, kw)")
    try:
        cfg = V.vae_config_from_state_dict(meta)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{ck.path}: could not infer the VAE configuration ({type(e).__name__}: {e})") from None
    cfg = _vae_norm_groups_from_metadata(ck, cfg)
    src = {"bits": "encoder.conv_out.conv.weight", "base_ch": "encoder.conv_in.conv.weight",
           "ch_mult": "encoder.down.<i>.block.0.conv1.conv.weight", "levels": "encoder.down.<i>",
           "num_res_blocks": "encoder.down.0.block.<j>"}
    values = {"bits": [cfg.bits], "base_ch": [cfg.base_ch], "ch_mult": list(cfg.ch_mult),
              "levels": [len(cfg.ch_mult)], "num_res_blocks": [cfg.num_res_blocks]}
    for field, vals in values.items():
        bad = [v for v in vals if not 1 <= v <= VAE_LIMITS[field]]
        if bad:
            raise CheckpointError(f"{ck.path}: the VAE keys ({src[field]}) imply {field} {bad[0]}; expected "
                                  f"1..{VAE_LIMITS[field]} - the file is damaged or not an Infinity BSQ VAE")
    return ck, cfg


def _vae_norm_groups_from_metadata(ck, cfg: VAEConfig) -> VAEConfig:
    """GroupNorm has no per-group tensor, so the group count of a VAE other than the released ones
    (32) comes from the 'infinity.config' metadata our trainer and converter write."""
    raw = (getattr(ck, "metadata", None) or {}).get("infinity.config")
    if not raw:
        return cfg
    try:
        groups = json.loads(raw).get("norm_groups", 32)
    except (ValueError, AttributeError):
        raise CheckpointError(f"{ck.path}: metadata 'infinity.config' is not a JSON object: {_short(raw)}") from None
    chans = cfg.channel_counts
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or any(c % groups for c in chans):
        raise CheckpointError(f"{ck.path}: metadata 'infinity.config' gives norm_groups {groups!r}; expected a "
                              f"positive integer dividing every channel count {sorted(chans)}")
    return dataclasses.replace(cfg, norm_groups=groups)


def read_vae_config(path) -> VAEConfig:
    """The VAEConfig of a VAE checkpoint from its names and shapes only."""
    ck, cfg = _vae_checkpoint(path)
    ck.close()
    return cfg


def _vae_desc(cfg: VAEConfig) -> str:
    name = f"{cfg.name}: " if cfg.name != "custom" else ""
    return f"{name}{cfg.bits}-bit BSQ VAE, stride {cfg.patch_size}, ch_mult {tuple(cfg.ch_mult)}, base {cfg.base_ch}"


def load_vae(path, dtype=torch.float32, device="cpu", *, strict: bool = True, allow_nonfinite: bool = False):
    """Build `vae.BSQVAE` from a VAE checkpoint ({'vae': sd} .pth, safetensors, plain or wrapped
    conv/norm key names). The bit-mask buffer may appear under `quantizer.lfq.mask`, `quantize.lfq.mask`
    or both; a missing one is recomputed (2^(d-1) ... 2^0). The VAE normally runs in fp32.
    allow_nonfinite: False (default) refuses a weight holding NaN/Inf, naming the key."""
    from . import vae as V

    dtype = resolve_dtype(dtype, device)
    ck, cfg = _vae_checkpoint(path)
    try:
        model = _build(V.BSQVAE, cfg, ck.path, "a BSQ VAE", _vae_desc(cfg))
        expected = _expected_tensors(model)
        to_fill, _ = _plan(ck, expected, "the BSQ VAE", _vae_desc(cfg), strict=strict, fillable=_is_mask,
                           ignorable=_is_mask, tolerated="the bit-mask aliases *.lfq.mask")
        device = torch.device(device)
        sd = {}
        for k, ref in expected.items():
            if k in to_fill:
                sd[k] = (2 ** torch.arange(cfg.bits - 1, -1, -1, dtype=torch.int64)).to(ref.dtype).to(device)
            else:
                sd[k] = ck.materialize(k, dtype, device, allow_nonfinite=allow_nonfinite)
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
              vae_strict: bool = True, allow_nonfinite: bool = False, **kwargs):
    """(transformer, vae), refusing a VAE that does not fit the transformer (checked from the names and
    shapes before any weight is read). kwargs go to `load_transformer`; allow_nonfinite to both."""
    tcfg = kwargs.get("config") or read_transformer_config(transformer_path, patchify=kwargs.get("patchify"))
    vcfg = read_vae_config(vae_path)
    _check_pair(tcfg, vcfg, transformer_path, vae_path)
    model = load_transformer(transformer_path, dtype, device, allow_nonfinite=allow_nonfinite, **kwargs)
    vae = load_vae(vae_path, vae_dtype, device, strict=vae_strict, allow_nonfinite=allow_nonfinite)
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
