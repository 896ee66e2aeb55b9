"""Robustness of the Infinity nodes in a real ComfyUI 0.3.75 (CPU): sustained use, interrupt and cancel at
every point, two clients at once, enforced input bounds, strict per-scale lists, and memory pressure.
Nothing here mocks ComfyUI: the session server of tests/stand_ins.py (random-weight stand-ins of the
official files, the bundled model or its stand-in) is driven over HTTP and its websocket; the memory
pressure test starts a second server with `--cache-ram`.

Interrupts are timed from the websocket (ComfyUI's "executing" and "progress" messages), with stand-ins
large or slow enough that the interrupt lands inside the step it is aimed at; no test hook is involved.
"""
from __future__ import annotations

import gc
import glob
import importlib.util
import io
import json
import os
import re
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import stand_ins  # noqa: E402
from comfy_server import ComfyError, ComfyServer  # noqa: E402
from test_comfy_sampling import BUNDLED, images, run_ok, t2i  # noqa: E402


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_sustained", REPO / "bench" / "sustained.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module
    spec.loader.exec_module(mod)
    return mod


sustained = _load_bench()
Listener, is_type, is_end = sustained.Listener, sustained.is_type, sustained.is_end
PACK_MODULE = "custom_nodes.ComfyUI-Infinity"


def bundled(**kw) -> dict:
    return t2i(transformer=BUNDLED, text_encoder=BUNDLED, **kw)


def output_files(srv) -> set[str]:
    return {os.path.relpath(p, srv.output_dir) for p in glob.glob(os.path.join(srv.output_dir, "**", "*"),
                                                                   recursive=True) if os.path.isfile(p)}


def interrupt_when(srv, graph, trigger, delay=0.0, timeout=300):
    """Queue `graph`, POST /interrupt (with its prompt id) `delay` seconds after the first websocket message
    for which trigger(message, prompt_id) holds; -> (history entry, listener, seconds from the interrupt
    to the end)."""
    with Listener(srv.port) as ws:
        pid = srv.queue_prompt(graph, client_id=ws.client_id)["prompt_id"]
        hit = ws.wait(lambda m: trigger(m, pid) or is_end(m, pid), timeout)
        assert hit is not None, f"no trigger message within {timeout} s"
        assert not is_end(hit[1], pid), f"the prompt ended before the trigger: {hit[1]}"
        time.sleep(delay)
        assert srv.request("POST", "/interrupt", {"prompt_id": pid})[0] == 200
        sent = time.monotonic()
        end = ws.wait(lambda m: is_end(m, pid), timeout)
        assert end is not None, "the interrupted prompt never ended"
        entry = sustained.history_entry(srv, pid)
    return entry, ws, end[0] - sent


def interrupted_in(srv, entry) -> dict:
    assert entry["status"]["status_str"] == "error", entry["status"]
    found = srv.messages(entry, "execution_interrupted")
    assert found, f"not interrupted: {srv.describe_failure(entry)}"
    return found[0][1]


def assert_next_prompt_works(srv):
    entry = run_ok(srv, bundled(prefix="after_interrupt"))
    assert images(srv, entry)[0].size == (256, 256)


# ------------------------------------------------------------------------------- sustained use
def test_sustained_short_run(srv):
    """bench/sustained.py's run on 10 prompts: a plan of 5 (varied prompts, seeds, aspect ratios and batch
    sizes 1-2; two interrupted; prompts 2-3 on the random-weight stand-in and back), then the same plan
    again with other seeds and texts. Every prompt finishes or stops as asked, writes exactly its PNGs
    (none when interrupted), the server answers after each, the switched-out models are released, and
    the RSS after the second pass is within 10% of the RSS after the first (the bench: 5% after 180 more
    prompts; here the first pass is the allocator's warm-up of a possibly fresh server)."""
    import dataclasses
    plan = sustained.make_plan(5, seed=11, interrupts=2, switch_at=2, batches=(1, 2))
    again = [dataclasses.replace(s, index=s.index + len(plan), seed=s.seed + 1, text=s.text + ", again") for s in plan]
    report = sustained.run(srv, plan=plan + again, baseline_after=len(plan), tolerance=0.10,
                           output_dir=srv.output_dir, log=None)
    print(report.summary())
    assert not report.problems, report.summary()
    outcomes = [r.outcome for r in report.results]
    asked = [r.spec.interrupt is not None for r in report.results]
    assert outcomes == ["interrupted" if a else "finished" for a in asked], outcomes
    assert sum(asked) == 4 and all(r.answer_s is not None for r in report.results)
    assert [what for what, _ in report.loads if what != "text encoder"][-2:] == ["infinity_2b_reg.pth", BUNDLED]
    assert report.memory_ok, report.summary()


