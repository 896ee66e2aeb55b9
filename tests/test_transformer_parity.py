"""Transformer and sampler parity against the official implementation's recorded tensors.

Weights are loaded from the official layouts (flat .pth for the 2B-style chain, the HF shard
folder for the 8B-style chain) and from the plain safetensors. For each chain: text path
intermediates, teacher-forced logits in both cross-attention precisions, losses, and every
recorded inference run (forced-bits replay of the per-scale logits, free sampling from the seed,
summed codes and the decoded picture).
"""
from __future__ import annotations

import pytest
import torch

import parity_fixtures as pf
from infinity_core import bsq
from infinity_core.checkpoint import load_transformer, load_vae
from infinity_core.sampler import sample, sample_bits, to_official_bgr_u8
from infinity_core.transformer import bit_cross_entropy

IO = "transformer_io"


@pytest.fixture(scope="module", params=pf.chains(IO) or [None])
def chain(request):
    pf.require(IO)
    return request.param


def official_weights(chain: str):
    d = pf.chain_dir(chain)
    if (d / "transformer_official.pth").is_file():
        return d / "transformer_official.pth"
    return d / "transformer_official_sharded"


def schedule(chain):
    return [tuple(s) for s in pf.meta(chain)["scale_schedule"]]


@pytest.fixture(scope="module")
def models(chain):
    path = official_weights(chain)
    return {prec: load_transformer(path, dtype=torch.float32, ca_precision=prec) for prec in ("bf16", "fp32")}


def tol(name):
    return pf.tolerance(IO, name)


def test_official_layout_equals_plain_safetensors(chain, models):
    plain = load_transformer(pf.chain_dir(chain) / "transformer_weights.safetensors", dtype=torch.float32)
    mine = models["bf16"].state_dict()
    for k, v in plain.state_dict().items():
        assert torch.equal(mine[k], v), k


def test_forward_logits_intermediates_and_losses(chain, models):
    io, m = pf.load_io(chain, IO), pf.meta(chain)
    sched = schedule(chain)
    args = (io["text.kv_compact"], io["text.cu_seqlens_k"], io["forward.x_BLC_wo_prefix"], sched)
    dropped = torch.tensor(m["forward"]["cond_dropped"])
    kv_before = io["text.kv_compact"].clone()
    with torch.no_grad():
        logits, inter = models["bf16"](*args, drop_text=dropped, return_intermediates=True)
        logits32 = models["fp32"](*args, drop_text=dropped)
    assert torch.equal(io["text.kv_compact"], kv_before), "forward must not mutate the caller's text"
    pf.assert_close(logits, io["forward.logits"], tol("forward.logits"), "forward.logits")
    if "forward_fp32ca.logits" in io:  # not official; recorded for chains that have it
        pf.assert_close(logits32, io["forward_fp32ca.logits"], tol("forward_fp32ca.logits"), "forward_fp32ca.logits")
    n = io["forward.inter.block_in"].shape[1] if "forward.inter.block_in" in io else 0
    depth = models["bf16"].cfg.depth
    pairs = {"forward.inter.cond_BD": inter["cond_BD"], "forward.inter.cond_BD_or_gss": inter["gss"],
             "forward.inter.block_in": inter["block_in"][:, :n],
             "forward.inter.head_nm_out": inter["head_nm_out"][:, :n],
             **{f"forward.inter.block_out.{i}": inter[f"block_out.{i}"][:, :n] for i in range(depth)}}
    for name, mine in pairs.items():
        if name in io:
            pf.assert_close(mine, io[name], tol(name), name)
    loss_u, per_token = bit_cross_entropy(logits, io["forward.gt_bits"], sched)
    loss_r, _ = bit_cross_entropy(logits, io["forward.gt_bits"], sched, reweight=True)
    pf.assert_close(per_token, io["forward.loss.per_token"], tol("forward.loss.per_token"), "per_token")
    pf.assert_close(loss_u, io["forward.loss.uniform"], tol("forward.loss.uniform"), "uniform")
    pf.assert_close(loss_r, io["forward.loss.reweighted"], tol("forward.loss.reweighted"), "reweighted")


def test_text_path_intermediates(chain, models):
    io = pf.load_io(chain, IO)
    names = ("forward.inter.text_norm_out", "forward.inter.ca_kv_compact")
    if not all(n in io for n in names):
        pytest.skip("this chain records no text-path intermediates")
    model = models["bf16"]
    kv = io["text.kv_compact"].clone()
    cu = io["text.cu_seqlens_k"].tolist()
    for i, dropped in enumerate(pf.meta(chain)["forward"]["cond_dropped"]):
        if dropped:
            kv[cu[i]:cu[i + 1]] = model.cfg_uncond[:cu[i + 1] - cu[i]]
    with torch.no_grad():
        normed = model.text_norm(kv)
        ca = model.text_proj_for_ca(normed)
    pf.assert_close(normed, io["forward.inter.text_norm_out"], tol("forward.inter.text_norm_out"), "text_norm")
    pf.assert_close(ca, io["forward.inter.ca_kv_compact"], tol("forward.inter.ca_kv_compact"), "ca_kv")


def runs(chain):
    return pf.meta(chain)["inference"]["runs"]


