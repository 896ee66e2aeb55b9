"""Infinity Edit in a real ComfyUI 0.3.75 (CPU), with the random-weight stand-ins of tests/stand_ins.py
(the session's server of test_comfy_sampling.py): the node's schema, the two ends of keep_scales (the
VAE reconstruction and plain text to image), strength and the k the node reports, masks, batches,
progress, and the bad inputs a user can give - each with a clear message, ComfyUI still serving.
Nothing here mocks ComfyUI; pictures go in through Load Image from ComfyUI's input folder.

The stand-ins have random weights, so pictures are checked against each other (reconstruction,
plain generation, single runs), never for what they show.
"""
from __future__ import annotations

import base64
import io
import re
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from comfy_server import ComfyError  # noqa: E402
from test_comfy_sampling import WSListener, t2i  # noqa: E402

from infinity_core import schedules  # noqa: E402
from infinity_core.bsq import summed_codes_from_bits  # noqa: E402
from infinity_core.data import Scene, ShapeObject, render_scene  # noqa: E402
from infinity_core.edit import mask_per_scale  # noqa: E402

NODE = "InfinityEdit"
PROMPT = "a large green circle on the left, blue background"
_seed = iter(range(20_000, 10**6))


# ------------------------------------------------------------------------------------ helpers
def scene(colour="red", position="left", background="blue", size=(256, 256)) -> np.ndarray:
    w, h = size
    return render_scene(Scene(background, (ShapeObject("circle", colour, "large", position),)), h, w)


def put_input(srv, pixels: np.ndarray, mode: str | None = None) -> str:
    """Save a picture into ComfyUI's input folder (what Load Image lists); returns its name."""
    name = f"edit_{uuid.uuid4().hex[:10]}.png"
    Image.fromarray(pixels, mode).save(Path(srv.input_dir) / name)
    return name


def edit_graph(image: str, keep_scales=-1, strength=0.5, seed=None, prompt=PROMPT, batch_size=1, cfg_list="",
               prefix="edit", **extra) -> dict:
    """Load Image ("4") -> Infinity Edit ("5", 2B stand-in) -> VAE Decode ("6") -> SaveImage ("7")."""
    return {
        "1": {"class_type": "InfinityModelLoader", "inputs": {"transformer": "infinity_2b_reg.pth", "vae": "auto",
                                                              "weight_dtype": "auto", "attention": "auto"}},
        "2": {"class_type": "InfinityTextEncoderLoader", "inputs": {"text_encoder": "flan-t5-xl", "dtype": "auto"}},
        "3": {"class_type": "InfinityTextEncode", "inputs": {"text_encoder": ["2", 0], "prompt": prompt}},
        "4": {"class_type": "LoadImage", "inputs": {"image": image}},
        "5": {"class_type": NODE, "inputs": {
            "model": ["1", 0], "source": ["4", 0], "positive": ["3", 0], "keep_scales": keep_scales,
            "strength": strength, "seed": next(_seed) if seed is None else seed, "cfg": 3.0, "cfg_list": cfg_list,
            "tau": 1.0, "tau_list": "", "top_k": 900, "top_p": 0.97, "batch_size": batch_size, **extra}},
        "6": {"class_type": "InfinityVAEDecode", "inputs": {"model": ["1", 0], "codes": ["5", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def run_ok(srv, graph, timeout=600, **kw) -> dict:
    entry = srv.run(graph, timeout=timeout, **kw)
    assert entry["status"]["status_str"] == "success", srv.describe_failure(entry)
    return entry


def run_error(srv, graph) -> dict:
    entry = srv.run(graph, timeout=300)
    assert entry["status"]["status_str"] == "error", f"expected an error, got {entry['status']}"
    (_, data), = srv.messages(entry, "execution_error")
    return data


def pictures(srv, entry, node="7") -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(srv.view(im["filename"], im["subfolder"], im["type"])))).astype(int)
            for im in entry["outputs"][node]["images"]]


def report(entry) -> str:
    """The text Infinity Edit shows under the node (its ui output, kept in the history)."""
    return entry["outputs"]["5"]["text"][0]


def changed_bits(entry) -> tuple[int, int]:
    m = re.search(r"([\d,]+) of ([\d,]+) source bits changed", report(entry))
    assert m, report(entry)
    return int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))


def probe(graph: dict, codes_node: str = "5") -> dict:
    """Add the test-only probe (tests/comfy_test_nodes) that shows the codes of `codes_node` in the history."""
    graph["20"] = {"class_type": "InfinityTestCodesProbe", "inputs": {"codes": [codes_node, 0]}}
    return graph


