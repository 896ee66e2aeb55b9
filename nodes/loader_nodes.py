"""Load Infinity Model and Load Infinity Text Encoder: ComfyUI file choices -> infinity_core loaders.

Devices follow ComfyUI (comfy.model_management): the transformer and VAE are read onto the offload
device and handed to ComfyUI's model management (ModelPatcher), which moves them to the compute
device when a node needs them and unloads them when other models need the memory; the T5 encoder
stays on the text-encoder offload device between prompts.
"""
from __future__ import annotations

import gc
import weakref

import torch

import comfy.model_management as mm
from comfy_api.latest import io

from ..infinity_core import attention as attn_mod
from ..infinity_core import checkpoint as ckpt
from ..infinity_core import text_encoder as te
from ..infinity_core import zoo
from . import model_paths as mp
from .common import (CATEGORY, InfinityModel, InfinityTextEncoder, Model, TextEncoder, check_choice, fail,
                     log, make_patcher, short)

DTYPES = ["auto", "bf16", "fp16", "fp32"]
ATTENTION = list(attn_mod.BACKENDS)  # auto, sdpa, xformers, flash
OFFICIAL_VAE_STEMS = set(zoo.VAES)

# Every transformer, VAE and T5 encoder these loaders created that is still alive (weak references):
# the log line after each load reports the counts, so a model that should have been released (replaced
# in the graph, or dropped by ComfyUI's cache or POST /free) and is still held somewhere shows up.
_LIVE: dict[str, weakref.WeakSet] = {"transformer": weakref.WeakSet(), "vae": weakref.WeakSet(),
                                     "text encoder": weakref.WeakSet()}


def live_counts() -> dict[str, int]:
    gc.collect()
    return {k: len(v) for k, v in _LIVE.items()}


def _in_memory() -> str:
    return ", ".join(f"{n} {k}{'s' if n != 1 else ''}" for k, n in live_counts().items())


class _CachedModel(InfinityModel):
    """The loader's INFINITY_MODEL value. ComfyUI's RAM-pressure cache (`--cache-ram`) scores cached node
    outputs by `get_ram_usage()` (as for its own ModelPatcher, CLIP and VAE outputs) and drops the
    biggest first when RAM runs short; without it a model would count as 0.1 byte and be dropped after
    every image and latent."""

    def get_ram_usage(self) -> int:
        return int(self.transformer_patcher.model_size() + self.vae_patcher.model_size())


class _CachedTextEncoder(InfinityTextEncoder):
    """The text encoder loader's value, with its weight bytes for ComfyUI's RAM-pressure cache."""

    def get_ram_usage(self) -> int:
        return int(self.size_bytes())


WHERE_TRANSFORMERS = ("ComfyUI/models/infinity/ (the 2B: infinity_2b_reg.pth; the 8B: the whole "
                      "infinity_8b_weights folder)")


def _transformer_path(node: str, name: str) -> tuple[str, bool]:
    """(path, is_bundled) for a transformer choice, or a clear error."""
    if name == mp.BUNDLED_LABEL:
        if not mp.bundled_available():
            fail(node, f"the bundled model is not installed: expected transformer.safetensors and "
                       f"vae.safetensors in {mp.bundled_dir()}")
        return str(mp.bundled_dir() / "transformer.safetensors"), True
    entries = mp.transformer_entries()
    if name in entries:
        return entries[name], False
    have = ", ".join(sorted(entries)[:8]) or "none"
    fail(node, f"transformer {name!r} was not found. Looked in: {mp.searched([mp.INFINITY_FOLDER, 'diffusion_models'])}. "
               f"Put the file in {WHERE_TRANSFORMERS} and refresh the page (press R). Transformers found: {have}.")


def _vae_path(node: str, name: str, transformer_name: str, transformer_path: str, bundled: bool) -> str:
    if name == "auto":
        if bundled:
            return str(mp.bundled_dir() / "vae.safetensors")
        entries = mp.vae_entries()
        official = [p for rel, p in entries.items() if rel.rsplit("/", 1)[-1].split(".")[0] in OFFICIAL_VAE_STEMS]
        try:
            found = ckpt.find_vae_for(transformer_path, official) if official else None
            if found is None:
                found = ckpt.find_vae_for(transformer_path, [p for p in entries.values() if p not in official])
            cfg = ckpt.read_transformer_config(transformer_path) if found is None else None
        except ckpt.CheckpointError as e:
            fail(node, short(e), e)
        if found is None:
            fail(node, f"vae 'auto': no VAE file fits transformer {transformer_name!r}. It needs "
                       f"{zoo.describe_needed_vae(cfg)}. Put it in ComfyUI/models/vae/ (looked in: "
                       f"{mp.searched(['vae', mp.INFINITY_FOLDER])}).")
        return str(found)
    entries = mp.vae_entries()
    if name in entries:
        return entries[name]
    fail(node, f"vae {name!r} was not found. Looked in: {mp.searched(['vae', mp.INFINITY_FOLDER])}. Put the "
               f"VAE in ComfyUI/models/vae/ (the 2B uses infinity_vae_d32reg.pth, the 8B "
               f"infinity_vae_d56_f8_14_patchify.pth), or choose 'auto'.")


