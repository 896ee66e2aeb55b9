"""Headless text-to-image through `python -m infinity_core generate` and the pipeline object,
with tiny random-weight files in the official layouts (runs on a fresh clone)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from infinity_core.pipeline import InfinityPipeline
from tiny_models import tiny_t5_folder, tiny_transformer, tiny_vae

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    torch.save(tiny_transformer().state_dict(), d / "infinity_tiny.pth")        # official flat layout
    save_file({k: v.clone().contiguous() for k, v in tiny_vae().state_dict().items()}, str(d / "vae_tiny.safetensors"))
    tiny_t5_folder(d / "t5")
    return d


def _generate(files, out, *extra):
    cmd = [sys.executable, "-m", "infinity_core", "generate", "--transformer", str(files / "infinity_tiny.pth"),
           "--vae", str(files / "vae_tiny.safetensors"), "--text-encoder", str(files / "t5"),
           "--prompt", "a red circle on the left", "--tier", "0.06M", "--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_cli_writes_pngs_with_settings_and_is_deterministic(files, tmp_path):
    r = _generate(files, tmp_path / "a_{i}.png", "--seed", "5", "--batch-size", "2", "--cfg", "3")
    assert r.returncode == 0, r.stderr
    a0, a1 = Image.open(tmp_path / "a_0.png"), Image.open(tmp_path / "a_1.png")
    assert a0.size == (256, 256) and a0.mode == "RGB"
    settings = json.loads(a0.text["infinity"])
    assert settings["prompt"] == ["a red circle on the left"] and settings["seed"] == 5
    assert settings["batch_size"] == 2 and (settings["width"], settings["height"]) == (256, 256)
    r = _generate(files, tmp_path / "b_{i}.png", "--seed", "5", "--batch-size", "2", "--cfg", "3")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(a0), np.asarray(Image.open(tmp_path / "b_0.png")))
    assert not np.array_equal(np.asarray(a0), np.asarray(a1)), "two images of a batch should differ"


def test_cli_rejects_wrong_per_scale_list_without_writing(files, tmp_path):
    r = _generate(files, tmp_path / "c_{i}.png", "--cfg", "3,3,3")
    assert r.returncode != 0
    assert "cfg has 3 values but the schedule has 7 scales" in r.stderr
    assert not list(tmp_path.glob("*.png"))


def test_pipeline_size_snapping_negative_prompt_and_rgb(files):
    pipe = InfinityPipeline.from_files(files / "infinity_tiny.pth", files / "vae_tiny.safetensors", files / "t5")
    gen = pipe.generate("a blue square", width=250, height=330, tier="0.06M", seed=1)
    assert gen.settings.h_div_w == 1.333 and gen.images.shape == (1, 320, 240, 3)
    assert 0.0 <= float(gen.images.min()) and float(gen.images.max()) <= 1.0
    neg = pipe.generate("a blue square", "a red square", width=250, height=330, tier="0.06M", seed=1)
    assert not torch.equal(gen.sample.summed_codes, neg.sample.summed_codes)
    per_image = pipe.generate(["a blue square", "a star"], tier="0.06M", seed=3, seed_mode="per_image",
                              stop_after=2, decode=False)
    alone = pipe.generate("a star", tier="0.06M", seed=4, stop_after=2, decode=False)
    assert all(torch.equal(x[1:2], y) for x, y in zip(per_image.sample.bits, alone.sample.bits))
