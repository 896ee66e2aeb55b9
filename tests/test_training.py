"""Training: data sources, the held-out split, the pixel analyzer, BSQ training losses, the transformer
and VAE trainers (loss goes down, checkpoints load through the user loaders, exact resume) and
two-process DDP on CPU with gloo. Everything uses tiny models: the whole file takes well under a minute
of CPU on one core apart from the torchrun test (~30 s)."""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from infinity_core import data as D
from infinity_core import schedules as S
from infinity_core import shapes_eval as E
from infinity_core import train as T
from infinity_core import train_vae as TV

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import TINY_VAE, tiny_t5_folder, tiny_vae  # noqa: E402


def _args(module, argv):
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return p.parse_args([str(a) for a in argv])


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    """A tiny VAE file (the VAE layout users load) and a tiny T5 folder with a sentencepiece tokenizer."""
    root = tmp_path_factory.mktemp("tiny_assets")
    vae = tiny_vae()
    T.save_safetensors(vae.state_dict(), root / "vae.safetensors")
    t5 = tiny_t5_folder(root / "t5")
    return {"vae": root / "vae.safetensors", "t5": t5, "root": root}


def _train_argv(assets, out, steps, extra=()):
    return ["--vae", assets["vae"], "--text-encoder", assets["t5"], "--train-text-encoder",
            "--depth", 2, "--width", 64, "--heads", 2, "--block-chunks", 2, "--batch-size", 4,
            "--steps", steps, "--feature-cache", 8, "--eval-samples", 4, "--eval-every", 0, "--ckpt-every", 0,
            "--log-every", 1, "--threads", 1, "--out", out, "--cache-dir", assets["root"] / "cache", *extra]


# ------------------------------------------------------------------------------------------------
# data


def test_synthetic_shapes_are_deterministic_and_captioned():
    a, b = D.SyntheticShapes(3), D.SyntheticShapes(3)
    for i in (0, 5, 17):
        ia, ib = a.item(i), b.item(i)
        assert ia["caption"] == ib["caption"] and torch.equal(ia["image"], ib["image"])
        assert ia["image"].shape == (3, 256, 256) and -1 <= float(ia["image"].min()) <= float(ia["image"].max()) <= 1
    assert a.item(0)["caption"] != D.SyntheticShapes(4).item(0)["caption"] or \
        not torch.equal(a.item(0)["image"], D.SyntheticShapes(4).item(0)["image"])
    caps = [a.scene(i).caption() for i in range(400)]
    assert any(c.startswith("two ") for c in caps) and any(" and a " in c for c in caps)
    assert all(c.endswith(" background") for c in caps)
    words = {w.strip(",") for c in caps for w in c.split()}
    assert set(D.SHAPES) <= words and set(D.COLOURS) <= words and len(D.COLOURS) >= 8
    for i in range(200):  # no object ever has the background's colour
        sc = a.scene(i)
        assert all(o.colour != sc.background for o in sc.objects)


def test_held_out_split_is_disjoint_and_covers_pairs():
    train = [D.SyntheticShapes(0).scene(i) for i in range(3000)]
    assert not any(any(sc.held_out_objects()) for sc in train)
    prompts = E.heldout_scenes(200, seed=0)
    assert len({p.caption() for p in prompts}) == 200
    assert all(all(p.held_out_objects()) for p in prompts)
    assert {p.caption() for p in prompts}.isdisjoint({s.caption() for s in train})
    assert sum(len(p.objects) == 2 for p in prompts) >= 40
    assert [p.caption() for p in E.heldout_scenes(20, seed=1)] != [p.caption() for p in prompts[:20]]
    # every (shape, colour) and (colour, background) pair is still seen in training
    seen_sc = {(o.shape, o.colour) for sc in train for o in sc.objects}
    seen_cb = {(o.colour, sc.background) for sc in train for o in sc.objects}
    assert len(seen_sc) == len(D.SHAPES) * len(D.COLOURS)
    assert len(seen_cb) == len(D.COLOURS) * (len(D.COLOURS) - 1)


