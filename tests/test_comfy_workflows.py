"""The shipped workflows (workflows/*.json, UI format, and their API-format twins in workflows/api/):
generated from the specs below, checked against the running server's node schemas, and run end to
end through `comfy run --wait` and through the HTTP API (POST /prompt, then /history), producing PNGs.

Workflows that name the official weights (infinity_2b_reg.pth, infinity_vae_d32reg.pth, flan-t5-xl,
infinity_8b_weights, infinity_vae_d56_f8_14_patchify.pth) run against random-weight stand-ins
placed under those names (tests/stand_ins.py): the graph and the loaders are what is tested. The
bundled-model workflows run against bundled/infinity_tiny_shapes/ when it exists, else a stand-in.
The editing workflow loads workflows/input/infinity_edit_source.png (generated here too, from the
shapes renderer of infinity_core.data); the tests copy it into ComfyUI's input folder.

Regenerate the files after changing a spec:  python tests/test_comfy_workflows.py
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

WORKFLOWS_DIR = REPO / "workflows"
API_DIR = WORKFLOWS_DIR / "api"
BUNDLED = "Infinity tiny shapes (bundled)"

# Widget order (= the node's widget inputs in schema order; checked against /object_info below), the
# socket inputs and the outputs of each node type the workflows use.
NODE_DEFS = {
    "InfinityModelLoader": {"widgets": ["transformer", "vae", "weight_dtype", "attention"], "inputs": [],
                            "outputs": [("model", "INFINITY_MODEL")]},
    "InfinityTextEncoderLoader": {"widgets": ["text_encoder", "dtype"], "inputs": [],
                                  "outputs": [("text_encoder", "INFINITY_TEXT_ENCODER")]},
    "InfinityTextEncode": {"widgets": ["prompt"], "inputs": [("text_encoder", "INFINITY_TEXT_ENCODER")],
                           "outputs": [("conditioning", "INFINITY_CONDITIONING")]},
    "InfinityScaleSchedule": {"widgets": ["mode", "aspect_ratio", "tier", "width", "height"], "inputs": [],
                              "outputs": [("scale_schedule", "INFINITY_SCALE_SCHEDULE"), ("width", "INT"),
                                          ("height", "INT")]},
    "InfinitySampler": {"widgets": ["seed", "cfg", "cfg_list", "tau", "tau_list", "top_k", "top_p",
                                    "cfg_insertion_layer", "batch_size"],
                        "control_after_generate": ["seed"],
                        "inputs": [("model", "INFINITY_MODEL"), ("positive", "INFINITY_CONDITIONING"),
                                   ("scale_schedule", "INFINITY_SCALE_SCHEDULE"),
                                   ("negative", "INFINITY_CONDITIONING")],
                        "optional": ["negative"],
                        "outputs": [("codes", "INFINITY_CODES")]},
    "InfinityEdit": {"widgets": ["keep_scales", "strength", "seed", "cfg", "cfg_list", "tau", "tau_list", "top_k",
                                 "top_p", "batch_size"],
                     "control_after_generate": ["seed"],
                     "inputs": [("model", "INFINITY_MODEL"), ("source", "IMAGE"), ("positive", "INFINITY_CONDITIONING"),
                                ("negative", "INFINITY_CONDITIONING"), ("mask", "MASK")],
                     "optional": ["negative", "mask"],
                     "outputs": [("codes", "INFINITY_CODES")]},
    "InfinityVAEDecode": {"widgets": [], "inputs": [("model", "INFINITY_MODEL"), ("codes", "INFINITY_CODES")],
                          "outputs": [("IMAGE", "IMAGE")]},
    "SaveImage": {"widgets": ["filename_prefix"], "inputs": [("images", "IMAGE")], "outputs": []},
    # the page saves the value of Load Image's upload button after the file name
    "LoadImage": {"widgets": ["image"], "ui_extra_values": ["image"], "inputs": [],
                  "outputs": [("IMAGE", "IMAGE"), ("MASK", "MASK")]},
}

CFG_LIST_1M = "4, 4, 4, 4, 4, 3.5, 3.5, 3, 3, 3, 2, 1.5, 1"  # 13 scales: strong for layout, weak for detail


def _t2i(name, title, note, loader, text_encoder, prompt, schedule, sampler, prefix):
    """A text-to-image graph: loaders -> encode -> schedule -> sampler -> decode -> SaveImage."""
    return {
        "name": name, "title": title, "note": note,
        "nodes": {
            1: ("InfinityModelLoader", "Load Infinity Model", loader),
            2: ("InfinityTextEncoderLoader", "Load Infinity Text Encoder", text_encoder),
            3: ("InfinityTextEncode", "Prompt", {"prompt": prompt}),
            4: ("InfinityScaleSchedule", "Infinity Scale Schedule", schedule),
            5: ("InfinitySampler", "Infinity Sampler", sampler),
            6: ("InfinityVAEDecode", "Infinity VAE Decode", {}),
            7: ("SaveImage", "Save Image", {"filename_prefix": prefix}),
        },
        # (from node, from slot, to node, to input name)
        "links": [(2, 0, 3, "text_encoder"), (1, 0, 5, "model"), (3, 0, 5, "positive"), (4, 0, 5, "scale_schedule"),
                  (1, 0, 6, "model"), (5, 0, 6, "codes"), (6, 0, 7, "images")],
    }


def _sampler(seed, cfg=3.0, tau=1.0, cfg_list="", tau_list=""):
    return {"seed": seed, "cfg": cfg, "cfg_list": cfg_list, "tau": tau, "tau_list": tau_list, "top_k": 900,
            "top_p": 0.97, "cfg_insertion_layer": 0, "batch_size": 1}


def _schedule(aspect="1:1 (1024x1024)", tier="1M", width=1024, height=1024):
    return {"mode": "aspect ratio", "aspect_ratio": aspect, "tier": tier, "width": width, "height": height}


def _edit(name, title, note, loader, text_encoder, prompt, source: Path, settings, prefix):
    """An editing graph: loaders -> encode (the new prompt); Load Image (the source) -> Infinity Edit ->
    decode -> SaveImage. `source` is put into ComfyUI's input folder by the tests."""
    return {
        "name": name, "title": title, "note": note, "source": source,
        "nodes": {
            1: ("InfinityModelLoader", "Load Infinity Model", loader),
            2: ("InfinityTextEncoderLoader", "Load Infinity Text Encoder", text_encoder),
            3: ("InfinityTextEncode", "New prompt", {"prompt": prompt}),
            4: ("LoadImage", "Load Image (the picture to edit)", {"image": source.name}),
            5: ("InfinityEdit", "Infinity Edit", settings),
            6: ("InfinityVAEDecode", "Infinity VAE Decode", {}),
            7: ("SaveImage", "Save Image", {"filename_prefix": prefix}),
        },
        "links": [(2, 0, 3, "text_encoder"), (1, 0, 5, "model"), (4, 0, 5, "source"), (3, 0, 5, "positive"),
                  (1, 0, 6, "model"), (5, 0, 6, "codes"), (6, 0, 7, "images")],
        # layout (node id or 8, the note): Load Image and its preview above the prompt, the note below
        # the text encoder loader
        "positions": {3: (440, 430), 8: (40, 480)},
        "sizes": {3: (380, 180), 4: (380, 340), 5: (360, 560), 8: (380, 200)},
    }


