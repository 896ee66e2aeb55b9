"""How close to the matmul rate generation can get on this machine: the kernels' own ceiling.

bench/generate.py reports the transformer's and the VAE decoder's effective GFLOP/s as a fraction of
the fp32 matmul rate (a 2048^3 matmul) measured beside them. This script splits the gap. It records
every FLOP-carrying kernel call that one generation makes (the linear layers' GEMMs, attention,
the VAE's convolutions) with its exact arguments (shapes, strides, scalars), then replays each call
alone on fresh random tensors of the same layout and times it. Then, in one run:

    kernel ceiling   = FLOPs / (sum of the replayed kernels' times) / matmul rate
    achieved         = FLOPs / (the real generation's time)         / matmul rate
    kernel share     = sum of the replayed kernels' times / the real generation's time

The kernel ceiling is what a generation would reach if everything between the kernels (norms,
RoPE, sampling, Python, memory traffic of the activations) cost nothing: no implementation that
calls these PyTorch kernels on these shapes can do better. Replays rotate over enough copies of
the weights (>= 128 MiB) that they stream from memory as in the real run rather than from cache.

    python bench/kernel_ceiling.py                          # layer12 256 + 512, 2B 256
    python bench/kernel_ceiling.py --cases layer12_256 --top 8
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import generate as G  # noqa: E402  (its cases, random init, FLOP formulas and matmul rate)
from infinity_core.sampler import sample  # noqa: E402

A = torch.ops.aten
# composite ops (linear, SDPA, conv2d) are recorded whole when they reach the mode undecomposed,
# as they do under inference_mode; the kernels inside a recorded call are not seen again.
KERNELS = {A.linear.default, A.addmm.default, A.mm.default, A.bmm.default, A.baddbmm.default,
           A.conv2d.default, A.convolution.default, A.scaled_dot_product_attention.default,
           A._scaled_dot_product_flash_attention_for_cpu.default}
if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
    KERNELS.add(torch.ops.mkldnn._linear_pointwise.default)
STREAM_BYTES = 128 * 2 ** 20


def _spec(a):
    if isinstance(a, torch.Tensor):
        return ("T", tuple(a.shape), tuple(a.stride()), a.dtype, a.storage_offset())
    if isinstance(a, (list, tuple)):
        return ("L" if isinstance(a, list) else "U", tuple(_spec(x) for x in a))
    return a


class Recorder(TorchDispatchMode):
    """Counts the FLOP-carrying kernel calls of everything run under it, by exact signature."""

    def __init__(self):
        super().__init__()
        self.calls = defaultdict(int)  # (op, arg specs, kwarg specs) -> count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in KERNELS:
            self.calls[(func, _spec(args), tuple(sorted((k, _spec(v)) for k, v in kwargs.items())))] += 1
        return func(*args, **kwargs)


def _make(spec):
    if isinstance(spec, tuple) and spec and spec[0] == "T":
        _, shape, stride, dtype, offset = spec
        numel = 1 + offset + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
        base = torch.randn(max(numel, 1)).to(dtype)
        return base.as_strided(shape, stride, offset)
    if isinstance(spec, tuple) and spec and spec[0] in ("L", "U"):
        items = [_make(x) for x in spec[1]]
        return items if spec[0] == "L" else tuple(items)
    return spec


def _nbytes(spec) -> int:
    if isinstance(spec, tuple) and spec and spec[0] == "T":
        return math.prod(spec[1]) * torch.empty((), dtype=spec[3]).element_size()
    if isinstance(spec, tuple) and spec and spec[0] in ("L", "U"):
        return sum(_nbytes(x) for x in spec[1])
    return 0


def replay(func, arg_specs, kwarg_specs, reps: int = 5) -> tuple[float, int]:
    """(median seconds, FLOPs) of one call on fresh tensors of the recorded layout, rotating over
    enough copies that the operands come from memory, not cache. The FLOPs are counted on the
    untimed warm-up call."""
    copies = max(1, min(8, math.ceil(STREAM_BYTES / max(1, _nbytes(arg_specs)))))
    sets = [(_make(arg_specs), {k: _make(v) for k, v in kwarg_specs}) for _ in range(copies)]
    with torch.inference_mode():
        with FlopCounterMode(display=False) as fc:
            func(*sets[0][0], **sets[0][1])  # warm-up (oneDNN primitive creation)
        times = []
        for i in range(max(reps, copies)):
            a, kw = sets[i % copies]
            t = time.perf_counter()
            func(*a, **kw)
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], fc.get_total_flops()


def ceiling(run, top: int) -> dict:
    """run: a zero-argument callable (one generation or one decode)."""
    run()  # warm-up
    rec = Recorder()
    with rec:
        run()
    t = time.perf_counter()
    run()
    actual = time.perf_counter() - t
    rows = []
    for (func, args, kwargs), n in rec.calls.items():
        s, flops = replay(func, args, kwargs)
        rows.append({"op": str(func.overloadpacket.__name__), "count": n, "seconds": n * s, "flops": n * flops,
                     "shapes": [a[1] for a in args[1] if isinstance(a, tuple) and a and a[0] == "T"]})
    kern_s, flops = sum(r["seconds"] for r in rows), sum(r["flops"] for r in rows)
    by_op = defaultdict(lambda: [0.0, 0])  # op -> [seconds, flops]
    for r in rows:
        by_op[r["op"]][0] += r["seconds"]
        by_op[r["op"]][1] += r["flops"]
    rows.sort(key=lambda r: -r["seconds"])
    return {"actual_s": actual, "kernel_s": kern_s, "flops": flops, "rows": rows[:top], "by_op": dict(by_op)}


def run_case(name: str, cfg: float, top: int) -> dict:
    model, vae, schedule, text, cu = G.build_case(name)
    res = sample(model, text, cu, schedule, cfg=cfg, tau=1.0, seed=0)
    out = {"case": name, "cfg": cfg}
    for part, fn in (("transformer", lambda: sample(model, text, cu, schedule, cfg=cfg, tau=1.0, seed=0)),
                     ("vae_decode", lambda: vae.decode(res.summed_codes))):
        r0 = G.matmul_gflops()
        with torch.inference_mode() if part == "vae_decode" else torch.no_grad():
            c = ceiling(fn, top)
        rate = (r0 + G.matmul_gflops()) / 2
        out[part] = {
            "matmul_gflops": round(rate, 1), "tflop": round(c["flops"] / 1e12, 3),
            "actual_s": round(c["actual_s"], 3), "kernels_alone_s": round(c["kernel_s"], 3),
            "achieved_frac": round(c["flops"] / c["actual_s"] / 1e9 / rate, 3),
            "kernel_ceiling_frac": round(c["flops"] / c["kernel_s"] / 1e9 / rate, 3),
            "kernel_share_of_time": round(c["kernel_s"] / c["actual_s"], 3),
            "by_op": {op: {"s": round(sec, 3), "share_of_flops": round(fl / c["flops"], 3),
                           "frac_of_matmul": round(fl / max(sec, 1e-9) / 1e9 / rate, 3)}
                      for op, (sec, fl) in c["by_op"].items()},
            "slowest_kernels": [{"op": r["op"], "calls": r["count"], "s": round(r["seconds"], 3),
                                 "frac_of_matmul": round(r["flops"] / max(r["seconds"], 1e-9) / 1e9 / rate, 3),
                                 "shapes": r["shapes"]} for r in c["rows"]],
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(G.CASES), choices=list(G.CASES))
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--top", type=int, default=5, help="slowest kernel signatures to list per part")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.cases:
        print(json.dumps(run_case(name, args.cfg, args.top)), flush=True)


if __name__ == "__main__":
    main()