def test_analyzer_reads_rendered_scenes_perfectly():
    scenes = E.heldout_scenes(60, seed=2)
    rows = []
    for j, sc in enumerate(scenes):
        im = D.render_scene(sc, 256, 256, random.Random(j))
        rows.append(E.score(sc, E.analyze(im)))
    m = E.aggregate(rows)
    for k in ("colour", "shape", "position", "counting", "size", "overall"):
        assert m[k] == 1.0, (k, m)


def test_analyzer_detects_wrong_pictures():
    sc = D.Scene("blue", (D.ShapeObject("star", "red", "large", "left"),))
    wrong = D.Scene("green", (D.ShapeObject("circle", "yellow", "large", "right"),
                              D.ShapeObject("square", "white", "small", "left")))
    s = E.score(sc, E.analyze(D.render_scene(wrong)))
    assert not s["background"] and not s["colour"] and not s["counting"]
    blank = np.zeros((256, 256, 3), np.uint8)
    s = E.score(sc, E.analyze(blank))
    assert s["shape"] == [False] and s["position"] == [False] and not s["counting"]


def test_label_components_8_connectivity():
    m = np.zeros((6, 6), bool)
    m[0, 0] = m[1, 1] = True           # diagonal -> one component
    m[4:6, 4:6] = True
    m[0, 4] = True
    lab, n = E.label_components(m)
    assert n == 3 and lab[0, 0] == lab[1, 1] != 0 and lab[4, 4] == lab[5, 5]


def test_jsonl_dataset_groups_by_template_and_sampler_shards(tmp_path):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i in range(6):
        w, h = (300, 300) if i < 4 else (200, 400)
        Image.new("RGB", (w, h), (i * 40, 10, 200)).save(img_dir / f"{i}.png")
    with open(tmp_path / "1.000_000.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"image_path": f"imgs/{i}.png", "h_div_w": 1.0, "text": f"short {i}",
                                "long_caption": f"Long one {i}. Second sentence. Third -- junk",
                                "long_caption_type": "x"}) + "\n")
    with open(tmp_path / "misc.jsonl", "w") as f:  # not a template file name: grouped by h_div_w
        for i in range(4, 6):
            f.write(json.dumps({"image_path": str(img_dir / f"{i}.png"), "h_div_w": 2.0, "text": "tall"}) + "\n")
    ds = D.JsonlImageText(tmp_path, tier="0.06M")
    assert sorted(ds.groups) == [1.0, 2.0] and len(ds.groups[1.0]) == 4 and len(ds.groups[2.0]) == 2
    it = ds.item(ds.groups[2.0][0], random.Random(0))
    assert tuple(it["image"].shape) == (3, *S.image_size(S.get_schedule(2.0, "0.06M")))
    rng = random.Random(0)
    caps = {D.choose_caption(ds.records[0], rng) for _ in range(50)}
    assert "short 0" in caps and any(c.startswith("Long one 0.") for c in caps)
    assert not any("junk" in c or "--" in c for c in caps)
    s0 = D.TemplateBatchSampler(ds.groups, 2, seed=1, rank=0, world_size=2)
    s1 = D.TemplateBatchSampler(ds.groups, 2, seed=1, rank=1, world_size=2)
    b0, b1 = s0.epoch_batches(0), s1.epoch_batches(0)
    assert b0 and len(b0) == len(b1) and not set(sum(b0, [])) & set(sum(b1, []))
    for b in b0 + b1:
        assert len({ds.records[i]["template"] for i in b}) == 1
    assert s0.batch_at(len(b0))[1] == s0.epoch_batches(1)[0] and s0.batch_at(0)[1] == b0[0]


# ------------------------------------------------------------------------------------------------
# BSQ training quantiser, init, lr


def test_straight_through_bsq_matches_inference_quantiser_and_passes_gradients():
    vae = tiny_vae()
    torch.manual_seed(0)
    f = torch.randn(2, 16, 16, 16, requires_grad=True)
    sched = TV.latent_schedule(16, 16)
    assert sched == S.get_schedule(1.0, "0.06M")
    summed, st = TV.quantize_train(f, sched)
    ref, bits, _ = vae.quantize(f.detach(), sched)
    assert torch.allclose(summed, ref, atol=1e-5)
    (summed.square().sum() + st["commit"] + st["ent_sample"] - st["ent_book"]).backward()
    assert f.grad is not None and float(f.grad.abs().sum()) > 0
    assert 0 <= float(st["ent_sample"]) <= np.log(2) + 1e-6 and 0 <= float(st["ent_book"]) <= np.log(2) + 1e-6
    assert TV.latent_schedule(8, 8) == S.get_schedule(1.0, "0.06M")[:5]
    assert TV.latent_schedule(32, 32, patchify=True) == S.vae_schedule(S.get_schedule(1.0, "0.06M"), True)


