"""BSQ VAE: architecture and checkpoint units, then parity with every VAE tensor of vae_io.safetensors
(the bsc.* tensors are checked in test_bsc_parity.py)."""
from __future__ import annotations

import fnmatch

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import parity_fixtures as pf
from infinity_core import bsq
from infinity_core.vae import (BSQVAE, normalize_vae_state_dict, preprocess_image,
                               vae_config_from_state_dict)
from infinity_core.zoo import VAES, VAEConfig

TINY = VAEConfig(bits=16, patch_size=8, ch_mult=(1, 2, 2, 2), base_ch=32)


def plain_keys(sd: dict) -> dict:
    """The plain Conv2d/GroupNorm naming of a wrapped state dict (what quirk Q16 says loaders accept)."""
    return {k.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias")
            .replace(".norm.weight", ".weight").replace(".norm.bias", ".bias"): v for k, v in sd.items()}


# --------------------------------------------------------------------------------------------------
# Units (no fixtures needed)

@pytest.mark.parametrize("name,n_keys,n_params", [("infinity_vae_d32", 270, 110_118_051),
                                                  ("infinity_vae_d56_f8_14_patchify", None, 81_624_209)])
def test_released_architectures(name, n_keys, n_params):
    with torch.device("meta"):
        model = BSQVAE(VAES[name])
    sd = model.state_dict()
    if n_keys is not None:
        assert len(sd) == n_keys
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert sd["quantizer.lfq.mask"].dtype == torch.int64 and "quantize.lfq.mask" in sd
    cfg = vae_config_from_state_dict(sd)
    assert (cfg.bits, cfg.patch_size, cfg.ch_mult, cfg.base_ch, cfg.num_res_blocks) == \
        (VAES[name].bits, VAES[name].patch_size, VAES[name].ch_mult, VAES[name].base_ch, VAES[name].num_res_blocks)


def test_state_dict_names_and_mask():
    model = BSQVAE(TINY)
    sd = model.state_dict()
    assert torch.equal(sd["quantizer.lfq.mask"], torch.tensor([2 ** i for i in range(15, -1, -1)]))
    assert sd["quantize.lfq.mask"].data_ptr() == sd["quantizer.lfq.mask"].data_ptr()
    for key in ["encoder.conv_in.conv.weight", "encoder.down.0.block.0.norm1.norm.weight",
                "encoder.down.1.block.0.nin_shortcut.conv.weight", "encoder.down.2.downsample.conv.conv.weight",
                "decoder.up.3.upsample.conv.conv.bias", "decoder.up.0.block.2.conv2.conv.weight",
                "decoder.mid.block_2.norm2.norm.bias", "decoder.norm_out.norm.weight", "decoder.conv_out.conv.weight"]:
        assert key in sd, key
    assert "encoder.down.3.downsample.conv.conv.weight" not in sd and "decoder.up.0.upsample.conv.conv.weight" not in sd
    assert callable(model.quantize)  # the method, though `quantize` also names the quantiser module


def test_normalize_vae_state_dict():
    sd = BSQVAE(TINY).state_dict()
    plain = plain_keys(sd)
    assert "encoder.conv_in.weight" in plain and "encoder.down.0.downsample.conv.weight" in plain
    assert "encoder.down.0.block.0.norm1.weight" in plain and "encoder.down.1.block.0.nin_shortcut.bias" in plain
    assert normalize_vae_state_dict(plain).keys() == sd.keys()
    assert normalize_vae_state_dict(sd).keys() == sd.keys()  # wrapped keys stay as they are
    assert vae_config_from_state_dict(plain) == vae_config_from_state_dict(sd) == TINY
    BSQVAE(TINY).load_state_dict(normalize_vae_state_dict(plain), strict=True)


def test_config_from_non_vae_state_dict():
    with pytest.raises(ValueError, match="encoder.conv_in.conv.weight"):
        vae_config_from_state_dict({"blocks.0.weight": torch.zeros(1)})
    sd = BSQVAE(TINY).state_dict()
    del sd["encoder.conv_out.conv.weight"]
    with pytest.raises(ValueError, match="encoder.conv_out.conv.weight"):
        vae_config_from_state_dict(sd)