def _edit_settings(seed, keep_scales=-1, strength=0.5, cfg=3.0, tau=1.0):
    sampler = _sampler(seed, cfg=cfg, tau=tau)
    del sampler["cfg_insertion_layer"]
    return {"keep_scales": keep_scales, "strength": strength, **sampler}


# The picture the editing workflow loads: "a large red circle on the left, blue background", drawn by
# the shapes renderer the bundled model was trained on (nominal scene, no jitter).
EDIT_SOURCE = WORKFLOWS_DIR / "input" / "infinity_edit_source.png"


def edit_source_pixels():
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from infinity_core.data import Scene, ShapeObject, render_scene
    return render_scene(Scene("blue", (ShapeObject("circle", "red", "large", "left"),)), 256, 256)


LOADER_2B = {"transformer": "infinity_2b_reg.pth", "vae": "infinity_vae_d32reg.pth", "weight_dtype": "auto",
             "attention": "auto"}
LOADER_8B = {"transformer": "infinity_8b_weights", "vae": "infinity_vae_d56_f8_14_patchify.pth",
             "weight_dtype": "auto", "attention": "auto"}
T5 = {"text_encoder": "flan-t5-xl", "dtype": "auto"}
WEIGHTS_2B = ("Weights: ComfyUI/models/infinity/infinity_2b_reg.pth, ComfyUI/models/vae/infinity_vae_d32reg.pth, "
              "ComfyUI/models/text_encoders/flan-t5-xl/ (the google/flan-t5-xl folder). See docs/nodes.md.")

