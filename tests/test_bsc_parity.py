"""bsq.py (code/bit math) units, bitwise self-correction parity with every bsc.* tensor of
vae_io.safetensors, and the sampler's code accumulation against transformer_io.safetensors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import parity_fixtures as pf
from infinity_core import bsq
from infinity_core.bsc import bitwise_self_correction, random_flip_mask
from infinity_core.vae import BSQVAE
from infinity_core.zoo import VAEConfig

# --------------------------------------------------------------------------------------------------
# bsq.py units (no fixtures needed)

SIZES = [((16, 16), (2, 2)), ((16, 16), (6, 6)), ((64, 64), (6, 6)), ((16, 12), (12, 9)), ((70, 56), (5, 4)),
         ((40, 30), (24, 18)), ((1, 1), (16, 16)), ((2, 2), (40, 30)), ((4, 3), (16, 12)), ((16, 16), (16, 16))]


def channels_last(x):
    return x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def bilinear_reference(x, hw):
    """Spec 3.4: source coordinate (i + 0.5)*In/Out - 0.5, clamped at 0, neighbour capped at In-1.
    The coordinate is computed in fp32 like PyTorch does (in double it moves results by ~1e-5)."""
    def weights(n_in, n_out):
        scale = torch.tensor(n_in / n_out, dtype=torch.float32)
        src = ((torch.arange(n_out, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
        i0 = src.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        lam = (src - i0).double()
        m = torch.zeros(n_out, n_in, dtype=torch.float64)
        m[torch.arange(n_out), i0] += 1 - lam
        m[torch.arange(n_out), i1] += lam
        return m
    mh, mw = weights(x.shape[-2], hw[0]), weights(x.shape[-1], hw[1])
    return torch.einsum("hH,bcHW,wW->bchw", mh, x.double(), mw)


def area_reference(x, hw):
    """Spec 3.4: output cell i averages input cells floor(i*In/Out) .. ceil((i+1)*In/Out) - 1."""
    def weights(n_in, n_out):
        m = torch.zeros(n_out, n_in, dtype=torch.float64)
        for i in range(n_out):
            a, b = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
            m[i, a:b] = 1 / (b - a)
        return m
    return torch.einsum("hH,bcHW,wW->bchw", weights(x.shape[-2], hw[0]), x.double(), weights(x.shape[-1], hw[1]))


@pytest.mark.parametrize("src,dst", SIZES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_resize_is_the_official_5d_call(src, dst, layout):
    x = torch.randn(2, 8, *src, generator=torch.Generator().manual_seed(0))
    if layout == "channels_last":
        x = channels_last(x)
    x5 = x.unsqueeze(2)  # the official [B, d, 1, h, w]
    tri = F.interpolate(x5, size=(1, *dst), mode="trilinear").squeeze(2)
    area = F.interpolate(x5, size=(1, *dst), mode="area").squeeze(2)
    assert torch.equal(bsq.resize_bilinear(x, dst), tri)  # bit for bit
    assert torch.equal(bsq.resize_area(x, dst), area)
    assert (bsq.resize_bilinear(x, dst).double() - bilinear_reference(x, dst)).abs().max() < 1e-6
    assert (bsq.resize_area(x, dst).double() - area_reference(x, dst)).abs().max() < 1e-6
    assert bsq.resize_bilinear(x, dst).dtype == torch.float32


def test_bits_from_latent_signs_and_layout():
    z = torch.tensor([1.0, -1.0, 0.0, -0.0, 1e-30, -1e-30, 3.0, 0.0]).view(1, 8, 1, 1).repeat(2, 1, 2, 3)
    bits = bsq.bits_from_latent(z)
    assert bits.shape == (2, 1, 2, 3, 8) and bits.dtype == torch.uint8
    assert bits[0, 0, 1, 2].tolist() == [1, 0, 0, 0, 1, 0, 1, 0]  # zero -> 0, bit k = channel k
    z = torch.randn(2, 14, 5, 4)
    assert torch.equal(bsq.bits_from_latent(z), (z > 0).permute(0, 2, 3, 1).unsqueeze(1).to(torch.uint8))


@pytest.mark.parametrize("d", [14, 16, 32, 64])
def test_codes_from_bits(d):
    bits = torch.randint(0, 2, (2, 1, 3, 5, d), dtype=torch.uint8)
    codes = bsq.codes_from_bits(bits, d)
    assert codes.shape == (2, d, 3, 5) and codes.dtype == torch.float32
    want = (bits.squeeze(1).permute(0, 3, 1, 2).double() * 2 - 1) / d ** 0.5
    assert (codes.double() - want).abs().max() <= 2 * torch.finfo(torch.float32).eps * want.abs().max()
    assert torch.equal(bsq.bits_from_latent(codes), bits)  # round trip
    assert torch.equal(bsq.codes_from_bits(bits.long()), codes)  # any integer dtype
    with pytest.raises(ValueError):
        bsq.codes_from_bits(bits, d + 1)
    _, st_bits = bsq.quantize_latent(codes)
    assert torch.equal(st_bits, bits)


def test_codes_value_for_d32_is_the_official_normalised_one():
    # fl32(1/sqrt(32)) = 0.17677669227; the official l2-normalisation gives one ulp more.
    codes = bsq.codes_from_bits(torch.ones(1, 1, 1, 1, 32, dtype=torch.uint8))
    assert codes.flatten()[0].item() == 0.1767767071723938


def test_quantize_latent_codes():
    z = torch.randn(2, 32, 4, 3)
    codes, bits = bsq.quantize_latent(z)
    assert torch.equal(bits, bsq.bits_from_latent(z))
    assert (codes - bsq.codes_from_bits(bits)).abs().max() <= 2 * torch.finfo(torch.float32).eps


def test_patchify_channel_order():
    B, C, h, w = 2, 3, 4, 5
    x = torch.randn(B, C, 2 * h, 2 * w)
    p = bsq.patchify(x)
    assert p.shape == (B, 4 * C, h, w)
    for c in range(C):
        for dy in range(2):
            for dx in range(2):
                assert torch.equal(p[:, 4 * c + 2 * dy + dx], x[:, c, dy::2, dx::2])
    assert torch.equal(bsq.unpatchify(p), x)
    bits = torch.randint(0, 2, (B, 1, 2 * h, 2 * w, C), dtype=torch.uint8)
    pb = bsq.patchify(bits)
    assert pb.shape == (B, 1, h, w, 4 * C) and pb.dtype == torch.uint8
    for c in range(C):
        for dy in range(2):
            for dx in range(2):
                assert torch.equal(pb[:, 0, :, :, 4 * c + 2 * dy + dx], bits[:, 0, dy::2, dx::2, c])
    assert torch.equal(bsq.unpatchify(pb), bits)


@pytest.mark.parametrize("patchify", [False, True])
def test_tokens_round_trip(patchify):
    bits = torch.randint(0, 2, (2, 1, 8, 6, 14), dtype=torch.uint8)
    tokens = bsq.bits_to_tokens(bits, patchify)
    grid = (4, 3) if patchify else (8, 6)
    assert tokens.shape == (2, grid[0] * grid[1], 56 if patchify else 14)
    assert torch.equal(bsq.tokens_to_bits(tokens, grid, patchify), bits)
    # Token t = row-major cell t of the grid.
    cells = bsq.patchify(bits) if patchify else bits
    assert torch.equal(tokens[:, grid[1] + 2], cells[:, 0, 1, 2])


@pytest.mark.parametrize("patchify", [False, True])
def test_next_scale_input(patchify):
    summed = torch.randn(2, 14, 40, 30)
    x = bsq.next_scale_input(summed, (8, 6), patchify)
    small = bsq.resize_bilinear(summed, (8, 6))
    if patchify:
        assert x.shape == (2, 12, 56)
        assert torch.equal(x, F.pixel_unshuffle(small, 2).flatten(2).transpose(1, 2))
    else:
        assert x.shape == (2, 48, 14)
        assert torch.equal(x[:, 6 * 3 + 4], small[:, :, 3, 4])


def test_summed_codes_from_bits():
    bits = [torch.randint(0, 2, (1, 1, h, w, 16), dtype=torch.uint8) for h, w in [(1, 1), (2, 3), (4, 6)]]
    summed = bsq.summed_codes_from_bits(bits, (4, 6))
    want = sum(bsq.resize_bilinear(bsq.codes_from_bits(b).contiguous(), (4, 6)).double() for b in bits)
    assert summed.shape == (1, 16, 4, 6) and (summed.double() - want).abs().max() < 1e-6
    assert torch.equal(bsq.summed_codes_from_bits(bits[-1:], (4, 6)), bsq.codes_from_bits(bits[-1]))


# --------------------------------------------------------------------------------------------------
# bsc.py units

SCHED = [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 6, 6), (1, 8, 8)]
SCHED_8B = [(1, 2, 2), (1, 4, 4), (1, 8, 6), (1, 16, 12)]


@pytest.mark.parametrize("sched,patchify", [(SCHED, False), (SCHED_8B, True)])
def test_bsc_without_noise_is_teacher_forcing(sched, patchify):
    f = torch.randn(2, 14, *sched[-1][1:], generator=torch.Generator().manual_seed(1))
    x, labels = bitwise_self_correction(f, sched, patchify, noise_layers=0, strength=0.0)
    _, vae_bits, _ = BSQVAE(VAEConfig(bits=14, patch_size=8, ch_mult=(1,), base_ch=32)).quantize(f, sched)
    assert [tuple(lab.shape) for lab in labels] == [tuple(bsq.bits_to_tokens(b, patchify).shape) for b in vae_bits]
    for lab, b in zip(labels, vae_bits):
        assert lab.dtype == torch.uint8 and torch.equal(lab, bsq.bits_to_tokens(b, patchify))
    inputs = [bsq.next_scale_input(bsq.summed_codes_from_bits(vae_bits[:k], sched[-1][1:]), sched[k][1:], patchify)
              for k in range(1, len(sched))]
    assert x.shape == (2, sum(t.shape[1] for t in inputs), 56 if patchify else 14)
    assert (x - torch.cat(inputs, 1)).abs().max() < 1e-6


def test_bsc_flip_source_and_requant():
    f = torch.randn(1, 16, 8, 8)
    clean_x, clean_labels = bitwise_self_correction(f, SCHED, False, 0, 0.0)
    calls = []

    def flip_all(si, bits):
        calls.append((si, tuple(bits.shape)))
        return torch.ones_like(bits, dtype=torch.bool)

    x, labels = bitwise_self_correction(f, SCHED, False, noise_layers=2, strength=0.3, flip_source=flip_all)
    assert calls == [(0, (1, 1, 1, 1, 16)), (1, (1, 1, 2, 2, 16))]
    assert torch.equal(labels[0], clean_labels[0])  # a flipped scale keeps its clean label
    flipped_bits0 = 1 - bsq.tokens_to_bits(clean_labels[0], (1, 1))
    cum = bsq.resize_bilinear(bsq.codes_from_bits(flipped_bits0), (8, 8))
    want = bsq.bits_from_latent(bsq.resize_area(f - cum, (2, 2)))  # the next label corrects the flip
    assert torch.equal(labels[1], bsq.bits_to_tokens(want))
    assert torch.equal(x[:, :4], bsq.next_scale_input(cum, (2, 2)))
    assert not torch.allclose(x, clean_x)
    x_nrq, labels_nrq = bitwise_self_correction(f, SCHED, False, 2, 0.3, requant=False, flip_source=flip_all)
    assert torch.equal(x_nrq, clean_x) and all(map(torch.equal, labels_nrq, clean_labels))
    with pytest.raises(ValueError, match="flip mask"):
        bitwise_self_correction(f, SCHED, False, 1, 0.3, flip_source=lambda si, b: torch.ones(3, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------
# Parity: bitwise self-correction (bsc.* of vae_io.safetensors)

@pytest.fixture(scope="module", params=pf.chains() or [None])
def chain(request):
    pf.require()
    return request.param


def setup(chain):
    meta = pf.meta(chain)
    sched = [tuple(s) for s in meta["vae_scale_schedule"]]
    patchify = bool(meta["transformer"]["constructor_kwargs"]["apply_spatial_patchify"])
    return pf.load_io(chain, "vae_io"), sched, patchify, meta["bsc"]


def check_bsc(t, run, x, labels, n_scales):
    name = f"bsc.{run}.x_BLC_wo_prefix"
    pf.assert_close(x, t[name], pf.tolerance("vae_io", name), name)
    assert len(labels) == n_scales
    for k, lab in enumerate(labels):
        name = f"bsc.{run}.gt_bits.s{k}"
        pf.assert_close(lab, t[name], pf.tolerance("vae_io", name), name)  # exact
        assert lab.dtype == t[name].dtype


def test_bsc_clean(chain):
    t, sched, patchify, _ = setup(chain)
    x, labels = bitwise_self_correction(t["encoder.features"], sched, patchify, noise_layers=0, strength=0.0)
    check_bsc(t, "clean", x, labels, len(sched))


def test_bsc_noisy_with_recorded_masks(chain):
    t, sched, patchify, cfg = setup(chain)
    used = []

    def recorded(si, bits):
        used.append(si)
        return t[f"bsc.noisy.flip_mask.s{si}"]

    x, labels = bitwise_self_correction(t["encoder.features"], sched, patchify, cfg["noise_apply_layers"],
                                        cfg["noise_apply_strength"], bool(cfg["noise_apply_requant"]), recorded)
    check_bsc(t, "noisy", x, labels, len(sched))
    assert used == list(range(cfg["noise_apply_layers"]))
    assert sorted(n for n in t if n.startswith("bsc.noisy.flip_mask.")) == sorted(f"bsc.noisy.flip_mask.s{s}" for s in used)


def test_bsc_noisy_official_rng(chain):
    """Seeding NumPy and torch with the generator's seed replays its draws: the flip probabilities,
    the masks, and through the default flip source the whole noisy run."""
    t, sched, patchify, cfg = setup(chain)
    if "seed" not in cfg:
        pytest.skip("meta.json bsc has no seed")
    n, strength = cfg["noise_apply_layers"], cfg["noise_apply_strength"]
    np.random.seed(cfg["seed"])
    p = torch.tensor([np.random.randint(0, 100 * strength + 1) * 0.01 for _ in range(n)], dtype=torch.float32)
    pf.assert_close(p, t["bsc.noisy.flip_strength"], {"atol": 0.0}, "bsc.noisy.flip_strength")
    assert p.tolist() == torch.tensor(cfg["flip_strengths"], dtype=torch.float32).tolist()
    np.random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    for si in range(n):
        want = t[f"bsc.noisy.flip_mask.s{si}"]
        assert torch.equal(random_flip_mask(torch.zeros(want.shape, dtype=torch.uint8), strength), want)
    np.random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    x, labels = bitwise_self_correction(t["encoder.features"], sched, patchify, n, strength,
                                        bool(cfg["noise_apply_requant"]))
    check_bsc(t, "noisy", x, labels, len(sched))


def test_bsc_labels_match_vae_bits(chain):
    t, sched, patchify, _ = setup(chain)
    for k in range(len(sched)):  # Q17: may differ only in degenerate near-zero cases; none here
        assert torch.equal(bsq.bits_to_tokens(t[f"quant.bits.s{k}"], patchify), t[f"bsc.clean.gt_bits.s{k}"])


# --------------------------------------------------------------------------------------------------
# Parity: the sampler's code accumulation (transformer_io.safetensors), from the recorded bits

@pytest.fixture(scope="module", params=pf.chains("transformer_io") or [None])
def tchain(request):
    pf.require("transformer_io")
    return request.param


def test_sampler_code_accumulation(tchain):
    meta = pf.meta(tchain)
    t = pf.load_io(tchain, "transformer_io")
    sched = [tuple(s) for s in meta["vae_scale_schedule"]]
    token_sched = [tuple(s) for s in meta["scale_schedule"]]
    patchify = bool(meta["transformer"]["constructor_kwargs"]["apply_spatial_patchify"])
    runs = sorted({n.split(".")[0] for n in t if n.startswith("infer_") and ".bits.s" in n})
    assert runs
    for run in runs:
        bits = [t[f"{run}.bits.s{k}"] for k in range(len(sched))]
        for k in range(1, len(sched)):
            name = f"{run}.next_input.s{k}"
            if name in t:
                summed = bsq.summed_codes_from_bits(bits[:k], sched[-1][1:])
                got = bsq.next_scale_input(summed, sched[k][1:], patchify)
                pf.assert_close(got, t[name], pf.tolerance("transformer_io", name), name)
        name = f"{run}.summed_codes"
        got = bsq.summed_codes_from_bits(bits, sched[-1][1:])
        pf.assert_close(got, t[name], pf.tolerance("transformer_io", name), name)
        for k, (_, h, w) in enumerate(token_sched):
            name = f"{run}.sampled.s{k}"
            if name in t:
                assert torch.equal(bsq.bits_to_tokens(bits[k], patchify), t[name]), name
                assert torch.equal(bsq.tokens_to_bits(t[name], (h, w), patchify), bits[k]), name
