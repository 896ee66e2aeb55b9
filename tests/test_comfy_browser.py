"""The real ComfyUI page in headless Chromium (tests/browser/check_workflows.mjs, playwright-core):
every shipped workflow loads with no missing node types, shows its saved widget values, converts to
the same API graph as its twin in workflows/api/, and the page logs no errors; the sampler refuses a
per-scale list of the wrong length before anything is queued; the bundled workflows (text to image,
editing) run from the page, and the reports of Infinity Text Encode and Infinity Edit show on their
nodes. Screenshots are kept in test-artifacts/browser/ (INFINITY_TEST_ARTIFACTS overrides).

Needs Debian's chromium and `npm ci` in tests/browser (scripts/setup_browser.sh does both). Without
them the test is skipped, or fails when CI=true.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


BROWSER_DIR = TESTS / "browser"
# What the page may log without it being our fault: requests to the internet that the check aborts
# (release notes, registry data), optional files this ComfyUI install lacks (404s, listed in
# httpErrors and checked to be none of ours), and a TypeError frontend 1.32.9 logs on every start with
# the tutorial marked done (also without this pack: see /work/shared/notes/comfyui-harness.md, 7).
HARMLESS = ("net::ERR_FAILED", "api.comfy.org", "Failed to fetch", "ERR_INTERNET_DISCONNECTED",
            "Failed to load resource: the server responded with a status of 404")
KNOWN_FRONTEND_ERROR = "TypeError: Cannot read properties of undefined (reading 'id')\n    at onChange"


def _require(ok: bool, msg: str):
    if ok:
        return
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        pytest.fail(msg + " (run scripts/setup_browser.sh)", pytrace=False)
    pytest.skip(msg + " (run scripts/setup_browser.sh)")


def test_workflows_in_the_real_page(infinity):
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    node = shutil.which("node")
    _require(node is not None, "Node.js is not installed")
    _require(os.path.isfile(chromium), f"no chromium at {chromium}")
    _require((BROWSER_DIR / "node_modules" / "playwright-core").is_dir(), "tests/browser/node_modules is missing")
    srv = infinity.server
    out = Path(os.environ.get("INFINITY_TEST_ARTIFACTS") or REPO / "test-artifacts") / "browser"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    source = REPO / "workflows" / "input" / "infinity_edit_source.png"  # the picture the edit workflow loads
    shutil.copy(source, Path(srv.input_dir) / source.name)
    cmd = [node, str(BROWSER_DIR / "check_workflows.mjs"), "--url", srv.url, "--workflows", str(REPO / "workflows"),
           "--api", str(REPO / "workflows" / "api"), "--out", str(out), "--chromium", chromium,
           "--run", "infinity_t2i_bundled,infinity_edit_bundled", "--validate", "infinity_2b_per_scale_cfg"]
    r = subprocess.run(cmd, cwd=BROWSER_DIR, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "NO_PROXY": "127.0.0.1,localhost"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["ok"], res.get("error")
    assert res["extensionLoaded"] and res["tableError"] is None
    assert set(res["workflows"]) == {p.stem for p in (REPO / "workflows").glob("*.json")}
    for name, wf in res["workflows"].items():
        assert wf["missing"] == [], (name, wf["missing"])
        assert wf["widgetMismatch"] == [], (name, wf["widgetMismatch"])
        assert wf["promptMatchesTwin"], (name, json.dumps(wf.get("prompt"))[:2000])
        assert wf["extensionErrors"] == {}, (name, wf["extensionErrors"])
        assert (out / f"{name}.png").is_file()
        info = wf["info"]
        types = {n["type"] for n in json.loads((REPO / "workflows" / f"{name}.json").read_text())["nodes"]}
        if "InfinityScaleSchedule" in types:
            assert "scales" in info.get("InfinityScaleSchedule", ""), info
        if "InfinitySampler" in types:
            assert "schedule:" in info.get("InfinitySampler", ""), info
    # live info: the per-scale workflow's list fits its 13 scales
    per_scale = res["workflows"]["infinity_2b_per_scale_cfg"]
    assert "cfg_list: 13 values ✓" in per_scale["info"]["InfinitySampler"], per_scale["info"]
    assert "13 scales" in per_scale["info"]["InfinitySampler"]
    # a wrong-length list is refused on the page: shown on the node, nothing sent to the server
    v = per_scale["validation"]
    assert "⚠ cfg_list has 3 values but the scale schedule has 13 scales" in v["info"], v
    assert v["queued"] is False and not v["historyGrew"] and v["queueLength"] == 0, v
    (node_id, err), = v["rejected"]["node_errors"].items()
    assert err["class_type"] == "InfinitySampler" and err["errors"][0]["extra_info"]["input_name"] == "cfg_list"
    assert "cfg_list: 13 values ✓" in v["infoAfter"]
    # the bundled workflow runs from the page, and the text encoder's report shows on its node
    bundled = res["workflows"]["infinity_t2i_bundled"]
    assert bundled["runFromPage"] == "success", bundled
    assert bundled["runOutputs"]["7"]["images"], bundled["runOutputs"]
    assert bundled["textEncodeInfo"] and "tokens" in bundled["textEncodeInfo"], bundled
    # the editing workflow runs from the page, and the k it used shows on the Infinity Edit node
    edit = res["workflows"]["infinity_edit_bundled"]
    assert edit["runFromPage"] == "success", edit
    assert edit["runOutputs"]["7"]["images"], edit["runOutputs"]
    assert (edit["editInfo"] or "").startswith("keep_scales 4 of 7 (from strength 0.50)\n"
                                               "source 256x256 -> 1:1, 256x256, tier 0.06M"), edit
    errors = [line for line in res["console"] + res["pageErrors"]
              if not any(h in line for h in HARMLESS) and not line.startswith(KNOWN_FRONTEND_ERROR)]
    # the page logs the prompt our extension refused (as it logs a server's 400): exactly that one
    refused = [e for e in errors if e.startswith("PromptExecutionError: Prompt execution failed")
               and "/extensions/ComfyUI-Infinity/infinity.js" in e]
    assert len(refused) == 1, errors
    errors = [e for e in errors if e not in refused]
    assert errors == [], errors
    ours = [e for e in res["httpErrors"] if "ComfyUI-Infinity" in e or "/object_info" in e or "/prompt" in e]
    assert ours == [], ours
    assert all(b.split("/")[2].split(":")[0] not in ("127.0.0.1", "localhost") for b in res["blocked"])
    print(f"browser check: {res['seconds']:.1f}s, screenshots in {out}")