SPECS = [
    # The sampler values, the tier and the aspect ratio are bundled/infinity_tiny_shapes/defaults.json's
    # (test_bundled_workflow_uses_the_bundled_defaults checks them); after retraining the bundle, set
    # them again and regenerate the files (python tests/test_comfy_workflows.py).
    _t2i("infinity_t2i_bundled", "Infinity: text to image (bundled tiny-shapes model)",
         "Text to image with the small model shipped in this node pack (bundled/infinity_tiny_shapes): it draws "
         "simple coloured shapes, at 256x256, fast even on a CPU. Nothing to download.",
         {"transformer": BUNDLED, "vae": "auto", "weight_dtype": "auto", "attention": "auto"},
         {"text_encoder": BUNDLED, "dtype": "auto"},
         "a small red circle on the left, blue background",
         _schedule(tier="0.06M"), _sampler(42, cfg=2.0, tau=0.5), "Infinity/t2i_bundled"),
    _t2i("infinity_2b_t2i_1024", "Infinity 2B: text to image, 1024x1024",
         "Infinity 2B at 1024x1024 (13 scales) with the official settings of its notebook (cfg 3, tau 0.5). "
         + WEIGHTS_2B,
         LOADER_2B, T5, "a photo of a red fox sitting in fresh snow at sunrise, detailed fur, soft golden light",
         _schedule(), _sampler(1, cfg=3.0, tau=0.5), "Infinity/2b_1024"),
    _t2i("infinity_2b_wide", "Infinity 2B: wide 7:4 (1344x768)",
         "Infinity 2B at the wide 7:4 template (1344x768, the template nearest 16:9). Other ratios: change "
         "aspect_ratio, or switch mode to width/height and type any size. " + WEIGHTS_2B,
         LOADER_2B, T5, "a panoramic view of a mountain lake at dusk, pine forest, mist over the water, cinematic",
         _schedule(aspect="7:4 (1344x768)", width=1344, height=768), _sampler(7, cfg=3.0, tau=0.5),
         "Infinity/2b_wide"),
    _t2i("infinity_2b_per_scale_cfg", "Infinity 2B: per-scale CFG",
         "Per-scale guidance: cfg_list gives one cfg per scale, coarse to fine (13 values at the 1M tier): strong "
         "guidance while the layout forms, weaker for the fine details. Its length must match the schedule's "
         "number of scales (the sampler node shows it). " + WEIGHTS_2B,
         LOADER_2B, T5, "an oil painting of a lighthouse on a cliff during a storm, dramatic waves",
         _schedule(), _sampler(3, cfg=3.0, tau=0.5, cfg_list=CFG_LIST_1M), "Infinity/2b_per_scale_cfg"),
    _t2i("infinity_8b_t2i_1024", "Infinity 8B: text to image, 1024x1024",
         "Infinity 8B at 1024x1024 (cfg 3, tau 1 as in its notebook). Weights: the whole infinity_8b_weights "
         "folder (shards + model.safetensors.index.json) in ComfyUI/models/infinity/, "
         "ComfyUI/models/vae/infinity_vae_d56_f8_14_patchify.pth, ComfyUI/models/text_encoders/flan-t5-xl/. "
         "Needs about 40 GB of GPU memory in bf16.",
         LOADER_8B, T5, "a cozy reading nook with a cat asleep on a pile of books, warm afternoon light",
         _schedule(), _sampler(5, cfg=3.0, tau=1.0), "Infinity/8b_1024"),
    # As for the first workflow: the bundle's defaults.json. strength 0.5 (k 4 of 7) until the
    # recolouring study (bench/edit_study.py) finds a k that meets both of its targets.
    _edit("infinity_edit_bundled", "Infinity: edit a picture (bundled tiny-shapes model)",
          "Editing without training: Infinity Edit encodes the picture into per-scale bits, keeps the coarse scales "
          "(layout, colour masses) and re-draws the finer ones under the new prompt. keep_scales -1 takes the number "
          "of kept scales from strength (the node shows the k it used); connect a MASK (e.g. painted in Load "
          "Image's mask editor) to re-draw only that region. The example picture is workflows/input/"
          "infinity_edit_source.png of this node pack: copy it into ComfyUI/input/, or pick any picture.",
          {"transformer": BUNDLED, "vae": "auto", "weight_dtype": "auto", "attention": "auto"},
          {"text_encoder": BUNDLED, "dtype": "auto"},
          "a large green circle on the left, blue background", EDIT_SOURCE,
          _edit_settings(42, keep_scales=-1, strength=0.5, cfg=2.0, tau=0.5), "Infinity/edit_bundled"),
]

