"""Partial-scale re-sampling (editing) on tiny random models."""
from __future__ import annotations

import pytest
import torch

from infinity_core import schedules as S
from infinity_core.edit import border_band_px, edit, encode_source, keep_scales_from_strength, mask_per_scale
from infinity_core.sampler import sample, to_rgb01
from tiny_models import random_text, tiny_transformer, tiny_vae

SCHED = S.get_schedule(1.0, "0.06M")


@pytest.fixture(scope="module")
def setup():
    model, vae = tiny_transformer(), tiny_vae()
    g = torch.Generator().manual_seed(3)
    img = torch.rand(1, 3, 256, 256, generator=g) * 2 - 1
    return model, vae, encode_source(vae, img, SCHED, patchify=False)


def test_keep_all_scales_is_the_reconstruction(setup):
    model, vae, src = setup
    kv, cu = random_text(1, seed=5)
    out = edit(model, src, kv, cu, keep_scales=len(SCHED), cfg=3, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(out.bits, src.bits))
    with torch.no_grad():
        assert torch.equal(vae.decode(out.summed_codes), vae.decode_bits(src.bits))


def test_keep_zero_is_plain_generation(setup):
    model, _, src = setup
    kv, cu = random_text(1, seed=5)
    out = edit(model, src, kv, cu, keep_scales=0, cfg=3, seed=4)
    plain = sample(model, kv, cu, SCHED, cfg=3, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(out.bits, plain.bits))


def test_strength_mapping_and_bounds():
    assert keep_scales_from_strength(0.0, 7) == 7 and keep_scales_from_strength(1.0, 7) == 0
    assert keep_scales_from_strength(0.5, 13) == 6
    with pytest.raises(ValueError, match="strength"):
        keep_scales_from_strength(1.5, 7)


def test_k_beyond_scales_is_a_clear_error(setup):
    model, _, src = setup
    kv, cu = random_text(1)
    with pytest.raises(ValueError, match="keep_scales 9 is outside 0..7"):
        edit(model, src, kv, cu, keep_scales=9)


def test_mask_keeps_outside_and_changes_inside(setup):
    """Outside the mask plus the border band the summed codes (what the decoder sees) are the
    source's; inside they change. (Pixel-level fidelity is checked with the trained bundled model.)"""
    model, vae, src = setup
    kv, cu = random_text(1, seed=5)
    mask = torch.zeros(256, 256)
    mask[96:224, 96:224] = 1.0
    keep = 2
    out = edit(model, src, kv, cu, keep_scales=keep, mask=mask, cfg=3, seed=1)
    vsched = S.vae_schedule(SCHED, False)
    band = border_band_px(mask, vsched, (256, 256), keep)
    assert band == 64                                   # one cell of the 4x4 scale (64 px cells)
    from infinity_core.bsq import summed_codes_from_bits
    src_codes = summed_codes_from_bits(src.bits, (16, 16))[0]          # [d, 16, 16], 16 px per cell
    diff = (out.summed_codes[0] - src_codes).abs().amax(0)             # [16, 16]
    lo, hi = (96 - band) // 16, -(-(224 + band) // 16)
    far = torch.ones(16, 16, dtype=torch.bool)
    far[lo:hi, lo:hi] = False
    assert diff[far].max() < 1e-6, "outside the mask and its band the codes must be the source's"
    assert diff[6:14, 6:14].mean() > 0.1, "inside the mask the codes must change"
    grids = mask_per_scale(mask, vsched)
    assert not grids[0].any() and grids[-1].float().mean() == 0.25