def _run_kwargs(chain, run):
    io, inf = pf.load_io(chain, IO), pf.meta(chain)["inference"]
    r = inf["runs"][run]
    neg = (io["neg_text.kv_compact"], io["neg_text.cu_seqlens_k"]) if r["negative_prompt"] else None
    return dict(kv_compact=io["text.kv_compact"], cu_seqlens=io["text.cu_seqlens_k"], schedule=schedule(chain),
                cfg=inf["cfg_list"], tau=inf["tau_list"], top_k=r["top_k"], top_p=r["top_p"], seed=r["g_seed"],
                negative=neg, cfg_insertion_layer=inf["cfg_insertion_layer"][0])


def _scaled_atol(chain, si, base):
    inf = pf.meta(chain)["inference"]
    c, t = inf["cfg_list"][si], inf["tau_list"][si]
    return base * (abs(c) + abs(1 - c)) / t


def test_inference_runs(chain, models):
    """Every recorded run: forced-bits replay logits per scale, free sampling from the seed,
    next-scale inputs, summed codes; the greedy decision equals the stored bit wherever the stored
    logit pair is decided by more than twice the tolerance."""
    io = pf.load_io(chain, IO)
    K = len(schedule(chain))
    for run, r in runs(chain).items():
        model = models["fp32" if r["fp32_cross_attention"] else "bf16"]
        kw = _run_kwargs(chain, run)
        stored = [io[f"{run}.bits.s{i}"] for i in range(K)]
        base = tol(f"{run}.logits.s0")["atol"]
        # 1. forced-bits replay: all scales forced, so scale si sees exactly the recorded earlier bits
        replay = sample(model, forced_bits=stored, record=True, **kw)
        for si in range(K):
            ref = io[f"{run}.logits.s{si}"]
            pf.assert_close(replay.logits[si], ref, {"atol": _scaled_atol(chain, si, base)}, f"{run}.logits.s{si}")
            if si >= 1 and f"{run}.next_input.s{si}" in io:
                pf.assert_close(replay.next_inputs[si - 1], io[f"{run}.next_input.s{si}"],
                                tol(f"{run}.next_input.s{si}"), f"{run}.next_input.s{si}")
            if r["top_k"] == 1:  # greedy: own decision = stored bit where the margin is clear
                pairs = ref.view(ref.shape[0], -1, 2)
                mine = replay.logits[si].view_as(pairs).argmax(-1)
                stored_tok = bsq.bits_to_tokens(stored[si], model.cfg.patchify).reshape(ref.shape[0], -1)
                clear = (pairs[..., 1] - pairs[..., 0]).abs() > 2 * _scaled_atol(chain, si, base)
                assert torch.equal(mine[clear], stored_tok[clear].long()), f"{run} s{si}: greedy decision differs"
        pf.assert_close(replay.summed_codes, io[f"{run}.summed_codes"], tol(f"{run}.summed_codes"), f"{run}.summed_codes")
        # 2. free run from the seed: equal bits up to the first scale where an undecidable bit
        # (stored margin below 2x tolerance; or for stochastic runs a draw on the edge) flips.
        free = sample(model, **kw)
        for si in range(K):
            diff = free.bits[si] != stored[si]
            if not diff.any():
                continue
            frac = diff.float().mean().item()
            assert int(diff.sum()) <= 2 and frac < 1e-3, f"{run}: {int(diff.sum())} bits differ at scale {si}"
            if r["top_k"] == 1:
                ref = io[f"{run}.logits.s{si}"]
                pairs = ref.view(ref.shape[0], -1, 2)
                margin = (pairs[..., 1] - pairs[..., 0]).abs()
                diff_tok = bsq.bits_to_tokens(diff.to(torch.uint8), model.cfg.patchify).reshape(ref.shape[0], -1).bool()
                assert (margin[diff_tok] < 2 * _scaled_atol(chain, si, base)).all(), f"{run} s{si}: clear bit flipped"
            break
        else:
            pf.assert_close(free.summed_codes, io[f"{run}.summed_codes"], tol(f"{run}.summed_codes"), f"{run} free")


def test_stochastic_draw_reproduces_official_generator(chain):
    """The CPU generator seeded with g_seed, one multinomial per scale over all bit rows, fed the
    stored post-guidance logits, redraws the stored bits exactly."""
    io, m = pf.load_io(chain, IO), pf.meta(chain)
    patchify = bool(m["transformer"]["constructor_kwargs"]["apply_spatial_patchify"])
    for run, r in runs(chain).items():
        if r["top_k"] == 1:
            continue
        g = torch.Generator("cpu").manual_seed(r["g_seed"])
        for si, (_, h, w) in enumerate(schedule(chain)):
            tokens = sample_bits(io[f"{run}.logits.s{si}"], r["top_k"], r["top_p"], g)
            assert torch.equal(bsq.tokens_to_bits(tokens, (h, w), patchify).to(torch.uint8), io[f"{run}.bits.s{si}"])


def test_decoded_picture_matches_official(chain):
    io = pf.load_io(chain, IO)
    vae_path = pf.chain_dir(chain) / "vae_official.pth"
    vae = load_vae(vae_path, dtype=torch.float32)
    t = pf.tolerance(IO, "infer_greedy.img_bgr_u8")
    for run in runs(chain):
        key = f"{run}.img_bgr_u8"
        if key not in io:
            continue
        with torch.no_grad():
            img = to_official_bgr_u8(vae.decode(io[f"{run}.summed_codes"].squeeze(2) if io[f"{run}.summed_codes"].dim() == 5
                                                else io[f"{run}.summed_codes"]))
        diff = (img.int() - io[key].int()).abs()
        assert diff.max() <= t["max_abs_diff"], key
        assert (diff > 0).float().mean() <= t["max_fraction_differing"], key