# ------------------------------------------------------------------------- interrupt at every point
@pytest.fixture(scope="module")
def slow_models(infinity):
    """A 140 MB transformer (about half a second to load from a warm page cache) and a T5 with 12 wide
    layers (1-2 s to encode 512 tokens on one CPU thread), both random weights, in the session server's
    model folders for this module only (other tests check the exact lists of choices)."""
    big = stand_ins.T_2B.with_(width=512, depth=8, block_chunks=4, num_heads=8, name="stand_in_slow_load")
    transformer = Path(infinity.models_dir) / "infinity" / "infinity_slow_load.pth"
    if not transformer.exists():
        stand_ins.write_flat_pth(transformer, big, seed=21)
    t5 = Path(infinity.models_dir) / "text_encoders" / "t5-slow-128"
    if not (t5 / "model.safetensors").exists():
        import shutil

        import torch
        import transformers
        from safetensors.torch import save_file
        t5.mkdir(parents=True, exist_ok=True)
        shutil.copy(infinity.paths["t5"] / "spiece.model", t5 / "spiece.model")
        cfg = transformers.T5Config(vocab_size=96, d_model=stand_ins.TEXT_CHANNELS, d_ff=8192, d_kv=32, num_heads=4,
                                    num_layers=12, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
        torch.manual_seed(5)
        model = transformers.T5EncoderModel(cfg).eval()
        cfg.save_pretrained(t5)
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"},
                  str(t5 / "model.safetensors"))
    yield {"transformer": transformer.name, "t5": t5.name}
    stand_ins.remove(transformer)
    stand_ins.remove(t5)


def test_interrupt_while_loading_the_model(srv, slow_models):
    """Interrupt while Load Infinity Model reads the weights: the prompt stops before anything is sampled
    or saved. The read cannot stop halfway, so the finished load is kept (ComfyUI caches the loader's
    output): the next prompt with this model does not read it again."""
    name = slow_models["transformer"]
    graph = t2i(transformer=name, vae="infinity_vae_d32reg.pth", prefix="interrupt_load")
    before, log_at = output_files(srv), len(srv.log_text())
    entry, ws, _ = interrupt_when(srv, graph, lambda m, pid: is_type(m, "executing", pid) and m["data"]["node"] == "1")
    data = interrupted_in(srv, entry)
    assert not {"5", "6", "7"} & set(data["executed"]), data
    assert "7" not in entry.get("outputs", {}) and output_files(srv) == before
    graph["5"]["inputs"]["seed"] += 1
    run_ok(srv, graph)
    loads = srv.log_text()[log_at:].count(f"Infinity: loaded {name}:")
    # stopped at the loader's own check (before reading) -> read once by the next prompt; stopped at the
    # next node -> read once, before the interrupt, and kept
    assert loads == 1, (loads, data)


