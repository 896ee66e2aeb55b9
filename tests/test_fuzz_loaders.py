"""Hostile and broken files: a seeded fuzz test of the checkpoint / VAE loaders (and the T5 single-file
loader) - the robustness issue.

Tiny valid checkpoints (a transformer and a VAE in every layout: .safetensors, bare and wrapped zip
.pth, legacy .pth, a sharded folder) are mutated into >= 500 broken files in these categories:

  empty          0-byte files, empty folders and indexes
  truncated      every layout cut at structural and random points
  random_bytes   random bytes, bare or behind a valid magic number
  header_lies    safetensors headers lying about offsets, shapes, dtypes, lengths, names, metadata
  enormous       huge declared shapes (safetensors, zero strides, lying storages, meta tensors, key names)
  wrong_dtypes   integer/bool/complex/quantized/sparse tensors, non-tensor entries, non-string names
  nonfinite      NaN / +Inf / -Inf weights, and fp32 values that overflow fp16
  pickle_code    pickles calling os.system, eval, exec, open, subprocess, ... (zip and legacy .pth)
  zip_tricks     '..', absolute and drive names, NUL bytes, duplicates, symlinks, compression, overlaps
  structure      wrong model kind, missing/renamed keys, shape mismatches, shard indexes with path tricks
  flips          1-3 random bytes flipped inside safetensors headers and zip directories
  pickle_flips   1-3 random bytes flipped inside data.pkl and legacy pickles
  t5             the T5 single-file loader on a subset of the above (plain ValueError accepted there)

Every case is run in-process and must end in a specific error - CheckpointError (T5: ValueError) whose
message names the file (plus category words) - within 2 s, with a peak-RSS growth below 100 MB (VmHWM
reset through /proc/self/clear_refs before each case) and without writing any file or starting any
process: an audit hook records every write-mode open, rename/remove/mkdir/chmod/..., os.system,
subprocess, exec and fork while a case runs, and the case folder, $TMPDIR, $HOME and the working
directory (fresh, watched folders) are compared before and after. Random byte flips may also hit bytes
that do not matter (whitespace, the device name, a CRC the memory-mapped path does not read); such a
case must then load exactly the original weights ('harmless', not counted as an error case). A flipped
pickle may also be a well-formed description of other valid tensors (e.g. a view smaller than its
storage): pickle_flips accept a load ('loaded', not counted) but nothing else (no crash, bare
exception, write, process, stall or memory spike). The test fails below 500 error cases.

Outside the cases: the first model built on the meta device in a process imports torch._dynamo, whose
import creates the empty folder $TMPDIR/torchinductor_$USER (torch behaviour, independent of the file);
it is imported before the sandbox is set up (`_import_dynamo`).

Seed: INFINITY_FUZZ_SEED (default 20240601). bench/fuzz_loaders.py prints the per-category statistics.
"""
from __future__ import annotations

import dataclasses
import gc
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import stat
import struct
import sys
import tempfile
import time
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from infinity_core import checkpoint as C  # noqa: E402
from infinity_core.checkpoint import CheckpointError  # noqa: E402
from infinity_core.zoo import VAEConfig  # noqa: E402

SEED = int(os.environ.get("INFINITY_FUZZ_SEED", "20240601"))
TIME_LIMIT_S = 2.0
RSS_LIMIT_MB = 100.0
MIN_ERROR_CASES = 500

FUZZ_T = None  # filled lazily (tiny_models imports the model code)
FUZZ_VAE = VAEConfig(bits=8, patch_size=2, ch_mult=(1, 1), base_ch=32, num_res_blocks=1, name="fuzz_vae")


# ---------------------------------------------------------------------------------------------
# sandbox: audit hook (writes, processes), watched folders, peak RSS
# ---------------------------------------------------------------------------------------------

class _Audit:
    on = False
    hits: list = []
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    MUTATING = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.truncate",
                "os.chmod", "os.chown", "os.utime", "os.chflags", "os.lchflags", "os.mkfifo", "os.mknod",
                "shutil.copyfile", "shutil.copymode", "shutil.copystat", "shutil.copytree", "shutil.move",
                "shutil.rmtree", "shutil.make_archive", "shutil.unpack_archive", "tempfile.mkstemp",
                "tempfile.mkdtemp", "os.putenv", "os.unsetenv"}
    PROCESS = {"os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
               "os.forkpty", "pty.spawn", "os.kill", "os.killpg", "socket.connect", "socket.bind",
               "urllib.Request", "webbrowser.open", "exec", "pickle.find_class", "ctypes.call_function"}

    @classmethod
    def hook(cls, event, args):
        if not cls.on:
            return
        try:
            if event == "open":
                path, mode, flags = (tuple(args) + (None, None, None))[:3]
                if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                        isinstance(flags, int) and flags & cls.WRITE_FLAGS):
                    cls.hits.append(f"open({path!r}, {mode!r}, flags={flags})")
            elif event in cls.MUTATING or event in cls.PROCESS:
                cls.hits.append(f"{event}{_short_args(args)}")
        except Exception:  # an audit hook must never raise
            pass


def _short_args(args) -> str:
    r = repr(tuple(args))
    return r if len(r) < 160 else r[:157] + "..."


_HOOK_INSTALLED = False


def _install_hook():
    global _HOOK_INSTALLED
    if not _HOOK_INSTALLED:
        sys.addaudithook(_Audit.hook)
        _HOOK_INSTALLED = True


