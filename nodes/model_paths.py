"""Where the Infinity nodes find weights, and the choices their loaders offer.

Folders (ComfyUI's folder_paths keys; extra_model_paths.yaml entries for them are respected):

  infinity          transformers: models/infinity/ (registered here) - .pth, .safetensors, or a folder
                    of shards with model.safetensors.index.json (the 8B download)
  diffusion_models  also searched for transformers; only entries whose path contains "infinity"
                    are listed, so Flux/SD3/... files do not clutter the list
  vae               BSQ VAEs (infinity_vae_*.pth); files in the infinity folders whose name contains
                    "vae" are offered too
  text_encoders     flan-t5-xl: a Hugging Face folder (config.json + weights + tokenizer) or one
                    encoder-only .safetensors file

The bundled default model (bundled/infinity_tiny_shapes/ in this repository, or the folder named by
the environment variable INFINITY_BUNDLED_DIR) is offered first, as BUNDLED_LABEL, when it exists.
Listing never reads a weight file: it only walks directories.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import folder_paths

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_LABEL = "Infinity tiny shapes (bundled)"
BUNDLED_ENV = "INFINITY_BUNDLED_DIR"
WEIGHT_EXTENSIONS = (".pth", ".safetensors", ".bin", ".pt", ".ckpt", ".sft")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")

INFINITY_FOLDER = "infinity"


def register_folders() -> None:
    """Register models/infinity with ComfyUI, keeping any paths extra_model_paths.yaml gave it."""
    default = os.path.join(folder_paths.models_dir, INFINITY_FOLDER)
    if INFINITY_FOLDER in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[INFINITY_FOLDER]
        if default not in paths:
            paths.append(default)
        if not exts:  # created by extra_model_paths.yaml: list weights only in GET /models/infinity
            folder_paths.folder_names_and_paths[INFINITY_FOLDER] = (paths, set(folder_paths.supported_pt_extensions))
    else:
        folder_paths.folder_names_and_paths[INFINITY_FOLDER] = ([default], set(folder_paths.supported_pt_extensions))


def folder_list(key: str) -> list[str]:
    try:
        return folder_paths.get_folder_paths(key)
    except KeyError:
        return []


# -------------------------------------------------------------------------------------- bundled
def bundled_dir() -> Path:
    env = os.environ.get(BUNDLED_ENV)
    return Path(env) if env else REPO_ROOT / "bundled" / "infinity_tiny_shapes"


def bundled_available() -> bool:
    d = bundled_dir()
    return (d / "transformer.safetensors").is_file() and (d / "vae.safetensors").is_file()


def bundled_text_encoder_available() -> bool:
    return (bundled_dir() / "text_encoder").is_dir()


def bundled_defaults() -> dict:
    """defaults.json of the bundled model ({} when absent or unreadable)."""
    try:
        data = json.loads((bundled_dir() / "defaults.json").read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


# -------------------------------------------------------------------------------------- listing
def _is_weight(name: str) -> bool:
    return name.lower().endswith(WEIGHT_EXTENSIONS)


def _walk(root: str):
    """(relative posix path, absolute path, is_folder) of weight files and sharded/HF folders under
    root. A folder holding an index file (or a single model.safetensors next to a config.json) is one
    entry and is not descended into."""
    if not os.path.isdir(root):
        return
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        files = set(filenames)
        if rel_dir != "." and (any(i in files for i in INDEX_FILES)
                               or ("config.json" in files and any(s in files for s in SINGLE_FILES))):
            dirnames[:] = []
            yield Path(rel_dir).as_posix(), dirpath, True
            continue
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in sorted(filenames):
            if _is_weight(f) and not f.startswith("."):
                rel = f if rel_dir == "." else Path(rel_dir, f).as_posix()
                yield rel, os.path.join(dirpath, f), False


def _entries(keys: list[str], keep=lambda rel, key: True) -> dict[str, str]:
    """{relative name: absolute path}, the first folder wins on equal names."""
    out: dict[str, str] = {}
    for key in keys:
        for root in folder_list(key):
            for rel, path, _ in _walk(root):
                if rel not in out and keep(rel, key):
                    out[rel] = path
    return out


def _looks_like_vae(rel: str) -> bool:
    return "vae" in Path(rel).name.lower()


def transformer_entries() -> dict[str, str]:
    def keep(rel, key):
        if _looks_like_vae(rel):
            return False
        return key == INFINITY_FOLDER or "infinity" in rel.lower()
    return _entries([INFINITY_FOLDER, "diffusion_models"], keep)


def vae_entries() -> dict[str, str]:
    def keep(rel, key):
        return key == "vae" or _looks_like_vae(rel)
    return _entries(["vae", INFINITY_FOLDER, "diffusion_models"], keep)


def text_encoder_entries() -> dict[str, str]:
    return _entries(["text_encoders"], lambda rel, key: True)


def transformer_options() -> list[str]:
    return ([BUNDLED_LABEL] if bundled_available() else []) + sorted(transformer_entries(), key=str.lower)


def vae_options() -> list[str]:
    return ["auto"] + sorted(vae_entries(), key=str.lower)


def text_encoder_options() -> list[str]:
    return ([BUNDLED_LABEL] if bundled_text_encoder_available() else []) + sorted(text_encoder_entries(),
                                                                                   key=str.lower)


def searched(keys: list[str]) -> str:
    dirs = [d for k in keys for d in folder_list(k)]
    return ", ".join(dirs) or "(no folders registered)"
