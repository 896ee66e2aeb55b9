"""Checkpoint reading, validation, model building and conversion (infinity_core.checkpoint / convert).

Fixture weights come from the parity fixture set (env INFINITY_PARITY_FIXTURES, default
<repo>/../shared/fixtures/parity). Without it the fixture tests are skipped, or fail when CI=true.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from infinity_core import checkpoint as C
from infinity_core import zoo
from infinity_core.checkpoint import CheckpointError
from infinity_core.convert import convert

REPO = Path(__file__).resolve().parents[1]
FIXTURE_ENV = "INFINITY_PARITY_FIXTURES"

try:  # shared helper written alongside the parity tests, when present
    import parity_fixtures as _pf
except ImportError:  # pragma: no cover - depends on the checkout
    _pf = None


def _fixture_root() -> Path:
    if _pf is not None and hasattr(_pf, "fixture_root"):
        root = Path(_pf.fixture_root())
    else:
        root = Path(os.environ.get(FIXTURE_ENV) or REPO.parent / "shared" / "fixtures" / "parity")
    if not (root / "chain_2b").is_dir() or not (root / "chain_8b").is_dir():
        msg = f"parity fixtures not found at {root}; set {FIXTURE_ENV} to the fixture folder"
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return root


@pytest.fixture(scope="module")
def fx() -> Path:
    return _fixture_root()


CHAINS = ("chain_2b", "chain_8b")
TRANSFORMER_LAYOUTS = [
    ("chain_2b", "transformer_official.pth"),
    ("chain_2b", "transformer_weights.safetensors"),
    ("chain_8b", "transformer_official_sharded"),
    ("chain_8b", "transformer_official_sharded/model.safetensors.index.json"),
    ("chain_8b", "transformer_weights.safetensors"),
]
VAE_LAYOUTS = [(c, f) for c in CHAINS for f in ("vae_official.pth", "vae_weights.safetensors")]


def _ref(fx: Path, chain: str, what: str) -> dict:
    return load_file(fx / chain / f"{what}_weights.safetensors")


def _meta(fx: Path, chain: str) -> dict:
    return json.loads((fx / chain / "meta.json").read_text())


def _assert_same(sd: dict, ref: dict, dtype=None):
    assert sorted(sd) == sorted(ref), f"missing {sorted(set(ref) - set(sd))}, unexpected {sorted(set(sd) - set(ref))}"
    for k, v in ref.items():
        want = v.to(dtype) if (dtype is not None and v.is_floating_point()) else v
        assert sd[k].dtype == want.dtype, k
        assert torch.equal(sd[k].cpu(), want), k


def _tiny_transformer_sd(fx: Path) -> dict:
    return {k: v.clone() for k, v in _ref(fx, "chain_2b", "transformer").items()}


# ---------------------------------------------------------------------------------------------
# every layout of the fixture weights
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chain,rel", TRANSFORMER_LAYOUTS)
def test_read_state_dict_transformer_layouts(fx, chain, rel):
    _assert_same(C.read_state_dict(fx / chain / rel), _ref(fx, chain, "transformer"))


@pytest.mark.parametrize("chain,rel", VAE_LAYOUTS)
def test_read_state_dict_vae_layouts(fx, chain, rel):
    _assert_same(C.read_state_dict(fx / chain / rel), _ref(fx, chain, "vae"))


@pytest.mark.parametrize("chain,rel", TRANSFORMER_LAYOUTS)
def test_load_transformer_every_layout(fx, chain, rel):
    ref = _ref(fx, chain, "transformer")
    model = C.load_transformer(fx / chain / rel)
    _assert_same(model.state_dict(), ref)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    model16 = C.load_transformer(fx / chain / rel, dtype="bf16")
    _assert_same(model16.state_dict(), ref, torch.bfloat16)


@pytest.mark.parametrize("chain,rel", VAE_LAYOUTS)
def test_load_vae_every_layout(fx, chain, rel):
    ref = _ref(fx, chain, "vae")
    vae = C.load_vae(fx / chain / rel)
    _assert_same(vae.state_dict(), ref)


def _plain_vae_names(sd: dict) -> dict:
    """The official loader also accepts plain Conv2d/GroupNorm names (quirk Q16)."""
    out = {}
    for k, v in sd.items():
        out[k.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias")
             .replace(".norm.weight", ".weight").replace(".norm.bias", ".bias")] = v
    return out


@pytest.mark.parametrize("chain", CHAINS)
def test_load_vae_plain_key_names_and_single_mask(fx, chain, tmp_path):
    ref = _ref(fx, chain, "vae")
    plain = _plain_vae_names(ref)
    assert "encoder.conv_in.weight" in plain and "encoder.down.0.downsample.conv.weight" in plain
    del plain["quantize.lfq.mask"]  # only one of the two mask aliases
    torch.save({"vae": plain}, tmp_path / "plain.pth")
    _assert_same(C.load_vae(tmp_path / "plain.pth").state_dict(), ref)
    plain.pop("quantizer.lfq.mask")  # no mask at all: recomputed
    save_file(plain, tmp_path / "nomask.safetensors")
    _assert_same(C.load_vae(tmp_path / "nomask.safetensors").state_dict(), ref)


@pytest.mark.parametrize("chain", CHAINS)
def test_transformer_config_matches_fixture_meta(fx, chain):
    meta = _meta(fx, chain)["transformer"]
    kw, derived = meta["constructor_kwargs"], meta["derived"]
    paths = [fx / chain / rel for c, rel in TRANSFORMER_LAYOUTS if c == chain]
    for p in paths:
        cfg = C.read_transformer_config(p)
        assert cfg.depth == kw["depth"]
        assert cfg.width == kw["embed_dim"]
        assert cfg.num_heads == kw["num_heads"]
        assert cfg.block_chunks == kw["block_chunks"]
        assert cfg.text_channels == kw["text_channels"]
        assert cfg.text_maxlen == kw["text_maxlen"]
        assert cfg.patchify == bool(kw["apply_spatial_patchify"])
        assert cfg.bits_per_token == derived["d_vae"]
        assert cfg.mlp_hidden == derived["mlp_hidden"]
        assert cfg.text_pool_heads == derived["text_pool_heads"]
        assert cfg == C.transformer_config_from_state_dict(C.read_state_dict(p), str(p))


@pytest.mark.parametrize("chain", CHAINS)
def test_vae_config_matches_fixture_meta(fx, chain):
    meta = _meta(fx, chain)["vae"]
    kw = meta["factory_kwargs"]
    for rel in ("vae_official.pth", "vae_weights.safetensors"):
        cfg = C.read_vae_config(fx / chain / rel)
        assert cfg.bits == kw["codebook_dim"]
        assert cfg.patch_size == kw["patch_size"]
        assert tuple(cfg.ch_mult) == tuple(kw["encoder_ch_mult"])
        assert cfg.base_ch == meta["overrides"]["base_ch"]


# ---------------------------------------------------------------------------------------------
# real model shapes (meta tensors only)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,params", [("infinity_2b", 2_204_564_032), ("infinity_8b", 8_375_791_824)])
def test_real_shapes_config_and_param_count(name, params):
    cfg = zoo.TRANSFORMERS[name]
    shapes = C.transformer_shapes(cfg)
    sd = {k: torch.empty(s, dtype=torch.bfloat16, device="meta") for k, s in shapes.items()}
    inferred = C.transformer_config_from_state_dict(sd, name)
    assert inferred == cfg
    assert sum(math.prod(s) for k, s in shapes.items() if not k.endswith("zero_k_bias")) == params
    from infinity_core.transformer import Infinity
    with torch.device("meta"):
        model = Infinity(cfg)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    assert sum(p.numel() for p in model.parameters()) == params


def test_real_2b_spec_table_shapes():
    s = C.transformer_shapes(zoo.TRANSFORMERS["infinity_2b"])
    assert len(s) == 694  # spec 2.11: 694 keys
    assert s["sa.mat_qkv.weight".join(["block_chunks.7.module.3.", ""])] == (6144, 2048)
    assert s["word_embed.weight"] == (2048, 32) and s["head.weight"] == (64, 2048)
    s8 = C.transformer_shapes(zoo.TRANSFORMERS["infinity_8b"])
    assert s8["text_proj_for_sos.ca.mat_q"] == (1, 16, 224) and s8["word_embed.weight"] == (3584, 56)
    assert "block_chunks.7.module.4.ffn.fc1.weight" in s8 and s8["head.weight"] == (112, 3584)


def test_patchify_inference_and_override():
    cfg = zoo.TransformerConfig(depth=2, width=64, num_heads=2, vae_bits=16, patchify=True, text_channels=128,
                                block_chunks=2)
    sd = {k: torch.empty(s, device="meta") for k, s in C.transformer_shapes(cfg).items()}
    assert C.transformer_config_from_state_dict(sd).patchify is False  # 64 bits/token: read as d64
    assert C.transformer_config_from_state_dict(sd, patchify=True) == cfg
    with pytest.raises(CheckpointError, match="not a multiple of 4"):
        bad = dict(sd, **{"word_embed.weight": torch.empty(64, 30, device="meta"),
                          "head.weight": torch.empty(60, 64, device="meta")})
        C.transformer_config_from_state_dict(bad, "x", patchify=True)


# ---------------------------------------------------------------------------------------------
# wrappers, legacy keys, cfg_uncond rows
# ---------------------------------------------------------------------------------------------

def test_training_checkpoint_wrappers(fx, tmp_path):
    sd = _tiny_transformer_sd(fx)
    ref = _ref(fx, "chain_2b", "transformer")
    torch.save({"args": argparse.Namespace(model="2bc8", lr=1e-4), "epoch": 3, "acc_str": "[0.5]",
                "trainer": {"config": {"x": 1}, "gpt_fsdp": sd, "gpt_fsdp_opt": {"state": {}}}}, tmp_path / "a.pth")
    _assert_same(C.read_state_dict(tmp_path / "a.pth"), ref)
    _assert_same(C.load_transformer(tmp_path / "a.pth").state_dict(), ref)

    # an object of the official args class (module infinity.utils.arg_util), not importable here
    mods = ["infinity", "infinity.utils", "infinity.utils.arg_util"]
    saved = {m: sys.modules.get(m) for m in mods}
    try:
        for m in mods:
            sys.modules[m] = types.ModuleType(m)
        Args = type("Args", (), {"__module__": "infinity.utils.arg_util"})
        sys.modules["infinity.utils.arg_util"].Args = Args
        args = Args()
        args.model = "2bc8"
        torch.save({"args": args, "trainer": {"gpt_wo_ddp": sd, "gpt_opt": {}}}, tmp_path / "b.pth")
    finally:
        for m, mod in saved.items():
            if mod is None:
                sys.modules.pop(m, None)
            else:
                sys.modules[m] = mod
    _assert_same(C.read_state_dict(tmp_path / "b.pth"), ref)

    torch.save({"trainer": {"gpt_opt": {}}}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match="gpt_fsdp"):
        C.read_state_dict(tmp_path / "c.pth")


def test_legacy_zip_less_pth_and_legacy_buffers(fx, tmp_path):
    sd = _tiny_transformer_sd(fx)
    sd.update({"lvl_1L": torch.zeros(1, 1, 521), "attn_bias_for_masking": torch.zeros(1, 1, 521, 521),
               "Infinity_visible_kvlen": torch.zeros(1), "Infinity_invisible_qlen": torch.zeros(1)})
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    model = C.load_transformer(tmp_path / "legacy.pth")
    _assert_same(model.state_dict(), _ref(fx, "chain_2b", "transformer"))


def test_missing_zero_k_bias_is_filled(fx, tmp_path):
    sd = {k: v for k, v in _tiny_transformer_sd(fx).items() if not k.endswith("zero_k_bias")}
    save_file(sd, tmp_path / "nobuf.safetensors")
    _assert_same(C.load_transformer(tmp_path / "nobuf.safetensors").state_dict(), _ref(fx, "chain_2b", "transformer"))


def test_flat_blocks_naming_is_remapped(fx, tmp_path):
    sd = {}
    for k, v in _tiny_transformer_sd(fx).items():
        m = C._BLOCK_RE.match(k)
        sd[f"blocks.{int(m.group(1)) * 2 + int(m.group(2))}.{m.group(3)}" if m else k] = v
    save_file(sd, tmp_path / "flat.safetensors")
    model = C.load_transformer(tmp_path / "flat.safetensors")
    assert model.cfg.block_chunks == 1 and model.cfg.depth == 4
    assert torch.equal(model.state_dict()["block_chunks.0.module.3.ffn.fc1.weight"],
                       _ref(fx, "chain_2b", "transformer")["block_chunks.1.module.1.ffn.fc1.weight"])


def test_cfg_uncond_rows(fx, tmp_path):
    sd = _tiny_transformer_sd(fx)
    full = sd["cfg_uncond"]
    sd["cfg_uncond"] = full[:300].clone()
    save_file(sd, tmp_path / "short.safetensors")
    model = C.load_transformer(tmp_path / "short.safetensors")
    assert model.cfg.text_maxlen == 300 and torch.equal(model.cfg_uncond, full[:300])
    with pytest.warns(UserWarning, match="padding with zero rows"):
        model = C.load_transformer(tmp_path / "short.safetensors", text_maxlen=512)
    assert model.cfg_uncond.shape == (512, full.shape[1])
    assert torch.equal(model.cfg_uncond[:300], full[:300]) and not model.cfg_uncond[300:].any()
    with pytest.warns(UserWarning, match="truncating"):
        model = C.load_transformer(fx / "chain_2b" / "transformer_official.pth", text_maxlen=256)
    assert torch.equal(model.cfg_uncond, full[:256])


def test_resolve_dtype():
    assert C.resolve_dtype("auto", "cpu") == torch.float32
    assert C.resolve_dtype("auto", "mps") == torch.float16
    assert C.resolve_dtype("bf16") == torch.bfloat16 and C.resolve_dtype("keep") is None
    assert C.resolve_dtype(torch.float16) == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        C.resolve_dtype("int4")


# ---------------------------------------------------------------------------------------------
# bad input: each with a specific message
# ---------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    p = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="no such file") as e:
        C.load_transformer(p)
    assert str(p) in str(e.value)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty") as e:
        C.read_state_dict(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("name", ["transformer_official.pth", "transformer_weights.safetensors"])
def test_truncated_file(fx, tmp_path, name):
    data = (fx / "chain_2b" / name).read_bytes()
    p = tmp_path / name
    p.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match="truncated") as e:
        C.load_transformer(p)
    assert str(p) in str(e.value)


def test_corrupted_pth(fx, tmp_path):
    data = bytearray((fx / "chain_2b" / "transformer_official.pth").read_bytes())
    for i in range(40, 1500):
        data[i] ^= 0x5A
    p = tmp_path / "corrupt.pth"
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted") as e:
        C.load_transformer(p)
    assert str(p) in str(e.value)


def test_corrupted_safetensors_header(fx, tmp_path):
    data = bytearray((fx / "chain_2b" / "transformer_weights.safetensors").read_bytes())
    data[20:60] = b"\xff" * 40
    p = tmp_path / "corrupt.safetensors"
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted safetensors header"):
        C.read_state_dict(p)


def test_garbage_and_gguf(tmp_path):
    (tmp_path / "x.pth").write_bytes(b"hello, this is not a model")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint nor a safetensors file"):
        C.read_state_dict(tmp_path / "x.pth")
    (tmp_path / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 32)
    with pytest.raises(CheckpointError, match="GGUF"):
        C.read_state_dict(tmp_path / "m.gguf")


def test_pickle_with_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    p = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "payload": Evil()}, p)
    for fn in (C.read_state_dict, C.load_transformer, C.load_vae):
        with pytest.raises(CheckpointError, match="refused for safety") as e:
            fn(p)
        assert "system" in str(e.value) and str(p) in str(e.value)
    assert not marker.exists()


def test_not_a_dict_of_tensors(tmp_path):
    torch.save({"a": torch.zeros(1), "b": [1, 2]}, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match="not a dict of tensors: entry 'b' is a list"):
        C.read_state_dict(tmp_path / "mixed.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="contains a list, expected a dict of tensors"):
        C.read_state_dict(tmp_path / "list.pth")


def test_stable_diffusion_state_dict(tmp_path):
    def z():
        return torch.zeros(4, 4)

    save_file({"model.diffusion_model.input_blocks.0.0.weight": z(), "model.diffusion_model.time_embed.0.weight": z(),
               "first_stage_model.encoder.conv_in.weight": z(), "cond_stage_model.transformer.x": z()},
              tmp_path / "sd15.safetensors")
    with pytest.raises(CheckpointError, match="Stable Diffusion.*Infinity transformer was expected"):
        C.load_transformer(tmp_path / "sd15.safetensors")
    with pytest.raises(CheckpointError, match="Stable Diffusion.*Infinity BSQ VAE was expected"):
        C.load_vae(tmp_path / "sd15.safetensors")


def test_t5_encoder_state_dict(tmp_path):
    def z():
        return torch.zeros(4, 4)

    save_file({"shared.weight": z(), "encoder.block.0.layer.0.SelfAttention.q.weight": z(),
               "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": z(), "encoder.final_layer_norm.weight": z()[0]},
              tmp_path / "t5.safetensors")
    with pytest.raises(CheckpointError, match="T5 text encoder.*Infinity transformer was expected"):
        C.load_transformer(tmp_path / "t5.safetensors")


def test_vae_given_as_transformer_and_vice_versa(fx):
    with pytest.raises(CheckpointError, match="Infinity BSQ VAE, but an Infinity transformer was expected"):
        C.load_transformer(fx / "chain_2b" / "vae_official.pth")
    with pytest.raises(CheckpointError, match="Infinity transformer, but an Infinity BSQ VAE was expected"):
        C.load_vae(fx / "chain_8b" / "transformer_official_sharded")


def test_missing_keys_named(fx, tmp_path):
    sd = _tiny_transformer_sd(fx)
    del sd["block_chunks.1.module.0.ca.proj.weight"], sd["pos_start"]
    save_file(sd, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="2 key.*missing") as e:
        C.load_transformer(tmp_path / "m.safetensors")
    assert "'block_chunks.1.module.0.ca.proj.weight'" in str(e.value) and "'pos_start'" in str(e.value)


def test_unexpected_keys_named(fx, tmp_path):
    sd = _tiny_transformer_sd(fx)
    sd["extra.lora_scale"] = torch.ones(1)
    save_file(sd, tmp_path / "u.safetensors")
    with pytest.raises(CheckpointError, match="not part of the Infinity transformer") as e:
        C.load_transformer(tmp_path / "u.safetensors")
    assert "'extra.lora_scale'" in str(e.value)
    with pytest.warns(UserWarning, match="extra.lora_scale"):
        model = C.load_transformer(tmp_path / "u.safetensors", strict=False)
    _assert_same(model.state_dict(), _ref(fx, "chain_2b", "transformer"))


def test_shape_mismatch_named(fx, tmp_path):
    sd = _tiny_transformer_sd(fx)
    sd["block_chunks.0.module.1.ffn.fc2.bias"] = torch.zeros(65)
    save_file(sd, tmp_path / "s.safetensors")
    with pytest.raises(CheckpointError, match=r"'block_chunks.0.module.1.ffn.fc2.bias' has shape \(65\).*\(64\)"):
        C.load_transformer(tmp_path / "s.safetensors")


def test_vae_transformer_mismatch_refused(fx):
    t, v = fx / "chain_8b" / "transformer_official_sharded", fx / "chain_2b" / "vae_official.pth"
    with pytest.raises(CheckpointError) as e:
        C.load_pair(t, v)
    msg = str(e.value)
    assert str(t) in msg and str(v) in msg
    assert "14-bit BSQ VAE with stride 8 and 2x2 patchify" in msg and "32-bit BSQ VAE with stride 16" in msg


def test_load_pair_ok(fx):
    model, vae = C.load_pair(fx / "chain_8b" / "transformer_official_sharded", fx / "chain_8b" / "vae_official.pth")
    assert model.cfg.patchify and vae.cfg.bits == 14 and next(vae.parameters()).dtype == torch.float32


def test_find_vae_for(fx, tmp_path):
    v2, v8 = fx / "chain_2b" / "vae_official.pth", fx / "chain_8b" / "vae_official.pth"
    assert C.find_vae_for(fx / "chain_8b" / "transformer_official_sharded", [v2, v8]) == v8
    assert C.find_vae_for(fx / "chain_2b" / "transformer_official.pth", [v8, v2]) == v2
    assert C.find_vae_for(fx / "chain_2b" / "transformer_official.pth", [v8]) is None
    names = ["aaa_vae.pth", "infinity_vae_d32.pth", "infinity_vae_d32reg.pth"]
    for n in names:
        shutil.copy(v2, tmp_path / n)
    junk = tmp_path / "broken.pth"
    junk.write_bytes(b"")
    cands = [junk] + [tmp_path / n for n in names]
    assert C.find_vae_for(fx / "chain_2b" / "transformer_official.pth", cands) == tmp_path / "infinity_vae_d32reg.pth"


def test_sharded_index_missing_shard(fx, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(fx / "chain_8b" / "transformer_official_sharded", folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard 'model-00002-of-00002.safetensors' is missing") as e:
        C.load_transformer(folder)
    assert "model.safetensors.index.json" in str(e.value)


def test_sharded_folder_without_index(tmp_path):
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(CheckpointError, match="folder without an index file"):
        C.read_state_dict(tmp_path)


def test_pytorch_bin_index(fx, tmp_path):
    ref = _ref(fx, "chain_8b", "transformer")
    keys = list(ref)
    parts = {"pytorch_model-00001-of-00002.bin": keys[:40], "pytorch_model-00002-of-00002.bin": keys[40:]}
    for name, ks in parts.items():
        torch.save({k: ref[k] for k in ks}, tmp_path / name)
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, ks in parts.items() for k in ks}}))
    _assert_same(C.load_transformer(tmp_path).state_dict(), ref)


# ---------------------------------------------------------------------------------------------
# converter
# ---------------------------------------------------------------------------------------------

def test_convert_round_trip_transformer(fx, tmp_path):
    out = tmp_path / "t.safetensors"
    info = convert(fx / "chain_2b" / "transformer_official.pth", out)
    assert info["kind"] == "transformer"
    ref = _ref(fx, "chain_2b", "transformer")
    _assert_same(load_file(out), ref)
    _assert_same(C.load_transformer(out).state_dict(), ref)
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["infinity.kind"] == "transformer"
    assert json.loads(meta["infinity.config"])["depth"] == 4

    out16 = tmp_path / "t16.safetensors"
    convert(fx / "chain_8b" / "transformer_official_sharded", out16, dtype="bf16")
    _assert_same(load_file(out16), _ref(fx, "chain_8b", "transformer"), torch.bfloat16)
    assert C.read_transformer_config(out16).patchify


def test_convert_records_patchify_override(fx, tmp_path):
    out = tmp_path / "p.safetensors"
    convert(fx / "chain_2b" / "transformer_official.pth", out, patchify=True)
    cfg = C.read_transformer_config(out)
    assert cfg.patchify and cfg.vae_bits == 8


def test_convert_vae_normalises_keys(fx, tmp_path):
    ref = _ref(fx, "chain_8b", "vae")
    torch.save({"vae": _plain_vae_names(ref)}, tmp_path / "plain.pth")
    out = tmp_path / "vae.safetensors"
    assert convert(tmp_path / "plain.pth", out)["kind"] == "vae"
    _assert_same(load_file(out), ref)


def test_convert_cli_and_atomic_failure(fx, tmp_path):
    out = tmp_path / "cli.safetensors"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "infinity_core", "convert", str(fx / "chain_2b" / "vae_official.pth"),
                        str(out), "--dtype", "fp16"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "vae" in r.stdout and out.is_file()
    r = subprocess.run([sys.executable, "-m", "infinity_core", "convert", str(fx / "chain_2b" / "vae_official.pth"),
                        str(out)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 2 and "already exists" in r.stderr

    bad = tmp_path / "trunc.pth"
    data = (fx / "chain_2b" / "transformer_official.pth").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    r = subprocess.run([sys.executable, "-m", "infinity_core", "convert", str(bad), str(tmp_path / "o.safetensors")],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 2 and "truncated" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.safetensors", "trunc.pth"]


def test_writer_failure_leaves_nothing(tmp_path):
    out = tmp_path / "w.safetensors"

    def items():
        yield "a", torch.zeros(3)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        C.write_safetensors(out, items(), {"a": (torch.float32, (3,)), "b": (torch.float32, (2,))})
    assert list(tmp_path.iterdir()) == []