COLUMNS = {1: (40, 60), 2: (40, 330), 3: (440, 330), 4: (440, 60), 5: (860, 60), 6: (1260, 60), 7: (1260, 220),
           8: (40, 560)}
SIZES = {1: (360, 180), 2: (360, 110), 3: (380, 200), 4: (380, 230), 5: (360, 400), 6: (260, 70), 7: (420, 460),
         8: (780, 120)}


def api_workflow(spec: dict) -> dict:
    """The API-format graph ComfyUI's "Export (API)" gives for this workflow."""
    out = {}
    for nid, (ctype, title, values) in spec["nodes"].items():
        d = NODE_DEFS[ctype]
        inputs = {w: values[w] for w in d["widgets"]}
        for (src, slot, dst, name) in spec["links"]:
            if dst == nid:
                inputs[name] = [str(src), slot]
        order = [w for w in d["widgets"]] + [n for n, _ in d["inputs"]]
        out[str(nid)] = {"inputs": {k: inputs[k] for k in order if k in inputs}, "class_type": ctype,
                         "_meta": {"title": title}}
    return out


def ui_workflow(spec: dict) -> dict:
    """The litegraph (UI) format the ComfyUI page saves and loads."""
    links, nodes = [], []
    link_id = {}
    for i, (src, slot, dst, name) in enumerate(spec["links"], start=1):
        link_id[(src, slot, dst, name)] = i
    for order, (nid, (ctype, title, values)) in enumerate(spec["nodes"].items()):
        d = NODE_DEFS[ctype]
        inputs = []
        for name, typ in d["inputs"]:
            lid = next((link_id[k] for k in link_id if k[2] == nid and k[3] == name), None)
            entry = {"name": name, "type": typ, "link": lid}
            if name in d.get("optional", []):
                entry["shape"] = 7
            inputs.append(entry)
        outputs = []
        for slot, (name, typ) in enumerate(d["outputs"]):
            outs = [link_id[k] for k in link_id if k[0] == nid and k[1] == slot]
            outputs.append({"name": name, "type": typ, "links": outs, "slot_index": slot})
        widgets_values = []
        for w in d["widgets"]:
            widgets_values.append(values[w])
            if w in d.get("control_after_generate", []):
                widgets_values.append("fixed")
        widgets_values += d.get("ui_extra_values", [])
        pos, size = spec.get("positions", {}).get(nid, COLUMNS[nid]), spec.get("sizes", {}).get(nid, SIZES[nid])
        nodes.append({"id": nid, "type": ctype, "pos": list(pos), "size": list(size), "flags": {},
                      "order": order, "mode": 0, "inputs": inputs, "outputs": outputs, "title": title,
                      "properties": {"Node name for S&R": ctype}, "widgets_values": widgets_values})
    for (src, slot, dst, name), lid in link_id.items():
        d_src, d_dst = NODE_DEFS[spec["nodes"][src][0]], NODE_DEFS[spec["nodes"][dst][0]]
        dst_slot = [n for n, _ in d_dst["inputs"]].index(name)
        links.append([lid, src, slot, dst, dst_slot, d_src["outputs"][slot][1]])
    note_id = max(spec["nodes"]) + 1
    pos, size = spec.get("positions", {}).get(8, COLUMNS[8]), spec.get("sizes", {}).get(8, SIZES[8])
    nodes.append({"id": note_id, "type": "Note", "pos": list(pos), "size": list(size), "flags": {},
                  "order": len(nodes), "mode": 0, "inputs": [], "outputs": [], "title": spec["title"],
                  "properties": {}, "widgets_values": [spec["note"]], "color": "#432", "bgcolor": "#653"})
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "comfyui-infinity/" + spec["name"])), "revision": 0,
            "last_node_id": note_id, "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def render(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def expected_files() -> dict[Path, str]:
    files = {}
    for spec in SPECS:
        files[WORKFLOWS_DIR / f"{spec['name']}.json"] = render(ui_workflow(spec))
        files[API_DIR / f"{spec['name']}.json"] = render(api_workflow(spec))
    return files