def _status_kb(field: str) -> int:
    """VmRSS / VmHWM in kB (Linux); elsewhere the current RSS / the process-lifetime peak (which cannot be
    reset, so the growth is then only caught when it exceeds every earlier peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    if field == "VmHWM":
        try:
            import resource
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return peak // 1024 if sys.platform == "darwin" else peak
        except Exception:
            pass
    import psutil
    return psutil.Process().memory_info().rss // 1024


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _snapshot(folders) -> dict:
    out = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for n in dirs + files:
                p = os.path.join(root, n)
                try:
                    st = os.lstat(p)
                except FileNotFoundError:
                    continue
                out[p] = (st.st_size, st.st_mtime_ns, stat.S_IFMT(st.st_mode))
    return out


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    category: str
    name: str
    loader: str                          # 'transformer' | 'vae' | 't5'
    make: Callable[[Path], Path]         # writes the file(s) into a fresh folder, returns the path to load
    expect: str = ""                     # regex the message must match (besides naming the file)
    may_load: str = ""                   # random flips: '' (must fail), 'identical' (may hit bytes that do not
    #                                      matter: then the original weights load), 'any' (pickle flips: a
    #                                      well-formed different pickle may load)
    kwargs: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Result:
    case: Case
    ok: bool
    outcome: str                         # 'error' | 'harmless' | 'loaded' | 'FAIL'
    seconds: float
    rss_mb: float
    detail: str = ""


class Base:
    """Tiny valid checkpoints (bytes in memory) that the cases mutate."""

    def __init__(self, tok_folder: Path | None = None):
        global FUZZ_T
        from tiny_models import TINY_T, randomize_, tiny_transformer
        from infinity_core.vae import BSQVAE

        FUZZ_T = TINY_T.with_(text_maxlen=16, name="fuzz_t")
        model = tiny_transformer(FUZZ_T, seed=3)
        self.t_sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        vae = randomize_(BSQVAE(FUZZ_VAE), seed=4)
        self.v_sd = {k: v.detach().clone().contiguous() for k, v in vae.state_dict().items()}
        self.v_sd_st = {k: v for k, v in self.v_sd.items() if k != "quantize.lfq.mask"}  # one alias only
        self.files: dict[str, bytes] = {
            "t.safetensors": st_bytes(self.t_sd),
            "t.pth": torch_bytes(self.t_sd),
            "t_train.pth": torch_bytes({"args": {"lr": 1e-4}, "epoch": 1,
                                        "trainer": {"gpt_fsdp": self.t_sd, "gpt_opt": {}}}),
            "t_legacy.pth": torch_bytes(self.t_sd, legacy=True),
            "v.safetensors": st_bytes(self.v_sd_st),
            "v.pth": torch_bytes({"vae": self.v_sd}),
            "v_legacy.pth": torch_bytes({"vae": self.v_sd}, legacy=True),
        }
        keys = list(self.t_sd)
        self.shard_keys = (keys[: len(keys) // 2], keys[len(keys) // 2:])
        self.shards = {f"model-0000{i + 1}-of-00002.safetensors": st_bytes({k: self.t_sd[k] for k in ks})
                       for i, ks in enumerate(self.shard_keys)}
        self.index = {"metadata": {}, "weight_map": {k: f"model-0000{i + 1}-of-00002.safetensors"
                                                     for i, ks in enumerate(self.shard_keys) for k in ks}}
        self.t5_folder = tok_folder

    def loader_of(self, name: str) -> str:
        return "transformer" if name.startswith(("t.", "t_", "model-", "shards")) else "vae"


def st_bytes(sd: dict, metadata: dict | None = None) -> bytes:
    from safetensors.torch import save
    return save({k: v.contiguous() for k, v in sd.items()}, metadata=metadata)


def torch_bytes(obj, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def st_split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def st_join(header, payload: bytes, raw: bytes | None = None, pad: bool = True) -> bytes:
    blob = raw if raw is not None else json.dumps(header, separators=(",", ":")).encode()
    if pad:
        blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + payload


def zip_entries(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def build_zip(entries: list[dict]) -> bytes:
    """A zip from {'name', 'data'} dicts, with overrides: 'local_name', 'method' + 'stored' (the bytes
    written), 'flags', 'ext_attr', 'offset' (a central-directory header offset), 'csize', 'usize'."""
    out, central = bytearray(), bytearray()
    for e in entries:
        name = e["name"] if isinstance(e["name"], bytes) else e["name"].encode()
        lname = e.get("local_name", name)
        lname = lname if isinstance(lname, bytes) else lname.encode()
        data = e["data"]
        stored = e.get("stored", data)
        method, flags = e.get("method", 0), e.get("flags", 0x800)
        crc = zlib.crc32(data)
        csize, usize = e.get("csize", len(stored)), e.get("usize", len(data))
        off = len(out)
        out += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, flags, method, 0, 0x21, crc, len(stored), len(data),
                           len(lname), 0) + lname + stored
        central += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 0x0314, 20, flags, method, 0, 0x21, crc, csize,
                               usize, len(name), 0, 0, 0, 0, e.get("ext_attr", 0o100644 << 16), e.get("offset", off))
        central += name
    cd = len(out)
    out += central
    out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), cd, 0)
    return bytes(out)


def _pkl_with_storages(entries: dict, proto: int = 2) -> bytes:
    """data.pkl of {name: tensor} whose storage references and tensor geometry are given explicitly:
    entries[name] = (key, storage type, storage numel, size, stride, offset)."""
    class _T:
        def __init__(self, args):
            self.args = args

        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, self.args

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage",) + obj[1:] if isinstance(obj, tuple) and obj[:1] == ("__st__",) else None

    import collections
    d = {n: _T((("__st__", st, key, "cpu", numel), off, tuple(size), tuple(stride), False, collections.OrderedDict()))
         for n, (key, st, numel, size, stride, off) in entries.items()}
    buf = io.BytesIO()
    P(buf, protocol=proto).dump(d)
    return buf.getvalue()


def _writer(files: dict, target: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        for rel, data in files.items():
            p = folder / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(data, str):
                p.write_text(data)
            elif data is None:
                p.mkdir(exist_ok=True)
            else:
                p.write_bytes(data)
        return folder / target
    return make


def _lazy(fn: Callable[[], dict], target: str) -> Callable[[Path], Path]:
    """Like _writer, with the bytes computed only when the case runs (big or costly files)."""
    def make(folder: Path) -> Path:
        return _writer(fn(), target)(folder)
    return make


# -- the generators, one per category ---------------------------------------------------------

MAIN_FILES = ("t.safetensors", "t.pth", "t_train.pth", "t_legacy.pth", "v.safetensors", "v.pth", "v_legacy.pth")
ANY_ERROR = ""


def gen_empty(b: Base, rng: random.Random) -> list[Case]:
    cases = []
    for loader in ("transformer", "vae"):
        for name in ("model.safetensors", "x.pth", "x.bin", "x.ckpt", "noext"):
            cases.append(Case("empty", f"{loader}:{name}", loader, _writer({name: b""}, name), r"empty \(0 bytes\)"))
        cases.append(Case("empty", f"{loader}:empty folder", loader, _writer({"m": None}, "m"),
                          "folder without an index file"))
    index = "model.safetensors.index.json"
    for body, what in ((b"", "empty index"), (b"{}", "index without weight_map"),
                       (b'{"weight_map": {}}', "empty weight_map"), (b"null", "null index"),
                       (b'{"weight_map": []}', "list weight_map")):
        cases.append(Case("empty", what, "transformer", _writer({f"s/{index}": body}, "s"), "corrupted shard index"))
    files = {f"s/{n}": d for n, d in b.shards.items()}
    files[f"s/{index}"] = json.dumps(b.index).encode()
    files["s/model-00002-of-00002.safetensors"] = b""
    cases.append(Case("empty", "empty shard", "transformer", _writer(files, "s"), r"empty \(0 bytes\)"))
    cases.append(Case("empty", "empty model.safetensors in folder", "vae",
                      _writer({"f/model.safetensors": b""}, "f"), r"empty \(0 bytes\)"))
    return cases


def _st_header_end(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def gen_truncated(b: Base, rng: random.Random) -> list[Case]:
    cases = []
    expect = r"truncated|corrupted|incomplete|unreadable|no end record|not a PyTorch checkpoint nor"
    for name in MAIN_FILES + ("shard",):
        data = b.files.get(name) or b.shards["model-00002-of-00002.safetensors"]
        size = len(data)
        cuts = {1, 7, 8, 9, size // 2, size - 1, size - 4}
        if name.endswith(".safetensors") or name == "shard":
            h = _st_header_end(data)
            cuts |= {h - 1, h, h + 1, h + 7}
        else:
            cuts |= {22, 30, 64, size - 22, size - 23}
        while len(cuts) < 11:
            cuts.add(rng.randrange(1, size))
        for cut in sorted(cuts):
            if name == "shard":
                files = dict({f"s/{n}": d for n, d in b.shards.items()},
                             **{"s/model.safetensors.index.json": json.dumps(b.index).encode(),
                                "s/model-00002-of-00002.safetensors": data[:cut]})
                cases.append(Case("truncated", f"shard@{cut}", "transformer", _writer(files, "s"), expect))
            else:
                cases.append(Case("truncated", f"{name}@{cut}/{size}", b.loader_of(name),
                                  _writer({name: data[:cut]}, name), expect))
    return cases


def gen_random_bytes(b: Base, rng: random.Random) -> list[Case]:
    cases = []
    prefixes = [b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x02\x8a\x0a", b"GGUF", None, b"PK\x05\x06"]
    for i in range(64):
        prefix = prefixes[i % len(prefixes)]
        n = rng.choice([1, 2, 9, 64, 500, 4096, 40000]) if i % 5 else rng.randrange(1, 200000)
        body = rng.randbytes(n)
        if prefix is None:  # a plausible safetensors length then garbage JSON
            hl = rng.randrange(1, n + 8)
            data = struct.pack("<Q", hl) + b"{" + body
        else:
            data = prefix + body
        ext = rng.choice([".safetensors", ".pth", ".bin", ".ckpt"])
        loader = rng.choice(["transformer", "vae"])
        cases.append(Case("random_bytes", f"{loader}:{prefix!r}+{n}{ext}", loader,
                          _writer({"r" + ext: data}, "r" + ext), ANY_ERROR))
    # a random-byte shard inside an otherwise valid folder
    for i in range(4):
        files = dict({f"s/{n}": d for n, d in b.shards.items()},
                     **{"s/model.safetensors.index.json": json.dumps(b.index).encode(),
                        "s/model-00001-of-00002.safetensors": rng.randbytes(rng.randrange(1, 5000))})
        cases.append(Case("random_bytes", f"random shard {i}", "transformer", _writer(files, "s"), ANY_ERROR))
    return cases


ST_LIE = (r"corrupted safetensors|truncated|implausible|safetensors header is|unsupported dtype|unexplained|"
          r"expected|has shape|has dtype|missing|not part")


def gen_header_lies(b: Base, rng: random.Random) -> list[Case]:
    cases = []

    def add(name, src, header=None, payload=None, raw=None, expect=ST_LIE, pad=True, data=None):
        orig = b.files[src]
        h0, p0 = st_split(orig)
        if data is None:
            data = st_join(header if header is not None else h0, p0 if payload is None else payload, raw=raw, pad=pad)
        cases.append(Case("header_lies", f"{src}:{name}", b.loader_of(src), _writer({src: data}, src), expect))

    for src in ("t.safetensors", "v.safetensors"):
        h0, p0 = st_split(b.files[src])
        names = [k for k in h0 if k != "__metadata__"]

        def pick():
            return rng.choice(names)

        def edit(fn):
            h = json.loads(json.dumps(h0))
            fn(h)
            return h

        def set_field(k, field, value):
            return edit(lambda h: h[k].__setitem__(field, value))

        def shift(k, i, d):
            return edit(lambda h: h[k]["data_offsets"].__setitem__(i, h[k]["data_offsets"][i] + d))

        big = [k for k in names if math.prod(h0[k]["shape"]) > 1]
        for i in range(8):  # offsets shifted
            k, d = pick(), rng.choice([1, 2, 3, 4, 8, -1, -4, 1000])
            add(f"end{d:+d}:{k}", src, shift(k, 1, d))
            k, d = pick(), rng.choice([1, 4, 8, -4])
            add(f"begin{d:+d}:{k}", src, shift(k, 0, d))
        for i in range(6):  # whole range moved: overlap or gap
            k, d = rng.choice(big), rng.choice([4, 8, 64, -4, -8])
            add(f"moved{d:+d}:{k}", src, set_field(k, "data_offsets", [o + d for o in h0[k]["data_offsets"]]))
        k = pick()
        b0, e0 = h0[k]["data_offsets"]
        add(f"reversed:{k}", src, set_field(k, "data_offsets", [e0, b0] if e0 != b0 else [8, 0]))
        for bad in (-1, 1.5, "0", None, [0], [0, 1, 2], {"a": 1}, [True, 4], [0, 2 ** 70]):
            k = pick()
            value = [bad, h0[k]["data_offsets"][1]] if type(bad) is int else bad
            add(f"offsets={bad!r}:{k}", src, set_field(k, "data_offsets", value))
        k = rng.choice(big)
        add(f"past end:{k}", src, shift(k, 1, len(p0)))
        for i in range(5):  # a dimension changed (byte span no longer matches)
            k = rng.choice(big)
            dims = h0[k]["shape"]
            j = rng.randrange(len(dims))
            d = rng.choice([1, -1, 2, 7])
            add(f"dim{j}{d:+d}:{k}", src, edit(lambda h: h[k]["shape"].__setitem__(j, max(0, h[k]["shape"][j] + d))))
        for i in range(3):  # same byte span, different shape: the model's shapes catch it
            k = rng.choice([n for n in big if len(set(h0[n]["shape"])) > 1 or len(h0[n]["shape"]) == 1])
            s = h0[k]["shape"]
            new = list(reversed(s)) if len(s) > 1 and len(set(s)) > 1 else s + [1]
            add(f"reshape {s}->{new}:{k}", src, edit(lambda h: h[k].__setitem__("shape", new)),
                expect=r"has shape|expects|expected|implies|incomplete")
        for bad in (-4, 2.0, "4", None, [[4]], [1] * 40, True, {"0": 4}):
            k = pick()
            add(f"shape={bad!r}:{k}", src, set_field(k, "shape", [bad] if type(bad) is int else bad))
        for dt in ("F16", "BF16", "F64", "I8", "U8", "BOOL", "I64", "F33", "f32", "Q4_K", 32, None, ["F32"]):
            k = rng.choice(big)
            add(f"dtype={dt!r}:{k}", src, edit(lambda h: h[k].__setitem__("dtype", dt)))
        k = rng.choice([n for n in big if h0[n]["dtype"] == "F32"])
        add(f"dtype=I32 (same size):{k}", src, edit(lambda h: h[k].__setitem__("dtype", "I32")),
            expect=r"has dtype torch\.int32 but a floating-point tensor is expected")
        for field in ("dtype", "shape", "data_offsets"):
            k = pick()
            add(f"no {field}:{k}", src, edit(lambda h: h[k].pop(field)))
        for bad in (None, 5, "x", [1, 2], [], "dtype"):
            k = pick()
            add(f"entry={bad!r}:{k}", src, edit(lambda h: h.__setitem__(k, bad)))
        for bad in ([1], "meta", 7, {"a": 1}, {"a": None}):
            add(f"__metadata__={bad!r}", src, edit(lambda h: h.__setitem__("__metadata__", bad)))
        for bad in (b"[]", b'"x"', b"42", b"null", b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000):
            add(f"header={bad[:12]!r}", src, raw=bad)
        raw = json.dumps(h0, separators=(",", ":")).encode()
        k = pick()
        member = b'"' + k.encode() + b'":' + json.dumps(h0[k], separators=(",", ":")).encode()
        add(f"duplicate name:{k}", src, raw=raw[:-1] + b"," + member + b"}", expect="appears twice")
        add("invalid utf-8", src, raw=raw.replace(b'"', b'"\xff', 1), expect="not valid JSON")
        add("integer with 5000 digits", src,
            raw=raw.replace(b'"data_offsets":[0', b'"data_offsets":[' + b"9" * 5000, 1))
        # the length field lies
        n0 = struct.unpack("<Q", b.files[src][:8])[0]
        for n in (0, 1, n0 - 1, n0 + 1, n0 + 8, len(b.files[src]), 2 ** 63, 2 ** 64 - 1):
            data = struct.pack("<Q", n) + b.files[src][8:]
            add(f"length field {n}", src, data=data)
        # tensors not packed: a gap between two tensors, bytes after the last one
        gap = rng.randrange(1, 64)
        order = sorted(names, key=lambda n: h0[n]["data_offsets"][0])
        cut_at = h0[order[len(order) // 2]]["data_offsets"][0]

        def with_gap(h):
            for n in names:
                if h[n]["data_offsets"][0] >= cut_at:
                    h[n]["data_offsets"] = [o + gap for o in h[n]["data_offsets"]]
        add(f"gap of {gap} bytes", src, edit(with_gap), payload=p0[:cut_at] + bytes(gap) + p0[cut_at:])
        for extra in (1, 8, 4096):
            add(f"{extra} trailing bytes", src, payload=p0 + rng.randbytes(extra), expect="unexplained bytes")
        # huge and bomb-like headers
        add("header over 4 MiB", src, raw=raw[:-1] + b',"__metadata__":{"pad":"' + b"x" * (4 << 20) + b'"}}',
            expect="safetensors header is")
        add("container bomb", src, raw=b'{"a":[' + b"[]," * 200000 + b"[]]}", expect="implausible")
    return cases


def gen_enormous(b: Base, rng: random.Random) -> list[Case]:
    cases = []
    T = "transformer"
    h0, p0 = st_split(b.files["t.safetensors"])
    names = [k for k in h0 if k != "__metadata__"]
    exp = (r"declares|implies|expected at most|expected 1\.\.|no data|truncated|record|could not read|not part|"
           r"has shape|overlaps")

    def add(name, loader, files, target, expect=exp):
        cases.append(Case("enormous", name, loader, _writer(files, target), expect))

    for shape in ([2 ** 20, 2 ** 20], [2 ** 40 + 1], [0, 2 ** 50], [2 ** 62, 2 ** 62], [2 ** 31, 2 ** 31, 4],
                  [1] * 20 + [2 ** 30, 2 ** 30]):
        k = rng.choice(names)
        h = json.loads(json.dumps(h0))
        b0 = h[k]["data_offsets"][0]
        h[k]["shape"] = shape
        h[k]["data_offsets"] = [b0, b0 + math.prod(shape) * 4]
        add(f"safetensors {k} {shape}", T, {"e.safetensors": st_join(h, p0)}, "e.safetensors")
    # zero-byte tensors with enormous dimensions drive the inferred config
    for key, shape in (("word_embed.weight", (10 ** 6, 0)), ("word_embed.weight", (64, 0)),
                       ("cfg_uncond", (0, 10 ** 7)), ("cfg_uncond", (10 ** 9, 0)),
                       ("block_chunks.0.module.0.ffn.fc1.weight", (10 ** 8, 0)),
                       ("block_chunks.0.module.0.sa.scale_mul_1H11", (1, 10 ** 5, 1, 0))):
        sd = dict(b.t_sd, **{key: torch.empty(shape)})
        add(f"zero-size {key} {shape}", T, {"z.safetensors": st_bytes(sd)}, "z.safetensors")
    for key, shape in (("encoder.conv_out.conv.weight", (10 ** 6, 0, 3, 3)),
                       ("encoder.conv_in.conv.weight", (10 ** 7, 3, 3, 0)),
                       ("encoder.down.1.block.0.conv1.conv.weight", (10 ** 8, 0, 3, 3))):
        sd = dict(b.v_sd_st, **{key: torch.empty(shape)})
        add(f"zero-size vae {key} {shape}", "vae", {"z.safetensors": st_bytes(sd)}, "z.safetensors")
    # key names that declare thousands of blocks / levels
    for key in ("block_chunks.0.module.999999.ffn.fc1.weight", "block_chunks.99999.module.0.ffn.fc1.weight",
                "block_chunks.0.module." + "9" * 5000 + ".x", "blocks.999999.ffn.fc1.weight"):
        add(f"key {key[:50]}", T, {"k.safetensors": st_bytes(dict(b.t_sd, **{key: torch.zeros(1)}))}, "k.safetensors")
    for key in ("encoder.down.999999.block.0.conv1.conv.weight", "encoder.down.0.block.99999.conv1.conv.weight",
                "encoder.down." + "7" * 5000 + ".block.0.conv1.conv.weight"):
        sd = dict(b.v_sd_st, **{key: torch.zeros(1, 1, 1, 1)})
        add(f"vae key {key[:50]}", "vae", {"k.safetensors": st_bytes(sd)}, "k.safetensors")
    # .pth: zero strides (an expanded tensor), meta tensors, storages that lie about their size
    for key, shape in (("word_embed.weight", (10 ** 6, 10 ** 6)), ("cfg_uncond", (2 ** 20, 128)),
                       ("block_chunks.1.module.0.ffn.fc2.weight", (64, 2 ** 30)), ("head.bias", (2 ** 40,))):
        for legacy in (False, True):
            sd = dict(b.t_sd, **{key: torch.zeros(1).expand(*shape)})
            add(f"zero strides {key} {shape}{' legacy' if legacy else ''}", T,
                {"s.pth": torch_bytes(sd, legacy)}, "s.pth")
    for shape in ((10 ** 6, 10 ** 6), (2 ** 40,), (64, 16)):
        sd = dict(b.t_sd, **{"word_embed.weight": torch.empty(shape, device="meta")})
        add(f"meta tensor {shape}", T, {"m.pth": torch_bytes(sd)}, "m.pth")
    entries = zip_entries(b.files["t.pth"])
    prefix = entries[0][0].split("/")[0]
    rec = dict(entries)
    st = torch.FloatStorage if hasattr(torch, "FloatStorage") else torch.UntypedStorage
    for numel, size, stride, off, what in (
            (10 ** 12, (4, 4), (4, 1), 0, "storage numel 10^12"), (2 ** 28, (4, 4), (4, 1), 0, "storage numel 2^28"),
            (16, (400, 4), (4, 1), 0, "size past storage"), (16, (4, 4), (4, 1), 10 ** 15, "offset past storage"),
            (16, (10 ** 6, 10 ** 6), (0, 0), 0, "zero strides, 10^12 elements"),
            (-5, (4, 4), (4, 1), 0, "negative numel"),
            (16, (-4, 4), (4, 1), 0, "negative size")):
        pkl = _pkl_with_storages({"word_embed.weight": ("0", st, numel, size, stride, off)})
        new = [{"name": n, "data": (pkl if n.endswith("/data.pkl") else d)} for n, d in entries
               if not re.search(r"/data/(?!0$)", n)]
        if f"{prefix}/data/0" in rec:
            new = [e if e["name"] != f"{prefix}/data/0" else {"name": e["name"], "data": bytes(64)} for e in new]
        add(f"lying pickle: {what}", T, {"p.pth": build_zip(new)}, "p.pth", exp + "|corrupted PyTorch checkpoint")
    return cases


def gen_wrong_dtypes(b: Base, rng: random.Random) -> list[Case]:
    cases = []
    exp = r"dtype|layout|integer buffer|not a dict of tensors|string names|plain dense"
    floats = [k for k, v in b.t_sd.items() if v.is_floating_point() and v.numel() > 1]
    vfloats = [k for k, v in b.v_sd_st.items() if v.is_floating_point() and v.numel() > 1]
    conv = {
        "int32": lambda t: t.to(torch.int32), "int8": lambda t: t.to(torch.int8), "uint8": lambda t: t.to(torch.uint8),
        "bool": lambda t: t > 0, "int64": lambda t: t.to(torch.int64), "int16": lambda t: t.to(torch.int16),
    }
    for i, (label, fn) in enumerate(sorted(conv.items()) * 2):
        for loader, sd, keys in (("transformer", b.t_sd, floats), ("vae", b.v_sd_st, vfloats)):
            k = rng.choice(keys)
            bad = dict(sd, **{k: fn(sd[k])})
            if i % 2 == 0:
                name, data = "w.safetensors", st_bytes(bad)
            else:
                name, data = "w.pth", torch_bytes(bad if loader == "transformer" else {"vae": bad})
            cases.append(Case("wrong_dtypes", f"{loader} {k} as {label}", loader, _writer({name: data}, name),
                              rf"key '{re.escape(k)}' has dtype"))
    for k in rng.sample(floats, 3):
        cases.append(Case("wrong_dtypes", f"complex {k}", "transformer",
                          _writer({"c.pth": torch_bytes(dict(b.t_sd, **{k: b.t_sd[k].to(torch.complex64)}))}, "c.pth"),
                          rf"key '{re.escape(k)}' has dtype"))
    for mask_dtype in (torch.float32, torch.bfloat16):
        sd = dict(b.v_sd_st, **{"quantizer.lfq.mask": b.v_sd_st["quantizer.lfq.mask"].to(mask_dtype)})
        cases.append(Case("wrong_dtypes", f"float mask {mask_dtype}", "vae",
                          _writer({"m.safetensors": st_bytes(sd)}, "m.safetensors"), "integer buffer"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.quantize_per_tensor(b.t_sd["head.bias"], 0.1, 0, torch.qint8)
    others = {
        "quantized": q, "sparse": b.t_sd["head.bias"].to_sparse(), "list": [1, 2], "string": "weights",
        "int": 3, "None": None, "dict": {"a": torch.zeros(1)}, "device": torch.device("cpu"),
        "set": {1, 2}, "bytes": b"abc", "complex": 1j, "dtype": torch.float32,
    }
    for label, v in others.items():
        cases.append(Case("wrong_dtypes", f"head.bias is {label}", "transformer",
                          _writer({"o.pth": torch_bytes(dict(b.t_sd, **{"head.bias": v}))}, "o.pth"), exp))
    for keyv in (1, (1, 2), 2.5, None):
        sd = dict(b.t_sd)
        sd[keyv] = torch.zeros(1)
        cases.append(Case("wrong_dtypes", f"non-string name {keyv!r}", "transformer",
                          _writer({"k.pth": torch_bytes(sd)}, "k.pth"), "string names"))
    for obj, what in (([b.t_sd["head.bias"]], "a list"), (torch.zeros(3), "a tensor"), ((1, 2), "a tuple"),
                      ("text", "a str"), (b"raw", "bytes")):
        cases.append(Case("wrong_dtypes", f"file holds {what}", "vae", _writer({"x.pth": torch_bytes(obj)}, "x.pth"),
                          "expected a dict of tensors"))
    return cases


def gen_nonfinite(b: Base, rng: random.Random) -> list[Case]:
    cases = []
    values = (float("nan"), float("inf"), float("-inf"))
    layouts = ("safetensors", "pth", "train", "legacy", "sharded")
    for i in range(40):
        loader = "transformer" if i % 5 < 3 else "vae"
        sd = b.t_sd if loader == "transformer" else b.v_sd
        keys = [k for k, v in sd.items() if v.is_floating_point() and not k.endswith("zero_k_bias")]
        k = rng.choice(keys)
        t = sd[k].clone()
        v = values[i % 3]
        if i % 7 == 0:
            t.fill_(v)
        else:
            for _ in range(rng.choice([1, 1, 3])):
                t.view(-1)[rng.randrange(t.numel())] = v
        bad = dict(sd, **{k: t})
        layout = layouts[i % len(layouts)] if loader == "transformer" else ("safetensors", "pth", "legacy")[i % 3]
        if layout == "safetensors":
            if loader == "vae":
                bad = {n: x for n, x in bad.items() if n != "quantize.lfq.mask"}
            files, target = {"n.safetensors": st_bytes(bad)}, "n.safetensors"
        elif layout == "pth":
            files, target = {"n.pth": torch_bytes(bad if loader == "transformer" else {"vae": bad})}, "n.pth"
        elif layout == "train":
            files, target = {"n.pth": torch_bytes({"trainer": {"gpt_fsdp": bad}, "epoch": 1})}, "n.pth"
        elif layout == "legacy":
            obj = bad if loader == "transformer" else {"vae": bad}
            files, target = {"n.pth": torch_bytes(obj, legacy=True)}, "n.pth"
        else:
            files = {f"s/model-0000{j + 1}-of-00002.safetensors": st_bytes({n: bad[n] for n in ks})
                     for j, ks in enumerate(b.shard_keys)}
            files["s/model.safetensors.index.json"] = json.dumps(b.index).encode()
            target = "s"
        cases.append(Case("nonfinite", f"{loader}/{layout} {k} {v}", loader, _writer(files, target),
                          rf"key '{re.escape(k)}'.*non-finite value.*(NaN|Inf)"))
    for i in range(8):  # fine in fp32, overflow when cast to fp16
        loader = "transformer" if i % 2 == 0 else "vae"
        sd = b.t_sd if loader == "transformer" else b.v_sd_st
        k = rng.choice([k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1])
        t = sd[k].clone()
        t.view(-1)[rng.randrange(t.numel())] = rng.choice([1e5, -7e4, 3e38])
        cases.append(Case("nonfinite", f"{loader} fp16 overflow {k}", loader,
                          _writer({"o.safetensors": st_bytes(dict(sd, **{k: t}))}, "o.safetensors"),
                          rf"key '{re.escape(k)}'.*overflow torch\.float16", kwargs={"dtype": "fp16"}))
    return cases


class _Call:
    """An object whose pickle calls `fn(*args)` on load."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker: str):
    import builtins
    import functools
    import operator
    import shutil as sh
    import socket
    import subprocess
    import webbrowser

    import numpy as np
    cmd = f"touch {marker}"
    out = [
        ("os.system", _Call(os.system, (cmd,))),
        ("os.popen", _Call(os.popen, (cmd,))),
        ("eval", _Call(builtins.eval, (f"__import__('os').system({cmd!r})",))),
        ("exec", _Call(builtins.exec, (f"open({marker!r}, 'w').write('x')",))),
        ("open for writing", _Call(builtins.open, (marker, "w"))),
        ("__import__", _Call(builtins.__import__, ("os",))),
        ("getattr", _Call(builtins.getattr, (Path(marker), "touch"))),
        ("subprocess.Popen", _Call(subprocess.Popen, (["touch", marker],))),
        ("subprocess.check_output", _Call(subprocess.check_output, (["touch", marker],))),
        ("shutil.rmtree", _Call(sh.rmtree, (marker + ".dir",))),
        ("os.remove", _Call(os.remove, (marker,))),
        ("socket.create_connection", _Call(socket.create_connection, (("127.0.0.1", 9),))),
        ("webbrowser.open", _Call(webbrowser.open, ("http://127.0.0.1:9/",))),
        ("functools.partial", _Call(functools.partial, (os.system, cmd))),
        ("operator.methodcaller", _Call(operator.methodcaller, ("system", cmd))),
        ("pickle.loads", _Call(pickle.loads, (pickle.dumps(_Call(os.system, (cmd,))),))),
        ("torch.load", _Call(torch.load, (marker,))),
        ("pathlib.Path.write_text", _Call(Path.write_text, (Path(marker), "x"))),
        ("numpy.save", _Call(np.save, (marker, np.zeros(2)))),
        ("numpy.load", _Call(np.load, (marker,))),
    ]
    return out


