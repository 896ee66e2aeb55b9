"""Integration tests of ComfyUI-Infinity's nodes and web extension against a real ComfyUI 0.3.75.

Everything that needs the server uses the session fixture `comfy_server` (tests/conftest.py): one
real server, started once, driven over HTTP. Nothing here mocks ComfyUI.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from fractions import Fraction

import pytest

from comfy_server import ComfyError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK = "ComfyUI-Infinity"  # the custom_nodes/ folder name conftest.py gives this repository
NODE = "InfinityScaleSchedule"
INPUTS = ["mode", "aspect_ratio", "tier", "width", "height"]


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# infinity_core/schedules.py and the generator script, loaded by path (no package install needed)
schedules = _load("_test_infinity_schedules", os.path.join(REPO, "infinity_core", "schedules.py"))
gen_web = _load("_test_gen_web_schedules", os.path.join(REPO, "scripts", "gen_web_schedules.py"))


def schedule_inputs(mode="aspect ratio", aspect_ratio="1:1 (1024x1024)", tier="1M", width=1024, height=1024):
    return {"mode": mode, "aspect_ratio": aspect_ratio, "tier": tier, "width": width, "height": height}


def preview_graph(cases: list[dict]) -> dict:
    """Per case i: schedule node "<10i+1>" and PreviewAny nodes for its three outputs."""
    g = {}
    for i, inputs in enumerate(cases):
        s = str(10 * i + 1)
        g[s] = {"class_type": NODE, "inputs": inputs}
        for k in range(3):
            g[str(10 * i + 2 + k)] = {"class_type": "PreviewAny", "inputs": {"source": [s, k]}}
    return g


def preview_results(entry: dict, n: int) -> list[dict]:
    """(schedule dict, width, height) per case from the PreviewAny texts in a history entry."""
    outs = entry["outputs"]
    res = []
    for i in range(n):
        text = [outs[str(10 * i + 2 + k)]["text"][0] for k in range(3)]
        res.append({"value": json.loads(text[0]), "width": int(text[1]), "height": int(text[2])})
    return res


def run_ok(srv, graph: dict) -> dict:
    entry = srv.run(graph, timeout=120)
    assert entry["status"]["status_str"] == "success", srv.describe_failure(entry)
    return entry


def expected(template: float, tier: str) -> dict:
    sched = schedules.get_schedule(template, tier)
    h, w = schedules.image_size(sched)
    return {"schedule": [list(s) for s in sched], "template": template, "tier": tier, "height": h, "width": w}


# ------------------------------------------------------------------------ without a server
def test_web_schedules_json_is_generated_from_schedules_py():
    with open(os.path.join(REPO, "web", "schedules.json"), encoding="utf-8") as f:
        current = f.read()
    assert current == gen_web.render(gen_web.build()), \
        "web/schedules.json is stale: run python scripts/gen_web_schedules.py"
    data = json.loads(current)
    assert [t["h_div_w"] for t in data["templates"]] == schedules.H_DIV_W_TEMPLATES
    assert {t["name"]: t["scales"] for t in data["tiers"]} == schedules.TIERS


def test_package_root_imports_without_comfyui(tmp_path):
    """ComfyUI-free tools may import the repository as a package; only WEB_DIRECTORY is defined then."""
    code = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('comfy_api') is None, 'comfy_api unexpectedly importable'\n"
        f"spec = importlib.util.spec_from_file_location('comfyui_infinity', {os.path.join(REPO, '__init__.py')!r},\n"
        f"    submodule_search_locations=[{REPO!r}])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['comfyui_infinity'] = m\n"
        "spec.loader.exec_module(m)\n"
        "assert m.WEB_DIRECTORY == './web' and not hasattr(m, 'comfy_entrypoint'), m.__all__\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------- with a server
def test_schedule_node_schema_in_object_info(comfy_server):
    info = comfy_server.node_info(NODE)
    assert info["display_name"] == "Infinity Scale Schedule"
    assert info["category"] == "Infinity"
    assert info["python_module"] == f"custom_nodes.{PACK}"
    assert len(info["description"]) > 80
    assert info["output_node"] is False

    assert info["input_order"] == {"required": INPUTS}
    req = info["input"]["required"]
    for name in INPUTS:
        assert req[name][1].get("tooltip"), f"input {name} has no tooltip"
    assert req["mode"][0] == "COMBO" and req["mode"][1]["options"] == ["aspect ratio", "width/height"]
    assert req["tier"][1]["options"] == list(schedules.TIERS)
    assert req["tier"][1]["default"] == "1M"
    for name in ("width", "height"):
        assert req[name][0] == "INT"
        assert (req[name][1]["min"], req[name][1]["max"], req[name][1]["default"]) == (16, 16384, 1024)

    labels = req["aspect_ratio"][1]["options"]
    assert req["aspect_ratio"][1]["default"] == "1:1 (1024x1024)"
    assert len(labels) == len(schedules.H_DIV_W_TEMPLATES) == 15
    for label, template in zip(labels, schedules.H_DIV_W_TEMPLATES):
        # "W:H (WxH)": an honest ratio of the template and its 1M size
        ratio, size = label.split(" ", 1)
        w_r, h_r = (int(v) for v in ratio.split(":"))
        assert Fraction(h_r, w_r) == Fraction(template).limit_denominator(10), label
        h, w = schedules.image_size(schedules.get_schedule(template, "1M"))
        assert size == f"({w}x{h})", label

    assert info["output"] == ["INFINITY_SCALE_SCHEDULE", "INT", "INT"]
    assert info["output_name"] == ["scale_schedule", "width", "height"]
    assert all(info["output_tooltips"]), info["output_tooltips"]


def test_web_extension_is_served(comfy_server):
    status, listed, _ = comfy_server.request("GET", "/extensions")
    assert status == 200
    for name in ("infinity.js", "schedule_math.js", "sampler_math.js"):
        url = f"/extensions/{PACK}/{name}"
        assert url in listed, f"{url} not in /extensions: {[u for u in listed if PACK in u]}"
        status, raw, ctype = comfy_server.get_file(url)
        assert status == 200 and "javascript" in ctype, (status, ctype)
        with open(os.path.join(REPO, "web", name), "rb") as f:
            assert raw == f.read()
    status, raw, _ = comfy_server.get_file(f"/extensions/{PACK}/schedules.json")
    assert status == 200
    with open(os.path.join(REPO, "web", "schedules.json"), encoding="utf-8") as f:
        assert json.loads(raw) == json.load(f)
    # the extension imports the frontend's app shim from this relative path
    status, _, _ = comfy_server.get_file("/scripts/app.js")
    assert status == 200


def test_models_dir_is_seen_by_comfyui(comfy_server):
    """Tests that need weights put them under comfy_server.models_dir/<folder>; ComfyUI lists them."""
    folder = os.path.join(comfy_server.models_dir, "checkpoints")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "infinity-test-placeholder.safetensors")
    open(path, "wb").close()
    try:
        assert "infinity-test-placeholder.safetensors" in comfy_server.get_json("/models/checkpoints")
    finally:
        os.remove(path)


def test_aspect_ratio_mode_runs_through_prompt_and_history(comfy_server):
    cases = [schedule_inputs(aspect_ratio="7:4 (1344x768)", tier="0.25M"),
             schedule_inputs(aspect_ratio="1:1 (1024x1024)", tier="1M"),
             schedule_inputs(aspect_ratio="1:3 (592x1776)", tier="0.06M")]
    entry = run_ok(comfy_server, preview_graph(cases))
    got = preview_results(entry, len(cases))
    for res, (template, tier) in zip(got, [(0.571, "0.25M"), (1.0, "1M"), (3.0, "0.06M")]):
        want = expected(template, tier)
        assert res["value"] == want
        assert (res["width"], res["height"]) == (want["width"], want["height"])
    assert (got[0]["width"], got[0]["height"]) == (672, 384)
    assert (got[1]["width"], got[1]["height"]) == (1024, 1024)


def test_width_height_mode_snaps_to_nearest_valid_size(comfy_server):
    sizes = [(1920, 1080), (500, 500), (600, 3000), (700, 1000), (3000, 2000)]
    cases = [schedule_inputs(mode="width/height", aspect_ratio="1:1 (1024x1024)", tier="0.06M", width=w, height=h)
             for w, h in sizes]
    got = preview_results(run_ok(comfy_server, preview_graph(cases)), len(cases))
    for (w, h), res in zip(sizes, got):
        sched, template, tier = schedules.schedule_for_size(w, h)
        assert res["value"] == expected(template, tier), (w, h)
    assert [(r["width"], r["height"], r["value"]["tier"]) for r in got[:2]] == [(1344, 768, "1M"), (512, 512, "0.25M")]


def test_web_math_matches_the_node(comfy_server, tmp_path):
    """web/schedule_math.js (what the node shows in the browser) == what the Python node outputs,
    for all 60 ratio/tier pairs and a spread of width/height requests."""
    node_bin = shutil.which("node")
    if node_bin is None:
        pytest.skip("Node.js is not installed: cannot run web/schedule_math.js")
    info = comfy_server.node_info(NODE)["input"]["required"]
    cases = [schedule_inputs(aspect_ratio=label, tier=tier)
             for label in info["aspect_ratio"][1]["options"] for tier in info["tier"][1]["options"]]
    cases += [schedule_inputs(mode="width/height", width=w, height=h)
              for w, h in [(64, 64), (256, 256), (640, 480), (1024, 576), (1080, 1920), (2048, 512),
                           (512, 2048), (1200, 1200), (900, 1600), (333, 1000), (4096, 4096), (777, 555),
                           (96, 576), (6000, 1000)]]
    absurd = [schedule_inputs(mode="width/height", width=w, height=h)
              for w, h in [(16, 16), (63, 63), (16384, 16), (16, 2048), (97, 600), (4100, 4100), (16384, 16384)]]
    got = preview_results(run_ok(comfy_server, preview_graph(cases)), len(cases))

    script = tmp_path / "compute.mjs"
    script.write_text(
        "import fs from 'node:fs';\n"
        f"import {{ computeSchedule }} from {json.dumps((os.path.join(REPO, 'web', 'schedule_math.js')))};\n"
        f"const table = JSON.parse(fs.readFileSync({json.dumps(os.path.join(REPO, 'web', 'schedules.json'))}, 'utf8'));\n"
        "const cases = JSON.parse(fs.readFileSync(0, 'utf8'));\n"
        "console.log(JSON.stringify(cases.map((c) => computeSchedule(table, c))));\n")
    r = subprocess.run([node_bin, str(script)], input=json.dumps(cases + absurd), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    js = json.loads(r.stdout)
    # sizes the node refuses as absurd: the page shows an error for exactly those
    for case, j in zip(absurd, js[len(cases):]):
        assert "error" in j, (case, j)
        entry = comfy_server.run(preview_graph([case]), timeout=60)
        assert entry["status"]["status_str"] == "error", case
        (_, data), = comfy_server.messages(entry, "execution_error")
        assert data["exception_message"].startswith("Infinity Scale Schedule: "), data["exception_message"]
    for case, res, j in zip(cases, got, js):
        v = res["value"]
        assert "error" not in j, (case, j)
        assert (j["width"], j["height"], j["tier"], j["template"]) == (v["width"], v["height"], v["tier"], v["template"]), case
        assert j["grids"] == [[h, w] for _, h, w in v["schedule"]], case
        assert j["scales"] == len(v["schedule"])
        assert j["tokens"] == schedules.token_count(v["schedule"])


def assert_server_keeps_serving(srv):
    assert srv.alive()
    good = preview_graph([schedule_inputs(mode="width/height", width=832, height=1248)])
    res = preview_results(run_ok(srv, good), 1)[0]
    assert (res["width"], res["height"]) == (832, 1248)


@pytest.mark.parametrize("bad, error_type, input_name", [
    ({"mode": "width/height", "width": 0}, "value_smaller_than_min", "width"),
    ({"mode": "width/height", "height": 10**9}, "value_bigger_than_max", "height"),
    ({"width": -5}, "value_smaller_than_min", "width"),
])
def test_out_of_range_size_is_rejected_at_queue_time(comfy_server, bad, error_type, input_name):
    graph = preview_graph([{**schedule_inputs(), **bad}])
    with pytest.raises(ComfyError) as exc:
        comfy_server.queue_prompt(graph)
    assert exc.value.status == 400
    node_errors = exc.value.response["node_errors"]
    assert list(node_errors) == ["1"], node_errors
    assert node_errors["1"]["class_type"] == NODE
    errors = node_errors["1"]["errors"]
    assert [e["type"] for e in errors] == [error_type], errors
    assert errors[0]["details"] == input_name and errors[0]["extra_info"]["input_name"] == input_name
    assert str(bad[input_name]) in errors[0]["message"]
    assert_server_keeps_serving(comfy_server)


@pytest.mark.parametrize("input_name, value", [
    ("aspect_ratio", "16:9 (1920x1080)"),
    ("tier", "4M"),
    ("mode", "megapixels"),
])
def test_unknown_choice_fails_naming_node_and_input(comfy_server, input_name, value):
    """ComfyUI 0.3.75 does not check V3 combo values at queue time, so the node refuses them when it
    runs (execution_error naming the node and the input). A ComfyUI that checks them rejects the
    prompt with HTTP 400 instead; both name the node and the input."""
    graph = preview_graph([{**schedule_inputs(), input_name: value}])
    try:
        prompt_id = comfy_server.queue_prompt(graph)["prompt_id"]
    except ComfyError as e:
        assert e.status == 400
        err = e.response["node_errors"]["1"]
        assert err["class_type"] == NODE
        assert any(x["extra_info"].get("input_name") == input_name for x in err["errors"]), err
    else:
        entry = comfy_server.wait_for_history(prompt_id, timeout=60)
        assert entry["status"]["status_str"] == "error"
        (_, data), = comfy_server.messages(entry, "execution_error")
        assert (data["node_id"], data["node_type"], data["exception_type"]) == ("1", NODE, "ValueError")
        assert data["exception_message"].startswith(f"Infinity Scale Schedule: {input_name} {value!r} is not one of")
    assert_server_keeps_serving(comfy_server)


# ------------------------------------------------------------------ every node of the pack
# node id -> (display name, category, required inputs [(name, type)], optional inputs, outputs [(name, type)])
NODE_SCHEMAS = {
    "InfinityModelLoader": ("Load Infinity Model", "Infinity",
                            [("transformer", "COMBO"), ("vae", "COMBO"), ("weight_dtype", "COMBO"),
                             ("attention", "COMBO")], [], [("model", "INFINITY_MODEL")]),
    "InfinityTextEncoderLoader": ("Load Infinity Text Encoder", "Infinity",
                                  [("text_encoder", "COMBO"), ("dtype", "COMBO")], [],
                                  [("text_encoder", "INFINITY_TEXT_ENCODER")]),
    "InfinityTextEncode": ("Infinity Text Encode", "Infinity",
                           [("text_encoder", "INFINITY_TEXT_ENCODER"), ("prompt", "STRING")], [],
                           [("conditioning", "INFINITY_CONDITIONING")]),
    "InfinityScaleSchedule": ("Infinity Scale Schedule", "Infinity",
                              [("mode", "COMBO"), ("aspect_ratio", "COMBO"), ("tier", "COMBO"), ("width", "INT"),
                               ("height", "INT")], [],
                              [("scale_schedule", "INFINITY_SCALE_SCHEDULE"), ("width", "INT"), ("height", "INT")]),
    "InfinitySampler": ("Infinity Sampler", "Infinity",
                        [("model", "INFINITY_MODEL"), ("positive", "INFINITY_CONDITIONING"),
                         ("scale_schedule", "INFINITY_SCALE_SCHEDULE"), ("seed", "INT"), ("cfg", "FLOAT"),
                         ("cfg_list", "STRING"), ("tau", "FLOAT"), ("tau_list", "STRING"), ("top_k", "INT"),
                         ("top_p", "FLOAT"), ("cfg_insertion_layer", "INT"), ("batch_size", "INT")],
                        [("negative", "INFINITY_CONDITIONING")], [("codes", "INFINITY_CODES")]),
    "InfinityEdit": ("Infinity Edit", "Infinity",
                     [("model", "INFINITY_MODEL"), ("source", "IMAGE"), ("positive", "INFINITY_CONDITIONING"),
                      ("keep_scales", "INT"), ("strength", "FLOAT"), ("seed", "INT"), ("cfg", "FLOAT"),
                      ("cfg_list", "STRING"), ("tau", "FLOAT"), ("tau_list", "STRING"), ("top_k", "INT"),
                      ("top_p", "FLOAT"), ("batch_size", "INT")],
                     [("negative", "INFINITY_CONDITIONING"), ("mask", "MASK")], [("codes", "INFINITY_CODES")]),
    "InfinityVAEDecode": ("Infinity VAE Decode", "Infinity", [("model", "INFINITY_MODEL"), ("codes", "INFINITY_CODES")],
                          [], [("IMAGE", "IMAGE")]),
    "InfinityVAEEncode": ("Infinity VAE Encode", "Infinity",
                          [("model", "INFINITY_MODEL"), ("image", "IMAGE"),
                           ("scale_schedule", "INFINITY_SCALE_SCHEDULE")], [], [("codes", "INFINITY_CODES")]),
}


def _type_of(spec) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


@pytest.mark.parametrize("node", list(NODE_SCHEMAS))
def test_every_node_in_object_info_with_its_inputs_and_outputs(comfy_server, node):
    display, category, required, optional, outputs = NODE_SCHEMAS[node]
    info = comfy_server.node_info(node)
    assert info["display_name"] == display
    assert info["category"] == category or info["category"].startswith("Infinity/")
    assert info["python_module"] == f"custom_nodes.{PACK}"
    assert len(info["description"]) > 80, info["description"]
    assert info["input_order"].get("required", []) == [n for n, _ in required]
    assert info["input_order"].get("optional", []) == [n for n, _ in optional]
    for section, declared in (("required", required), ("optional", optional)):
        for name, typ in declared:
            spec = info["input"][section][name]
            assert _type_of(spec) == typ, (name, spec)
            assert len(spec[1].get("tooltip") or "") > 20, f"input {name} of {node} has no tooltip"
    assert list(zip(info["output_name"], info["output"])) == outputs
    assert all(info["output_tooltips"]), info["output_tooltips"]
    assert info["output_node"] is False


def test_sampler_widgets(comfy_server):
    req = comfy_server.node_info("InfinitySampler")["input"]["required"]
    seed = req["seed"][1]
    assert seed["control_after_generate"] is True and (seed["min"], seed["max"]) == (0, 2**64 - 1)
    assert "seed + i" in seed["tooltip"]
    assert (req["cfg"][1]["default"], req["tau"][1]["default"]) == (3.0, 1.0)
    assert (req["top_k"][1]["default"], req["top_p"][1]["default"]) == (900, 0.97)
    assert (req["batch_size"][1]["min"], req["batch_size"][1]["max"]) == (1, 64)
    assert (req["cfg_insertion_layer"][1]["max"], req["cfg_list"][1]["default"]) == (0, "")
    vae_encode = comfy_server.node_info("InfinityVAEEncode")["input"]["required"]["image"][1]["tooltip"]
    assert "Lanczos" in vae_encode and "centre-cropped" in vae_encode


def test_loaders_list_no_bundled_model_when_it_is_absent(comfy_server):
    """This server has no stand-in bundle: the bundled choice appears only when its folder exists."""
    bundled = os.path.join(REPO, "bundled", "infinity_tiny_shapes")
    opts = comfy_server.node_info("InfinityModelLoader")["input"]["required"]["transformer"][1]["options"]
    present = os.path.isfile(os.path.join(bundled, "transformer.safetensors"))
    assert (opts[:1] == ["Infinity tiny shapes (bundled)"]) == present, opts
    assert comfy_server.node_info("InfinityModelLoader")["input"]["required"]["vae"][1]["options"][0] == "auto"


PARSE_CASES = ["3", "3, 3, 2.5", "3,3,2.5", "  4 4\t3 ", "1e1, .5, 5., -2, +3", "1_000, 2", "3,,3", "3,3,", ",3", "3, \u0663", "3 ,  , 4", "",
               " , ", "x", "3, abc", "inf", "1, nan", "-Infinity", "1__0", "1.2.3", "0x10", "1e", "½"]


def test_web_sampler_math_matches_python_parse_list(tmp_path):
    """web/sampler_math.js parses per-scale lists exactly like infinity_core.sampler.parse_list (the
    page refuses a list before queueing for the same reasons the node would)."""
    node_bin = shutil.which("node")
    if node_bin is None:
        pytest.skip("Node.js is not installed: cannot run web/sampler_math.js")
    from infinity_core.sampler import parse_list
    script = tmp_path / "parse.mjs"
    script.write_text(
        "import fs from 'node:fs';\n"
        f"import {{ parseList, samplerProblems }} from {json.dumps(os.path.join(REPO, 'web', 'sampler_math.js'))};\n"
        "const cases = JSON.parse(fs.readFileSync(0, 'utf8'));\n"
        "console.log(JSON.stringify({parsed: cases.map((c) => parseList(c, 'cfg_list')),\n"
        "  problems: samplerProblems({cfg_list: '3,3,3', tau_list: '1 1 1 1 1 1 1'}, 7)}));\n")
    r = subprocess.run([node_bin, str(script)], input=json.dumps(PARSE_CASES), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for text, js in zip(PARSE_CASES, out["parsed"]):
        try:
            want = {"values": parse_list(text, "cfg_list")}
        except ValueError as e:
            want = {"error": str(e)}
        assert js == want, (text, js, want)
    assert [p["input"] for p in out["problems"]] == ["cfg_list"]
    assert out["problems"][0]["message"].startswith("cfg_list has 3 values but the scale schedule has 7 scales")
