"""Sampler behaviour a user relies on, on tiny random models (runs without fixtures)."""
from __future__ import annotations

import pytest
import torch

from infinity_core import bsq, sampler as SM
from infinity_core import schedules as S
from infinity_core.bsc import bitwise_self_correction
from tiny_models import TINY_T, TINY_T_PATCHIFY, TINY_VAE, TINY_VAE_F8, random_text, tiny_transformer, tiny_vae

SCHED = S.get_schedule(1.0, "0.06M")          # 7 scales, 256x256


@pytest.fixture(scope="module")
def model():
    return tiny_transformer()


@pytest.fixture(scope="module")
def text():
    return random_text(2)


def test_per_scale_lists_and_helpers():
    assert SM.per_scale(3, 7, "cfg") == [3.0] * 7
    assert SM.linear_ramp(4, 1, 4) == [4.0, 3.0, 2.0, 1.0]
    assert SM.off_from(3, 2, 4) == [3.0, 3.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="cfg has 3 values but the schedule has 7 scales"):
        SM.per_scale([1, 2, 3], 7, "cfg")
    assert SM.parse_list("3, 3 2.5") == [3.0, 3.0, 2.5]
    with pytest.raises(ValueError, match=r"item 2 \('x'\)"):
        SM.parse_list("3, x", "cfg list")
    with pytest.raises(ValueError, match="item 1"):
        SM.parse_list("nan", "cfg list")
    assert SM.parse_list("3,3,") == [3.0, 3.0]  # one trailing comma is harmless
    for bad, where in (("3,,3", "item 2 is empty"), ("1_000", "item 1"), ("3, \u0663", "item 2"),
                       ("3, 1e999", "item 2"), (",3", "item 1 is empty")):
        with pytest.raises(ValueError, match=where):
            SM.parse_list(bad, "cfg list")


def test_wrong_list_length_names_number_of_scales(model, text):
    with pytest.raises(ValueError, match="7 scales"):
        SM.sample(model, *text, SCHED, cfg=[3, 3], seed=0)
    with pytest.raises(ValueError, match="tau has 8 values"):
        SM.sample(model, *text, SCHED, tau=[1] * 8, seed=0)


def test_top_p_forces_the_majority_bit():
    # p(class1) = sigmoid(4) = 0.982 -> minority 0.018 <= 0.03 is removed -> always 1
    logits = torch.tensor([[[0.0, 4.0, 0.0, 0.5]]])
    out = [SM.sample_bits(logits, 900, 0.97, torch.Generator().manual_seed(s)) for s in range(50)]
    assert all(o[0, 0, 0] == 1 for o in out)
    assert {int(o[0, 0, 1]) for o in out} == {0, 1}  # p = 0.62: both outcomes occur
    greedy = SM.sample_bits(torch.tensor([[[0.3, 0.1]]]), 1, 0.0, torch.Generator().manual_seed(0))
    assert greedy.item() == 0


def test_same_seed_same_bits_and_different_seed_differs(model, text):
    a = SM.sample(model, *text, SCHED, cfg=3, tau=1, seed=7)
    b = SM.sample(model, *text, SCHED, cfg=3, tau=1, seed=7)
    c = SM.sample(model, *text, SCHED, cfg=3, tau=1, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits))
    assert not all(torch.equal(x, y) for x, y in zip(a.bits, c.bits))
    assert a.summed_codes.shape == (2, 16, 16, 16)
    assert [tuple(b.shape) for b in a.bits] == [(2, 1, h, w, 16) for _, h, w in SCHED]


def test_per_image_seeds_equal_single_image_runs(model, text):
    kv, cu = text
    both = SM.sample(model, kv, cu, SCHED, cfg=2, seed=[11, 12])
    for i, seed in enumerate([11, 12]):
        one = SM.sample(model, kv[cu[i]:cu[i + 1]], torch.tensor([0, cu[i + 1] - cu[i]], dtype=torch.int32),
                        SCHED, cfg=2, seed=seed)
        assert all(torch.equal(x[i:i + 1], y) for x, y in zip(both.bits, one.bits))