def gen_pickle_code(b: Base, rng: random.Random, marker: str) -> list[Case]:
    cases = []
    exp = r"refused for safety|not a dict of tensors|expected a dict of tensors"
    placements = (
        ("value in the state dict", "transformer", lambda p: dict(b.t_sd, payload=p)),
        ("the whole file", "vae", lambda p: p),
        ("args of a training checkpoint", "transformer", lambda p: {"args": p, "trainer": {"gpt_fsdp": b.t_sd}}),
        ("inside the vae wrapper", "vae", lambda p: {"vae": dict(b.v_sd, extra=p)}),
    )
    for label, payload in _payloads(marker):
        stubbed = label.startswith("numpy.")
        for j, legacy in enumerate((False, True)):
            for where, loader, wrap in rng.sample(placements, 2):
                if stubbed and where.startswith("args"):  # inert stand-ins: the file loads, nothing runs
                    where, loader, wrap = placements[0]
                try:
                    data = torch_bytes(wrap(payload), legacy)
                except Exception as e:  # pragma: no cover - a payload this Python cannot pickle
                    raise AssertionError(f"cannot pickle payload {label}: {e}") from e
                cases.append(Case("pickle_code", f"{label} as {where}{' (legacy)' if legacy else ''}", loader,
                                  _writer({"evil.pth": data}, "evil.pth"), exp))
    return cases