class InfinityModelLoader(io.ComfyNode):
    NAME = "Load Infinity Model"

    @classmethod
    def define_schema(cls) -> io.Schema:
        transformers = mp.transformer_options()
        return io.Schema(
            node_id="InfinityModelLoader",
            display_name=cls.NAME,
            category=CATEGORY,
            description=(
                "Loads an Infinity transformer and the BSQ VAE that fits it. Transformers are listed from "
                "models/infinity (and Infinity files in models/diffusion_models, and folders in "
                "extra_model_paths.yaml): the official infinity_2b_reg.pth, the 8B shard folder "
                "infinity_8b_weights, or converted .safetensors. With vae 'auto' the loader pairs the "
                "transformer with a fitting VAE from models/vae (same bits per latent cell; stride 8 for "
                "the patchified 8B); a VAE that does not fit is refused before any weight is read. "
                "ComfyUI's model management moves the weights to the GPU while sampling and unloads them "
                "when other models need the memory."),
            inputs=[
                io.Combo.Input(
                    "transformer", options=transformers, default=transformers[0] if transformers else None,
                    tooltip=("The Infinity transformer: a file in models/infinity (also Infinity files in "
                             "models/diffusion_models), or the 8B's folder of shards. '" + mp.BUNDLED_LABEL +
                             "' is the small model shipped with this node pack.")),
                io.Combo.Input(
                    "vae", options=mp.vae_options(), default="auto",
                    tooltip=("'auto' picks the VAE that fits the transformer (official names first: "
                             "infinity_vae_d32reg.pth for the 2B, infinity_vae_d56_f8_14_patchify.pth for the "
                             "8B). Or choose a file from models/vae; one that does not fit is refused.")),
                io.Combo.Input(
                    "weight_dtype", options=DTYPES, default="auto",
                    tooltip=("Precision of the transformer weights. 'auto': bf16 on CUDA GPUs (fp16 where "
                             "bf16 is unsupported), fp32 on the CPU (bf16 matrix products are 10-400x slower "
                             "there). The VAE always runs in fp32.")),
                io.Combo.Input(
                    "attention", options=ATTENTION, default="auto",
                    tooltip=("Attention kernel. 'auto': flash-attn, else xformers, else PyTorch SDPA (CUDA); "
                             "SDPA elsewhere. xformers/flash need CUDA and the package installed; results "
                             "do not depend on the choice.")),
            ],
            outputs=[Model.Output("model", display_name="model",
                                  tooltip="The transformer and its VAE, for the Infinity sampler and VAE nodes.")],
        )

    @classmethod
    def execute(cls, transformer: str, vae: str, weight_dtype: str, attention: str) -> io.NodeOutput:
        node = cls.NAME
        check_choice(node, "weight_dtype", weight_dtype, DTYPES)
        check_choice(node, "attention", attention, ATTENTION)
        tpath, bundled = _transformer_path(node, transformer)
        vpath = _vae_path(node, vae, transformer, tpath, bundled)
        load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
        dtype = ckpt.resolve_dtype(weight_dtype, load_device)
        try:
            attn_mod.resolve_backend(attention)
        except ValueError as e:
            fail(node, f"attention: {short(e)}", e)
        defaults = mp.bundled_defaults() if bundled else {}
        # Cross-attention precision: the released models were trained with bf16 flash-attn, whose rounding
        # "bf16" reproduces; the bundled model was trained and evaluated with exact fp32 math.
        ca_precision = str(defaults.get("ca_precision", "fp32")) if bundled else "bf16"
        # Cancel before the weights are read. Reading cannot stop halfway (one infinity_core call), and a
        # finished load is kept: ComfyUI stops the prompt before the next node and caches this output.
        mm.throw_exception_if_processing_interrupted()
        try:
            tmodel, vmodel = ckpt.load_pair(tpath, vpath, dtype=dtype, device=offload_device, vae_dtype=torch.float32,
                                            attn_backend=attention, ca_precision=ca_precision)
        except (ckpt.CheckpointError, ValueError, OSError) as e:
            fail(node, short(e), e)
        model = _CachedModel(
            transformer_patcher=make_patcher(tmodel, load_device, offload_device),
            vae_patcher=make_patcher(vmodel, mm.vae_device(), mm.vae_offload_device()),
            transformer_path=tpath, vae_path=vpath, dtype=dtype, attention=tmodel.attn_backend,
            label=transformer, defaults=defaults)
        _LIVE["transformer"].add(tmodel)
        _LIVE["vae"].add(vmodel)
        log.info("Infinity: loaded %s. In memory: %s", model.describe(), _in_memory())
        return io.NodeOutput(model)


