"""The Infinity nodes at work in a real ComfyUI 0.3.75 (CPU), with random-weight stand-ins of the
official files (tests/stand_ins.py): loaders and model folders, text to image through the HTTP API,
progress and previews over the websocket, interrupt, batches and seeds, VAE encode/decode, memory
release, and the errors a user meets - each must name the node and the problem, leave ComfyUI
serving, and the next good prompt must succeed. Nothing here mocks ComfyUI.
"""
from __future__ import annotations

import io
import json
import re
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import stand_ins  # noqa: E402
from comfy_server import ComfyError, Listener  # noqa: E402

BUNDLED = "Infinity tiny shapes (bundled)"
SQUARE = "1:1 (1024x1024)"
_seed = iter(range(1000, 10**6))


def t2i(transformer="infinity_2b_reg.pth", vae="auto", text_encoder="flan-t5-xl", prompt="a red circle",
        tier="0.06M", aspect=SQUARE, mode="aspect ratio", width=1024, height=1024, seed=None, cfg=3.0, cfg_list="",
        tau=1.0, tau_list="", batch_size=1, negative=None, layer=0, prefix="test", save=True,
        weight_dtype="auto", attention="auto") -> dict:
    """An API graph: loaders -> encode -> schedule -> sampler -> decode -> SaveImage ("7")."""
    g = {
        "1": {"class_type": "InfinityModelLoader", "inputs": {"transformer": transformer, "vae": vae,
                                                              "weight_dtype": weight_dtype, "attention": attention}},
        "2": {"class_type": "InfinityTextEncoderLoader", "inputs": {"text_encoder": text_encoder, "dtype": "auto"}},
        "3": {"class_type": "InfinityTextEncode", "inputs": {"text_encoder": ["2", 0], "prompt": prompt}},
        "4": {"class_type": "InfinityScaleSchedule", "inputs": {"mode": mode, "aspect_ratio": aspect, "tier": tier,
                                                                "width": width, "height": height}},
        "5": {"class_type": "InfinitySampler", "inputs": {
            "model": ["1", 0], "positive": ["3", 0], "scale_schedule": ["4", 0],
            "seed": next(_seed) if seed is None else seed, "cfg": cfg, "cfg_list": cfg_list, "tau": tau,
            "tau_list": tau_list, "top_k": 900, "top_p": 0.97, "cfg_insertion_layer": layer,
            "batch_size": batch_size}},
        "6": {"class_type": "InfinityVAEDecode", "inputs": {"model": ["1", 0], "codes": ["5", 0]}},
        "7": {"class_type": "SaveImage" if save else "PreviewImage",
              "inputs": {"images": ["6", 0], **({"filename_prefix": prefix} if save else {})}},
    }
    if negative is not None:
        g["8"] = {"class_type": "InfinityTextEncode", "inputs": {"text_encoder": ["2", 0], "prompt": negative}}
        g["5"]["inputs"]["negative"] = ["8", 0]
    return g


def run_ok(srv, graph, timeout=600, **kw) -> dict:
    entry = srv.run(graph, timeout=timeout, **kw)
    assert entry["status"]["status_str"] == "success", srv.describe_failure(entry)
    return entry


def run_error(srv, graph) -> dict:
    """Run a graph that must fail while executing: the execution_error payload."""
    entry = srv.run(graph, timeout=300)
    assert entry["status"]["status_str"] == "error", f"expected an error, got {entry['status']}"
    (_, data), = srv.messages(entry, "execution_error")
    return data


def images(srv, entry, node="7") -> list[Image.Image]:
    out = []
    for im in entry["outputs"][node]["images"]:
        out.append(Image.open(io.BytesIO(srv.view(im["filename"], im["subfolder"], im["type"]))))
    return out


def assert_keeps_serving(srv):
    """After an error: ComfyUI is alive and the next good prompt succeeds."""
    assert srv.alive()
    entry = run_ok(srv, t2i(prefix="after_error"))
    assert images(srv, entry)[0].size == (256, 256)