_BOMB: list = []


def _zeros_bomb() -> tuple[bytes, bytes]:
    """(16 MB of zeros, their raw deflate stream of ~16 KB), computed once."""
    if not _BOMB:
        data = bytes(16 << 20)
        _BOMB.extend((data, zlib.compress(data, 9)[2:-4]))
    return _BOMB[0], _BOMB[1]


def gen_zip_tricks(b: Base, rng: random.Random) -> list[Case]:
    cases = []
    refused = r"refused: the zip archive|corrupted PyTorch checkpoint|zip directory|data\.pkl|not a torch\.save archive"

    for src in ("t.pth", "v.pth"):
        loader = b.loader_of(src)
        entries = zip_entries(b.files[src])
        prefix = entries[0][0].split("/")[0]
        base = [{"name": n, "data": d} for n, d in entries]

        def add(name, ents, expect=refused):
            cases.append(Case("zip_tricks", f"{src}:{name}", loader, _writer({"z.pth": build_zip(ents)}, "z.pth"),
                              expect))

        def renamed(i, new):
            ents = [dict(e) for e in base]
            ents[i]["name"] = new
            ents[i]["local_name"] = new
            return ents

        pkl_i = next(i for i, e in enumerate(base) if e["name"].endswith("/data.pkl"))
        rec_i = next(i for i, e in enumerate(base) if "/data/" in e["name"])
        for i, new in ((pkl_i, f"../{prefix}/data.pkl"), (rec_i, f"{prefix}/../../etc/passwd"),
                       (rec_i, f"/{prefix}/data/0"), (pkl_i, "/etc/cron.d/x"), (rec_i, f"C:\\{prefix}\\data\\0"),
                       (rec_i, f"C:/{prefix}/data/0"), (rec_i, f"{prefix}\\data\\0"), (rec_i, f"{prefix}//data/0"),
                       (rec_i, f"{prefix}/./data/0"), (rec_i, f"{prefix}/data/0\x00.txt"), (pkl_i, ".."),
                       (rec_i, f"{prefix}/data/.."), (pkl_i, "data.pkl"), (rec_i, f"other/data/0"),
                       (rec_i, f"{prefix}/data/../data/0"), (pkl_i, f"~/{prefix}/data.pkl")):
            add(f"entry renamed {new!r}", renamed(i, new),
                r"refused: the zip archive|not a torch\.save archive|corrupted PyTorch checkpoint")
        ents = [dict(e) for e in base]
        ents.append({"name": base[pkl_i]["name"], "data": pickle.dumps(_Call(os.system, ("true",)), protocol=2)})
        add("data.pkl twice", ents, "twice")
        ents = [dict(e) for e in base]
        ents.insert(rec_i + 1, dict(base[rec_i]))
        add("record twice", ents, "twice")
        ents = [dict(e) for e in base]
        ents[rec_i]["ext_attr"] = (stat.S_IFLNK | 0o777) << 16
        add("symlink entry", ents, "symbolic link")
        ents = [dict(e) for e in base]
        ents[pkl_i].update(method=8, stored=zlib.compress(ents[pkl_i]["data"])[2:-4])
        add("deflated data.pkl", ents, "compressed")
        ents = [dict(e) for e in base]
        ents[rec_i].update(method=8, data=_zeros_bomb()[0], stored=_zeros_bomb()[1])
        add("zip bomb record (16 MB of zeros in 16 KB)", ents, "compressed")
        ents = [dict(e) for e in base]
        ents[rec_i]["flags"] = 0x801
        add("encrypted flag", ents, "encrypted")
        ents = [dict(e) for e in base]
        ents[rec_i]["local_name"] = ents[rec_i]["name"].replace("data/", "evil/")
        add("local name differs", ents, "local header")
        ents = [dict(e) for e in base]
        ents[rec_i]["csize"] = ents[rec_i]["usize"] = len(ents[rec_i]["data"]) + 100
        add("record runs into the next entry", ents, r"overlap|past the start")
        ents = [dict(e) for e in base]
        ents[-1]["csize"] = ents[-1]["usize"] = 10 ** 9
        add("last record runs past the directory", ents, "past the start of the zip directory")
        ents = [dict(e) for e in base if not e["name"].endswith("/data.pkl")]
        add("no data.pkl", ents, "no '.*data.pkl' entry")
        ents = [dict(e) for e in base]
        ents[pkl_i]["data"] = ents[pkl_i]["data"] + bytes((2 << 20) + 1)
        add("data.pkl of 2 MiB", ents, r"data\.pkl' is \d+ bytes")
        bomb = b"\x80\x02]" + b"]a" * 50_000 + b"."  # 100,003 operations (the cap is 200,000)
        ents = [dict(e, data=bomb) if i == pkl_i else dict(e) for i, e in enumerate(base)]
        add("list-bomb data.pkl (100 KB), records unused", ents, "not used by data.pkl")
        ents = [dict(e, data=bomb) if i == pkl_i else dict(e) for i, e in enumerate(base) if "/data/" not in e["name"]]
        add("list-bomb data.pkl (100 KB)", ents, "contains a list")
        ents = [dict(e, data=b"\x80\x02]" + b"]a" * 450000 + b".") if i == pkl_i else dict(e)
                for i, e in enumerate(base) if "/data/" not in e["name"]]
        add("list-bomb data.pkl (900 KB, 900k operations)", ents, "more than 200000 pickle operations")
        # the central directory points twice at one local header (overlapping entries)
        ents = [dict(e) for e in base]
        ents[rec_i]["offset"] = 0  # data.pkl's local header
        add("two directory entries, one local header", ents, r"local header|overlap")
        # end record lies
        z = bytearray(build_zip(base))
        e = z.rindex(b"PK\x05\x06")
        for label, at, value in (("directory size 5 MiB", 12, struct.pack("<I", 5 << 20)),
                                 ("zip64 markers without zip64 records", 10, b"\xff\xff"),
                                 ("directory offset past the end", 16, struct.pack("<I", 2 ** 31)),
                                 ("no end record", 0, b"PK\x00\x00")):
            zz = bytearray(z)
            zz[e + at:e + at + len(value)] = value
            cases.append(Case("zip_tricks", f"{src}:{label}", loader, _writer({"z.pth": bytes(zz)}, "z.pth"),
                              r"zip directory|zip64|corrupted|truncated"))
    return cases