def test_forced_bits_are_kept_and_masks_keep_only_their_cells(model, text):
    free = SM.sample(model, *text, SCHED, cfg=3, seed=1)
    forced = SM.sample(model, *text, SCHED, cfg=3, seed=2, forced_bits=free.bits[:3])
    assert all(torch.equal(forced.bits[i], free.bits[i]) for i in range(3))
    # masks: force the top half of scale 4's cells only
    _, h, w = SCHED[4]
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[: h // 2] = True
    masked = SM.sample(model, *text, SCHED, cfg=3, seed=2, forced_bits=[None] * 4 + [free.bits[4]],
                       forced_masks=[None] * 4 + [mask])
    assert torch.equal(masked.bits[4][:, :, : h // 2], free.bits[4][:, :, : h // 2])
    assert not torch.equal(masked.bits[4][:, :, h // 2:], free.bits[4][:, :, h // 2:])


def test_stop_after_and_callback_interrupt(model, text):
    seen = []
    res = SM.sample(model, *text, SCHED, seed=0, stop_after=2, callback=lambda si, bits, prev: seen.append(si))
    assert len(res.bits) == 3 and seen == [0, 1, 2]

    def stop(si, bits, preview):
        if si == 1:
            raise SM.SamplingInterrupted()
    with pytest.raises(SM.SamplingInterrupted):
        SM.sample(model, *text, SCHED, seed=0, callback=stop)


def test_preview_is_a_small_rgb_image(model, text):
    vae = tiny_vae()
    shapes = []
    SM.sample(model, *text, SCHED, seed=0, stop_after=3, vae=vae,
              callback=lambda si, bits, preview: shapes.append(tuple(preview().shape)))
    assert shapes == [(2, 16 * h, 16 * w, 3) for _, h, w in SCHED[:4]]


def test_negative_prompt_and_hidden_state_guidance_change_the_result(model, text):
    base = SM.sample(model, *text, SCHED, cfg=4, seed=3, top_k=1, top_p=0)
    neg_kv, neg_cu = random_text(2, lens=[2, 6], seed=9)
    neg = SM.sample(model, *text, SCHED, cfg=4, seed=3, top_k=1, top_p=0, negative=(neg_kv, neg_cu))
    hid = SM.sample(model, *text, SCHED, cfg=4, seed=3, top_k=1, top_p=0, cfg_insertion_layer=-1)
    assert not torch.equal(base.summed_codes, neg.summed_codes)
    assert not torch.equal(base.summed_codes, hid.summed_codes)
    with pytest.raises(ValueError, match="cfg_insertion_layer"):
        SM.sample(model, *text, SCHED, cfg=4, seed=3, cfg_insertion_layer=1)


@pytest.mark.parametrize("tcfg,vcfg,ratio", [(TINY_T, TINY_VAE, 1.0), (TINY_T_PATCHIFY, TINY_VAE_F8, 1.333)])
def test_forced_encoded_image_logits_equal_teacher_forced_forward(tcfg, vcfg, ratio):
    """Spec self-consistency check: forcing every scale to an encoded image's bits, the KV-cached
    per-scale logits equal the teacher-forced forward's logits (cfg 1, fp32 cross-attention)."""
    model = tiny_transformer(tcfg, ca_precision="fp32")
    vae = tiny_vae(vcfg)
    sched = S.get_schedule(ratio, "0.06M")
    vsched = S.vae_schedule(sched, tcfg.patchify)
    H, W = S.image_size(sched)
    img = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        f = vae.encode_features(img)
        _, bits, _ = vae.quantize(f, vsched)
        x_in, labels = bitwise_self_correction(f, vsched, patchify=tcfg.patchify, noise_layers=0, strength=0.0)
    kv, cu = random_text(1, width=tcfg.text_channels)
    res = SM.sample(model, kv, cu, sched, cfg=1, tau=1, seed=0, forced_bits=bits, record=True)
    with torch.no_grad():
        ref = model(kv, cu, x_in, sched)
    start = 0
    for si, (_, h, w) in enumerate(sched):
        torch.testing.assert_close(res.logits[si], ref[:, start:start + h * w], atol=2e-4, rtol=0)
        start += h * w
    for si in range(1, len(sched)):
        torch.testing.assert_close(res.next_inputs[si - 1], x_in[:, sum(h * w for _, h, w in sched[1:si]):][:, :sched[si][1] * sched[si][2]], atol=1e-6, rtol=0)


def test_speed_modes_stay_close_to_exact(model, text):
    import copy
    from infinity_core.speed import quantize_int8
    cfg = SM.off_from(3.0, 4, len(SCHED))
    exact = SM.sample(model, *text, SCHED, cfg=cfg, seed=2)
    fast = SM.sample(model, *text, SCHED, cfg=cfg, seed=2, drop_unconditional=True)
    assert all(torch.equal(a, b) for a, b in zip(exact.bits[:4], fast.bits[:4]))
    total = sum(b.numel() for b in exact.bits)
    assert sum(int((a != b).sum()) for a, b in zip(exact.bits, fast.bits)) < 0.01 * total
    q = quantize_int8(copy.deepcopy(model))
    assert not isinstance(q.blocks[0].ffn.fc1, torch.nn.Linear)
    q_res = SM.sample(q, *text, SCHED, cfg=cfg, seed=2)
    assert sum(int((a != b).sum()) for a, b in zip(exact.bits, q_res.bits)) < 0.2 * total