# ---------------------------------------------------------------------------------- loaders
def test_loader_choices_and_model_folders(srv):
    """Bundled model first (and default); official names from models/infinity, Infinity files from
    diffusion_models, extra_model_paths.yaml folders; shard folders as one entry; VAEs listed apart."""
    req = srv.node_info("InfinityModelLoader")["input"]["required"]
    transformers = req["transformer"][1]["options"]
    assert transformers[0] == BUNDLED and req["transformer"][1]["default"] == BUNDLED
    for name in ("infinity_2b_reg.pth", "infinity_8b_weights", "infinity_2b_in_diffusion_models.pth",
                 "extra/infinity_2b_extra.pth", "stand_in_16bit.pth"):
        assert name in transformers, (name, transformers)
    assert not any("flux" in t or "model-0000" in t or "vae" in t for t in transformers), transformers
    assert req["vae"][1]["options"] == ["auto", "infinity_vae_d32reg.pth", "infinity_vae_d56_f8_14_patchify.pth"]
    assert req["vae"][1]["default"] == "auto"
    te = srv.node_info("InfinityTextEncoderLoader")["input"]["required"]["text_encoder"][1]
    assert te["options"] == [BUNDLED, "flan-t5-xl", "t5-small-64"] and te["default"] == BUNDLED
    # the folder is registered with ComfyUI (GET /models lists it; extra_model_paths.yaml is respected)
    assert "infinity" in srv.get_json("/models")
    listed = srv.get_json("/models/infinity")
    assert "infinity_2b_reg.pth" in listed and "extra/infinity_2b_extra.pth" in listed


@pytest.mark.parametrize("transformer, vae, dtype", [
    ("infinity_2b_in_diffusion_models.pth", "auto", "auto"),
    ("extra/infinity_2b_extra.pth", "infinity_vae_d32reg.pth", "auto"),
    ("infinity_8b_weights", "auto", "auto"),
    (BUNDLED, "auto", "auto"),
    ("infinity_2b_reg.pth", "auto", "bf16"),
])
def test_every_folder_and_layout_loads_and_draws(srv, transformer, vae, dtype):
    te = BUNDLED if transformer == BUNDLED else "flan-t5-xl"
    entry = run_ok(srv, t2i(transformer=transformer, vae=vae, text_encoder=te, weight_dtype=dtype))
    assert images(srv, entry)[0].size == (256, 256)


# ------------------------------------------------------------------------ text to image
def test_text_to_image_writes_pngs_with_the_settings_in_the_metadata(srv):
    workflow = {"nodes": [], "links": [], "version": 0.4, "extra": {"note": "sent by the test like the page does"}}
    graph = t2i(seed=1234, batch_size=2, cfg=4.0, tau=0.9, negative="blurry", prefix="meta")
    entry = run_ok(srv, graph, extra_data={"extra_pnginfo": {"workflow": workflow}})
    pics = images(srv, entry)
    assert len(pics) == 2 and all(p.size == (256, 256) and p.mode == "RGB" for p in pics)
    assert not np.array_equal(np.asarray(pics[0]), np.asarray(pics[1]))  # seed + i per image
    prompt = json.loads(pics[0].text["prompt"])
    assert prompt["5"]["class_type"] == "InfinitySampler"
    s = prompt["5"]["inputs"]
    assert (s["seed"], s["cfg"], s["tau"], s["batch_size"]) == (1234, 4.0, 0.9, 2)
    assert prompt["3"]["inputs"]["prompt"] == "a red circle" and prompt["8"]["inputs"]["prompt"] == "blurry"
    assert json.loads(pics[0].text["workflow"]) == workflow
    # ComfyUI's model management loaded the model (ModelPatcher), it did not bypass it
    assert "Requested to load Infinity" in srv.log_text()


