"""Random-weight stand-ins for the official Infinity downloads, for tests of the ComfyUI nodes and of
the shipped workflows (the graph and the loaders are what is tested with them, not image quality).

Each stand-in has the official file name and key layout but small shapes, so CPU tests are fast:

  infinity/infinity_2b_reg.pth                  flat torch.save(state_dict), 2B layout
                                                (block_chunks.<c>.module.<j>.*, cfg_uncond 512 rows,
                                                32 bits per token, no patchify)
  vae/infinity_vae_d32reg.pth                   {'vae': state_dict}, 32-bit BSQ VAE, stride 16
  text_encoders/flan-t5-xl/                     Hugging Face T5 folder (config.json,
                                                model.safetensors, spiece.model); d_model = the
                                                transformers' text_channels (128)
  infinity/infinity_8b_weights/                 sharded safetensors + model.safetensors.index.json,
                                                8B layout (56 bits per token = 14-bit VAE x 2x2
                                                patchify)
  vae/infinity_vae_d56_f8_14_patchify.pth       {'vae': state_dict}, 14-bit BSQ VAE, stride 8

and a stand-in of the bundled default model folder (what bundled/infinity_tiny_shapes/ will hold):
transformer.safetensors, vae.safetensors, text_encoder/, defaults.json, MODEL_CARD.md.

    from stand_ins import build_models_dir
    build_models_dir("/tmp/models")            # everything above under /tmp/models/<folder>/

Builds are seeded (the same bytes every time) and cached per process by target directory.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from infinity_core.transformer import Infinity
from infinity_core.zoo import TransformerConfig, VAEConfig
from tiny_models import randomize_, tiny_t5_folder, tiny_vae

TEXT_CHANNELS = 128  # d_model of the stand-in flan-t5-xl (the transformers' text_channels)

# 2B layout: 32 bits per token, stride-16 32-bit VAE, blocks in chunks (the 2B has 8 chunks of 4).
T_2B = TransformerConfig(depth=2, width=64, num_heads=2, vae_bits=32, text_channels=TEXT_CHANNELS,
                         block_chunks=2, name="stand_in_2b")
# base_ch 32 is the least GroupNorm(32 groups) allows; one res block per level keeps a 1024x1024
# decode at a few seconds on a CPU.
VAE_D32 = VAEConfig(bits=32, patch_size=16, ch_mult=(1, 1, 1, 1, 1), base_ch=32, num_res_blocks=1,
                    name="stand_in_vae_d32")
# 8B layout: 14-bit stride-8 VAE, 2x2 patchify -> 56 bits per token.
T_8B = TransformerConfig(depth=2, width=64, num_heads=2, vae_bits=14, patchify=True, text_channels=TEXT_CHANNELS,
                         block_chunks=2, name="stand_in_8b")
VAE_D14_F8 = VAEConfig(bits=14, patch_size=8, ch_mult=(1, 1, 1, 1), base_ch=32, num_res_blocks=1,
                       name="stand_in_vae_d14_f8")
# A transformer with a different token width: no official VAE fits it (for the mismatch error).
T_16BIT = TransformerConfig(depth=2, width=64, num_heads=2, vae_bits=16, text_channels=TEXT_CHANNELS,
                            block_chunks=2, name="stand_in_16bit")

NAME_2B = "infinity_2b_reg.pth"
NAME_VAE_2B = "infinity_vae_d32reg.pth"
NAME_8B = "infinity_8b_weights"
NAME_VAE_8B = "infinity_vae_d56_f8_14_patchify.pth"
NAME_T5 = "flan-t5-xl"
BUNDLE_DEFAULTS = {"cfg": 3.0, "tau": 1.0, "top_k": 900, "top_p": 0.97, "tier": "0.06M", "h_div_w": 1.0}


def transformer_state_dict(cfg: TransformerConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights with the official key names and shapes of `cfg`."""
    torch.manual_seed(seed)
    model = randomize_(Infinity(cfg), seed)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def vae_state_dict(cfg: VAEConfig, seed: int = 1) -> dict[str, torch.Tensor]:
    """A BSQ VAE with Kaiming-initialised convolutions (its pictures are noise, but not constant)."""
    vae = tiny_vae(cfg, seed)
    return {k: v.detach().clone().contiguous() for k, v in vae.state_dict().items()}


