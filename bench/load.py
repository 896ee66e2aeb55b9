"""Load-time and peak-memory benchmark of infinity_core.checkpoint.load_transformer at the real 2B size.

    python bench/load.py [--cache-dir DIR] [--rebuild] [--dtypes keep,fp32] [--formats safetensors,pth]

1. Builds (once) a random-weight checkpoint with the real Infinity-2B shapes (2,204,564,032 parameters,
   official key names, bf16), generated tensor by tensor, in the cache folder (default
   ~/.cache/comfyui-infinity/bench, or $INFINITY_BENCH_CACHE): `infinity_2b_random.safetensors`
   (streamed by our writer) and `infinity_2b_random.pth` (torch.save of the memory-mapped tensors).
2. Loads each file through `load_transformer` in a fresh subprocess (so RSS starts clean), keeping the
   file dtype (bf16) and, for information, converting to fp32.
3. Prints load seconds, peak RSS (ru_maxrss of the child) and its ratio to the file size.
   Targets (keep dtype): safetensors <= 1.15x, .pth <= 1.6x the file size.

Note: the files are usually in the page cache after being written, so the times are warm-cache times.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TARGETS = {"safetensors": 1.15, "pth": 1.6}
NAME = "infinity_2b_random"


def _cache_dir(arg: str | None) -> Path:
    d = Path(arg or os.environ.get("INFINITY_BENCH_CACHE") or Path.home() / ".cache" / "comfyui-infinity" / "bench")
    d.mkdir(parents=True, exist_ok=True)
    return d


def build(cache: Path, rebuild: bool = False) -> dict[str, Path]:
    import torch

    from infinity_core import checkpoint as C
    from infinity_core import zoo

    cfg = zoo.TRANSFORMERS["infinity_2b"]
    shapes = C.transformer_shapes(cfg)
    st, pth = cache / f"{NAME}.safetensors", cache / f"{NAME}.pth"
    if rebuild or not st.is_file():
        print(f"building {st} ...", flush=True)
        t0 = time.time()
        g = torch.Generator().manual_seed(0)

        def items():
            for k, s in shapes.items():
                if k.endswith("zero_k_bias"):
                    yield k, torch.zeros(s, dtype=torch.bfloat16)
                else:
                    yield k, (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)

        C.write_safetensors(st, items(), {k: (torch.bfloat16, s) for k, s in shapes.items()},
                            {"format": "pt", "note": "random weights with the Infinity-2B shapes (benchmark)"})
        print(f"  {time.time() - t0:.1f} s, {st.stat().st_size / 2**30:.2f} GiB", flush=True)
    if rebuild or not pth.is_file():
        print(f"building {pth} ...", flush=True)
        t0 = time.time()
        sd = C.read_state_dict(st)  # memory-mapped
        tmp = pth.with_name(pth.name + ".tmp")
        torch.save(sd, tmp)
        os.replace(tmp, pth)
        del sd
        print(f"  {time.time() - t0:.1f} s, {pth.stat().st_size / 2**30:.2f} GiB", flush=True)
    return {"safetensors": st, "pth": pth}


def child(path: str, dtype: str) -> None:
    """Runs in a fresh interpreter: load, then print one JSON line."""
    import psutil
    import torch

    from infinity_core import checkpoint as C
    import infinity_core.transformer  # noqa: F401  (import cost not counted as load time)

    proc = psutil.Process()
    base = proc.memory_info().rss
    t0 = time.perf_counter()
    model = C.load_transformer(path, dtype=None if dtype == "keep" else dtype)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    n = sum(p.numel() for p in model.parameters())
    pbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(json.dumps({"seconds": secs, "peak_rss": peak, "base_rss": base, "rss_after": proc.memory_info().rss,
                      "params": n, "model_bytes": pbytes, "dtype": str(model.block_dtype),
                      "torch_threads": torch.get_num_threads()}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--formats", default="safetensors,pth")
    ap.add_argument("--dtypes", default="keep,fp32")
    ap.add_argument("--child", nargs=2, metavar=("PATH", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0

    files = build(_cache_dir(args.cache_dir), args.rebuild)
    rows, ok = [], True
    for fmt in args.formats.split(","):
        path = files[fmt]
        size = path.stat().st_size
        for dtype in args.dtypes.split(","):
            r = subprocess.run([sys.executable, __file__, "--child", str(path), dtype], capture_output=True, text=True)
            if r.returncode != 0:
                print(r.stderr, file=sys.stderr)
                return 1
            res = json.loads(r.stdout.strip().splitlines()[-1])
            ratio = res["peak_rss"] / size
            extra = (res["peak_rss"] - res["base_rss"]) / size
            target = TARGETS[fmt] if dtype == "keep" else None
            verdict = "" if target is None else ("PASS" if ratio <= target else "FAIL")
            ok &= verdict != "FAIL"
            rows.append((fmt, dtype, res, size, ratio, extra, target, verdict))
    print(f"\n2B random weights, {rows[0][2]['params']:,} parameters; torch threads {rows[0][2]['torch_threads']}")
    print(f"{'file':12} {'load as':8} {'file GiB':>9} {'seconds':>8} {'peak RSS GiB':>13} {'peak/file':>10} "
          f"{'(peak-base)/file':>17} {'target':>7}")
    for fmt, dtype, res, size, ratio, extra, target, verdict in rows:
        shown = "bf16 (keep)" if dtype == "keep" else dtype
        print(f"{fmt:12} {shown:8} {size / 2**30:9.2f} {res['seconds']:8.1f} {res['peak_rss'] / 2**30:13.2f} "
              f"{ratio:10.3f} {extra:17.3f} {('<= %.2f' % target) if target else 'info':>7} {verdict}")
    print(f"(base RSS after imports: {rows[0][2]['base_rss'] / 2**20:.0f} MiB)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