def test_each_image_of_a_batch_can_be_rendered_alone(srv):
    """Image i of a batch uses seed + i: batch 3 from seed 500 == single images with seeds 501, 502."""
    batch = images(srv, run_ok(srv, t2i(seed=500, batch_size=3, prefix="batch")))
    for i in (1, 2):
        alone = images(srv, run_ok(srv, t2i(seed=500 + i, prefix=f"alone{i}")))[0]
        assert np.array_equal(np.asarray(alone), np.asarray(batch[i])), i


def test_same_seed_same_image_and_per_scale_lists(srv):
    a = images(srv, run_ok(srv, t2i(seed=77, cfg_list="3,3,3,3,2,2,1", tau_list="1 1 1 1 1 0.8 0.5", prefix="ps")))
    b = images(srv, run_ok(srv, t2i(seed=77, cfg_list="3, 3, 3, 3, 2, 2, 1", tau_list="1,1,1,1,1,0.8,0.5",
                                    prefix="ps2")))
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    c = images(srv, run_ok(srv, t2i(seed=77, prefix="ps3")))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))


def test_hidden_state_guidance_and_width_height_mode(srv):
    sys.path.insert(0, str(stand_ins.REPO))
    from infinity_core import schedules
    entry = run_ok(srv, t2i(layer=-1, mode="width/height", width=700, height=400, tier="1M", prefix="wh"))
    sched, template, tier = schedules.schedule_for_size(700, 400)
    h, w = schedules.image_size(sched)
    assert template == 0.571  # the nearest template, 7:4; the tier with the nearest pixel count
    assert images(srv, entry)[0].size == (w, h)


def test_text_encode_reports_tokens_and_truncation(srv):
    # prompts not used by other tests: a cached node would not report again
    short = run_ok(srv, t2i(prompt=f"a red circle {uuid.uuid4().hex[:6]}", prefix="tok"))
    assert re.fullmatch(r"\d+ tokens \(of 512\)", short["outputs"]["3"]["text"][0]), short["outputs"]["3"]
    long_prompt = " ".join(["red circle on the left"] * 200) + f" {uuid.uuid4().hex[:6]}"
    entry = run_ok(srv, t2i(prompt=long_prompt, prefix="trunc"))
    report = entry["outputs"]["3"]["text"][0]
    m = re.match(r"⚠ prompt truncated: (\d+) tokens, T5 reads only the first 512; (\d+) tokens were dropped", report)
    assert m and int(m.group(1)) - int(m.group(2)) == 512, report
    assert "Infinity Text Encode: ⚠ prompt truncated" in srv.log_text()


# --------------------------------------------------------------------- progress, interrupt
class WSListener(Listener):
    """The websocket messages of one client id (tests/comfy_server.Listener) with progress/preview views."""

    def __init__(self, srv, client_id: str):
        super().__init__(srv.port, client_id)

    def progress(self, node: str) -> list[dict]:
        return [m["data"] for _, m in self.messages if isinstance(m, dict) and m.get("type") == "progress"
                and m["data"].get("node") == node]

    def previews(self) -> list[bytes]:
        # binary frame: 4-byte event type (1 = preview image), 4-byte image type (1 = JPEG), image bytes
        return [m[8:] for _, m in self.messages if isinstance(m, bytes) and int.from_bytes(m[:4], "big") == 1]


def test_one_progress_step_per_scale_with_previews(srv):
    client = uuid.uuid4().hex
    with WSListener(srv, client) as ws:
        entry = run_ok(srv, t2i(tier="0.25M", prefix="progress"), client_id=client)
        time.sleep(0.3)
    steps = ws.progress("5")
    assert [(p["value"], p["max"]) for p in steps] == [(i, 10) for i in range(1, 11)], steps
    previews = ws.previews()
    assert len(previews) >= 10, len(previews)
    sizes = [Image.open(io.BytesIO(p)).size for p in previews[-10:]]
    assert sizes[0][0] <= sizes[-1][0] <= 512, sizes  # coarse to fine, capped
    assert images(srv, entry)[0].size == (512, 512)


