#!/usr/bin/env python3
"""Write web/schedules.json, the frontend's copy of infinity_core/schedules.py's tables.

web/infinity.js reads it to show, live on the "Infinity Scale Schedule" node, the output size,
number of scales and token count. Regenerate after changing schedules.py:

    python scripts/gen_web_schedules.py          # write web/schedules.json
    python scripts/gen_web_schedules.py --check  # exit 1 if the file is stale

tests/test_comfy_nodes.py checks that the file equals what this script generates. Stdlib only;
schedules.py is loaded by path, so neither the package nor ComfyUI needs to be importable.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULES_PY = os.path.join(REPO, "infinity_core", "schedules.py")
OUT = os.path.join(REPO, "web", "schedules.json")


def load_schedules():
    spec = importlib.util.spec_from_file_location("_infinity_schedules_for_web", SCHEDULES_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build() -> dict:
    s = load_schedules()
    return {
        "_generated_by": "scripts/gen_web_schedules.py from infinity_core/schedules.py; do not edit",
        "patch_size": 16,
        "tiers": [{"name": name, "scales": n} for name, n in s.TIERS.items()],
        "templates": [{"h_div_w": t, "grids": [list(g) for g in s.TEMPLATES[t]]} for t in s.H_DIV_W_TEMPLATES],
    }


def render(data: dict) -> str:
    # one template per line: small, diffable
    lines = ["{",
             f'  "_generated_by": {json.dumps(data["_generated_by"])},',
             f'  "patch_size": {data["patch_size"]},',
             f'  "tiers": {json.dumps(data["tiers"])},',
             '  "templates": [']
    items = [f"    {json.dumps(t, separators=(', ', ': '))}" for t in data["templates"]]
    lines.append(",\n".join(items))
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if web/schedules.json is not up to date")
    a = p.parse_args(argv)
    text = render(build())
    if a.check:
        try:
            with open(OUT, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current != text:
            print(f"{OUT} is stale: run python scripts/gen_web_schedules.py", file=sys.stderr)
            return 1
        return 0
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(text)
    print(OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