def gen_structure(b: Base, rng: random.Random) -> list[Case]:
    cases = []
    T, V = "transformer", "vae"

    def add(name, loader, files, target, expect):
        cases.append(Case("structure", name, loader, _writer(files, target), expect))

    add("vae file to the transformer loader", T, {"v.safetensors": b.files["v.safetensors"]}, "v.safetensors",
        "Infinity BSQ VAE, but an Infinity transformer was expected")
    add("vae .pth to the transformer loader", T, {"v.pth": b.files["v.pth"]}, "v.pth", "was expected")
    add("transformer file to the vae loader", V, {"t.safetensors": b.files["t.safetensors"]}, "t.safetensors",
        "Infinity transformer, but an Infinity BSQ VAE was expected")
    add("training checkpoint to the vae loader", V, {"t.pth": b.files["t_train.pth"]}, "t.pth", "was expected")
    for i in range(6):
        k = rng.choice([k for k in b.t_sd if not k.endswith("zero_k_bias")])
        sd = {n: v for n, v in b.t_sd.items() if n != k}
        add(f"missing {k}", T, {"m.safetensors": st_bytes(sd)}, "m.safetensors",
            r"missing|no transformer blocks|expected")
        k = rng.choice([k for k in b.v_sd_st if not k.endswith("lfq.mask")])  # a missing mask is recomputed
        sd = {n: v for n, v in b.v_sd_st.items() if n != k}
        add(f"vae missing {k}", V, {"m.safetensors": st_bytes(sd)}, "m.safetensors",
            r"missing|could not infer|expected|cannot be built")
    for i in range(4):
        k = rng.choice(list(b.t_sd))
        sd = dict(b.t_sd)
        sd[k + ".extra"] = sd[k]
        add(f"unexpected {k}.extra", T, {"u.pth": torch_bytes(sd)}, "u.pth", "not part of the Infinity transformer")
    for i in range(6):
        loader, sd = (T, b.t_sd) if i % 2 == 0 else (V, b.v_sd_st)
        k = rng.choice([k for k, v in sd.items() if v.dim() >= 1])
        t = sd[k]
        shape = list(t.shape)
        shape[rng.randrange(len(shape))] += rng.choice([1, 2])
        bad = st_bytes(dict(sd, **{k: torch.zeros(shape)}))
        add(f"{loader} {k} resized to {shape}", loader, {"s.safetensors": bad}, "s.safetensors",
            r"has shape|expects|expected|implies|incomplete|cannot be built|divisible")
    index = "model.safetensors.index.json"
    shards = {f"s/{n}": d for n, d in b.shards.items()}
    for bad in ("../t.safetensors", "/etc/passwd", "sub/model.safetensors", "C:model.safetensors", "..", ".",
                5, None, ["a"], "", "a\\b.safetensors", "model\x00.safetensors"):
        wm = dict(b.index["weight_map"])
        wm[next(iter(wm))] = bad
        files = dict(shards, **{f"s/{index}": json.dumps({"weight_map": wm}).encode(),
                                "t.safetensors": b.files["t.safetensors"]})
        add(f"index maps a key to {bad!r}", T, files, "s", r"refused: the index maps")
    wm = dict(b.index["weight_map"])
    wm[next(iter(wm))] = "model-00009-of-00009.safetensors"
    add("index names a missing shard", T, dict(shards, **{f"s/{index}": json.dumps({"weight_map": wm}).encode()}), "s",
        "is missing")
    wm = dict(b.index["weight_map"])
    wm["not.in.any.shard"] = "model-00001-of-00002.safetensors"
    add("index maps a key the shard lacks", T, dict(shards, **{f"s/{index}": json.dumps({"weight_map": wm}).encode()}),
        "s", "does not contain")
    files = {f"s/model-0000{j + 1}-of-00002.safetensors":
             st_bytes({n: b.t_sd[n] for n in ks + [b.shard_keys[1 - j][0]]}) for j, ks in enumerate(b.shard_keys)}
    wm = {k: "model-00001-of-00002.safetensors" for k in b.shard_keys[0]}
    wm.update({k: "model-00002-of-00002.safetensors" for k in b.shard_keys[1]})
    files[f"s/{index}"] = json.dumps({"weight_map": wm}).encode()
    add("a key in two shards", T, files, "s", "appears in two shards")
    for body in (b"not json", b"[" * 100000, b'{"weight_map": 5}', b'{"weight_map": {"a": {"b": 1}}}', b"\xff\xfe"):
        add(f"index body {body[:12]!r}", T, dict(shards, **{f"s/{index}": body}), "s",
            r"corrupted shard index|refused: the index maps")
    return cases