def write_flat_pth(path, cfg: TransformerConfig, seed: int = 0) -> Path:
    """The official 2B file layout: `torch.save(state_dict)`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(transformer_state_dict(cfg, seed), path)
    return path


def write_vae_pth(path, cfg: VAEConfig, seed: int = 1) -> Path:
    """The official VAE file layout: `torch.save({'vae': state_dict})`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"vae": vae_state_dict(cfg, seed)}, path)
    return path


def write_sharded(folder, cfg: TransformerConfig, shards: int = 2, seed: int = 0) -> Path:
    """The official 8B layout: a folder of safetensors shards with model.safetensors.index.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = transformer_state_dict(cfg, seed)
    keys = list(sd)
    per = -(-len(keys) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder


def write_t5_folder(folder, d_model: int = TEXT_CHANNELS, seed: int = 0) -> Path:
    """A Hugging Face T5 encoder folder with its own tokenizer (spiece.model)."""
    return tiny_t5_folder(folder, d_model=d_model, seed=seed)


def write_bundle(folder, cfg: TransformerConfig = T_2B, vae_cfg: VAEConfig = VAE_D32, seed: int = 3) -> Path:
    """A stand-in of bundled/infinity_tiny_shapes/: the same files, random weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(transformer_state_dict(cfg, seed), str(folder / "transformer.safetensors"))
    save_file(vae_state_dict(vae_cfg, seed + 1), str(folder / "vae.safetensors"))
    write_t5_folder(folder / "text_encoder", seed=seed)
    (folder / "defaults.json").write_text(json.dumps(BUNDLE_DEFAULTS, indent=2))
    (folder / "MODEL_CARD.md").write_text("# Stand-in of the bundled tiny-shapes model (random weights, tests only)\n")
    return folder


_BUILT: dict[str, dict[str, Path]] = {}


def build_models_dir(models_dir, *, with_8b: bool = True, with_mismatch: bool = True) -> dict[str, Path]:
    """Write every stand-in under `models_dir` (ComfyUI's models/ layout). Returns {what: path}."""
    models_dir = Path(models_dir)
    key = str(models_dir.resolve())
    if key in _BUILT and all(p.exists() for p in _BUILT[key].values()):
        return _BUILT[key]
    out = {
        "2b": write_flat_pth(models_dir / "infinity" / NAME_2B, T_2B, seed=0),
        "vae_2b": write_vae_pth(models_dir / "vae" / NAME_VAE_2B, VAE_D32, seed=1),
        "t5": write_t5_folder(models_dir / "text_encoders" / NAME_T5),
    }
    if with_8b:
        out["8b"] = write_sharded(models_dir / "infinity" / NAME_8B, T_8B, seed=2)
        out["vae_8b"] = write_vae_pth(models_dir / "vae" / NAME_VAE_8B, VAE_D14_F8, seed=3)
    if with_mismatch:
        out["16bit"] = write_flat_pth(models_dir / "infinity" / "stand_in_16bit.pth", T_16BIT, seed=4)
    _BUILT[key] = out
    return out


def remove(path) -> None:
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        os.remove(path)


# ---------------------------------------------------------------------------------------------
# The test environment: a real ComfyUI with this package and the stand-ins above
# ---------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
REAL_BUNDLE = REPO / "bundled" / "infinity_tiny_shapes"
# test-only nodes (a one-channel IMAGE maker, a probe of INFINITY_CODES), loaded next to the pack
TEST_NODES_PLUGIN = "ComfyUI-Infinity-TestNodes"
TEST_NODES_DIR = REPO / "tests" / "comfy_test_nodes"