def write_files() -> None:
    from PIL import Image
    API_DIR.mkdir(parents=True, exist_ok=True)
    for path, text in expected_files().items():
        path.write_text(text, encoding="utf-8")
        print(path.relative_to(REPO))
    EDIT_SOURCE.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(edit_source_pixels()).save(EDIT_SOURCE, optimize=True)
    print(EDIT_SOURCE.relative_to(REPO))


# ------------------------------------------------------------------------ without a server
def test_shipped_workflows_are_generated_from_the_specs():
    files = expected_files()
    stale = [str(p.relative_to(REPO)) for p, text in files.items()
             if not p.is_file() or p.read_text(encoding="utf-8") != text]
    assert not stale, f"stale or missing workflow files {stale}: run python tests/test_comfy_workflows.py"
    shipped = {p for p in WORKFLOWS_DIR.glob("*.json")} | {p for p in API_DIR.glob("*.json")}
    assert shipped == set(files), f"unexpected workflow files: {sorted(map(str, shipped - set(files)))}"


def test_edit_source_picture_is_the_rendered_scene():
    import numpy as np
    from PIL import Image
    assert EDIT_SOURCE.is_file(), f"{EDIT_SOURCE} is missing: run python tests/test_comfy_workflows.py"
    with Image.open(EDIT_SOURCE) as pic:
        assert pic.mode == "RGB" and np.array_equal(np.asarray(pic), edit_source_pixels()), \
            f"{EDIT_SOURCE} is stale: run python tests/test_comfy_workflows.py"


def test_workflows_name_the_official_files():
    by_name = {s["name"]: api_workflow(s) for s in SPECS}
    loaders = {n: g["1"]["inputs"] for n, g in by_name.items()}
    assert loaders["infinity_t2i_bundled"]["transformer"] == BUNDLED
    assert loaders["infinity_edit_bundled"]["transformer"] == BUNDLED
    assert by_name["infinity_edit_bundled"]["4"]["inputs"]["image"] == EDIT_SOURCE.name
    for n in ("infinity_2b_t2i_1024", "infinity_2b_wide", "infinity_2b_per_scale_cfg"):
        assert (loaders[n]["transformer"], loaders[n]["vae"]) == ("infinity_2b_reg.pth", "infinity_vae_d32reg.pth")
        assert by_name[n]["2"]["inputs"]["text_encoder"] == "flan-t5-xl"
    assert (loaders["infinity_8b_t2i_1024"]["transformer"], loaders["infinity_8b_t2i_1024"]["vae"]) == \
        ("infinity_8b_weights", "infinity_vae_d56_f8_14_patchify.pth")
    per_scale = by_name["infinity_2b_per_scale_cfg"]
    assert per_scale["4"]["inputs"]["tier"] == "1M" and len(per_scale["5"]["inputs"]["cfg_list"].split(",")) == 13