def _flip(b: Base, rng: random.Random, category: str, n: int, sources, region) -> list[Case]:
    cases = []
    for i in range(n):
        src = sources[i % len(sources)]
        data = bytearray(b.files[src])
        lo, hi = region(data)
        positions = sorted(rng.sample(range(lo, hi), rng.choice([1, 1, 2, 3])))
        for p in positions:
            data[p] ^= (1 << rng.randrange(8)) if i % 2 else rng.randrange(1, 256)
        cases.append(Case(category, f"{src}@{positions}", b.loader_of(src), _writer({src: bytes(data)}, src), ANY_ERROR,
                          may_load="identical" if category == "flips" else "any"))
    return cases


def _zip_region(data: bytes, which: str) -> tuple[int, int]:
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        pkl = next(zi for zi in z.infolist() if zi.filename.endswith("/data.pkl"))
        if which == "directory":
            return z.start_dir, len(data)
    lo = data.index(b"\x80", pkl.header_offset + 30 + len(pkl.filename.encode()))
    return lo, lo + pkl.file_size


def _legacy_region(data: bytes) -> tuple[int, int]:
    import pickletools
    bio = io.BytesIO(bytes(data))
    for _ in range(5):
        for _op in pickletools.genops(bio):
            pass
    return 0, bio.tell()


def gen_flips(b: Base, rng: random.Random) -> list[Case]:
    """Flips in safetensors headers and zip directories: every change is caught or does not matter."""
    sts = ("t.safetensors", "v.safetensors")
    zips = ("t.pth", "t_train.pth", "v.pth")
    return (_flip(b, rng, "flips", 50, sts, lambda d: (8, _st_header_end(d)))
            + _flip(b, rng, "flips", 30, zips, lambda d: _zip_region(d, "directory")))


def gen_pickle_flips(b: Base, rng: random.Random) -> list[Case]:
    """Flips inside data.pkl and legacy pickles. A flipped pickle can be well-formed and describe other
    (valid) tensors - e.g. a view smaller than its storage - so a load is accepted here; what is tested is
    that nothing crashes, escapes as a bare exception, runs, writes, stalls or balloons."""
    zips = ("t.pth", "t_train.pth", "v.pth")
    legacy = ("t_legacy.pth", "v_legacy.pth")
    return (_flip(b, rng, "pickle_flips", 40, zips, lambda d: _zip_region(d, "pickle"))
            + _flip(b, rng, "pickle_flips", 20, legacy, _legacy_region))


def gen_t5(b: Base, rng: random.Random, marker: str) -> list[Case]:
    from safetensors.torch import load_file
    folder = b.t5_folder
    sd = load_file(folder / "model.safetensors")
    good = st_bytes(sd)
    cases = []

    def add(name, data, fname="t5.safetensors", expect=""):
        cases.append(Case("t5", name, "t5", _writer({fname: data}, fname), expect))

    add("empty", b"")
    for cut in sorted(rng.sample(range(1, len(good)), 8)) + [7, 8, _st_header_end(good) - 1]:
        add(f"truncated@{cut}", good[:cut])
    for n in (1, 100, 5000):
        add(f"random {n}", rng.randbytes(n), "t5.safetensors")
        add(f"random pth {n}", b"PK\x03\x04" + rng.randbytes(n), "t5.pth")
    h0, p0 = st_split(good)
    names = [k for k in h0 if k != "__metadata__"]
    for d in (1, -4, 8):
        h = json.loads(json.dumps(h0))
        k = rng.choice(names)
        h[k]["data_offsets"][1] += d
        add(f"offsets lie {k} {d:+d}", st_join(h, p0))
    for shape in ([2 ** 20, 2 ** 20], [2 ** 40]):
        h = json.loads(json.dumps(h0))
        k = rng.choice(names)
        h[k]["shape"] = shape
        add(f"enormous shape {shape}", st_join(h, p0))
    for dt in ("F16", "Q4"):
        h = json.loads(json.dumps(h0))
        h[rng.choice(names)]["dtype"] = dt
        add(f"dtype {dt}", st_join(h, p0))
    for label, payload in _payloads(marker)[:6]:
        add(f"pickle {label}", torch_bytes(dict(sd, payload=payload)), "t5.pth")
    add("vae file", b.files["v.safetensors"], expect="not a T5 encoder checkpoint")
    return cases