def test_official_init_and_param_groups():
    from infinity_core.transformer import Infinity
    from infinity_core.zoo import TransformerConfig
    m = Infinity(TransformerConfig(depth=2, width=64, num_heads=2, vae_bits=16, text_channels=128, block_chunks=2))
    T.init_weights(m)
    assert float(m.cfg_uncond.std()) == pytest.approx(1.2 / 128 ** 0.5 * 0.88, rel=0.15)  # truncated normal
    assert float(m.head.weight.abs().max()) < 0.02 * 2 + 1e-6
    g = m.blocks[0].ada_gss
    assert float(g[..., 0:2, :].abs().max()) < 1e-4 and float(g[..., 2:, :].abs().max()) < 1e-2
    decay, no_decay = T.param_groups(m, 0.005)
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert {"cfg_uncond", "pos_start", "lvl_embed.weight", "text_proj_for_sos.ca.mat_q"} <= nd
    assert all(names[id(p)].endswith("weight") and p.ndim >= 2 for p in decay["params"])
    assert T.lr_at(0, 100, 1.0, 0, "constant", 0.7) == 1.0
    assert T.lr_at(85, 100, 1.0, 0, "linear-decay", 0.7) == pytest.approx(0.5)
    assert T.lr_at(4, 100, 1.0, 10, "constant", 0.7) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------
# trainers


def test_short_transformer_training_lowers_loss_and_checkpoint_loads(tiny_assets, tmp_path):
    out = tmp_path / "run"
    summary = T.train(_args(T, _train_argv(tiny_assets, out, 30, ["--lr", "3e-3", "--cond-drop", "0"])))
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    first = np.mean([r["loss"] for r in log[:3]])
    last = np.mean([r["loss"] for r in log[-5:]])
    assert first > 0.68 and last < first - 0.03, (first, last)
    assert summary["steps"] == 30
    for name in ("ar-ckpt-last.pth", "transformer.pth", "transformer.safetensors", "text_encoder/model.safetensors",
                 "text_encoder/spiece.model", "text_encoder/config.json"):
        assert (out / name).is_file(), name

    # the user-facing loaders read every file the trainer wrote, with the same tensors
    from infinity_core.checkpoint import load_transformer, read_state_dict
    from infinity_core.pipeline import InfinityPipeline
    ck = torch.load(out / "ar-ckpt-last.pth", map_location="cpu", weights_only=True)
    assert set(ck) >= {"args", "arch", "epoch", "iter", "trainer", "acc_str", "milestones"} and ck["iter"] == 30
    ref = ck["trainer"]["gpt_wo_ddp"]
    assert "block_chunks.1.module.0.sa.mat_qkv.weight" in ref and "cfg_uncond" in ref
    for f in ("transformer.pth", "transformer.safetensors", "ar-ckpt-last.pth"):
        m = load_transformer(out / f)
        sd = m.state_dict()
        assert sd.keys() == ref.keys()
        assert all(torch.equal(sd[k], ref[k]) for k in ref), f
    assert read_state_dict(out / "transformer.pth").keys() == ref.keys()
    pipe = InfinityPipeline.from_files(out / "transformer.safetensors", tiny_assets["vae"], out / "text_encoder",
                                       dtype="fp32")
    gen = pipe.generate("a small red circle on the left, blue background", tier="0.06M", seed=0)
    assert gen.images.shape == (1, 256, 256, 3)


def test_resume_reproduces_uninterrupted_training(tiny_assets, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    T.train(_args(T, _train_argv(tiny_assets, a, 4)))
    T.train(_args(T, _train_argv(tiny_assets, b, 2)))
    s = T.train(_args(T, _train_argv(tiny_assets, b, 4)))
    assert s["start"] == 2
    from safetensors.torch import load_file
    sa, sb = load_file(a / "transformer.safetensors"), load_file(b / "transformer.safetensors")
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)
    ta, tb = load_file(a / "text_encoder/model.safetensors"), load_file(b / "text_encoder/model.safetensors")
    assert all(torch.allclose(ta[k], tb[k], atol=1e-6) for k in ta)