def test_interrupt_stops_within_one_scale(srv):
    """POST /interrupt while the sampler runs: it stops after the scale in progress; the VAE never runs,
    ComfyUI keeps serving and the next prompt succeeds."""
    client = uuid.uuid4().hex
    graph = t2i(tier="1M", batch_size=4, prefix="interrupted")
    with WSListener(srv, client) as ws:
        prompt_id = srv.queue_prompt(graph, client_id=client)["prompt_id"]
        deadline = time.monotonic() + 300
        sent_at = None
        while time.monotonic() < deadline:
            steps = ws.progress("5")
            if steps and steps[-1]["value"] >= 8:
                at_interrupt = steps[-1]["value"]
                assert srv.interrupt() == 200
                sent_at = time.monotonic()
                break
            time.sleep(0.005)
        assert sent_at is not None, f"sampler progress never reached scale 8: {ws.progress('5')}"
        entry = srv.wait_for_history(prompt_id, timeout=300)
        time.sleep(0.3)
    steps = ws.progress("5")
    assert entry["status"]["status_str"] == "error"
    (_, data), = srv.messages(entry, "execution_interrupted")
    assert data["node_id"] == "5" and data["node_type"] == "InfinitySampler"
    assert max(p["value"] for p in steps) <= at_interrupt + 1 < 13, steps
    assert "7" not in entry.get("outputs", {})
    assert_keeps_serving(srv)


# -------------------------------------------------------------------- errors a user meets
def test_missing_model_file(srv):
    data = run_error(srv, t2i(transformer="infinity_2b_reg_missing.pth"))
    assert (data["node_id"], data["node_type"]) == ("1", "InfinityModelLoader")
    msg = data["exception_message"]
    assert msg.startswith("Load Infinity Model: transformer 'infinity_2b_reg_missing.pth' was not found"), msg
    assert "models/infinity" in msg
    assert_keeps_serving(srv)


def test_missing_text_encoder_and_vae(srv):
    data = run_error(srv, t2i(text_encoder="flan-t5-xxl"))
    assert data["node_type"] == "InfinityTextEncoderLoader"
    assert data["exception_message"].startswith("Load Infinity Text Encoder: text_encoder 'flan-t5-xxl' was not found")
    data = run_error(srv, t2i(vae="infinity_vae_d32.pth"))
    assert data["exception_message"].startswith("Load Infinity Model: vae 'infinity_vae_d32.pth' was not found")
    assert_keeps_serving(srv)


def test_vae_that_does_not_fit(srv):
    data = run_error(srv, t2i(transformer="infinity_8b_weights", vae="infinity_vae_d32reg.pth"))
    assert data["node_type"] == "InfinityModelLoader"
    msg = data["exception_message"]
    assert msg.startswith("Load Infinity Model: VAE ") and "infinity_vae_d32reg.pth does not fit transformer" in msg
    assert "infinity_8b_weights" in msg and "14-bit BSQ VAE with stride 8" in msg
    # 'auto' with no fitting VAE at all names what is needed
    data = run_error(srv, t2i(transformer="stand_in_16bit.pth"))
    assert data["exception_message"].startswith("Load Infinity Model: vae 'auto': no VAE file fits transformer "
                                                "'stand_in_16bit.pth'. It needs a 16-bit BSQ VAE with stride 16")
    assert_keeps_serving(srv)


def test_text_encoder_of_the_wrong_width(srv):
    data = run_error(srv, t2i(text_encoder="t5-small-64"))
    assert data["node_type"] == "InfinitySampler"
    assert data["exception_message"].startswith(
        "Infinity Sampler: positive: text encoder 't5-small-64' outputs 64-wide features but transformer "
        "'infinity_2b_reg.pth' expects text_channels=128"), data["exception_message"]
    assert_keeps_serving(srv)