def all_cases(b: Base, marker: str, with_t5: bool = True) -> list[Case]:
    out = []
    for cat, gen in (("empty", gen_empty), ("truncated", gen_truncated), ("random_bytes", gen_random_bytes),
                     ("header_lies", gen_header_lies), ("enormous", gen_enormous), ("wrong_dtypes", gen_wrong_dtypes),
                     ("nonfinite", gen_nonfinite), ("pickle_code", None), ("zip_tricks", gen_zip_tricks),
                     ("structure", gen_structure), ("flips", gen_flips), ("pickle_flips", gen_pickle_flips),
                     ("t5", None)):
        rng = random.Random(f"{SEED}:{cat}")
        if cat == "pickle_code":
            out += gen_pickle_code(b, rng, marker)
        elif cat == "t5":
            if with_t5 and b.t5_folder is not None:
                out += gen_t5(b, rng, marker)
        else:
            out += gen(b, rng)
    return out


CATEGORIES = ("empty", "truncated", "random_bytes", "header_lies", "enormous", "wrong_dtypes", "nonfinite",
              "pickle_code", "zip_tricks", "structure", "flips", "pickle_flips", "t5")


# ---------------------------------------------------------------------------------------------
# the runner
# ---------------------------------------------------------------------------------------------

class Runner:
    """Runs cases in this process inside a sandbox of fresh, watched folders (TMPDIR, HOME, cwd)."""

    def __init__(self, root: Path, base: Base):
        self.root = root
        self.base = base
        self.cases_dir = root / "cases"
        self.watch = [root / "tmp", root / "home", root / "cwd"]
        for d in [self.cases_dir] + self.watch:
            d.mkdir(parents=True, exist_ok=True)
        self.marker = str(root / "home" / "PWNED")
        self.n = 0
        self.peak_ok = _reset_peak()
        self._t5 = None

    def load(self, case: Case, path: Path):
        if case.loader == "fn":  # harness self-test
            return case.kwargs["fn"](path)
        if case.loader == "transformer":
            return C.load_transformer(path, **case.kwargs)
        if case.loader == "vae":
            return C.load_vae(path, **case.kwargs)
        from infinity_core.text_encoder import T5TextEncoder
        return T5TextEncoder(path, tokenizer_path=self.base.t5_folder, device="cpu", dtype="fp32")

    def expected_state(self, case: Case):
        return self.base.t_sd if case.loader == "transformer" else self.base.v_sd

    def run(self, case: Case) -> Result:
        self.n += 1
        folder = self.cases_dir / f"{self.n:04d}"
        folder.mkdir()
        path = case.make(folder)
        watched = [folder] + self.watch
        before = _snapshot(watched)
        rss0 = _status_kb("VmRSS")
        self.peak_ok = _reset_peak() and self.peak_ok
        hwm0 = _status_kb("VmHWM")
        outcome, model = None, None
        _Audit.hits = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _Audit.on = True
            t0 = time.perf_counter()
            try:
                model = self.load(case, path)
            except Exception as e:  # judged below
                outcome = e
            finally:
                dt = time.perf_counter() - t0
                _Audit.on = False
        hits = list(_Audit.hits)
        peak = max(_status_kb("VmHWM"), hwm0)
        rss_mb = (peak - rss0) / 1024
        after = _snapshot(watched)
        problems = []
        if hits:
            problems.append(f"side effects: {hits[:3]}")
        if before != after:
            changed = sorted(set(before) ^ set(after) | {k for k in before if k in after and before[k] != after[k]})
            problems.append(f"files changed: {changed[:4]}")
        if os.path.exists(self.marker):
            problems.append("the payload ran (marker file exists)")
        if dt > TIME_LIMIT_S:
            problems.append(f"took {dt:.2f} s (limit {TIME_LIMIT_S} s)")
        if rss_mb > RSS_LIMIT_MB:
            problems.append(f"peak RSS grew {rss_mb:.0f} MB (limit {RSS_LIMIT_MB} MB)")
        kind = "error"
        if outcome is None:
            if case.may_load and self._same_weights(case, model):
                kind = "harmless"
            elif case.may_load == "any":
                kind = "loaded"
            else:
                problems.append("loaded without an error" + (" but with different weights" if case.may_load else ""))
        else:
            msg = str(outcome)
            wanted = CheckpointError if case.loader in ("transformer", "vae") else ValueError
            if not isinstance(outcome, wanted) or (case.loader == "t5" and type(outcome).__name__ in (
                    "UnpicklingError", "JSONDecodeError", "UnicodeDecodeError")):
                problems.append(f"raised {type(outcome).__name__}: {msg[:300]}")
            else:
                if str(path) not in msg:
                    problems.append(f"message does not name the file: {msg[:300]}")
                if case.expect and not re.search(case.expect, msg, re.S):
                    problems.append(f"message does not match {case.expect!r}: {msg[:400]}")
        del model, outcome
        shutil.rmtree(folder, ignore_errors=True)
        return Result(case, not problems, "FAIL" if problems else kind, dt, rss_mb, "; ".join(problems))

    def _same_weights(self, case: Case, model) -> bool:
        if case.loader == "t5" or model is None:
            return False
        ref = self.expected_state(case)
        got = model.state_dict()
        return all(k in got and torch.equal(got[k].to(v.dtype), v) for k, v in ref.items() if k in got) and \
            set(got) == set(ref)


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    """(runner, {category: [cases]}) inside a sandbox: $TMPDIR, $HOME (and caches) and the working
    directory point at fresh folders that must stay empty."""
    root = tmp_path_factory.mktemp("fuzz")
    want_t5 = os.environ.get("INFINITY_FUZZ_T5", "1") != "0"
    t5_folder = None
    if want_t5:
        try:
            from tiny_models import tiny_t5_folder
            t5_folder = tiny_t5_folder(root / "t5", d_model=64)
            import infinity_core.text_encoder  # noqa: F401
        except Exception:  # sentencepiece / transformers missing: T5 cases are skipped
            t5_folder = None
    base = Base(t5_folder)
    runner = Runner(root, base)
    cases: dict[str, list[Case]] = {c: [] for c in CATEGORIES}
    for case in all_cases(base, runner.marker, with_t5=t5_folder is not None):
        cases[case.category].append(case)
    _import_dynamo()
    with pytest.MonkeyPatch.context() as mp:
        for var in ("TMPDIR", "TEMP", "TMP"):
            mp.setenv(var, str(root / "tmp"))
        for var in ("HOME", "XDG_CACHE_HOME", "TORCH_HOME", "HF_HOME"):
            mp.setenv(var, str(root / "home"))
        mp.setattr(tempfile, "tempdir", None)
        mp.chdir(root / "cwd")
        _install_hook()
        _warm_up(runner, base)
        yield runner, cases
    _RESULTS.clear()


def _import_dynamo():
    """torch (2.13) computes meta-tensor arithmetic - which building a model on the meta device does -
    through Python references that import torch._dynamo on first use, and that import creates the empty
    cache folder $TMPDIR/torchinductor_$USER. This happens once per process, whatever the file; it is
    done here, before the sandbox, so that the sandbox checks what depends on the file."""
    import torch._dynamo  # noqa: F401


def _warm_up(runner: Runner, base: Base):
    """One valid load per layout outside the measured cases (imports, lazy initialisation)."""
    import codecs
    for enc in ("latin-1", "ascii", "utf-8"):  # codec modules are imported on first use (an 'exec' event)
        codecs.lookup(enc)
    for name in MAIN_FILES:
        p = runner.root / "warm" / name
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(base.files[name])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (C.load_transformer if base.loader_of(name) == "transformer" else C.load_vae)(p)
    if base.t5_folder is not None:
        from infinity_core.text_encoder import T5TextEncoder
        T5TextEncoder(base.t5_folder / "model.safetensors", tokenizer_path=base.t5_folder, device="cpu", dtype="fp32")
    shutil.rmtree(runner.root / "warm")
    gc.collect()


_RESULTS: dict[str, list[Result]] = {}


def _report(results: list[Result]) -> str:
    bad = [r for r in results if not r.ok]
    lines = [f"{len(bad)} of {len(results)} cases failed:"]
    lines += [f"  [{r.case.category}] {r.case.name} ({r.case.loader}): {r.detail}" for r in bad[:25]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------------------------

def test_base_files_load(fuzz):
    """The unmutated files load (so every failure below comes from the mutation)."""
    runner, _ = fuzz
    for name, data in runner.base.files.items():
        p = runner.root / "basecheck" / name
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(data)
        model = (C.load_transformer if runner.base.loader_of(name) == "transformer" else C.load_vae)(p)
        ref = runner.base.t_sd if name.startswith("t") else runner.base.v_sd
        assert sorted(model.state_dict()) == sorted(ref)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.items()), name
    shutil.rmtree(runner.root / "basecheck")