def test_bundled_workflow_uses_the_bundled_defaults():
    """Once bundled/infinity_tiny_shapes/ exists, the first workflow's sampler uses its defaults.json."""
    defaults = REPO / "bundled" / "infinity_tiny_shapes" / "defaults.json"
    if not defaults.is_file():
        pytest.skip("bundled/infinity_tiny_shapes/defaults.json does not exist yet")
    want = json.loads(defaults.read_text())
    for spec in SPECS:
        if spec["nodes"][1][2]["transformer"] == BUNDLED:  # the sampler or the edit node
            settings = api_workflow(spec)["5"]["inputs"]
            for key in ("cfg", "tau", "top_k", "top_p"):
                if key in want:
                    assert settings[key] == want[key], (spec["name"], key, settings[key], want[key])
    graph = api_workflow(SPECS[0])
    schedule = graph["4"]["inputs"]
    if "tier" in want:
        assert schedule["tier"] == want["tier"]
    if "h_div_w" in want:
        from fractions import Fraction
        w_r, h_r = (int(v) for v in schedule["aspect_ratio"].split(" ")[0].split(":"))
        assert Fraction(h_r, w_r) == Fraction(float(want["h_div_w"])).limit_denominator(10)


# --------------------------------------------------------------------------- with a server
def test_widget_order_matches_the_server(infinity):
    """The UI files store widget values by position: the order must be the server's input order."""
    info = infinity.server.node_info()
    for ctype, d in NODE_DEFS.items():
        schema = info[ctype]
        order = schema["input_order"].get("required", []) + schema["input_order"].get("optional", [])
        spec = {**schema["input"].get("required", {}), **schema["input"].get("optional", {})}
        sockets = [n for n in order if not _is_widget(spec[n])]
        widgets = [n for n in order if _is_widget(spec[n])]
        assert widgets == d["widgets"], (ctype, widgets)
        assert sockets == [n for n, _ in d["inputs"]], (ctype, sockets)
        assert list(zip(schema["output_name"], schema["output"])) == d["outputs"], ctype
        for w in d.get("control_after_generate", []):
            assert spec[w][1].get("control_after_generate"), (ctype, w)


def _is_widget(spec) -> bool:
    typ = spec[0]
    return isinstance(typ, list) or typ in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def comfy_cli() -> str:
    """comfy-cli: $INFINITY_COMFY_CLI, else where `scripts/setup_comfyui.sh --with-cli` puts it, else PATH."""
    home = Path(os.environ.get("INFINITY_COMFY_HOME") or Path.home() / ".cache" / "comfyui-infinity")
    candidates = [os.environ.get("INFINITY_COMFY_CLI"),
                  os.path.join(os.environ.get("INFINITY_COMFY_CLI_VENV") or home / "comfycli", "bin", "comfy")]
    env_file = home / "venv" / "comfyui-infinity.env"
    if env_file.is_file():
        for line in env_file.read_text().splitlines():
            if line.startswith("INFINITY_COMFY_CLI="):
                candidates.append(line.split("=", 1)[1].strip())
    candidates.append(shutil.which("comfy"))
    cli = next((c for c in candidates if c and os.path.isfile(c)), None)
    if not cli:
        msg = "comfy-cli not installed: run scripts/setup_comfyui.sh --with-cli"
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return cli