def test_preprocess_image_rule():
    rng = np.random.default_rng(0)
    for (w0, h0), (H, W) in [((300, 200), (256, 256)), ((200, 300), (320, 240)), ((97, 203), (176, 352))]:
        img = Image.fromarray(rng.integers(0, 256, (h0, w0, 3), dtype=np.uint8))
        if w0 / h0 <= W / H:  # the rule of spec 3.1, spelled out independently
            size = (W, int(W / (w0 / h0)))
        else:
            size = (int(w0 / h0 * H), H)
        arr = np.asarray(img.resize(size, resample=Image.LANCZOS)).astype(np.float32)
        top, left = (size[1] - H) // 2, (size[0] - W) // 2
        want = torch.from_numpy(arr[top:top + H, left:left + W] / 255 * 2 - 1).permute(2, 0, 1)[None]
        got = preprocess_image(img, H, W)
        assert got.shape == (1, 3, H, W) and got.dtype == torch.float32
        assert torch.equal(got, want)


def test_decoder_upsamples_encoder_stride():
    model = BSQVAE(TINY).eval()
    with torch.no_grad():
        f = model.encode_features(torch.rand(1, 3, 32, 48) * 2 - 1)
        assert f.shape == (1, 16, 4, 6)
        img = model.decode(f)
    assert img.shape == (1, 3, 32, 48) and img.abs().max() <= 1


# --------------------------------------------------------------------------------------------------
# Parity with the official VAE (vae_io.safetensors of every chain)

@pytest.fixture(scope="module", params=pf.chains() or [None])
def chain(request):
    pf.require()
    return request.param


def io(chain):
    return pf.load_io(chain, "vae_io")


def tol(name):
    return pf.tolerance("vae_io", name)


def schedule(chain):
    return [tuple(s) for s in pf.meta(chain)["vae_scale_schedule"]]


def official_weights(chain, source):
    d = pf.chain_dir(chain)
    if source == "pth":
        return normalize_vae_state_dict(torch.load(d / "vae_official.pth", weights_only=True)["vae"])
    return load_file(d / "vae_weights.safetensors")


@pytest.fixture(scope="module")
def vae(chain):
    sd = official_weights(chain, "safetensors")
    model = BSQVAE(vae_config_from_state_dict(sd)).eval()
    model.load_state_dict(sd, strict=True)
    return model


def assert_bits(got, want, residual, what):
    """Bits must be equal; a mismatch is only excused where the residual entry is within 1e-6 of 0
    (tolerances.json). residual [B, d, h, w] is aligned to the bit layout [B, 1, h, w, d]."""
    assert got.shape == want.shape and got.dtype == torch.uint8, what
    bad = got != want
    if bad.any():
        near_zero = residual.permute(0, 2, 3, 1).unsqueeze(1).abs() <= 1e-6
        assert not (bad & ~near_zero).any(), f"{what}: {int((bad & ~near_zero).sum())} bits differ"
    return int(bad.sum())


@pytest.mark.parametrize("source", ["pth", "safetensors"])
def test_official_weights_load_strict(chain, source):
    sd = official_weights(chain, source)
    model = BSQVAE(vae_config_from_state_dict(sd))
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    other = official_weights(chain, "safetensors")
    assert sd.keys() == other.keys() and all(torch.equal(sd[k], other[k]) for k in sd)
    # The plain Conv2d/GroupNorm naming loads to the same model (quirk Q16).
    assert normalize_vae_state_dict(plain_keys(sd)).keys() == sd.keys()


def test_config_matches_meta(chain):
    args = pf.meta(chain)["vae"]["autoencoder_args"]
    assert args["encoder_ch_mult"] == args["decoder_ch_mult"]
    sd = official_weights(chain, "safetensors")
    for form in (sd, plain_keys(sd)):
        cfg = vae_config_from_state_dict(form)
        assert (cfg.bits, cfg.patch_size, list(cfg.ch_mult), cfg.base_ch, cfg.num_res_blocks) == \
            (args["codebook_dim"], args["patch_size"], args["encoder_ch_mult"], args["base_ch"], args["num_res_blocks"])