@pytest.mark.parametrize("inputs, message", [
    ({"cfg_list": "3, 3, 3"},
     "Infinity Sampler: cfg_list has 3 values but the scale schedule (1:1, 256x256, tier 0.06M) has 7 scales"),
    ({"tau_list": "1 1 1 1 1 1 1 1 1 1"},
     "Infinity Sampler: tau_list has 10 values but the scale schedule (1:1, 256x256, tier 0.06M) has 7 scales"),
    ({"cfg_list": "3, 3, x, 3"}, "Infinity Sampler: cfg_list: item 3 ('x') is not a number"),
    ({"tau_list": "1,1,1,1,1,1,0"}, "Infinity Sampler: tau must be > 0 on every scale"),
    ({"cfg_insertion_layer": -50}, "Infinity Sampler: cfg_insertion_layer -50 is out of range for this model"),
])
def test_bad_sampler_values(srv, inputs, message):
    graph = t2i()
    graph["5"]["inputs"].update(inputs)
    data = run_error(srv, graph)
    assert (data["node_id"], data["node_type"]) == ("5", "InfinitySampler")
    assert data["exception_message"].startswith(message), data["exception_message"]
    assert_keeps_serving(srv)


@pytest.mark.parametrize("width, height, message", [
    (16, 16384, "Infinity Scale Schedule: 16x16384 has an aspect ratio (width:height) of 1:1024; Infinity draws "
                "ratios from 1:3 to 3:1"),
    (16384, 16384, "Infinity Scale Schedule: 16384x16384 (268,435,456 pixels) is far from every size Infinity "
                   "draws: the largest size at this ratio is 1024x1024"),
    (32, 32, "Infinity Scale Schedule: 32x32 (1,024 pixels) is far from every size Infinity draws: the smallest "
             "size at this ratio is 256x256"),
])
def test_absurd_size(srv, width, height, message):
    data = run_error(srv, t2i(mode="width/height", width=width, height=height))
    assert (data["node_id"], data["node_type"]) == ("4", "InfinityScaleSchedule")
    assert data["exception_message"].startswith(message), data["exception_message"]
    assert_keeps_serving(srv)


def test_out_of_range_size_is_refused_before_running(srv):
    graph = t2i(mode="width/height", width=0)
    with pytest.raises(ComfyError) as exc:
        srv.queue_prompt(graph)
    err = exc.value.response["node_errors"]["4"]
    assert err["class_type"] == "InfinityScaleSchedule"
    assert err["errors"][0]["type"] == "value_smaller_than_min" and err["errors"][0]["details"] == "width"
    assert_keeps_serving(srv)


@pytest.mark.parametrize("node, name, value, message", [
    ("1", "weight_dtype", "fp8", "Load Infinity Model: weight_dtype 'fp8' is not one of"),
    ("1", "attention", "sage", "Load Infinity Model: attention 'sage' is not one of"),
    ("2", "dtype", "int8", "Load Infinity Text Encoder: dtype 'int8' is not one of"),
])
def test_unknown_choices_name_node_and_input(srv, node, name, value, message):
    graph = t2i()
    graph[node]["inputs"][name] = value
    data = run_error(srv, graph)
    assert data["node_id"] == node and data["exception_message"].startswith(message), data


def test_unavailable_attention_backend(srv):
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA present: flash/xformers may be available")
    data = run_error(srv, t2i(attention="flash"))
    assert data["exception_message"].startswith("Load Infinity Model: attention: attention backend 'flash' is not "
                                                "available here"), data["exception_message"]


