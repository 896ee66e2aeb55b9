"""Scale schedules against the official tables, RoPE positions, and dtype/device choices."""
from __future__ import annotations

import json

import pytest
import torch

import parity_fixtures as pf
from infinity_core import schedules as S
from infinity_core.rope import apply_rope, grid_positions, rope_cos_sin, rope_rotation
from infinity_core.sampler import sample
from infinity_core.transformer import KVCache
from tiny_models import random_text, tiny_transformer


def test_all_60_schedules_equal_the_official_table():
    path = pf.fixture_root() / "scale_schedules.json"
    if not path.is_file():
        pf.require("transformer_io")  # skips (fails on CI) with the variable's name
    table = json.loads(path.read_text())
    assert table["h_div_w_templates"] == S.H_DIV_W_TEMPLATES
    n = 0
    for template, tiers in table["transformer_dynamic_resolution_h_w"].items():
        for tier, entry in tiers.items():
            sched = S.get_schedule(float(template), tier)
            # the table's t entries are for video; images use t = 1 everywhere (spec 4)
            assert [[h, w] for _, h, w in sched] == [s[1:] for s in entry["scales"]], (template, tier)
            assert list(S.image_size(sched)) == entry["pixel"]
            assert S.token_count(sched) == entry["seq_len_t1"]
            assert S.template_of(sched) == float(template) and S.tier_of(sched) == tier
            n += 1
    assert n == 60


def test_nearest_template_and_size_snapping():
    assert S.nearest_template(1.0) == 1.0
    assert S.nearest_template(9 / 16) == 0.571       # 16:9 landscape
    assert S.nearest_template(100.0) == 3.0
    sched, template, tier = S.schedule_for_size(1920, 1080)
    assert (template, tier, S.image_size(sched)) == (0.571, "1M", (768, 1344))
    sched, template, tier = S.schedule_for_size(256, 256)
    assert (template, tier, len(sched)) == (1.0, "0.06M", 7)
    assert S.token_count(S.get_schedule(1.0, "1M")) == 10521
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="aspect ratio"):
            S.nearest_template(bad)
    with pytest.raises(ValueError, match="unknown tier"):
        S.get_schedule(1.0, "2M")


def test_schedule_not_in_the_table_is_refused():
    model = tiny_transformer()
    kv, cu = random_text(1)
    bad = [(1, 1, 1), (1, 3, 3), (1, 5, 5)]
    with pytest.raises(ValueError, match="not one of the official 60 schedules"):
        sample(model, kv, cu, bad, seed=0)
    with pytest.raises(ValueError, match="not one of the official 60 schedules"):
        model(kv, cu, torch.zeros(1, 34, 16), bad)


def test_rope_positions_use_the_1m_grid_with_half_to_even_rounding():
    pos = grid_positions(S.get_schedule(1.0, "0.06M"))
    sixes = pos[1 + 4 + 16: 1 + 4 + 16 + 36]        # the 6x6 scale
    assert sorted(set(sixes[:, 0].tolist())) == [0, 11, 21, 32, 43, 53]
    twenties = grid_positions(S.get_schedule(1.25, "0.25M"))[sum(h * w for _, h, w in S.get_schedule(1.25, "0.25M")[:6]):]
    rows = sorted(set(twenties[:20 * 16, 0].tolist()))
    assert rows[:8] == [0, 4, 7, 10, 14, 18, 21, 24]   # 3.5 -> 4, 10.5 -> 10, 17.5 -> 18, 24.5 -> 24
    assert rope_cos_sin(S.get_schedule(1.0, "0.06M"), 32).shape == (2, 521, 16)


def test_rope_as_complex_rotation_equals_the_official_pair_formula():
    schedule = S.get_schedule(1.0, "0.06M")
    cos, sin = rope_cos_sin(schedule, 32)                         # [L, 16] each
    x = torch.randn(2, 521, 3, 32, generator=torch.Generator().manual_seed(0))  # [B, L, heads, c]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s_ = cos[:, None], sin[:, None]
    official = torch.stack([c * x0 - s_ * x1, s_ * x0 + c * x1], dim=-1).flatten(-2)
    out = apply_rope(x, rope_rotation(schedule, 32)[:, None])
    assert torch.allclose(out, official, atol=1e-6, rtol=0)


@pytest.mark.parametrize("capacity", [0, 7, 100])
def test_kv_cache_holds_every_scale_in_order_whatever_its_capacity(capacity):
    """Buffers sized once (capacity = the schedule's tokens), too small (grows) or absent."""
    g = torch.Generator().manual_seed(0)
    chunks = [(torch.randn(2, 3, n, 4, generator=g), torch.randn(2, 3, n, 4, generator=g)) for n in (1, 4, 16)]
    cache = KVCache(capacity)
    for i, (k, v) in enumerate(chunks):
        got_k, got_v = cache.append(k, v)
        assert torch.equal(got_k, torch.cat([c[0] for c in chunks[:i + 1]], dim=2))
        assert torch.equal(got_v, torch.cat([c[1] for c in chunks[:i + 1]], dim=2))
    cache.keep_rows(1)
    k2, v2 = cache.append(chunks[0][0][:1], chunks[0][1][:1])
    assert k2.shape == (1, 3, 22, 4) and torch.equal(k2[:, :, 21:], chunks[0][0][:1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_sample_close_to_fp32(dtype):
    """Blocks stored in bf16/fp16 run (text path and head stay fp32, as officially)."""
    ref_model = tiny_transformer()
    low = tiny_transformer().to(dtype)
    kv, cu = random_text(1)
    sched = S.get_schedule(1.0, "0.06M")
    ref = sample(ref_model, kv, cu, sched, cfg=1, top_k=1, top_p=0, seed=0, stop_after=1, record=True)
    out = sample(low, kv, cu, sched, cfg=1, top_k=1, top_p=0, seed=0, stop_after=1, record=True,
                 forced_bits=ref.bits)
    assert out.logits[1].dtype == torch.float32
    torch.testing.assert_close(out.logits[1], ref.logits[1], atol=0.15, rtol=0)