def test_image_input(chain):
    want = io(chain)["image.input"]
    img = Image.open(pf.chain_dir(chain) / "image_input.png")
    got = preprocess_image(img, *want.shape[-2:])  # same size: the resize is the identity
    pf.assert_close(got, want, tol("image.input"), "image.input")


def test_encoder_features(chain, vae):
    with torch.no_grad():
        f = vae.encode_features(io(chain)["image.input"])
    pf.assert_close(f, io(chain)["encoder.features"], tol("encoder.features"), "encoder.features")


def test_quantize(chain, vae):
    t = io(chain)
    sched = schedule(chain)
    summed, bits, var_inputs, residuals = vae.quantize(t["encoder.features"], sched, return_residuals=True)
    pf.assert_close(summed, t["quant.z"], tol("quant.z"), "quant.z")
    assert len(bits) == len(sched) and len(var_inputs) == len(sched) - 1
    for k, (b, r) in enumerate(zip(bits, residuals)):
        assert_bits(b, t[f"quant.bits.s{k}"], r, f"quant.bits.s{k}")
    for k, v in enumerate(var_inputs, start=1):
        pf.assert_close(v, t[f"quant.var_input.s{k}"].squeeze(2), tol(f"quant.var_input.s{k}"), f"quant.var_input.s{k}")
    scale = 1 / vae.bits ** 0.5
    small = torch.stack([(r.abs() < 0.05 * scale).sum() / r.numel() for r in residuals])
    pf.assert_close(small, t["quant.residual_small_frac"], tol("quant.residual_small_frac"), "quant.residual_small_frac")


def test_encode_end_to_end(chain, vae):
    t = io(chain)
    with torch.no_grad():
        f = vae.encode_features(t["image.input"])
    summed, bits, _, residuals = vae.quantize(f, schedule(chain), return_residuals=True)
    flipped = sum(assert_bits(b, t[f"quant.bits.s{k}"], r, f"encode -> quant.bits.s{k}")
                  for k, (b, r) in enumerate(zip(bits, residuals)))
    if flipped == 0:
        pf.assert_close(summed, t["quant.z"], tol("quant.z"), "encode -> quant.z")
    f2, summed2, bits2, _ = vae.encode(t["image.input"], schedule(chain))
    assert torch.equal(f2, f) and torch.equal(summed2, summed) and all(map(torch.equal, bits2, bits))


def test_summed_codes_from_bits(chain):
    t = io(chain)
    sched = schedule(chain)
    summed = bsq.summed_codes_from_bits([t[f"quant.bits.s{k}"] for k in range(len(sched))], sched[-1][-2:])
    want = t["decode_from_bits.summed_codes"]
    pf.assert_close(summed, want.squeeze(2), tol("decode_from_bits.summed_codes"), "decode_from_bits.summed_codes")


def test_decode(chain, vae):
    t = io(chain)
    with torch.no_grad():
        img = vae.decode(t["quant.z"])
        from_bits = vae.decode_bits([t[f"quant.bits.s{k}"] for k in range(len(schedule(chain)))])
    pf.assert_close(img, t["decode.from_z"], tol("decode.from_z"), "decode.from_z")
    pf.assert_close(from_bits, t["decode.from_z"], tol("decode.from_z"), "decode_bits -> decode.from_z")


CHECKED = {  # every vae_io tensor -> the test comparing it
    "image.input": "test_image_input", "encoder.features": "test_encoder_features",
    "quant.*": "test_quantize", "decode.from_z": "test_decode",
    "decode_from_bits.summed_codes": "test_summed_codes_from_bits",
    "bsc.*": "test_bsc_parity.py",
}


def test_every_vae_io_tensor_is_checked(chain):
    unchecked = [n for n in io(chain) if not any(fnmatch.fnmatchcase(n, p) for p in CHECKED)]
    assert not unchecked, f"vae_io tensors no test compares: {unchecked}"