class InfinityEnv:
    """A running ComfyUI (tests/comfy_server.ComfyServer) with ComfyUI-Infinity and the stand-ins:

    - models dir with every official-name stand-in (build_models_dir) plus a diffusion_models entry;
    - an extra_model_paths.yaml section `infinity_extra` whose `infinity` folder holds
      extra/infinity_2b_extra.pth (the 2B stand-in under another name);
    - the bundled model: the real bundled/infinity_tiny_shapes/ when it exists, else a stand-in
      passed through INFINITY_BUNDLED_DIR (`bundle_is_stand_in` says which);
    - the test-only nodes of tests/comfy_test_nodes/ (custom-node package TEST_NODES_PLUGIN): a
      one-channel IMAGE maker and a probe that shows INFINITY_CODES in the history.
    The torch thread count of the server is INFINITY_TEST_THREADS (default 1: CI machines have 2
    cores, shared with the test process)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.models_dir = self.root / "models"
        self.extra_dir = self.root / "extra_models"
        self.paths = build_models_dir(self.models_dir)
        (self.models_dir / "diffusion_models").mkdir(parents=True, exist_ok=True)
        shutil.copy(self.paths["2b"], self.models_dir / "diffusion_models" / "infinity_2b_in_diffusion_models.pth")
        (self.models_dir / "diffusion_models" / "flux1-dev-placeholder.safetensors").write_bytes(b"")
        write_flat_pth(self.extra_dir / "more_infinity" / "extra" / "infinity_2b_extra.pth", T_2B, seed=0)
        # a T5 of another width than the transformers' text_channels (for the mismatch error)
        self.paths["t5_64"] = write_t5_folder(self.models_dir / "text_encoders" / "t5-small-64", d_model=64)
        self.bundle_is_stand_in = not ((REAL_BUNDLE / "transformer.safetensors").is_file()
                                       and (REAL_BUNDLE / "vae.safetensors").is_file())
        self.bundle_dir = write_bundle(self.root / "bundle") if self.bundle_is_stand_in else REAL_BUNDLE
        self.server = None

    def start(self, comfy_dir: str, python: str):
        from comfy_server import ComfyServer
        env = {"OMP_NUM_THREADS": os.environ.get("INFINITY_TEST_THREADS", "1")}
        if self.bundle_is_stand_in:
            env["INFINITY_BUNDLED_DIR"] = str(self.bundle_dir)
        stub = REPO / "scripts" / "stubs"
        base = self.root / "comfyui"
        base.mkdir(parents=True, exist_ok=True)
        import conftest  # the repository's tests/conftest.py: the nodes the pack must register
        self.server = ComfyServer(
            comfy_dir, python, {"ComfyUI-Infinity": str(REPO), TEST_NODES_PLUGIN: str(TEST_NODES_DIR)},
            base_dir=str(base), models_dir=str(self.models_dir),
            extra_model_paths={"infinity_extra": {"base_path": str(self.extra_dir), "infinity": "more_infinity"}},
            env=env, torchvision_stubs=str(stub),
            log_path=os.environ.get("INFINITY_COMFY_LOG") or str(self.root / "comfyui.log"),
            expect_nodes=[*conftest.COMFY_EXPECT_NODES, "InfinityTestImageChannels", "InfinityTestCodesProbe"])
        self.server.start()
        return self.server

    def stop(self):
        if self.server is not None:
            self.server.stop()
            self.server = None


_ENV: dict[str, InfinityEnv] = {}


def infinity_env(request, tmp_path_factory) -> InfinityEnv:
    """The session's InfinityEnv, started on first use (one server for every test module that asks).
    Without a provisioned ComfyUI the test is skipped, or fails when CI=true (as conftest.py does)."""
    import pytest

    if "env" in _ENV:
        return _ENV["env"]
    import conftest  # the repository's tests/conftest.py: provisioning of ComfyUI
    try:
        comfy_dir, python = conftest._provision_comfyui()
    except conftest._Unprovisioned as e:
        msg = f"no ComfyUI to test against: {e}"
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    env = InfinityEnv(tmp_path_factory.mktemp("infinity_env"))
    try:
        env.start(comfy_dir, python)
    except Exception as e:
        env.stop()
        pytest.fail(f"ComfyUI with the Infinity stand-ins did not start: {e}", pytrace=False)
    _ENV["env"] = env
    request.config.add_cleanup(env.stop)
    return env
