"""README's first command renders through scripts/render_workflow.py: run it as scripts/quickstart.sh
does (workflows/infinity_t2i_bundled.json, a real headless ComfyUI, the bundled model or, when the
trained bundle is not in the checkout, its random-weight stand-in) and check the PNG it leaves.
Plus its bad-input path, and the --prompt/--seed overrides on the API graph (no server needed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SCRIPT = REPO / "scripts" / "render_workflow.py"
WORKFLOW = "workflows/infinity_t2i_bundled.json"
TWIN = REPO / "workflows" / "api" / "infinity_t2i_bundled.json"
REAL_BUNDLE = REPO / "bundled" / "infinity_tiny_shapes" / "transformer.safetensors"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

for p in (str(TESTS), str(REPO / "scripts")):
    if p not in sys.path:
        sys.path.insert(0, p)


def _comfyui() -> tuple[str, str]:
    """(ComfyUI dir, its python), found as tests/conftest.py finds them (skip, or fail under CI=true)."""
    import conftest
    try:
        return conftest._provision_comfyui()
    except conftest._Unprovisioned as e:
        msg = f"no ComfyUI to test against: {e}"
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


def _run(args, python: str, env_extra: dict | None = None, timeout: float = 300):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("INFINITY_TEST_THREADS", "1"), **(env_extra or {})}
    env.pop("INFINITY_BUNDLED_DIR", None)  # the repository's bundle or the script's stand-in, as for a user
    return subprocess.run([python, str(SCRIPT), *args], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def _expected_size() -> tuple[int, int]:
    """(width, height) the twin's schedule node draws."""
    from infinity_core import schedules
    graph = json.loads(TWIN.read_text())
    (node,) = [n for n in graph.values() if n["class_type"] == "InfinityScaleSchedule"]
    inp = node["inputs"]
    assert inp["mode"] == "aspect ratio", inp
    w_r, h_r = (int(v) for v in inp["aspect_ratio"].split(" ")[0].split(":"))
    h, w = schedules.image_size(schedules.get_schedule(h_r / w_r, inp["tier"]))
    return w, h


def test_render_workflow_renders_the_first_workflow(tmp_path):
    from PIL import Image
    comfy_dir, python = _comfyui()
    out = tmp_path / "out"
    r = _run([WORKFLOW, "--out", str(out)], python,
             {"INFINITY_COMFYUI_DIR": comfy_dir, "INFINITY_COMFY_PYTHON": python})
    report = f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    assert r.returncode == 0, report
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 1, report
    png = pngs[0]
    assert str(png) in r.stdout.splitlines(), report  # the path is printed on a line of its own
    assert "rendered 1 image(s) in" in r.stdout, report
    stand_in = not REAL_BUNDLE.is_file()
    assert png.name.startswith("random_stand_in_") == stand_in, report
    assert ("RANDOM STAND-IN WEIGHTS" in r.stdout) == stand_in, report
    assert png.read_bytes()[:8] == PNG_MAGIC
    with Image.open(png) as im:
        im.load()  # decodes the whole file: a truncated PNG fails here
        assert im.size == _expected_size() and im.mode == "RGB"
        assert json.loads(im.info["prompt"])["3"]["inputs"]["prompt"] == \
            json.loads(TWIN.read_text())["3"]["inputs"]["prompt"]
        lo, hi = zip(*im.getextrema())
        assert max(hi) > min(lo), "a constant picture"


def test_render_workflow_names_a_missing_workflow(tmp_path):
    r = _run(["workflows/no_such_workflow.json", "--out", str(tmp_path / "out")], sys.executable, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "workflow not found: workflows/no_such_workflow.json" in r.stderr, r.stderr
    assert "workflows/infinity_t2i_bundled.json" in r.stderr  # lists what ships
    assert not (tmp_path / "out").exists()


def test_prompt_and_seed_overrides_reach_the_graph():
    import render_workflow as rw
    path, graph = rw.resolve_workflow(WORKFLOW)
    assert path == TWIN
    assert rw.set_prompt(graph, "a blue square") == ["3"]
    assert graph["3"]["inputs"]["prompt"] == "a blue square"
    assert rw.set_seed(graph, 7) == ["5"]
    assert graph["5"]["inputs"]["seed"] == 7
    assert rw.uses_bundled(graph)
    with pytest.raises(rw.UsageError, match="no node with a number 'seed'"):
        rw.set_seed({"1": {"class_type": "X", "inputs": {}}}, 1)