def run_comfy_cli(srv, *args, timeout=600) -> subprocess.CompletedProcess:
    home = tempfile.mkdtemp(prefix="comfy-cli-home-")
    env = {**os.environ, "HOME": home, "DO_NOT_TRACK": "1", "COMFY_NO_UPDATE_CHECK": "1", "COMFY_NO_WATCH": "1",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    try:
        return subprocess.run([comfy_cli(), *args, "--host", "127.0.0.1", "--port", str(srv.port)],
                              env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def envelope(stdout: str) -> dict:
    """comfy-cli's JSON envelope: the last stdout line that parses as JSON."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    raise AssertionError(f"no JSON envelope in comfy-cli output:\n{stdout[-3000:]}")


def print_prompt(srv, path: Path) -> dict:
    r = run_comfy_cli(srv, "run", "--workflow", str(path), "--print-prompt", timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = envelope(r.stdout)
    # the converted prompt: in the envelope's data (comfy-cli >= 1.23) or as the whole output
    for key in ("prompt", "api", "workflow"):
        if isinstance(data.get("data"), dict) and isinstance(data["data"].get(key), dict):
            return data["data"][key]
    if all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        return data
    raise AssertionError(f"no converted prompt in {json.dumps(data)[:2000]}")


def _strip(graph: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in graph.items()}


def _pngs(srv, entry: dict, node: str = "7") -> list[Path]:
    images = entry["outputs"][node]["images"]
    out = []
    for im in images:
        p = Path(srv.output_dir) / im["subfolder"] / im["filename"]
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p
        out.append(p)
    return out


def _place_inputs(srv, spec) -> None:
    """Copy the picture a workflow loads into ComfyUI's input folder (Load Image lists that folder)."""
    if "source" in spec:
        shutil.copy(spec["source"], Path(srv.input_dir) / spec["source"].name)


@pytest.mark.parametrize("name", [s["name"] for s in SPECS])
def test_comfy_cli_converts_the_ui_file_to_the_api_twin(infinity, name):
    _place_inputs(infinity.server, next(s for s in SPECS if s["name"] == name))
    converted = print_prompt(infinity.server, WORKFLOWS_DIR / f"{name}.json")
    twin = json.loads((API_DIR / f"{name}.json").read_text())
    assert _strip(converted) == _strip(twin)


def _expected_size(spec) -> tuple[int, int]:
    """(width, height) of the PNGs: the schedule's size, or for an edit the size nearest its source's."""
    sys.path.insert(0, str(REPO))
    from PIL import Image
    from infinity_core import schedules
    if "source" in spec:
        with Image.open(spec["source"]) as pic:
            sched, _, _ = schedules.schedule_for_size(*pic.size)
        h, w = schedules.image_size(sched)
        return w, h
    s = spec["nodes"][4][2]
    label = s["aspect_ratio"]
    w_r, h_r = (int(v) for v in label.split(" ")[0].split(":"))
    sched = schedules.get_schedule(h_r / w_r, s["tier"])
    h, w = schedules.image_size(sched)
    return w, h


@pytest.mark.parametrize("name", [s["name"] for s in SPECS])
def test_workflow_runs_with_comfy_run_and_the_http_api(infinity, name):
    """`comfy run --wait` on the UI file, then POST /prompt with the API twin (another file prefix, so
    ComfyUI's cache re-runs only SaveImage): both succeed and write PNGs of the schedule's size."""
    from PIL import Image
    srv = infinity.server
    spec = next(s for s in SPECS if s["name"] == name)
    _place_inputs(srv, spec)
    t0 = time.monotonic()
    r = run_comfy_cli(srv, "run", "--workflow", str(WORKFLOWS_DIR / f"{name}.json"), "--wait", "--timeout", "300")
    env = envelope(r.stdout)
    assert r.returncode == 0 and env.get("ok"), f"comfy run failed ({r.returncode}): {json.dumps(env)[:3000]}\n" \
                                                f"{r.stderr[-2000:]}\n{srv.log_tail(40)}"
    cli_seconds = time.monotonic() - t0
    outputs = env["data"].get("outputs") or []
    assert any(".png" in u for u in outputs), env
    hist = srv.get_json(f"/history/{env['data']['prompt_id']}")[env["data"]["prompt_id"]]
    cli_png = _pngs(srv, hist)
    want = _expected_size(spec)
    assert Image.open(cli_png[0]).size == want

    twin = json.loads((API_DIR / f"{name}.json").read_text())
    twin["7"]["inputs"]["filename_prefix"] += "_http"
    entry = srv.run(twin, timeout=600)
    assert entry["status"]["status_str"] == "success", srv.describe_failure(entry)
    http_png = _pngs(srv, entry)
    assert Image.open(http_png[0]).size == want
    assert "_http" in http_png[0].name
    # the same graph and seed: the same pixels
    assert Image.open(http_png[0]).tobytes() == Image.open(cli_png[0]).tobytes()
    print(f"{name}: comfy run {cli_seconds:.1f}s")


def test_comfy_run_reports_user_errors(infinity, tmp_path):
    """Errors met through `comfy run`: a missing weight file is caught by comfy-cli's check against the
    server's choices (naming node, input and the files that exist); a wrong-length cfg_list fails in
    the node with its message. Exit code 1 both times, and the server keeps serving."""
    srv = infinity.server
    wf = json.loads((WORKFLOWS_DIR / "infinity_2b_t2i_1024.json").read_text())
    loader = next(n for n in wf["nodes"] if n["type"] == "InfinityModelLoader")
    loader["widgets_values"][0] = "infinity_2b_missing.pth"
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps(wf))
    r = run_comfy_cli(srv, "run", "--workflow", str(missing), "--wait", "--timeout", "300")
    env = envelope(r.stdout)
    assert r.returncode == 1 and not env["ok"], env
    (err,) = env["error"]["details"]["errors"]
    assert (err["node_id"], err["field"]) == (str(loader["id"]), "transformer")
    assert "infinity_2b_missing.pth" in err["message"] and "infinity_2b_reg.pth" in err["valid_options"]

    wf = json.loads((WORKFLOWS_DIR / "infinity_2b_per_scale_cfg.json").read_text())
    sampler = next(n for n in wf["nodes"] if n["type"] == "InfinitySampler")
    sampler["widgets_values"][NODE_DEFS["InfinitySampler"]["widgets"].index("cfg_list") + 1] = "3, 3, 3"
    short = tmp_path / "short_list.json"
    short.write_text(json.dumps(wf))
    r = run_comfy_cli(srv, "run", "--workflow", str(short), "--wait", "--timeout", "300")
    env = envelope(r.stdout)
    assert r.returncode == 1 and env["error"]["code"] == "execution_error", env
    details = env["error"]["details"]
    assert (details["node_type"], details["exception_type"]) == ("InfinitySampler", "ValueError")
    assert details["exception_message"].startswith(
        "Infinity Sampler: cfg_list has 3 values but the scale schedule (1:1, 1024x1024, tier 1M) has 13 scales")
    entry = srv.run(json.loads((API_DIR / "infinity_t2i_bundled.json").read_text()), timeout=300)
    assert entry["status"]["status_str"] == "success", srv.describe_failure(entry)


# ------------------------------------------------------------------------ the docs recipe
def _recipe() -> str:
    text = (REPO / "docs" / "nodes.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- batch-recipe:start -->\s*```bash\n(.*?)```\s*<!-- batch-recipe:end -->", text, re.S)
    assert m, "docs/nodes.md has no batch recipe between <!-- batch-recipe:start/end --> markers"
    return m.group(1)


def test_docs_batch_recipe_renders_pngs(infinity, tmp_path):
    """The headless batch-render recipe of docs/nodes.md, run as written against the test server."""
    srv = infinity.server
    script = tmp_path / "recipe.sh"
    script.write_text(_recipe())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square on the left")  # no final newline: still two prompts
    cli = comfy_cli()
    env = {**os.environ, "COMFY": cli, "COMFY_PORT": str(srv.port), "PROMPTS": str(prompts),
           "WORKFLOW": str(API_DIR / "infinity_t2i_bundled.json"), "SEEDS": "11", "OUT": str(tmp_path / "out"),
           "HOME": str(tmp_path / "home"), "DO_NOT_TRACK": "1", "COMFY_NO_UPDATE_CHECK": "1",
           "NO_PROXY": "127.0.0.1,localhost"}
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert [re.sub(r"_\d+_\.png$", "", p) for p in pngs] == ["p1_s11", "p2_s11"], (pngs, r.stdout[-2000:])


if __name__ == "__main__":
    write_files()
