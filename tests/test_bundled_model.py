"""The bundled tiny-shapes model: what ships, that it loads through the loaders users use, and that
it follows held-out prompts (a small subset of `python -m infinity_core eval-shapes`).

Skipped, with one message, in a checkout without bundled/infinity_tiny_shapes/ (the model is
produced by ./scripts/train_bundled.sh)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from infinity_core import data as D
from infinity_core import edit as EDIT
from infinity_core import schedules as S
from infinity_core import shapes_eval as E
from infinity_core.checkpoint import load_pair
from infinity_core.zoo import vae_fits

BUNDLE = Path(__file__).resolve().parent.parent / "bundled" / "infinity_tiny_shapes"
pytestmark = pytest.mark.skipif(not (BUNDLE / "transformer.safetensors").is_file(),
                                reason="bundled/infinity_tiny_shapes/ is not in this checkout "
                                       "(./scripts/train_bundled.sh makes it)")


def test_bundle_files_fit_the_budget_and_the_card_reports_metrics():
    files = [p for p in BUNDLE.rglob("*") if p.is_file()]
    names = {p.relative_to(BUNDLE).as_posix() for p in files}
    for need in ("transformer.safetensors", "vae.safetensors", "defaults.json", "MODEL_CARD.md",
                 "text_encoder/config.json"):
        assert need in names, f"{need} missing from {BUNDLE}"
    assert any(n.startswith("text_encoder/") and n.endswith(".model") for n in names), "no sentencepiece model"
    total = sum(p.stat().st_size for p in files)
    assert total <= 40e6, f"bundle is {total / 1e6:.1f} MB, the budget is 40 MB"
    card = (BUNDLE / "MODEL_CARD.md").read_text()
    for word in ("Training", "Held-out", "colour", "shape", "position", "train_bundled.sh"):
        assert word in card
    defaults = json.loads((BUNDLE / "defaults.json").read_text())
    assert {"cfg", "tau", "top_k", "top_p"} <= set(defaults)


def test_bundle_loads_through_the_user_loaders():
    t, v = load_pair(BUNDLE / "transformer.safetensors", BUNDLE / "vae.safetensors", dtype="fp32")
    assert vae_fits(t.cfg, v.cfg)
    assert all(torch.isfinite(p).all() for p in t.parameters())


@pytest.fixture(scope="module")
def pipe():
    return E.load_pipeline(BUNDLE)


@pytest.fixture(scope="module")
def settings():
    return E.sampling_settings(E.load_defaults(BUNDLE))


@pytest.fixture(scope="module")
def held_out_metrics(pipe, settings):
    """40 held-out prompts (never-seen shape/colour/background combinations) at the bundled defaults."""
    return E.evaluate(pipe, E.heldout_scenes(40, seed=0), seed=0, **settings)["metrics"]


def test_bundled_model_puts_and_counts_objects_where_asked(held_out_metrics):
    m = held_out_metrics
    assert m["position"] >= E.TARGETS["position"] and m["counting"] >= 0.8, E.format_metrics(m)


@pytest.mark.xfail(strict=True, reason="the bundle (88 min of CPU training) draws square, star and triangle "
                   "mostly as rounded blobs and gives both objects of most two-colour scenes one colour "
                   "(MODEL_CARD.md: 200 held-out prompts colour 88.5%, one-object scenes 100%, shape 26.3%); "
                   "issue 5 stays open until a model meets the targets")
def test_bundled_model_meets_the_colour_and_shape_targets(held_out_metrics):
    m = held_out_metrics
    assert all(E.meets_targets(m).values()), E.format_metrics(m)


def test_analyzer_reads_the_vae_reconstructions_of_held_out_scenes(pipe):
    """The VAE's reconstruction of a picture (its own bits on every scale) has the picture's shape,
    drawn with the VAE's rounded points and soft edges, as a model's drawings are. The analyzer must
    read such shapes: it fits each shape's outline to the object's area and centroid (the previous
    fit to the object's bounding box read 36 of these 48 right, the area fit 43: rounded points shrink
    the box). Small stars stay hard for this VAE (its 16-px cells)."""
    import random
    schedule = S.get_schedule(1.0, "0.06M")
    rng = random.Random(5)
    right = 0
    n = 48
    for _ in range(n):
        sc = D.sample_scene(rng, "heldout", p_two=0.0)
        img = D.render_scene(sc, rng=rng)
        src = EDIT.encode_source(pipe.vae, D.to_model_image(img)[None], schedule, pipe.transformer.cfg.patchify)
        an = E.analyze(E.to_uint8(pipe.decode(src.summed_codes)[0]))
        right += bool(an.objects) and an.objects[0].shape == sc.objects[0].shape
    assert right / n >= 0.85, f"{right}/{n} shapes read right in the VAE's reconstructions"


def test_same_seed_same_picture_other_seed_other_picture(pipe):
    prompt = "a large yellow star in the centre, purple background"
    a = pipe.generate([prompt], seed=5, seed_mode="per_image", h_div_w=1.0, tier="0.06M").images
    b = pipe.generate([prompt], seed=5, seed_mode="per_image", h_div_w=1.0, tier="0.06M").images
    c = pipe.generate([prompt], seed=6, seed_mode="per_image", h_div_w=1.0, tier="0.06M").images
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ------------------------------------------------------------------------------------------------
# Infinity Edit with the bundled model (issue 6; the 50-source study is bench/edit_study.py)

def test_masked_edit_changes_the_mask_and_keeps_the_rest(pipe, settings):
    """A mask around the object, keep_scales 3 (the 4x4 and coarser scales kept, so the band around
    the mask is one 6x6 cell, 43 px): outside the mask and its band the picture stays within 1 grey
    level (mean absolute difference) of the source's reconstruction; inside, the object takes the new
    colour."""
    schedule = S.get_schedule(1.0, "0.06M")
    img = pipe.generate(["a large red circle on the left, blue background"], seed=3, seed_mode="per_image",
                        h_div_w=1.0, tier="0.06M", **settings).images
    src = EDIT.encode_source(pipe.vae, img.permute(0, 3, 1, 2) * 2 - 1, schedule, pipe.transformer.cfg.patchify)
    recon = E.to_uint8(pipe.decode(src.summed_codes)[0]).astype(np.float64)
    m = torch.zeros(256, 256)
    m[48:208, 8:136] = 1  # the left object's region, with a margin
    cond = pipe.encode_prompts(["a large yellow circle on the left, blue background"])
    res = EDIT.edit(pipe.transformer, src, cond.kv_compact, cond.cu_seqlens, 3, mask=m, seed=7, **settings)
    out = E.to_uint8(pipe.decode(res.summed_codes)[0])
    band = EDIT.border_band_px(m, S.vae_schedule(schedule, False), (256, 256), 3)
    assert band == 43
    grown = EDIT.grow_mask(m, band).numpy()
    diff = np.abs(out - recon).mean(-1)
    assert diff[~grown].mean() <= 1.0, (band, diff[~grown].mean())
    assert diff[m.bool().numpy()].mean() > 10
    an = E.analyze(out)
    assert an.objects and an.objects[0].colour == "yellow" and an.background == "blue", an