def probed(entry) -> tuple[list[np.ndarray], np.ndarray]:
    """(bits per scale [B, 1, h, w, d] uint8, summed codes [B, d, H, W]) the probe saw."""
    with np.load(io.BytesIO(base64.b64decode(entry["outputs"]["20"]["codes"][0]))) as z:
        return [z[f"bits_{k}"] for k in range(len(z.files) - 1)], z["summed"]


def reconstruction(srv, image: str, width: int, height: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Infinity VAE Encode -> Infinity VAE Decode of a picture, at the schedule of its own size:
    (the decoded picture, the bits of every scale)."""
    graph = {
        "1": {"class_type": "InfinityModelLoader", "inputs": {"transformer": "infinity_2b_reg.pth", "vae": "auto",
                                                              "weight_dtype": "auto", "attention": "auto"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": image}},
        "8": {"class_type": "InfinityScaleSchedule", "inputs": {"mode": "width/height", "tier": "1M",
                                                                "aspect_ratio": "1:1 (1024x1024)",
                                                                "width": width, "height": height}},
        "5": {"class_type": "InfinityVAEEncode", "inputs": {"model": ["1", 0], "image": ["4", 0],
                                                            "scale_schedule": ["8", 0]}},
        "6": {"class_type": "InfinityVAEDecode", "inputs": {"model": ["1", 0], "codes": ["5", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "recon"}},
    }
    entry = run_ok(srv, probe(graph))
    return pictures(srv, entry)[0], probed(entry)[0]


def assert_keeps_serving(srv, image: str):
    assert srv.alive()
    entry = run_ok(srv, edit_graph(image, keep_scales=3, prefix="after_error"))
    assert pictures(srv, entry)[0].shape == (256, 256, 3)


@pytest.fixture
def source(srv) -> str:
    return put_input(srv, scene())


# ----------------------------------------------------------------------------------- schema
REQUIRED = [("model", "INFINITY_MODEL"), ("source", "IMAGE"), ("positive", "INFINITY_CONDITIONING"),
            ("keep_scales", "INT"), ("strength", "FLOAT"), ("seed", "INT"), ("cfg", "FLOAT"), ("cfg_list", "STRING"),
            ("tau", "FLOAT"), ("tau_list", "STRING"), ("top_k", "INT"), ("top_p", "FLOAT"), ("batch_size", "INT")]
OPTIONAL = [("negative", "INFINITY_CONDITIONING"), ("mask", "MASK")]


def test_edit_node_in_object_info(srv):
    info = srv.node_info(NODE)
    assert info["display_name"] == "Infinity Edit"
    assert info["category"] == "Infinity" and info["python_module"] == "custom_nodes.ComfyUI-Infinity"
    assert len(info["description"]) > 200 and "keep_scales" in info["description"]
    assert info["input_order"] == {"required": [n for n, _ in REQUIRED], "optional": [n for n, _ in OPTIONAL]}
    for section, declared in (("required", REQUIRED), ("optional", OPTIONAL)):
        for name, typ in declared:
            spec = info["input"][section][name]
            assert spec[0] == typ, (name, spec)
            assert len(spec[1].get("tooltip") or "") > 40, f"input {name} has no useful tooltip"
    req = info["input"]["required"]
    keep = req["keep_scales"][1]
    assert (keep["min"], keep["max"], keep["default"]) == (-1, 13, -1)
    assert (req["strength"][1]["min"], req["strength"][1]["max"]) == (0.0, 1.0)
    assert req["seed"][1]["control_after_generate"] is True
    source_tip = req["source"][1]["tooltip"]
    assert "nearest" in source_tip and "centre crop" in source_tip and "alpha" in source_tip
    assert "stretched" in info["input"]["optional"]["mask"][1]["tooltip"]
    assert list(zip(info["output_name"], info["output"])) == [("codes", "INFINITY_CODES")]
    assert all(info["output_tooltips"]) and info["output_node"] is False


# ---------------------------------------------------------------------------- the two ends
def test_keep_every_scale_is_the_vae_reconstruction(srv):
    """k = number of scales, no mask: exactly the bits Infinity VAE Encode gives at the schedule of the
    source's size (a 320x240 picture: the 4:3 template, tier 0.06M, 7 scales), and the same picture
    once decoded."""
    image = put_input(srv, scene(size=(320, 240)))
    sched, _, tier = schedules.schedule_for_size(320, 240)
    K = len(sched)
    h, w = schedules.image_size(sched)
    entry = run_ok(srv, probe(edit_graph(image, keep_scales=K)))
    assert changed_bits(entry)[0] == 0, report(entry)
    lines = report(entry).splitlines()
    assert lines[0] == f"keep_scales {K} of {K} (set by keep_scales)"
    assert lines[1] == f"source 320x240 -> 4:3, {w}x{h}, tier {tier}"
    got = pictures(srv, entry)[0]
    want, want_bits = reconstruction(srv, image, 320, 240)
    got_bits = probed(entry)[0]
    assert len(got_bits) == len(want_bits) == K
    assert all(np.array_equal(a, b) for a, b in zip(got_bits, want_bits))
    assert got.shape == want.shape == (h, w, 3)
    diff = np.abs(got - want)
    # the same bits; the sum of their codes differs from the quantiser's straight-through sum by an ulp
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99, (diff.max(), (diff == 0).mean())


def test_keep_no_scale_is_plain_text_to_image(srv, source):
    """k = 0 (here through strength 1), no mask: the very picture Infinity Sampler draws with the same
    prompt and seed at the schedule of the source's size."""
    seed = next(_seed)
    entry = run_ok(srv, edit_graph(source, keep_scales=-1, strength=1.0, seed=seed, prompt="a red circle"))
    assert report(entry).splitlines()[0] == "keep_scales 0 of 7 (from strength 1.00)"
    plain = run_ok(srv, t2i(prompt="a red circle", seed=seed, tier="0.06M", prefix="plain"))
    a, b = pictures(srv, entry)[0], pictures(srv, plain)[0]
    assert np.array_equal(a, b)


def test_strength_gives_k_and_the_node_shows_it(srv, source):
    """strength 0.5 on 7 scales keeps round(3.5) = 4 scales: shown under the node and logged; some bits
    change, not all."""
    start = len(srv.log_text())
    entry = run_ok(srv, edit_graph(source, keep_scales=-1, strength=0.5))
    text = report(entry)
    assert text.startswith("keep_scales 4 of 7 (from strength 0.50)\n"
                           "source 256x256 -> 1:1, 256x256, tier 0.06M\n"), text
    changed, total = changed_bits(entry)
    assert 0 < changed < total
    assert "Infinity Edit: keep_scales 4 of 7 (from strength 0.50); source 256x256" in srv.log_text()[start:]


def test_one_progress_step_per_scale_with_previews(srv, source):
    client = uuid.uuid4().hex
    with WSListener(srv, client) as ws:
        run_ok(srv, edit_graph(source, keep_scales=2), client_id=client)
        time.sleep(0.3)
    steps = ws.progress("5")
    assert [(p["value"], p["max"]) for p in steps] == [(i, 7) for i in range(1, 8)], steps
    assert len(ws.previews()) >= 7


# -------------------------------------------------------------------------------------- masks
def test_mask_keeps_outside_and_redraws_inside(srv):
    """The mask painted in Load Image's mask editor (alpha 0 = masked) on the right half, k = 2: the
    first 2 scales and every cell outside the mask keep the source's bits, cells inside are re-drawn;
    the summed codes the decoder reads equal the source's left of the mask's border band (64 px = one
    cell of the 4x4 scale, the first re-drawn) and differ right of it. Without the mask the same edit
    changes the left half too. (Pixel fidelity outside the mask needs the trained decoder: the random
    stand-in's GroupNorm layers normalise over the whole picture, so any change moves every pixel.)"""
    rgb = scene(colour="red", position="left")
    rgba = np.concatenate([rgb, np.full((256, 256, 1), 255, np.uint8)], axis=-1)
    rgba[:, 128:, 3] = 0                                   # transparent right half -> MASK 1 there
    image = put_input(srv, rgba, "RGBA")
    seed = 4242
    graph = edit_graph(image, keep_scales=2, seed=seed)
    graph["5"]["inputs"]["mask"] = ["4", 1]
    entry = run_ok(srv, probe(graph))
    assert re.search(r"\nmask: 50% of the picture may change, border band 64 px\n", report(entry)), report(entry)
    bits, summed = probed(entry)
    recon, src_bits = reconstruction(srv, image, 256, 256)
    mask = torch.zeros(256, 256)
    mask[:, 128:] = 1
    redrawn = [g[0].numpy() for g in mask_per_scale(mask, schedules.vae_schedule(schedules.get_schedule(1.0, "0.06M"),
                                                                                  False))]
    for si, (b, s_) in enumerate(zip(bits, src_bits)):
        same = (b[0, 0] == s_[0, 0]).all(-1)               # [h, w]: every bit of the cell is the source's
        if si < 2:
            assert same.all(), si
        else:
            assert same[~redrawn[si]].all(), f"scale {si}: a cell outside the mask changed"
            assert (~same[redrawn[si]]).mean() > 0.5, f"scale {si}: the masked cells were not re-drawn"
    src_summed = summed_codes_from_bits([torch.from_numpy(b) for b in src_bits], (16, 16)).numpy()
    diff = np.abs(summed - src_summed)[0].max(0)           # [16, 16] latent cells of 16 px
    assert diff[:, :(128 - 64) // 16].max() < 1e-6 and diff[:, (128 + 64) // 16:].min() > 0.01
    edited = pictures(srv, entry)[0]
    inside = np.abs(edited[:, 128 + 64:] - recon[:, 128 + 64:]).mean()
    outside = np.abs(edited[:, :128 - 64] - recon[:, :128 - 64]).mean()
    print(f"mean absolute difference to the reconstruction: inside {inside:.1f}, outside the band {outside:.1f}")
    assert inside > 5
    unmasked = probed(run_ok(srv, probe(edit_graph(image, keep_scales=2, seed=seed))))[0]
    assert not np.array_equal(unmasked[2][..., :2, :], src_bits[2][..., :2, :])


def test_mask_of_another_size_is_resized_with_a_warning(srv, source):
    """A 128x128 mask for a 256x256 picture is stretched to 256x256 (warning naming both sizes, in the
    node's report and the log) and edits exactly like the same mask drawn at 256x256."""
    half = np.zeros((128, 128, 3), np.uint8)
    half[:, 64:, 0] = 255
    small = put_input(srv, half)
    full = np.zeros((256, 256, 3), np.uint8)
    full[:, 128:, 0] = 255
    big = put_input(srv, full)
    seed = next(_seed)
    start = len(srv.log_text())
    outs = []
    for name in (small, big):
        graph = edit_graph(source, keep_scales=2, seed=seed, prefix="mask_size")
        graph["9"] = {"class_type": "LoadImageMask", "inputs": {"image": name, "channel": "red"}}
        graph["5"]["inputs"]["mask"] = ["9", 0]
        entry = run_ok(srv, graph)
        outs.append((report(entry), pictures(srv, entry)[0]))
    warning = "the mask is 128x128 but the source is 256x256: the mask was resized (stretched) to 256x256"
    assert f"⚠ {warning}" in outs[0][0] and "⚠" not in outs[1][0], outs[0][0]
    assert f"Infinity Edit: {warning}" in srv.log_text()[start:]
    assert np.array_equal(outs[0][1], outs[1][1])


def test_empty_mask_is_reported(srv, source):
    """Load Image's MASK of a picture without alpha is an empty 64x64 mask: the node says so (and that the
    output is then the reconstruction) instead of silently doing nothing."""
    graph = edit_graph(source, keep_scales=2)
    graph["5"]["inputs"]["mask"] = ["4", 1]
    entry = run_ok(srv, graph)
    text = report(entry)
    assert "⚠ the mask is 64x64 but the source is 256x256" in text and "⚠ the mask is empty (all 0)" in text, text
    assert changed_bits(entry)[0] == 0


# ------------------------------------------------------------------------ pictures of any kind
def test_rgba_source_is_edited_as_its_rgb(srv):
    """An IMAGE with an alpha channel (Join Image with Alpha): alpha is ignored, with a note; the result
    is the one of the RGB picture."""
    image = put_input(srv, scene(colour="yellow"))
    seed = next(_seed)
    rgb = run_ok(srv, edit_graph(image, keep_scales=3, seed=seed))
    graph = edit_graph(image, keep_scales=3, seed=seed)
    graph["9"] = {"class_type": "SolidMask", "inputs": {"value": 0.3, "width": 256, "height": 256}}
    graph["10"] = {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["4", 0], "alpha": ["9", 0]}}
    graph["5"]["inputs"]["source"] = ["10", 0]
    rgba = run_ok(srv, graph)
    assert "⚠ the image has an alpha channel (RGBA): alpha is ignored" in report(rgba)
    assert np.array_equal(pictures(srv, rgb)[0], pictures(srv, rgba)[0])


@pytest.mark.parametrize("channels", [1, 2])
def test_grey_source_is_replicated_to_rgb(srv, channels):
    """A one-channel IMAGE (and grey + alpha) is edited as the RGB picture with that grey in R, G and B
    (what Load Image gives for a grey PNG)."""
    grey = scene(colour="white", background="black")[..., 0]
    image = put_input(srv, grey, "L")
    seed = next(_seed)
    as_rgb = run_ok(srv, edit_graph(image, keep_scales=3, seed=seed))
    graph = edit_graph(image, keep_scales=3, seed=seed)
    graph["9"] = {"class_type": "InfinityTestImageChannels", "inputs": {"image": ["4", 0], "channels": channels}}
    graph["5"]["inputs"]["source"] = ["9", 0]
    entry = run_ok(srv, graph)
    what = "one channel (grey)" if channels == 1 else "two channels (grey + alpha)"
    assert f"⚠ the image has {what}: the grey is used for R, G and B" in report(entry)
    assert np.array_equal(pictures(srv, as_rgb)[0], pictures(srv, entry)[0])


def test_batch_of_sources(srv):
    """2 pictures x batch_size 2 -> 4 edits, source-major (a0, a1, b0, b1); edit r uses seed + r, so
    each can be re-drawn alone from its source with batch_size 1 and seed + r."""
    a, b = put_input(srv, scene(colour="red")), put_input(srv, scene(colour="purple", position="right"))
    seed = next(_seed)
    next(_seed), next(_seed), next(_seed)
    graph = edit_graph(a, keep_scales=3, seed=seed, batch_size=2, prefix="batch")
    graph["9"] = {"class_type": "LoadImage", "inputs": {"image": b}}
    graph["10"] = {"class_type": "ImageBatch", "inputs": {"image1": ["4", 0], "image2": ["9", 0]}}
    graph["5"]["inputs"]["source"] = ["10", 0]
    batch = pictures(srv, run_ok(srv, graph))
    assert len(batch) == 4
    for r, name in ((1, a), (2, b)):
        alone = pictures(srv, run_ok(srv, edit_graph(name, keep_scales=3, seed=seed + r, prefix=f"alone{r}")))[0]
        assert np.array_equal(alone, batch[r]), r
    assert not np.array_equal(batch[0], batch[2])


# -------------------------------------------------------------------------------- bad input
def test_keep_scales_beyond_the_schedule(srv, source):
    data = run_error(srv, edit_graph(source, keep_scales=9))
    assert (data["node_id"], data["node_type"], data["exception_type"]) == ("5", NODE, "ValueError")
    msg = data["exception_message"]
    assert msg.startswith("Infinity Edit: keep_scales 9 is outside 0..7 (this schedule has 7 scales): the source is "
                          "edited along the schedule of its size (1:1, 256x256, tier 0.06M), which has 7 scales"), msg
    # above the widget's range the server refuses the prompt before running it
    with pytest.raises(ComfyError) as exc:
        srv.queue_prompt(edit_graph(source, keep_scales=14))
    err = exc.value.response["node_errors"]["5"]["errors"][0]
    assert (err["type"], err["details"]) == ("value_bigger_than_max", "keep_scales") or \
        err["extra_info"]["input_name"] == "keep_scales", err
    assert_keeps_serving(srv, source)


@pytest.mark.parametrize("inputs, message", [
    ({"cfg_list": "3, 3, 3"},
     "Infinity Edit: cfg_list has 3 values but the scale schedule (1:1, 256x256, tier 0.06M) has 7 scales"),
    ({"tau_list": "1,1,1,1,1,1,0"}, "Infinity Edit: tau must be > 0 on every scale"),
])
def test_bad_per_scale_lists(srv, source, inputs, message):
    graph = edit_graph(source, keep_scales=3)
    graph["5"]["inputs"].update(inputs)
    data = run_error(srv, graph)
    assert data["exception_message"].startswith(message), data["exception_message"]


def test_mask_batch_that_fits_no_source(srv, source):
    graph = edit_graph(source, keep_scales=3)
    graph["9"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["4", 0], "amount": 3}}
    graph["10"] = {"class_type": "ImageToMask", "inputs": {"image": ["9", 0], "channel": "red"}}
    graph["5"]["inputs"]["mask"] = ["10", 0]
    data = run_error(srv, graph)
    assert data["exception_message"].startswith(
        "Infinity Edit: mask has 3 masks for 1 source images: give one mask (used for every source) or one per "
        "source"), data["exception_message"]
    assert_keeps_serving(srv, source)