def test_interrupt_while_encoding_text(srv, slow_models):
    """Interrupt half a second into Infinity Text Encode running T5 over 512 tokens (about 1-2 s here): the
    encoder stops at its next layer (node 3 is the one interrupted, not the node after it), nothing is
    saved, the next prompt works."""
    te = slow_models["t5"]
    run_ok(srv, t2i(text_encoder=te, prompt="a red circle", prefix="slow_t5_warm", save=False))  # load and cache T5
    words = "a small red circle on the left and a big blue square at the top green background".split()
    long_prompt = " ".join(words[i % len(words)] for i in range(700)) + f" {uuid.uuid4().hex[:8]}"
    before = output_files(srv)
    entry, ws, stop_s = interrupt_when(srv, t2i(text_encoder=te, prompt=long_prompt, prefix="interrupt_encode"),
                                       lambda m, pid: is_type(m, "executing", pid) and m["data"]["node"] == "3",
                                       delay=0.5)
    data = interrupted_in(srv, entry)
    assert (data["node_id"], data["node_type"]) == ("3", "InfinityTextEncode"), data
    assert stop_s < 2.0, f"the encoder took {stop_s:.1f} s to stop"
    assert output_files(srv) == before
    assert_next_prompt_works(srv)


@pytest.mark.parametrize("scale", [7, 10, 13])
def test_interrupt_during_a_scale(srv, scale):
    """Interrupt while the sampler draws scale `scale` of 13 (after progress scale-1 arrived): it stops
    after that scale (its progress step is never sent, or is the one already on its way), nothing is
    decoded or saved, and the next prompt works."""
    before = output_files(srv)
    entry, ws, _ = interrupt_when(
        srv, bundled(tier="1M", prefix=f"interrupt_scale{scale}"),
        lambda m, pid: is_type(m, "progress", pid) and m["data"]["node"] == "5" and m["data"]["value"] == scale - 1)
    data = interrupted_in(srv, entry)
    assert (data["node_id"], data["node_type"]) == ("5", "InfinitySampler"), data
    steps = [m["data"]["value"] for m in ws.json_messages() if m.get("type") == "progress" and m["data"]["node"] == "5"]
    assert scale - 1 <= max(steps) <= scale, steps
    assert not [m for m in ws.json_messages() if m.get("type") == "executing" and m["data"].get("node") == "6"]
    assert output_files(srv) == before
    assert_next_prompt_works(srv)


def test_interrupt_during_vae_decode(srv):
    """Interrupt half a second into Infinity VAE Decode decoding a 1024x1024 image (about 5 s here): the
    decoder stops at its next layer (node 6 is the one interrupted: Save Image never starts), no file is
    written."""
    before = output_files(srv)
    entry, ws, stop_s = interrupt_when(
        srv, bundled(tier="1M", prefix="interrupt_decode"),
        lambda m, pid: is_type(m, "executing", pid) and m["data"]["node"] == "6", delay=0.5)
    data = interrupted_in(srv, entry)
    assert (data["node_id"], data["node_type"]) == ("6", "InfinityVAEDecode"), data
    assert "7" not in entry.get("outputs", {}) and output_files(srv) == before
    assert stop_s < 2.0, f"the decode took {stop_s:.1f} s to stop"
    assert_next_prompt_works(srv)


def test_cancel_a_queued_prompt(srv):
    """A prompt deleted from the queue (the page's Cancel on a pending item) never runs and writes nothing;
    the one running meanwhile finishes."""
    with Listener(srv.port) as ws:
        first = srv.queue_prompt(bundled(batch_size=2, prefix="cancel_first"), client_id=ws.client_id)["prompt_id"]
        second = srv.queue_prompt(bundled(prefix="cancel_second"), client_id=ws.client_id)["prompt_id"]
        assert srv.request("POST", "/queue", {"delete": [second]})[0] == 200
        assert ws.wait(lambda m: is_end(m, first), 300)
        time.sleep(0.5)
    assert sustained.history_entry(srv, first)["status"]["status_str"] == "success"
    assert srv.request("GET", f"/history/{second}")[1] == {}
    assert not [m for m in ws.json_messages() if (m.get("data") or {}).get("prompt_id") == second]
    assert not glob.glob(os.path.join(srv.output_dir, "cancel_second*"))