def test_bsc_noise_off_changes_training_inputs(tiny_assets, tmp_path):
    """--noise-apply-layers 0 trains on clean teacher forcing (the ablation's other arm)."""
    a, b = tmp_path / "bsc", tmp_path / "clean"
    T.train(_args(T, _train_argv(tiny_assets, a, 2)))
    T.train(_args(T, _train_argv(tiny_assets, b, 2, ["--noise-apply-layers", "0"])))
    la = [json.loads(x)["loss"] for x in (a / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (b / "log.jsonl").read_text().splitlines()]
    assert la[0] != lb[0]


def test_vae_training_lowers_loss_and_loads(tmp_path):
    out = tmp_path / "vae"
    argv = ["--ch-mult", "1,1,1,1,1", "--steps", 14, "--crop", 64, "--crop-until", 12, "--batch-size", 4,
            "--full-batch-size", 1, "--lr", 2e-3, "--warmup-steps", 0, "--eval-samples", 2, "--eval-every", 0,
            "--ckpt-every", 0, "--log-every", 1, "--threads", 1, "--out", out]
    s = TV.train_vae(_args(TV, argv))
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert np.mean([r["loss"] for r in log[-3:]]) < log[0]["loss"]
    assert log[0]["res"] == [64, 64] and log[-1]["res"] == [256, 256]
    assert "psnr" in s["eval"] and "analyzer" in s["eval"]
    from infinity_core.checkpoint import load_vae
    ck = torch.load(out / "vae-ckpt-last.pth", map_location="cpu", weights_only=True)
    for f in ("vae.pth", "vae.safetensors", "vae-ckpt-last.pth"):
        v = load_vae(out / f)
        assert v.cfg.bits == 16 and v.cfg.ch_mult == (1, 1, 1, 1, 1) and v.cfg.num_res_blocks == 1
        assert v.cfg.norm_groups == 8 and v.decoder.norm_out.norm.num_groups == 8  # --norm-groups default
        assert all(torch.equal(v.state_dict()[k], ck["vae"][k]) for k in ck["vae"])


def test_cache_only_computes_the_shared_features_and_trains_nothing(tiny_assets, tmp_path):
    cache = tmp_path / "cache"
    argv = _train_argv(tiny_assets, tmp_path / "run", 3, ["--cache-only"])
    argv[argv.index("--cache-dir") + 1] = cache
    assert T.train(_args(T, argv))["cache_only"]
    names = sorted(p.name for p in cache.glob("features-*.pt"))
    assert len(names) == 2 and names[0].startswith("features-shapes-heldout") and names[1].endswith("-n8.pt")
    assert not (tmp_path / "run" / "transformer.safetensors").exists()


def test_vae_norm_groups_travel_with_the_file(tmp_path):
    """A VAE trained with 8 GroupNorm groups decodes the same pictures after saving and loading (.pth and
    safetensors); read as the released 32 groups it would not; a bad group count is refused by name."""
    import dataclasses
    from safetensors.torch import save_file
    from infinity_core.checkpoint import CheckpointError, load_vae
    cfg = dataclasses.replace(TINY_VAE, norm_groups=8)
    vae = tiny_vae(cfg)
    TV.write_vae_files(vae.state_dict(), cfg, tmp_path)
    codes = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = vae.decode(codes)
        for f in ("vae.pth", "vae.safetensors"):
            assert torch.equal(load_vae(tmp_path / f).decode(codes), want), f
        sd = {k: v.clone() for k, v in vae.state_dict().items()}
        save_file(sd, str(tmp_path / "no_meta.safetensors"))
        assert load_vae(tmp_path / "no_meta.safetensors").cfg.norm_groups == 32
        assert (load_vae(tmp_path / "no_meta.safetensors").decode(codes) - want).abs().max() > 0.05
    save_file(sd, str(tmp_path / "bad.safetensors"), metadata={"infinity.config": json.dumps({"norm_groups": 5})})
    with pytest.raises(CheckpointError, match=r"bad.safetensors.*norm_groups 5.*dividing every channel count \[32\]"):
        load_vae(tmp_path / "bad.safetensors")


def _torchrun(args, tmp_path, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


@pytest.mark.parametrize("fsdp", [False, pytest.param(True, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="FSDP in torch 2.13 needs an accelerator device (no CUDA here)"))],
    ids=["ddp", "fsdp"])
def test_two_process_gloo_training(tiny_assets, tmp_path, fsdp):
    out = tmp_path / "dist"
    argv = _train_argv(tiny_assets, out, 3, ["--eval-every", 2] + (["--fsdp"] if fsdp else []))
    _torchrun(["-m", "infinity_core.train", *argv], tmp_path)
    from infinity_core.checkpoint import load_transformer
    m = load_transformer(out / "transformer.safetensors")
    assert m.cfg.depth == 2
    ck = torch.load(out / "ar-ckpt-last.pth", map_location="cpu", weights_only=True)
    assert ck["iter"] == 3 and ("gpt_fsdp" if fsdp else "gpt_wo_ddp") in ck["trainer"]
    assert len((out / "eval.jsonl").read_text().splitlines()) == 2
    # resume in a single process from the distributed checkpoint (optimizer state keyed by names)
    s = T.train(_args(T, _train_argv(tiny_assets, out, 4)))
    assert s["start"] == 3 and s["steps"] == 4


def test_two_process_gloo_vae_training(tmp_path):
    out = tmp_path / "vae"
    _torchrun(["-m", "infinity_core.train_vae", "--ch-mult", "1,1,1,1,1", "--steps", 2, "--crop", 64,
               "--batch-size", 2, "--eval-samples", 0, "--threads", 1, "--out", out], tmp_path)
    from infinity_core.checkpoint import load_vae
    assert load_vae(out / "vae.safetensors").cfg.bits == 16


def test_caption_parsing_pretraining_teaches_the_t5_to_read_captions(tmp_path):
    """The bundled T5's text-only pretraining: the parse loss falls, the weights are saved back into
    the folder users load, with the report (parse accuracy on training and held-out captions)."""
    from safetensors.torch import load_file
    from infinity_core.text_encoder import T5TextEncoder
    from infinity_core import text_pretrain as TP
    folder = T.create_tiny_t5(tmp_path / "t5", D.caption_corpus(400, 0), d_model=128, d_ff=256, num_heads=4)
    before = load_file(folder / "model.safetensors")
    report = T.pretrain_tiny_t5(folder, 150, "cpu", log=None)
    assert report["loss"] < report["first_loss"] / 3, report
    assert 0.0 <= report["heldout_parse_acc"] <= 1.0 and 0.0 <= report["train_parse_acc"] <= 1.0
    assert json.loads((folder / "pretrain.json").read_text())["steps"] == 150
    after = load_file(folder / "model.safetensors")
    assert after.keys() == before.keys() and any(not torch.equal(after[k], before[k]) for k in before)
    enc = T5TextEncoder(folder, device="cpu", dtype="fp32")  # the user-facing loader reads it
    assert enc.encode(["a small red circle on the left, blue background"]).kv_compact.shape[-1] == 128
    # the labels follow the caption: background, count, then the objects in caption order
    sc = D.Scene("blue", (D.ShapeObject("star", "red", "small", "left"), D.ShapeObject("circle", "white", "large", "right")))
    lab = TP.scene_labels(sc)
    assert len(lab) == len(TP.FIELDS) and lab[:2] == [D.COLOUR_NAMES.index("blue"), 1]
    assert lab[2:6] == [D.COLOUR_NAMES.index("red"), D.SHAPES.index("star"), D.SIZES.index("small"),
                        D.POSITIONS.index("left")]
    # and per position the object there (what a picture token at that position must find in the text)
    at = TP.position_labels(sc)
    assert len(at) == len(TP.AT_FIELDS) == 3 * len(D.POSITIONS)
    left, top = 3 * D.POSITIONS.index("left"), 3 * D.POSITIONS.index("top")
    assert at[left:left + 3] == [D.COLOUR_NAMES.index("red"), D.SHAPES.index("star"), D.SIZES.index("small")]
    assert at[top:top + 3] == [len(D.COLOUR_NAMES), len(D.SHAPES), len(D.SIZES)]  # nothing at the top