@pytest.mark.parametrize("category", CATEGORIES)
def test_fuzz_category(fuzz, category):
    runner, cases = fuzz
    if category == "t5" and not cases["t5"]:
        pytest.skip("T5 loader unavailable (transformers / sentencepiece missing)")
    assert cases[category], f"no cases generated for {category}"
    results = [runner.run(c) for c in cases[category]]
    _RESULTS[category] = results
    assert all(r.ok for r in results), _report(results)


def test_fuzz_totals_and_sandbox(fuzz):
    """>= 500 error cases, every limit honoured, the sandbox untouched; prints the statistics."""
    runner, cases = fuzz
    missing = [c for c in CATEGORIES if c not in _RESULTS and cases[c]]
    for c in missing:  # run standalone (e.g. `-k totals`)
        _RESULTS[c] = [runner.run(case) for case in cases[c]]
    results = [r for rs in _RESULTS.values() for r in rs]
    errors = [r for r in results if r.outcome == "error"]
    print("\n" + summary(_RESULTS, runner.peak_ok))
    assert all(r.ok for r in results), _report(results)
    assert len(errors) >= MIN_ERROR_CASES, f"only {len(errors)} error cases"
    if sys.platform.startswith("linux"):
        assert runner.peak_ok, "could not reset the peak RSS (/proc/self/clear_refs): memory growth not measured"
    elif not runner.peak_ok:
        warnings.warn("no /proc/self/clear_refs: per-case memory growth measured against the lifetime peak only")
    for d in runner.watch:
        assert not any(d.iterdir()), f"{d} is not empty: {sorted(p.name for p in d.iterdir())}"
    assert not os.path.exists(runner.marker)


def test_harness_catches_violations(fuzz, monkeypatch):
    """The runner itself: each kind of violation is reported (so a passing fuzz run means something)."""
    runner, _ = fuzz
    home = Path(os.environ["HOME"])

    def case(fn):
        return Case("selftest", fn.__name__, "fn", _writer({"x.bin": b"x"}, "x.bin"), kwargs={"fn": fn})

    def ok_error(p):
        raise CheckpointError(f"{p}: fine")

    def bare_error(p):
        raise KeyError("word_embed.weight")

    def unnamed(p):
        raise CheckpointError("no file named here")

    def loads(p):
        return None

    def balloon(p):
        x = bytearray(150 << 20)
        x[::4096] = b"\x01" * len(x[::4096])
        raise CheckpointError(f"{p}: after 150 MB")

    def writes_tmp(p):
        with open(os.path.join(tempfile.gettempdir(), "leak"), "w") as f:
            f.write("x")
        raise CheckpointError(f"{p}: after writing")

    def writes_beside(p):
        (p.parent / "extracted.pkl").write_bytes(b"x")
        raise CheckpointError(f"{p}: after writing")

    def runs_process(p):
        os.system("true")
        raise CheckpointError(f"{p}: after os.system")

    def slow(p):
        time.sleep(0.2)
        raise CheckpointError(f"{p}: slow")

    monkeypatch.setattr(sys.modules[__name__], "TIME_LIMIT_S", 0.1)
    expect = {ok_error: "", bare_error: "raised KeyError", unnamed: "does not name the file",
              loads: "loaded without an error", balloon: "peak RSS grew", writes_tmp: "side effects: .*open",
              writes_beside: "files changed", runs_process: "side effects: .*os.system", slow: "took"}
    for fn, want in expect.items():
        r = runner.run(case(fn))
        assert r.ok == (not want), (fn.__name__, r.detail)
        assert re.search(want, r.detail), (fn.__name__, r.detail)
    for d in runner.watch:  # clean up what the self-test wrote on purpose
        for p in d.iterdir():
            p.unlink()


def test_nonfinite_can_be_allowed(fuzz, tmp_path):
    """allow_nonfinite=True loads a file with NaN weights as it is."""
    runner, _ = fuzz
    sd = dict(runner.base.t_sd)
    sd["head.bias"] = sd["head.bias"].clone()
    sd["head.bias"][3] = float("nan")
    p = tmp_path / "nan.safetensors"
    save_file(sd, p)
    with pytest.raises(CheckpointError, match=r"'head.bias'.*1 non-finite value.*1 NaN, 0 Inf; first at flat index 3"):
        C.load_transformer(p)
    model = C.load_transformer(p, allow_nonfinite=True)
    assert torch.isnan(model.state_dict()["head.bias"][3])
    vsd = dict(runner.base.v_sd_st)
    vsd["decoder.conv_out.conv.bias"] = torch.full_like(vsd["decoder.conv_out.conv.bias"], float("inf"))
    save_file(vsd, tmp_path / "inf.safetensors")
    with pytest.raises(CheckpointError, match=r"decoder.conv_out.conv.bias.*3 Inf"):
        C.load_vae(tmp_path / "inf.safetensors")
    assert torch.isinf(C.load_vae(tmp_path / "inf.safetensors", allow_nonfinite=True).decoder.conv_out.conv.bias).all()


def test_stubbed_training_args_run_nothing(fuzz, tmp_path):
    """pathlib / numpy globals in a training checkpoint's args become inert stand-ins: the weights
    load and the call never happens."""
    runner, _ = fuzz
    marker = tmp_path / "written"
    for label, payload in _payloads(str(marker)):
        if not label.startswith("numpy."):
            continue
        p = tmp_path / "train.pth"
        p.write_bytes(torch_bytes({"args": payload, "trainer": {"gpt_fsdp": runner.base.t_sd}}))
        _Audit.hits = []
        _Audit.on = True
        try:
            model = C.load_transformer(p)
        finally:
            _Audit.on = False
        assert not _Audit.hits, _Audit.hits
        assert not any(tmp_path.glob("written*"))
        assert torch.equal(model.state_dict()["head.weight"], runner.base.t_sd["head.weight"])


def summary(results: dict[str, list[Result]], peak_ok: bool = True) -> str:
    def row(name, rs):
        return (f"{name:<14}{len(rs):>7}{sum(r.outcome == 'error' for r in rs):>8}"
                f"{sum(r.outcome == 'harmless' for r in rs):>10}{sum(r.outcome == 'loaded' for r in rs):>8}"
                f"{sum(not r.ok for r in rs):>8}{max((r.seconds for r in rs), default=0):>10.3f}"
                f"{max((r.rss_mb for r in rs), default=0):>10.1f}")

    lines = [f"{'category':<14}{'cases':>7}{'errors':>8}{'harmless':>10}{'loaded':>8}{'failed':>8}{'worst s':>10}"
             f"{'worst MB':>10}"]
    tot = []
    for cat, rs in results.items():
        tot += rs
        lines.append(row(cat, rs))
    lines.append(row("total", tot))
    if tot:
        slow = max(tot, key=lambda r: r.seconds)
        big = max(tot, key=lambda r: r.rss_mb)
        lines.append(f"slowest: [{slow.case.category}] {slow.case.name} {slow.seconds:.3f} s; "
                     f"largest RSS growth: [{big.case.category}] {big.case.name} {big.rss_mb:.1f} MB"
                     f"{'' if peak_ok else ' (VmHWM reset unavailable: growth not measured)'}")
    return "\n".join(lines)


def _t5_or_skip(fuzz):
    runner, _ = fuzz
    if runner.base.t5_folder is None:
        pytest.skip("T5 loader unavailable (transformers / sentencepiece missing)")
    from infinity_core.text_encoder import T5TextEncoder
    return runner.base.t5_folder, T5TextEncoder


@pytest.mark.xfail(reason="gap in infinity_core/text_encoder.py (not hardened by this change): NaN/Inf T5 "
                          "weights load silently", strict=False)
def test_t5_refuses_nonfinite_weights(fuzz, tmp_path):
    folder, T5TextEncoder = _t5_or_skip(fuzz)
    from safetensors.torch import load_file
    sd = load_file(folder / "model.safetensors")
    k = "encoder.final_layer_norm.weight"
    sd[k] = sd[k].clone()
    sd[k][0] = float("nan")
    save_file(sd, tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match="final_layer_norm"):
        T5TextEncoder(tmp_path / "nan.safetensors", tokenizer_path=folder, device="cpu", dtype="fp32")


@pytest.mark.xfail(reason="gap in infinity_core/text_encoder.py (not hardened by this change): zero-stride "
                          "tensors in a .pth are materialised when cast (a 0.3 MB file can demand any amount of "
                          "memory)", strict=False)
def test_t5_refuses_zero_stride_tensors(fuzz, tmp_path):
    folder, T5TextEncoder = _t5_or_skip(fuzz)
    from safetensors.torch import load_file
    sd = load_file(folder / "model.safetensors")
    sd["shared.weight"] = torch.zeros(1).expand(100_000, sd["shared.weight"].shape[1])  # 12.8 MB in bf16
    torch.save(sd, tmp_path / "amp.pth")
    with pytest.raises(ValueError):
        T5TextEncoder(tmp_path / "amp.pth", tokenizer_path=folder, device="cpu", dtype="bf16")