class InfinityTextEncoderLoader(io.ComfyNode):
    NAME = "Load Infinity Text Encoder"

    @classmethod
    def define_schema(cls) -> io.Schema:
        encoders = mp.text_encoder_options()
        return io.Schema(
            node_id="InfinityTextEncoderLoader",
            display_name=cls.NAME,
            category=CATEGORY,
            description=(
                "Loads the T5 text encoder Infinity was trained with (google/flan-t5-xl for the 2B and 8B) "
                "from models/text_encoders: a Hugging Face folder (config.json, weights, tokenizer) or a "
                "single encoder-only .safetensors file (its tokenizer is then ComfyUI's T5 tokenizer). "
                "The encoder waits on the offload device (CPU) between prompts and visits the GPU only "
                "while it encodes."),
            inputs=[
                io.Combo.Input(
                    "text_encoder", options=encoders, default=encoders[0] if encoders else None,
                    tooltip=("A flan-t5-xl folder (or encoder-only .safetensors) in models/text_encoders. '"
                             + mp.BUNDLED_LABEL + "' is the encoder of the bundled small model.")),
                io.Combo.Input(
                    "dtype", options=DTYPES, default="auto",
                    tooltip=("Precision of the encoder. 'auto': bf16 on CUDA GPUs, fp32 on the CPU. In fp16 "
                             "the feed-forward output layers stay fp32, as in transformers.")),
            ],
            outputs=[TextEncoder.Output("text_encoder_out", display_name="text_encoder",
                                        tooltip="The T5 encoder, for Infinity Text Encode.")],
        )

    @classmethod
    def execute(cls, text_encoder: str, dtype: str) -> io.NodeOutput:
        node = cls.NAME
        check_choice(node, "dtype", dtype, DTYPES)
        if text_encoder == mp.BUNDLED_LABEL:
            if not mp.bundled_text_encoder_available():
                fail(node, f"the bundled text encoder is not installed: expected the folder "
                           f"{mp.bundled_dir() / 'text_encoder'}")
            path = str(mp.bundled_dir() / "text_encoder")
        else:
            entries = mp.text_encoder_entries()
            if text_encoder not in entries:
                have = ", ".join(sorted(entries)[:8]) or "none"
                fail(node, f"text_encoder {text_encoder!r} was not found. Looked in: {mp.searched(['text_encoders'])}. "
                           f"Put the google/flan-t5-xl folder (config.json, model weights, spiece.model or "
                           f"tokenizer.json) in ComfyUI/models/text_encoders/flan-t5-xl/ and refresh the page. "
                           f"Found: {have}.")
            path = entries[text_encoder]
        load_device, offload_device = mm.text_encoder_device(), mm.text_encoder_offload_device()
        torch_dtype = te.resolve_dtype(dtype, torch.device(load_device))
        mm.throw_exception_if_processing_interrupted()  # Cancel before the weights are read (see above)
        try:
            encoder = te.T5TextEncoder(path, device=offload_device, dtype=torch_dtype,
                                       pad_to_max_length=torch.device(load_device).type == "cuda")
        except (ValueError, OSError) as e:
            fail(node, f"{text_encoder!r}: {short(e)}", e)
        _LIVE["text encoder"].add(encoder.model)
        log.info("Infinity: loaded text encoder %s (d_model %d, %s). In memory: %s", path, encoder.width,
                 torch_dtype, _in_memory())
        return io.NodeOutput(_CachedTextEncoder(encoder, torch.device(load_device), torch.device(offload_device),
                                                text_encoder))


NODES: list[type[io.ComfyNode]] = [InfinityModelLoader, InfinityTextEncoderLoader]
