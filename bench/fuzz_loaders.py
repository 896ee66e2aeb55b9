"""Statistics of the loader fuzz test (tests/test_fuzz_loaders.py), plus probes at the input limits.

    python bench/fuzz_loaders.py [--seed N] [--no-t5] [--no-limits] [--only CATEGORY,...]

Runs every fuzz case in this process, inside the same sandbox as the test (fresh $TMPDIR, $HOME and
working directory, an audit hook on writes and processes, peak RSS via /proc/self/clear_refs), and
prints per category: cases, specific errors, harmless flips (the original weights loaded), loads
accepted for pickle flips, failures, the worst time and the worst peak-RSS growth.

--limits (default on) adds hostile files sitting just under each input cap of infinity_core.checkpoint
(the pickle operation cap, the safetensors header cap at the worst JSON density, a zip directory of
~40,000 entries, a legacy pickle at the cap): their time and memory are the worst a file can cost
before it is refused. They are reported, not judged (they must still end in a specific error).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def limit_cases(F, C):
    """Hostile files just under each cap (see the module docstring)."""
    import io
    import struct

    import torch

    cases = []
    ops = C.MAX_PICKLE_OPS - 10
    bomb = b"\x80\x02]" + b"]a" * (ops // 2) + b"."
    entries = [{"name": "archive/data.pkl", "data": bomb}, {"name": "archive/byteorder", "data": b"little"},
               {"name": "archive/version", "data": b"3\n"}]
    cases.append(F.Case("limits", f"data.pkl list bomb, {ops} operations", "transformer",
                        F._writer({"b.pth": F.build_zip(entries)}, "b.pth"), "contains a list"))
    # legacy file: five pickles, the fourth a list bomb at the cap
    buf = io.BytesIO()
    for obj in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
        buf.write(__import__("pickle").dumps(obj, protocol=2))
    buf.write(bomb)
    buf.write(__import__("pickle").dumps([], protocol=2))
    cases.append(F.Case("limits", f"legacy pickle list bomb, {ops} operations", "vae",
                        F._writer({"l.pth": buf.getvalue()}, "l.pth"), ""))
    # safetensors header just under the size cap, at the densest accepted JSON (containers and 2-char strings)
    n = C.MAX_SAFETENSORS_HEADER_BYTES - 64
    units = [b'["%09d","%09d"],' % (i, i + 1) for i in range(0, (n - 16) // 26 * 2, 2)]  # 1 list, 4 quotes / 26 B
    body = b'{"a":[' + b"".join(units) + b'[]]}'
    body += b" " * (n - len(body))
    cases.append(F.Case("limits", f"safetensors header of {len(body)} bytes", "transformer",
                        F._writer({"h.safetensors": struct.pack("<Q", len(body)) + body}, "h.safetensors"),
                        "corrupted safetensors header"))
    # a zip directory of ~40,000 entries (under the 4 MiB directory cap)
    sd = {"w": torch.zeros(4)}
    base = F.zip_entries(F.torch_bytes(sd))
    many = [{"name": n_, "data": d} for n_, d in base] + [{"name": f"archive/data/x{i}", "data": b""}
                                                          for i in range(40000)]
    cases.append(F.Case("limits", "zip with 40,000 entries", "vae", F._writer({"z.pth": F.build_zip(many)}, "z.pth"),
                        "not used by data.pkl"))
    return cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--no-t5", action="store_true", help="skip the T5 cases (saves importing transformers)")
    ap.add_argument("--no-limits", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated categories")
    args = ap.parse_args(argv)
    if args.seed is not None:
        os.environ["INFINITY_FUZZ_SEED"] = str(args.seed)

    import test_fuzz_loaders as F

    from infinity_core import checkpoint as C

    root = Path(tempfile.mkdtemp(prefix="fuzz-loaders-"))
    t5 = None
    if not args.no_t5:
        try:
            from tiny_models import tiny_t5_folder
            t5 = tiny_t5_folder(root / "t5", d_model=64)
        except Exception as e:  # pragma: no cover
            print(f"T5 cases skipped: {e}")
    base = F.Base(t5)
    runner = F.Runner(root, base)
    F._import_dynamo()  # torch's one-time cache folder, before the sandbox (see the test)
    cases = F.all_cases(base, runner.marker, with_t5=t5 is not None)
    if not args.no_limits:
        cases += limit_cases(F, C)
    only = {c for c in args.only.split(",") if c}
    if only:
        cases = [c for c in cases if c.category in only]
    old = {k: os.environ.get(k) for k in ("TMPDIR", "TEMP", "TMP", "HOME", "XDG_CACHE_HOME", "TORCH_HOME", "HF_HOME")}
    cwd = os.getcwd()
    results: dict[str, list] = {}
    t0 = time.time()
    try:
        for k in ("TMPDIR", "TEMP", "TMP"):
            os.environ[k] = str(root / "tmp")
        for k in ("HOME", "XDG_CACHE_HOME", "TORCH_HOME", "HF_HOME"):
            os.environ[k] = str(root / "home")
        tempfile.tempdir = None
        os.chdir(root / "cwd")
        F._install_hook()
        F._warm_up(runner, base)
        for case in cases:
            results.setdefault(case.category, []).append(runner.run(case))
    finally:
        os.chdir(cwd)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        tempfile.tempdir = None
    print(f"seed {F.SEED}, {sum(map(len, results.values()))} cases in {time.time() - t0:.1f} s")
    print(F.summary(results, runner.peak_ok))
    for r in results.get("limits", []):
        print(f"  limit probe: {r.case.name}: {r.seconds:.3f} s, +{r.rss_mb:.1f} MB, {r.outcome} {r.detail[:200]}")
    bad = [r for rs in results.values() for r in rs if not r.ok and r.case.category != "limits"]
    if bad:
        print(F._report(bad))
    leftovers = [p for d in runner.watch for p in d.iterdir()]
    if leftovers:
        print(f"FILES LEFT IN THE SANDBOX: {leftovers}")
    import shutil
    shutil.rmtree(root, ignore_errors=True)
    return 1 if bad or leftovers else 0


if __name__ == "__main__":
    raise SystemExit(main())