# ------------------------------------------------------------------------------------- concurrency
def test_two_clients_get_their_own_results_and_progress(srv):
    """Two clients (own client_id and websocket) submit two prompts each at the same moment: ComfyUI queues
    them; every prompt succeeds with its own settings; each client receives progress, previews and
    execution messages only for its own prompts (previews carry the prompt id with ComfyUI's
    supports_preview_metadata feature), and a third, idle client none."""
    wide = 4  # template 0.75 (4:3): client b draws 320x240
    label = srv.node_info("InfinityScaleSchedule")["input"]["required"]["aspect_ratio"][1]["options"][wide]
    barrier = threading.Barrier(2)
    ids: dict[str, list[str]] = {"a": [], "b": []}
    seeds = {"a": [101, 102], "b": [201, 202]}
    errors = []

    def submit(who, ws):
        try:
            barrier.wait(10)
            for k, seed in enumerate(seeds[who]):
                graph = bundled(seed=seed, aspect=label if who == "b" else "1:1 (1024x1024)",
                                prefix=f"client_{who}{k}")
                ids[who].append(srv.queue_prompt(graph, client_id=ws.client_id)["prompt_id"])
        except Exception as e:  # reported below
            errors.append(e)

    with Listener(srv.port, supports_preview_metadata=True) as wa, \
            Listener(srv.port, supports_preview_metadata=True) as wb, Listener(srv.port) as idle:
        threads = [threading.Thread(target=submit, args=(w, ws)) for w, ws in (("a", wa), ("b", wb))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        for who, ws in (("a", wa), ("b", wb)):
            for pid in ids[who]:
                assert ws.wait(lambda m: is_end(m, pid), 300), f"client {who}: no end for {pid}"
        time.sleep(0.5)
    assert set(ids["a"]).isdisjoint(ids["b"])

    for who, ws in (("a", wa), ("b", wb)):
        own = set(ids[who])
        for k, pid in enumerate(ids[who]):
            entry = sustained.history_entry(srv, pid)
            assert entry["status"]["status_str"] == "success", srv.describe_failure(entry)
            (im,) = entry["outputs"]["7"]["images"]
            assert im["filename"].startswith(f"client_{who}{k}_"), im
            pic = Image.open(io.BytesIO(srv.view(im["filename"], im["subfolder"], im["type"])))
            assert json.loads(pic.text["prompt"])["5"]["inputs"]["seed"] == seeds[who][k]
            assert pic.size == ((256, 256) if who == "a" else sustained.expected_size(wide)), pic.size
        msgs = ws.json_messages()
        foreign = [m for m in msgs if "prompt_id" in (m.get("data") or {}) and m["data"]["prompt_id"] not in own]
        assert not foreign, foreign[:3]
        for pid in own:
            kinds = {m["type"] for m in msgs if (m.get("data") or {}).get("prompt_id") == pid}
            assert {"execution_start", "executing", "progress", "executed", "execution_success"} <= kinds, kinds
            steps = [m["data"]["value"] for m in msgs if is_type(m, "progress", pid) and m["data"]["node"] == "5"]
            assert steps == list(range(1, 8)), steps
        # binary frame 4: preview with metadata (4-byte length, JSON, image); one per scale of each own prompt
        meta = [json.loads(b[8:8 + int.from_bytes(b[4:8], "big")]) for b in ws.binary_messages()
                if int.from_bytes(b[:4], "big") == 4]
        assert sorted(m["prompt_id"] for m in meta) == sorted(ids[who] * 7), meta
    assert not [m for m in idle.json_messages() if (m.get("data") or {}).get("prompt_id")]
    assert not idle.binary_messages()


# ------------------------------------------------------------------------------------- node inputs
def infinity_nodes(srv) -> dict:
    info = srv.node_info()
    nodes = {k: v for k, v in info.items() if v.get("python_module") == PACK_MODULE}
    assert "InfinitySampler" in nodes and "InfinityScaleSchedule" in nodes, sorted(nodes)
    return nodes


def numeric_inputs(nodes: dict):
    for cls, info in sorted(nodes.items()):
        for group in ("required", "optional"):
            for name, spec in (info["input"].get(group) or {}).items():
                if spec[0] in ("INT", "FLOAT"):
                    yield cls, name, spec[0], spec[1] if len(spec) > 1 else {}


def test_every_numeric_input_has_bounds(srv):
    found = list(numeric_inputs(infinity_nodes(srv)))
    assert len(found) >= 9, found  # schedule width/height, sampler seed/cfg/tau/top_k/top_p/layer/batch
    missing = [(c, n) for c, n, _, o in found if "min" not in o or "max" not in o]
    assert not missing, f"numeric inputs without min/max: {missing}"
    for cls, name, kind, o in found:
        assert o["min"] < o["max"] and all(np.isfinite([o["min"], o["max"]])), (cls, name, o)
        assert o["min"] <= o.get("default", o["min"]) <= o["max"], (cls, name, o)


def test_bounds_are_enforced_when_queueing(srv):
    """For every numeric input of every Infinity node: a value just outside its range is refused by POST
    /prompt (HTTP 400) with ComfyUI's value_smaller_than_min / value_bigger_than_max naming the input, so
    no node ever sees it. (Each node alone, feeding ComfyUI's PreviewAny; its other inputs missing.)"""
    checked = 0
    for cls, name, kind, o in numeric_inputs(infinity_nodes(srv)):
        step = 1 if kind == "INT" else max(float(o.get("step", 0.01)), 1e-3)
        for value, err in ((o["max"] + step, "value_bigger_than_max"), (o["min"] - step, "value_smaller_than_min")):
            graph = {"1": {"class_type": cls, "inputs": {name: value}},
                     "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
            with pytest.raises(ComfyError) as exc:
                srv.queue_prompt(graph)
            assert exc.value.status == 400
            errs = exc.value.response["node_errors"]["1"]["errors"]
            assert any(e["type"] == err and e["details"] == name for e in errs), (cls, name, value, errs)
            checked += 1
    assert checked >= 18


@pytest.mark.parametrize("name, text, message", [
    ("cfg_list", "3, 3, 3, x, 3, 3, 3", "cfg_list: item 4 ('x') is not a number"),
    ("cfg_list", "3 3 3 3 3 3 nan", "cfg_list: item 7 ('nan') is not a finite number"),
    ("cfg_list", "1e999, 3, 3, 3, 3, 3, 3", "cfg_list: item 1 ('1e999') is not a finite number"),
    ("cfg_list", "3;3;3;3;3;3;3", "cfg_list: item 1 ('3;3;3;3;3;3;3') is not a number"),
    ("tau_list", "1, 1, 1, 1, 1, 0.5x, 1", "tau_list: item 6 ('0.5x') is not a number"),
    ("tau_list", "1, 1, 1, 1, 1, 1, -inf", "tau_list: item 7 ('-inf') is not a finite number"),
    ("tau_list", "1 1 1 1 1 1 1 1", "tau_list has 8 values but the scale schedule (1:1, 256x256, tier 0.06M) has 7"),
])
def test_per_scale_list_errors_point_at_the_item(srv, name, text, message):
    """A bad per-scale list is refused by the sampler with an execution error (over the HTTP API) that
    names the node, the list, the item's position and its text, and says what to type instead."""
    graph = bundled()
    graph["5"]["inputs"][name] = text
    entry = srv.run(graph, timeout=300)
    assert entry["status"]["status_str"] == "error", entry["status"]
    (_, data), = srv.messages(entry, "execution_error")
    assert (data["node_id"], data["node_type"]) == ("5", "InfinitySampler")
    msg = data["exception_message"]
    assert msg.startswith(f"Infinity Sampler: {message}"), msg
    assert "7 numbers separated by commas" in msg or "exactly 7 numbers" in msg, msg


# ---------------------------------------------------------------------------------- memory pressure
_RAM_USAGE_PROBE = r"""
import importlib.util, json, os, sys
comfy_dir, repo = sys.argv[1], sys.argv[2]
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, comfy_dir)
import comfy.options
comfy.options.enable_args_parsing()
import folder_paths  # noqa: F401  (ComfyUI's own start-up order)
import comfy.model_management  # noqa: F401
spec = importlib.util.spec_from_file_location("ComfyUI_Infinity", os.path.join(repo, "__init__.py"),
                                              submodule_search_locations=[repo])
pack = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = pack
spec.loader.exec_module(pack)
from ComfyUI_Infinity.nodes import loader_nodes as L
label = "Infinity tiny shapes (bundled)"
model = L.InfinityModelLoader.execute(transformer=label, vae="auto", weight_dtype="auto", attention="auto").args[0]
te = L.InfinityTextEncoderLoader.execute(text_encoder=label, dtype="auto").args[0]
nbytes = lambda m: sum(t.numel() * t.element_size() for t in m.state_dict().values())
print(json.dumps({"model": [model.get_ram_usage(), nbytes(model.transformer) + nbytes(model.vae)],
                  "text_encoder": [te.get_ram_usage(), nbytes(te.encoder.model)]}))
"""


def test_loader_outputs_report_their_ram_use(infinity):
    """ComfyUI's RAM-pressure cache (--cache-ram) scores each cached output by get_ram_usage(), as ComfyUI's
    own model, CLIP and VAE outputs report it; an output without it counts as 0.1 byte and would be
    dropped after every image and latent. The loaders' outputs report their weight bytes. (The loaders
    called in-process inside the real ComfyUI install, as ComfyUI calls them.)"""
    import subprocess
    srv = infinity.server
    env = srv.server_env()
    env["INFINITY_BUNDLED_DIR"] = str(infinity.bundle_dir)
    r = subprocess.run([srv.python, "-c", _RAM_USAGE_PROBE, srv.comfy_dir, str(REPO)], capture_output=True, text=True,
                       env=env, cwd=srv.comfy_dir, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for what, (reported, weights) in got.items():
        assert reported == weights > 0, (what, reported, weights)


def _mem_available() -> int:
    import psutil
    return psutil.virtual_memory().available


class Ballast:
    """RAM held by this test process, resized until the machine's available memory sits at a target
    (available memory does not follow allocations byte for byte: the kernel also reclaims page cache)."""

    CHUNK = 8 * 2 ** 20

    def __init__(self):
        self.blocks = []

    def settle(self, target: int, tolerance: int = 24 * 2 ** 20) -> int:
        for _ in range(2000):
            gap = _mem_available() - target
            if abs(gap) <= tolerance:
                break
            if gap > 0:
                n = max(1, min(gap // self.CHUNK, 64))
                self.blocks += [np.ones(self.CHUNK, dtype=np.uint8) for _ in range(n)]  # written: resident
            elif self.blocks:
                del self.blocks[-max(1, min(-gap // self.CHUNK, len(self.blocks))):]
            else:
                break
        return _mem_available()

    def release(self):
        self.blocks = []
        gc.collect()


def test_ram_pressure_frees_the_first_model_when_a_second_one_needs_the_memory(infinity, tmp_path):
    """On a CPU, comfy.model_management never unloads anything (load_models_gpu frees memory only on GPU
    devices); what frees RAM is ComfyUI's output cache. A second server runs with --cpu --cache-ram H,
    ComfyUI's RAM-pressure cache: after each node, while the available RAM is below H it drops cached
    node outputs (the largest by get_ram_usage(), older workflows first) until 1.1 H is free. With
    room, model A stays cached (the next prompt does not read it again). When model B (the same size)
    is read while the available RAM is a quarter of a model above H, A is dropped and its memory really
    freed: the next prompt with A reads it again, and after POST /free (ComfyUI drops its cache) no
    model made by our loaders is alive. (Counted with the loaders' own tally of live models, not with
    the RSS: the C allocator may keep freed memory in the process, so the RSS need not drop.) The
    available RAM is set by this process holding memory, measured just before each step (the machine's
    other processes only need to stay within a quarter of a model, ~80 MB, meanwhile)."""
    if _mem_available() < 5 * 2 ** 30:
        pytest.skip("needs 5 GiB of available RAM")
    models = tmp_path / "models"
    cfg = stand_ins.T_2B.with_(width=768, depth=8, block_chunks=4, num_heads=12, name="stand_in_ram")
    for k in "ab":
        stand_ins.write_flat_pth(models / "infinity" / f"infinity_ram_{k}.pth", cfg, seed=30 + ord(k))
    stand_ins.write_vae_pth(models / "vae" / stand_ins.NAME_VAE_2B, stand_ins.VAE_D32, seed=1)
    size = (models / "infinity" / "infinity_ram_a.pth").stat().st_size
    assert size > 250 * 2 ** 20, size
    headroom = _mem_available() - 3 * 2 ** 30  # room for the server, model A and slack
    base = infinity.server
    server = ComfyServer(base.comfy_dir, base.python, {"ComfyUI-Infinity": str(REPO)}, base_dir=str(tmp_path / "comfy"),
                         models_dir=str(models), extra_args=["--cache-ram", f"{headroom / 2 ** 30:.3f}"],
                         env={"OMP_NUM_THREADS": "1", "INFINITY_BUNDLED_DIR": str(infinity.bundle_dir)},
                         torchvision_stubs=str(REPO / "scripts" / "stubs"),
                         expect_nodes=["InfinityModelLoader", "InfinitySampler"])
    ballast = Ballast()

    def prompt(k, n):
        """Load model k and use it: its VAE encodes a plain picture (colour n: new work each time) and decodes
        it (sampling with a 330 MB transformer would cost seconds per prompt and show nothing more)."""
        return {"1": {"class_type": "InfinityModelLoader", "inputs": {
                    "transformer": f"infinity_ram_{k}.pth", "vae": stand_ins.NAME_VAE_2B, "weight_dtype": "auto",
                    "attention": "auto"}},
                "2": {"class_type": "EmptyImage", "inputs": {"width": 256, "height": 256, "batch_size": 1,
                                                             "color": 0x102030 * n}},
                "3": {"class_type": "InfinityScaleSchedule", "inputs": {
                    "mode": "aspect ratio", "aspect_ratio": "1:1 (1024x1024)", "tier": "0.06M", "width": 1024,
                    "height": 1024}},
                "4": {"class_type": "InfinityVAEEncode", "inputs": {"model": ["1", 0], "image": ["2", 0],
                                                                    "scale_schedule": ["3", 0]}},
                "5": {"class_type": "InfinityVAEDecode", "inputs": {"model": ["1", 0], "codes": ["4", 0]}},
                "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}}}

    def loads(k):
        return re.findall(rf"Infinity: loaded infinity_ram_{k}\.pth:.*?In memory: (\d+) transformer", server.log_text())

    server.start()
    try:
        run_ok(server, prompt("a", 1))
        assert loads("a") == ["1"]
        # room left: half a model above the headroom -> model A stays cached
        ballast.settle(headroom + size // 2)
        run_ok(server, prompt("a", 2))
        assert loads("a") == ["1"], "model A was read again although RAM was not short"
        # model B needs the memory (a quarter of a model above H, so reading B goes below H): ComfyUI drops
        # the cached outputs after the loader, and model A's memory is freed
        ballast.settle(headroom + size // 4)
        run_ok(server, prompt("b", 3))
        ballast.release()
        assert loads("b") == ["2"], "A was not cached any more when B was read"
        # A was dropped: the next prompt with it reads it again
        run_ok(server, prompt("a", 4))
        assert len(loads("a")) == 2, "model A was still cached"
        # and nothing of ours keeps a dropped model alive: once ComfyUI drops its whole cache (POST /free),
        # the next load reports itself alone in memory (the count is of the live models our loaders made)
        assert server.request("POST", "/free", {"unload_models": True, "free_memory": True})[0] == 200
        time.sleep(1.0)
        run_ok(server, t2i(transformer=BUNDLED, text_encoder=BUNDLED, save=False))
        (last,) = re.findall(r"Infinity: loaded Infinity tiny shapes \(bundled\):.*?In memory: (\d+) transformer",
                             server.log_text())
        assert last == "1", "a dropped model is still alive"
    finally:
        ballast.release()
        server.stop()