# ----------------------------------------------------------------------------- VAE encode
def test_vae_encode_resizes_like_the_official_preprocessing(srv, infinity):
    """A 300x200 picture -> Infinity VAE Encode at 256x256 (Lanczos cover-resize + centre crop) ->
    VAE Decode: equals the same steps done here with infinity_core (the official preprocessing)."""
    import torch
    sys.path.insert(0, str(stand_ins.REPO))
    from infinity_core import checkpoint, schedules
    from infinity_core.sampler import to_rgb01
    from infinity_core.vae import preprocess_image

    rng = np.random.default_rng(0)
    pic = Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8))
    name = f"infinity_encode_{uuid.uuid4().hex[:8]}.png"
    pic.save(Path(srv.input_dir) / name)
    graph = {
        "1": {"class_type": "InfinityModelLoader", "inputs": {"transformer": "infinity_2b_reg.pth",
                                                              "vae": "infinity_vae_d32reg.pth",
                                                              "weight_dtype": "auto", "attention": "auto"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": name}},
        "4": {"class_type": "InfinityScaleSchedule", "inputs": {"mode": "aspect ratio", "aspect_ratio": SQUARE,
                                                                "tier": "0.06M", "width": 1024, "height": 1024}},
        "5": {"class_type": "InfinityVAEEncode", "inputs": {"model": ["1", 0], "image": ["2", 0],
                                                            "scale_schedule": ["4", 0]}},
        "6": {"class_type": "InfinityVAEDecode", "inputs": {"model": ["1", 0], "codes": ["5", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "encoded"}},
    }
    got = np.asarray(images(srv, run_ok(srv, graph))[0]).astype(int)
    assert got.shape == (256, 256, 3)

    vae = checkpoint.load_vae(infinity.paths["vae_2b"])
    with torch.inference_mode():
        x = preprocess_image(pic, 256, 256)
        _, summed, _, _ = vae.encode(x, schedules.vae_schedule(schedules.get_schedule(1.0, "0.06M"), False))
        want = (to_rgb01(vae.decode(summed))[0].numpy() * 255).astype(int)  # SaveImage truncates
    assert np.abs(got - want).max() <= 1


def test_codes_from_another_vae_are_refused(srv):
    graph = t2i()
    graph["9"] = {"class_type": "InfinityModelLoader", "inputs": {"transformer": "infinity_8b_weights", "vae": "auto",
                                                                  "weight_dtype": "auto", "attention": "auto"}}
    graph["6"]["inputs"]["model"] = ["9", 0]
    data = run_error(srv, graph)
    assert data["node_type"] == "InfinityVAEDecode"
    assert data["exception_message"].startswith("Infinity VAE Decode: these codes were made for a 32-bit BSQ VAE "
                                                "with stride 16, but the model's VAE is a 14-bit BSQ VAE with stride 8")


# ------------------------------------------------------------------------------- memory
def _in_memory(srv, after: int) -> list[str]:
    return re.findall(r"Infinity: loaded .*?In memory: (\d+ transformers?, \d+ vaes?, \d+ text encoders?)",
                      srv.log_text()[after:])


def test_replaced_and_freed_models_are_released(srv, infinity, tmp_path_factory):
    """Switching the loader between three ~70 MB transformers keeps one in memory (ComfyUI's cache
    drops the replaced loader output; our code holds no other reference), and POST /free releases it;
    the server's resident memory does not grow by a model per switch."""
    import psutil
    big = stand_ins.T_2B.with_(width=384, depth=8, block_chunks=4, num_heads=6, name="stand_in_big")
    folder = Path(infinity.models_dir) / "infinity"
    names = []
    for i in range(3):
        name = f"infinity_big_{i}.pth"
        if not (folder / name).exists():
            stand_ins.write_flat_pth(folder / name, big, seed=10 + i)
        names.append(name)
    size = (folder / names[0]).stat().st_size
    proc = psutil.Process(srv.pid)
    start = len(srv.log_text())
    rss = []
    for name in names + names[:1]:
        run_ok(srv, t2i(transformer=name, vae="infinity_vae_d32reg.pth", prefix="big", save=False))
        rss.append(proc.memory_info().rss)
    counts = _in_memory(srv, start)
    assert counts and all(c.startswith("1 transformer, 1 vae") for c in counts), counts
    growth = max(rss) - rss[0]
    assert growth < 1.5 * size, f"RSS grew by {growth / 2**20:.0f} MiB switching ~{size / 2**20:.0f} MiB models: {rss}"

    assert srv.request("POST", "/free", {"unload_models": True, "free_memory": True})[0] == 200
    time.sleep(1.0)
    start = len(srv.log_text())
    run_ok(srv, t2i(transformer="infinity_8b_weights", prefix="after_free"))
    counts = _in_memory(srv, start)
    assert counts and counts[0].startswith("1 transformer, 1 vae"), counts
