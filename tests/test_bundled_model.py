"""The bundled tiny-shapes model: what ships, that it loads through the loaders users use, and that
it follows held-out prompts (a small subset of `python -m infinity_core eval-shapes`).

Skipped, with one message, in a checkout without bundled/infinity_tiny_shapes/ (the model is
produced by ./scripts/train_bundled.sh)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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


def test_bundled_model_follows_held_out_prompts(pipe):
    """40 held-out prompts (never-seen shape/colour/background combinations) at the bundled defaults:
    the analyzer reads the asked colours, shapes and positions at the targets of the full eval."""
    d = E.load_defaults(BUNDLE)
    settings = {k: d[k] for k in ("cfg", "tau", "top_k", "top_p")}
    scenes = E.heldout_scenes(40, seed=0)
    res = E.evaluate(pipe, scenes, seed=0, **settings)
    m = res["metrics"]
    assert all(E.meets_targets(m).values()), E.format_metrics(m)


def test_same_seed_same_picture_other_seed_other_picture(pipe):
    prompt = "a large yellow star in the centre, purple background"
    a = pipe.generate([prompt], seed=5, seed_mode="per_image", h_div_w=1.0, tier="0.06M").images
    b = pipe.generate([prompt], seed=5, seed_mode="per_image", h_div_w=1.0, tier="0.06M").images
    c = pipe.generate([prompt], seed=6, seed_mode="per_image", h_div_w=1.0, tier="0.06M").images
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
