"""Transformer training with bitwise self-correction (spec 6), single process or torchrun (DDP / FSDP).

    python -m infinity_core train --vae VAE.safetensors --text-encoder T5_FOLDER --data shapes \\
        --out RUN_DIR [--model infinity_layer12 | --depth 6 --width 256 --heads 4] [--steps N] ...
    torchrun --nproc_per_node 8 -m infinity_core train ... [--fsdp]

One step (spec 6.1-6.3): VAE encoder features of the batch (or a precomputed feature cache) ->
bitwise self-correction (bits of scales < noise_apply_layers flipped with p ~ U{0, .01, ..., strength},
re-quantised; labels are the bits of the residual w.r.t. the corrupted running sum) -> 10% of the
prompts replaced by the learned null text `cfg_uncond[:len]` -> block-causal teacher-forced forward ->
per-bit cross-entropy, tokens weighted by 1/sqrt(scale area) (the intended `reweight_loss_by_scale`)
-> AdamW (betas 0.9/0.97, wd 0.005 off 1-D/gain/embedding parameters), global-norm clip 5. bf16
autocast on CUDA; fp32 on CPU (bf16 matmuls are slower than fp32 there).

Released defaults (spec 6.3): lr = tblr * global_batch / 256 with tblr 6e-3, constant, no warm-up,
noise_apply_layers 13 (all), strength 0.3, requant 1, cond-drop 0.1, reweight 1, clip 5.

Outputs in --out:
  ar-ckpt-last.pth          the official training-checkpoint layout {'args', 'arch', 'epoch', 'iter',
                            'trainer': {'config', 'gpt_wo_ddp' (or 'gpt_fsdp'), 'gpt_opt'}, 'acc_str',
                            'milestones'} plus 'text_encoder' / 'text_opt' when the T5 is trained; resume
                            with --resume (the step's data, noise and dropout are reproduced exactly)
  transformer.pth           flat state dict with the official key names (the 2B release format)
  transformer.safetensors   the same tensors + `infinity.*` metadata
  text_encoder/             the T5 folder, when --train-text-encoder
  log.jsonl, eval.jsonl     training and held-out metrics (held-out bit accuracy per scale)

Distributed: launched by torchrun (WORLD_SIZE > 1) it initialises NCCL on CUDA, gloo on CPU; DDP by
default, FSDP (SHARD_GRAD_OP, one unit per block chunk) with --fsdp. --batch-size is per process.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import bsq
from . import schedules as S
from .zoo import TransformerConfig

DEFAULT_OUT = Path(os.path.expanduser("~/.cache/comfyui-infinity/train"))
NO_DECAY_NAMES = ("cfg_uncond", "pos_start", "lvl_embed", "gamma", "beta", "ada_gss", "scale_mul",
                  "text_proj_for_sos.ca.mat_q")

# ================================================================================================
# distributed helpers (shared with train_vae)


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(t)
        return t

    def print(self, *a, **k):
        if self.main:
            print(*a, **k, flush=True)


def start_run(args):
    """Threads, process group and output folder of a training run -> (dist, out, start time)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    dist = setup_distributed(args.device)
    out = Path(args.out).expanduser()
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return dist, out, time.time()


def command_main(help_text, add_arguments, run, argv=None) -> int:
    """`python -m infinity_core.<module>`: the subcommand without the package's command table."""
    p = argparse.ArgumentParser(description=help_text)
    add_arguments(p)
    return run(p.parse_args(argv))


def setup_distributed(device: str = "auto") -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: init the process group (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def cleanup_distributed(dist: Dist):
    if dist.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def autocast(device: torch.device, precision: str):
    """bf16 autocast where it pays off (CUDA with bf16); 'auto' is fp32 elsewhere."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"precision {precision!r}: expected auto, bf16 or fp32")


def step_seed(seed: int, step: int, rank: int, what: str = "") -> int:
    h = hashlib.sha256(f"{seed}/{step}/{rank}/{what}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def seed_step(seed: int, step: int, rank: int):
    """Seed every global RNG the step uses (NumPy for the BSC flip rate, torch for flips / dropout)."""
    s = step_seed(seed, step, rank)
    np.random.seed(s)
    torch.manual_seed(s)
    random.seed(s)


def atomic_torch_save(obj, path: Path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_safetensors(sd: dict, path: Path, metadata: dict | None = None, dtype: torch.dtype | None = None):
    """Write a flat state dict as .safetensors (floating tensors cast to `dtype` if given), atomically."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    for k, v in sd.items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.clone().contiguous()  # own storage: the VAE mask appears under two names
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(out, str(tmp), metadata={str(k): str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


def full_state_dict(model: nn.Module) -> dict:
    """Full (unsharded) CPU state dict of a plain / DDP / FSDP module, without wrapper prefixes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.nn.parallel import DistributedDataParallel
    if isinstance(model, DistributedDataParallel):  # replicated: the inner module holds everything
        model = model.module                         # (and the VAE's `quantize` alias trips dcp's getattr)
    elif _wrapped(model):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _wrapped(model) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel) or _is_fsdp(model)


def _is_fsdp(model) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        if isinstance(model, FSDP):
            return True
    except ImportError:
        pass
    return type(model).__name__.startswith("FSDP")


def optimizer_state(model, opt) -> dict:
    """Optimizer state keyed by parameter names (portable across world sizes, DDP and FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                         cpu_offload=_wrapped(model)))


def load_optimizer_state(model, opt, sd):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, opt, sd, options=StateDictOptions(full_state_dict=True))


def load_model_state(model, sd):
    if _wrapped(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=True))
    else:
        model.load_state_dict(sd, strict=True)


def lr_at(step: int, total: int, base: float, warmup: int, schedule: str, decay_start: float) -> float:
    """'constant' (released), or 'linear-decay': constant, then linearly to 0 from decay_start*total."""
    f = 1.0
    if warmup > 0 and step < warmup:
        f = (step + 1) / warmup
    if schedule == "linear-decay" and total > 0:
        d0 = int(decay_start * total)
        if step >= d0:
            f *= max(0.0, (total - step) / max(1, total - d0))
    elif schedule != "constant":
        raise ValueError(f"lr schedule {schedule!r}: expected constant or linear-decay")
    return base * f


def jsonl_append(path: Path, row: dict):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def file_digest(path, n: int = 16) -> str:
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:n]


# ================================================================================================
# model construction and initialisation (spec 2.12)


def init_weights(model, tini: float = -1, aln: float = 1e-3, alng: float = 5e-6, hd0: float = 0.02,
                 diva: bool = True) -> None:
    """The official from-scratch initialisation (train.sh values)."""
    from .transformer import Infinity
    assert isinstance(model, Infinity)
    C, Ct5, depth = model.cfg.width, model.cfg.text_channels, model.cfg.depth
    std = math.sqrt(1 / C / 3) if tini < 0 else tini
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std, a=-2, b=2)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.fill_(1.0)
                m.bias.zero_()
        g = torch.Generator().manual_seed(0)
        u = torch.empty(model.cfg_uncond.shape)
        nn.init.trunc_normal_(u, std=1.2, a=-2, b=2, generator=g)
        model.cfg_uncond.copy_(u / Ct5 ** 0.5)
        nn.init.trunc_normal_(model.pos_start, std=std, a=-2, b=2)
        nn.init.trunc_normal_(model.text_proj_for_sos.ca.mat_q, std=std, a=-2, b=2)
        model.text_norm.weight.fill_(1.0)
        model.head_nm.ada_lin[-1].weight.mul_(aln)
        model.head_nm.ada_lin[-1].bias.zero_()
        model.head.weight.mul_(hd0)
        model.head.bias.zero_()
        for b in model.blocks:
            b.sa.scale_mul_1H11.fill_(math.log(4.0))
            b.sa.q_bias.zero_(); b.sa.v_bias.zero_(); b.ca.v_bias.zero_()
            b.ada_gss.copy_(torch.randn(b.ada_gss.shape) / C ** 0.5)
            if diva:
                for lin in (b.sa.proj, b.ca.proj, b.ffn.fc2):
                    lin.weight.div_(math.sqrt(2 * depth))
                b.ada_gss[..., 0:2, :].mul_(alng)
                b.ada_gss[..., 2:6, :].mul_(aln)


def build_config(args, vae_bits: int, patchify: bool, text_channels: int) -> TransformerConfig:
    from . import zoo
    if args.model and args.model != "custom":
        if args.model not in zoo.TRANSFORMERS:
            raise ValueError(f"--model {args.model!r}: expected 'custom' or one of {list(zoo.TRANSFORMERS)}")
        base = zoo.TRANSFORMERS[args.model]
        cfg = dataclasses.replace(base, vae_bits=vae_bits, patchify=patchify, text_channels=text_channels)
    else:
        cfg = TransformerConfig(depth=args.depth, width=args.width, num_heads=args.heads, vae_bits=vae_bits,
                                patchify=patchify, text_channels=text_channels, block_chunks=args.block_chunks,
                                text_maxlen=args.text_maxlen, name=args.name or "custom")
    if args.drop_path is not None:
        cfg = dataclasses.replace(cfg, drop_path_rate=args.drop_path)
    if args.name:
        cfg = dataclasses.replace(cfg, name=args.name)
    return cfg


def load_init_weights(model, path, dist: Dist) -> None:
    """Fine-tuning start (the official --rush_resume rules): load a checkpoint non-strictly, dropping
    word_embed/head when the bit width differs and the text path + cfg_uncond when the T5 width differs."""
    from .checkpoint import normalize_transformer_state_dict, read_state_dict
    sd = normalize_transformer_state_dict(read_state_dict(path))
    own = model.state_dict()
    dropped = []
    for k in list(sd):
        if k not in own:
            dropped.append(k); sd.pop(k); continue
        if tuple(sd[k].shape) != tuple(own[k].shape):
            if k == "cfg_uncond" and sd[k].shape[1] == own[k].shape[1]:
                t = own[k].clone(); n = min(t.shape[0], sd[k].shape[0]); t[:n] = sd[k][:n]; sd[k] = t
                continue
            dropped.append(k); sd.pop(k)
    missing = [k for k in own if k not in sd]
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=False)
    dist.print(f"init from {path}: {len(sd)} tensors loaded, {len(dropped)} dropped "
               f"{dropped[:6]}, {len(missing)} kept from scratch {missing[:6]}")


def param_groups(model: nn.Module, wd: float):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or n.endswith(".bias") or any(k in n for k in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


class _TrainForward(nn.Module):
    """The transformer plus condition dropout inside one forward, so that DDP/FSDP see `cfg_uncond`
    used on every step (its gradient is zero when no prompt of the batch was dropped)."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, kv_compact, cu_seqlens, x_BLC_wo_prefix, schedule, drop):
        lens = torch.diff(cu_seqlens).tolist()
        uncond = torch.cat([self.gpt.cfg_uncond[:n] for n in lens]).to(kv_compact.dtype)
        row_drop = torch.repeat_interleave(drop.to(kv_compact.device), torch.tensor(lens, device=kv_compact.device))
        kv = torch.where(row_drop[:, None], uncond, kv_compact)
        return self.gpt(kv, cu_seqlens, x_BLC_wo_prefix, schedule)


def wrap_model(model: nn.Module, dist: Dist, fsdp: bool, find_unused: bool = False):
    if not dist.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from .transformer import MultipleLayers
        kw = {"device_id": dist.device} if dist.device.type == "cuda" else {}
        return FSDP(model, auto_wrap_policy=ModuleWrapPolicy({MultipleLayers}),
                    sharding_strategy=ShardingStrategy.SHARD_GRAD_OP, use_orig_params=True, **kw)
    kw = {"device_ids": [dist.device.index]} if dist.device.type == "cuda" else {}
    return nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused, **kw)


def clip_grad(model, params, max_norm: float) -> float:
    if _is_fsdp(model) and hasattr(model, "clip_grad_norm_"):
        return float(model.clip_grad_norm_(max_norm))
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")))


# ================================================================================================
# text encoder


def create_tiny_t5(folder, captions: list[str], d_model: int = 128, num_layers: int = 2, num_heads: int = 4,
                   d_ff: int = 256, vocab_size: int = 140, seed: int = 0) -> Path:
    """A small T5 encoder (flan-t5 architecture family: gated-GELU FFN, relative position buckets,
    RMSNorm) with a sentencepiece BPE tokenizer trained on `captions` (pad 0, eos 1, unk 2 as in T5;
    140 pieces make every caption word of the shapes data one piece, ',' is its own symbol). Writes config.json, model.safetensors (encoder-only keys + `shared.weight`), spiece.model."""
    import sentencepiece as spm
    import transformers
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(captions), model_prefix=str(folder / "spiece"),
                                   vocab_size=vocab_size, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, model_type="bpe", minloglevel=2, num_threads=1,
                                   character_coverage=1.0, user_defined_symbols=[","])
    (folder / "spiece.vocab").unlink(missing_ok=True)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    cfg = transformers.T5Config(vocab_size=sp.get_piece_size(), d_model=d_model, d_ff=d_ff, d_kv=d_model // num_heads,
                                num_heads=num_heads, num_layers=num_layers, feed_forward_proj="gated-gelu",
                                dropout_rate=0.0, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                                decoder_start_token_id=0, is_encoder_decoder=False)
    torch.manual_seed(seed)
    model = transformers.T5EncoderModel(cfg).eval()
    cfg.save_pretrained(folder)
    save_t5(model, folder)
    return folder


def pretrain_tiny_t5(folder, steps: int, device, seed: int = 0, data_seed: int = 0, log=print) -> dict:
    """Caption-parsing pretraining of a created T5 (text_pretrain.py), saved back into `folder`
    with its report in `folder/pretrain.json`."""
    from .text_encoder import T5TextEncoder
    from .text_pretrain import pretrain_caption_parsing
    log = log or (lambda *a, **k: None)
    enc = T5TextEncoder(folder, device=device, dtype="fp32")
    log(f"pretraining the T5 on caption parsing ({steps} steps)")
    report = pretrain_caption_parsing(enc, steps=steps, seed=seed, data_seed=data_seed, log=log)
    save_t5(enc.model, folder)
    (Path(folder) / "pretrain.json").write_text(json.dumps(report, indent=1))
    log(f"caption parsing: {report['seconds']:.0f}s, every field right on {100 * report['train_parse_acc']:.1f}% "
        f"of training captions and {100 * report['heldout_parse_acc']:.1f}% of held-out ones")
    return report


def save_t5(model, folder) -> None:
    sd = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_safetensors(sd, Path(folder) / "model.safetensors", {"format": "pt"})


class TextEncoderForTraining:
    """T5TextEncoder whose weights can be trained (the tiny bundled T5) or stay frozen (flan-t5-xl)."""

    def __init__(self, path, device, trainable: bool):
        from .text_encoder import T5TextEncoder
        self.enc = T5TextEncoder(path, device=device, dtype="fp32")
        self.trainable = trainable
        self.model = self.enc.model
        if trainable:
            self.model.requires_grad_(True).train()
        self.wrapped = self.model

    @property
    def width(self) -> int:
        return self.enc.width

    def encode(self, prompts: list[str]):
        from .text_encoder import pack_features
        if not self.trainable:
            tc = self.enc.encode(prompts)
            return tc.kv_compact, tc.cu_seqlens
        ids, mask, dropped = self.enc.tokenize(prompts)
        ids, mask = ids.to(self.enc.device), mask.to(self.enc.device)
        feats = self.wrapped(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        tc = pack_features(feats, mask, prompts, dropped)
        return tc.kv_compact, tc.cu_seqlens

    def save(self, folder, state_dict=None):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        src = Path(self.enc.tokenizer.folder)
        for name in ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (src / name).is_file() and (src / name).resolve() != (folder / name).resolve():
                (folder / name).write_bytes((src / name).read_bytes())
        self.enc.config.save_pretrained(folder)
        sd = state_dict if state_dict is not None else self.model.state_dict()
        sd = {k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"}
        save_safetensors(sd, folder / "model.safetensors", {"format": "pt"})


# ================================================================================================
# data: synthetic shapes (with a feature cache) or the official jsonl layout


class FeaturePool:
    """VAE encoder features + captions of a fixed set of pictures, grouped by template, computed once
    and kept on disk (keyed by VAE file digest and data settings) so repeated runs skip the encoder."""

    def __init__(self, feats: list, captions: list, templates: list):
        self.feats, self.captions, self.templates = feats, captions, templates
        self.groups: dict[float, list[int]] = {}
        for i, t in enumerate(templates):
            self.groups.setdefault(t, []).append(i)

    def __len__(self):
        return len(self.feats)

    def batch(self, indices):
        return {"features": torch.stack([self.feats[i] for i in indices]).float(),
                "caption": [self.captions[i] for i in indices], "template": self.templates[indices[0]]}

    @staticmethod
    @torch.no_grad()
    def build(source, n: int, vae, device, batch: int = 16, log=None) -> "FeaturePool":
        feats, caps, temps = [], [], []
        t0 = time.time()
        by_t: dict[float, list[int]] = {}
        for i in range(n):
            by_t.setdefault(source.template_of(i), []).append(i)
        for t, ix in by_t.items():
            for a in range(0, len(ix), batch):
                b = source.batch(ix[a:a + batch])
                f = vae.encode_features(b["image"].to(device)).float().cpu()
                feats += list(f)
                caps += b["caption"]
                temps += [t] * len(b["caption"])
                if log and (a // batch) % 50 == 0:
                    log(f"  feature cache {len(feats)}/{n} ({time.time() - t0:.0f}s)")
        return FeaturePool(feats, caps, temps)

    def save(self, path):
        atomic_torch_save({"feats": torch.stack(self.feats) if len({f.shape for f in self.feats}) == 1 else self.feats,
                           "captions": self.captions, "templates": self.templates}, path)

    @staticmethod
    def load(path) -> "FeaturePool":
        d = torch.load(path, map_location="cpu", weights_only=True)
        feats = list(d["feats"]) if isinstance(d["feats"], torch.Tensor) else d["feats"]
        return FeaturePool(feats, d["captions"], d["templates"])


def cached_pool(source, n: int, vae, vae_path, device, dist: Dist, cache_dir: Path, tag: str) -> FeaturePool:
    key = f"{tag}-{file_digest(vae_path)}-n{n}"
    path = Path(cache_dir) / f"features-{key}.pt"
    if not path.is_file():
        if dist.main:
            dist.print(f"computing the feature cache {path.name} ({n} pictures)")
            pool = FeaturePool.build(source, n, vae, device, log=dist.print)
            pool.save(path)
        dist.barrier()
    return FeaturePool.load(path)


# ================================================================================================
# held-out metrics


@torch.no_grad()
def bit_accuracy_per_scale(fwd, text, pool: FeaturePool, schedule_of, patchify: bool, batch: int = 16,
                           noise_strength: float = 0.0, seed: int = 0, dist: Dist | None = None,
                           precision: str = "auto", device=torch.device("cpu")) -> dict:
    """Teacher-forced argmax bit accuracy per scale and the loss on a fixed set, without text dropout.
    noise_strength > 0 corrupts the inputs like BSC with a fixed flip rate (p = strength on every
    scale), i.e. how well the model corrects mistakes of earlier scales."""
    from .bsc import bitwise_self_correction
    from .transformer import bit_cross_entropy
    dist = dist or Dist()
    correct: dict[float, torch.Tensor] = {}
    total: dict[float, torch.Tensor] = {}
    loss_sum = torch.zeros(2, dtype=torch.float64)
    idx = list(range(dist.rank, len(pool), dist.world))
    g = torch.Generator().manual_seed(seed)
    for a in range(0, len(idx), batch):
        b = pool.batch(idx[a:a + batch])
        sched = schedule_of(b["template"])
        vsched = S.vae_schedule(sched, patchify)
        f = b["features"].to(device)
        flip = None
        if noise_strength > 0:
            flip = lambda si, bits: (torch.rand(bits.shape, generator=g) < noise_strength).to(bits.device)  # noqa
        x, labels = bitwise_self_correction(f, vsched, patchify, len(sched) if flip else 0, noise_strength,
                                            flip_source=flip)
        kv, cu = text.encode(b["caption"])
        with autocast(device, precision):
            logits = fwd(kv, cu, x, sched, torch.zeros(len(b["caption"]), dtype=torch.bool))
        lab = torch.cat(labels, 1).to(device)
        loss, _ = bit_cross_entropy(logits, lab, sched, reweight=True)
        pred = logits.float().view(*lab.shape, 2).argmax(-1)
        ok = (pred == lab).float().mean(-1)  # [B, L]
        sizes = [h * w for _, h, w in sched]
        c = torch.stack([seg.sum() for seg in ok.split(sizes, dim=1)]).double().cpu()
        n = torch.tensor([float(s * ok.shape[0]) for s in sizes], dtype=torch.float64)
        key = b["template"]
        correct[key] = correct.get(key, 0) + c
        total[key] = total.get(key, 0) + n
        loss_sum += torch.tensor([float(loss) * len(b["caption"]), len(b["caption"])], dtype=torch.float64)
    out = {}
    for key in sorted(pool.groups):
        c = correct.get(key, torch.zeros(len(schedule_of(key)), dtype=torch.float64))
        n = total.get(key, torch.zeros(len(schedule_of(key)), dtype=torch.float64))
        c, n = dist.all_reduce_sum(c.clone()), dist.all_reduce_sum(n.clone())
        out[str(key)] = (c / n.clamp_min(1)).tolist()
    loss_sum = dist.all_reduce_sum(loss_sum)
    out["loss"] = float(loss_sum[0] / loss_sum[1].clamp_min(1))
    return out


# ================================================================================================
# command line

HELP = "train an Infinity transformer with bitwise self-correction (single process, or torchrun for DDP/FSDP)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="shapes", help="'shapes' (synthetic, built in) or a folder of official jsonl files")
    g.add_argument("--image-root", default=None, help="base folder of relative image paths in the jsonl files")
    g.add_argument("--data-seed", type=int, default=0)
    g.add_argument("--pn", default="0.06M", choices=list(S.TIERS), help="resolution tier")
    g.add_argument("--templates", default="1.0", help="h/w templates to train on, e.g. '1.0' or '1.0,0.5,2.0'")
    g.add_argument("--short-cap-prob", type=float, default=0.5)
    g.add_argument("--two-object-fraction", type=float, default=0.3,
                   help="shapes: fraction of training scenes with two objects (the held-out evaluation uses 0.4)")
    g.add_argument("--feature-cache", type=int, default=0,
                   help="shapes: train on a fixed pool of this many pictures whose VAE features are computed "
                        "once and cached (0: draw new pictures every step)")
    g.add_argument("--cache-dir", default=str(DEFAULT_OUT / "cache"))
    g.add_argument("--cache-only", action="store_true",
                   help="compute the feature caches (training pool and held-out set) and stop, e.g. with all "
                        "cores before several runs share them")
    g.add_argument("--eval-samples", type=int, default=64, help="held-out pictures for the bit-accuracy eval")
    g = p.add_argument_group("models")
    g.add_argument("--vae", required=True, help="BSQ VAE checkpoint (frozen)")
    g.add_argument("--text-encoder", required=True, help="T5 folder (flan-t5-xl or a small one)")
    g.add_argument("--train-text-encoder", action="store_true", help="train the T5 too (small encoders only)")
    g.add_argument("--create-text-encoder", action="store_true",
                   help="if --text-encoder does not exist, create a tiny T5 there (tokenizer trained on the "
                        "shapes captions; see create_tiny_t5)")
    g.add_argument("--t5-width", type=int, default=128, help="d_model of a created T5 (>= 128)")
    g.add_argument("--pretrain-text-steps", type=int, default=0,
                   help="with --create-text-encoder on the shapes data: caption-parsing steps for the new T5 "
                        "(text only, training-split captions; the stand-in for flan-t5's pretraining)")
    g.add_argument("--model", default="custom", help="a zoo name (infinity_2b, infinity_layer12, ...) or 'custom'")
    g.add_argument("--depth", type=int, default=6)
    g.add_argument("--width", type=int, default=256)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--block-chunks", type=int, default=2)
    g.add_argument("--text-maxlen", type=int, default=512)
    g.add_argument("--drop-path", type=float, default=None, help="default: the config's (0.1)")
    g.add_argument("--name", default=None, help="model name recorded in the checkpoint metadata")
    g.add_argument("--init-from", default=None, help="start from these weights (fine-tuning)")
    g = p.add_argument_group("optimisation (defaults: the released train.sh)")
    g.add_argument("--batch-size", type=int, default=16, help="per process")
    g.add_argument("--steps", type=int, default=1000)
    g.add_argument("--max-minutes", type=float, default=0, help="stop (and save) after this long (0: no limit)")
    g.add_argument("--tblr", type=float, default=6e-3, help="lr = tblr * global batch / 256")
    g.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --tblr)")
    g.add_argument("--lr-schedule", default="constant", choices=["constant", "linear-decay"])
    g.add_argument("--decay-start", type=float, default=0.7)
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--wd", type=float, default=0.005)
    g.add_argument("--betas", default="0.9,0.97")
    g.add_argument("--eps", type=float, default=1e-8)
    g.add_argument("--clip", type=float, default=5.0)
    g.add_argument("--text-lr-mult", type=float, default=1.0, help="T5 lr = lr * this (with --train-text-encoder)")
    g.add_argument("--cond-drop", type=float, default=0.1)
    g.add_argument("--noise-apply-layers", type=int, default=13, help="BSC on scales < this (0: off)")
    g.add_argument("--noise-apply-strength", type=float, default=0.3)
    g.add_argument("--noise-apply-requant", type=int, default=1)
    g.add_argument("--reweight", type=int, default=1, help="reweight tokens by 1/sqrt(scale area)")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    g = p.add_argument_group("run")
    g.add_argument("--out", default=str(DEFAULT_OUT / "transformer"))
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0: default)")
    g.add_argument("--fsdp", action="store_true", help="FSDP (SHARD_GRAD_OP per block chunk) instead of DDP")
    g.add_argument("--resume", default="auto", help="'auto' (OUT/ar-ckpt-last.pth if present), a path, or 'no'")
    g.add_argument("--ckpt-every", type=int, default=500)
    g.add_argument("--eval-every", type=int, default=250)
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--save-dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="dtype of transformer.safetensors")


def _templates(text: str) -> list[float]:
    return [S.nearest_template(float(t)) for t in text.replace(",", " ").split()]


def run(args) -> int:
    result = train(args)
    return 0 if result is not None else 1


def train(args) -> dict:
    """Train; returns a summary dict (also written to OUT/summary.json)."""
    from .checkpoint import load_vae
    from .bsc import bitwise_self_correction
    from .transformer import Infinity, bit_cross_entropy
    from . import data as D

    dist, out, t_start = start_run(args)
    device = dist.device

    if args.create_text_encoder and not Path(args.text_encoder).exists():
        if dist.main:
            dist.print(f"creating a tiny T5 text encoder in {args.text_encoder}")
            create_tiny_t5(args.text_encoder, D.caption_corpus(4000, args.data_seed), d_model=args.t5_width,
                           d_ff=2 * args.t5_width, num_heads=max(1, args.t5_width // 32), seed=args.seed)
            if args.pretrain_text_steps > 0:
                pretrain_tiny_t5(args.text_encoder, args.pretrain_text_steps, device, args.seed, args.data_seed,
                                 dist.print)
        dist.barrier()
    vae = load_vae(args.vae, torch.float32, device)
    vcfg = vae.cfg
    patchify = vcfg.patchify_vae
    text = TextEncoderForTraining(args.text_encoder, device, args.train_text_encoder)
    cfg = build_config(args, vcfg.bits, patchify, text.width)
    templates = _templates(args.templates)
    schedules = {t: S.get_schedule(t, args.pn) for t in templates}
    schedule_of = lambda t: schedules[t]  # noqa: E731

    torch.manual_seed(args.seed)
    gpt = Infinity(cfg, ca_precision="fp32" if device.type == "cpu" else "bf16")
    init_weights(gpt)
    if args.init_from:
        load_init_weights(gpt, args.init_from, dist)
    gpt.to(device).train()
    fwd_module = _TrainForward(gpt)
    fwd = wrap_model(fwd_module, dist, args.fsdp)
    params = [p for p in fwd.parameters() if p.requires_grad]
    nparams = sum(p.numel() for p in gpt.parameters())
    global_bs = args.batch_size * dist.world
    lr = args.lr if args.lr is not None else args.tblr * global_bs / 256
    betas = tuple(float(b) for b in args.betas.split(","))
    opt = torch.optim.AdamW(param_groups(fwd, args.wd), lr=lr, betas=betas, eps=args.eps)
    t5_opt = None
    if args.train_text_encoder:
        text.wrapped = wrap_model(text.model, dist, fsdp=False)
        t5_opt = torch.optim.AdamW(param_groups(text.model, args.wd), lr=lr * args.text_lr_mult, betas=betas,
                                   eps=args.eps)
    dist.print(f"transformer {cfg.name}: depth {cfg.depth} width {cfg.width} heads {cfg.num_heads} "
               f"d_in {cfg.bits_per_token} Ct5 {cfg.text_channels}: {nparams / 1e6:.2f}M params; "
               f"world {dist.world}, batch {args.batch_size}/process, lr {lr:.3g}, device {device}")

    # -- data ------------------------------------------------------------------------------------
    pool = sampler = source = None
    eval_pool = None
    if args.data == "shapes":
        if not 0.0 <= args.two_object_fraction <= 1.0:
            raise SystemExit(f"--two-object-fraction {args.two_object_fraction}: expected a fraction in [0, 1]")
        source = D.SyntheticShapes(args.data_seed, "train", args.pn, templates, p_two=args.two_object_fraction)
        heldout = D.SyntheticShapes(args.data_seed, "heldout", args.pn, templates)
        if args.feature_cache:
            two = "" if args.two_object_fraction == 0.3 else f"-two{args.two_object_fraction:g}"
            pool = cached_pool(source, args.feature_cache, vae, args.vae, device, dist, Path(args.cache_dir),
                               f"shapes-train-s{args.data_seed}-{args.pn}-{'_'.join(map(str, templates))}{two}")
            sampler = D.TemplateBatchSampler(pool.groups, args.batch_size, args.seed, dist.rank, dist.world)
        if args.eval_samples:
            eval_pool = cached_pool(heldout, args.eval_samples, vae, args.vae, device, dist, Path(args.cache_dir),
                                    f"shapes-heldout-s{args.data_seed}-{args.pn}-{'_'.join(map(str, templates))}")
    else:
        source = D.JsonlImageText(args.data, args.pn, args.image_root, args.short_cap_prob, templates)
        sampler = D.TemplateBatchSampler(source.groups, args.batch_size, args.seed, dist.rank, dist.world)
    if args.cache_only:
        dist.print(f"feature caches ready in {args.cache_dir} ({(time.time() - t_start) / 60:.1f} min)")
        cleanup_distributed(dist)
        return {"cache_only": True, "seconds": time.time() - t_start}

    def get_batch(step: int) -> dict:
        if pool is not None:
            _, ix = sampler.batch_at(step)
            return pool.batch(ix)
        if isinstance(source, D.SyntheticShapes):
            # new pictures every step; all ranks of a step share one template
            k = len(templates)
            t_idx = step % k
            base = (step * dist.world + dist.rank) * args.batch_size
            ix = [(base + j) * k + t_idx for j in range(args.batch_size)]
            b = source.batch(ix)
        else:
            _, ix = sampler.batch_at(step)
            b = source.batch(ix, random.Random(step_seed(args.seed, step, dist.rank, "caption")))
        with torch.no_grad():
            b["features"] = vae.encode_features(b["image"].to(device)).float()
        return b

    # -- resume ----------------------------------------------------------------------------------
    start = 0
    ckpt_path = out / "ar-ckpt-last.pth"
    resume = None if args.resume == "no" else (ckpt_path if args.resume == "auto" else Path(args.resume))
    if resume is not None and resume.is_file():
        ck = torch.load(resume, map_location="cpu", weights_only=True)
        sd = ck["trainer"].get("gpt_wo_ddp") or ck["trainer"].get("gpt_fsdp")
        load_model_state(fwd, {"gpt." + k: v for k, v in sd.items()})
        load_optimizer_state(fwd, opt, _prefix_opt(ck["trainer"]["gpt_opt"]))
        if t5_opt is not None and "text_encoder" in ck:
            text.model.load_state_dict(ck["text_encoder"], strict=False)
            t5_opt.load_state_dict(ck["text_opt"])
        start = int(ck["iter"])
        dist.print(f"resumed from {resume} at step {start}")
    elif args.resume not in ("auto", "no"):
        raise FileNotFoundError(f"--resume {args.resume}: no such checkpoint")

    log_path, eval_path = out / "log.jsonl", out / "eval.jsonl"
    if dist.main and start == 0:
        for pth in (log_path, eval_path):
            pth.unlink(missing_ok=True)

    def save(step: int, final: bool = False):
        sd = {k[len("gpt."):]: v for k, v in full_state_dict(fwd).items()}
        osd = optimizer_state(fwd, opt)
        t5_sd = full_state_dict(text.wrapped) if args.train_text_encoder else None
        if dist.main:
            ck = {"args": _plain(vars(args)), "arch": cfg.name, "epoch": 0, "iter": step,
                  "trainer": {"config": _plain(dataclasses.asdict(cfg)),
                              ("gpt_fsdp" if args.fsdp else "gpt_wo_ddp"): sd, "gpt_opt": _unprefix_opt(osd)},
                  "acc_str": "", "milestones": {"step": step, "seconds": time.time() - t_start}}
            if t5_sd is not None:
                ck["text_encoder"] = t5_sd
                ck["text_opt"] = t5_opt.state_dict()
            atomic_torch_save(ck, ckpt_path)
            write_transformer_files(sd, cfg, out, args.save_dtype)
            if t5_sd is not None:
                text.save(out / "text_encoder", t5_sd)
        dist.barrier()

    def evaluate(step: int):
        if eval_pool is None:
            return None
        fwd.eval(); text.model.eval()
        row = {"step": step}
        for name, strength in (("clean", 0.0), ("noisy", 0.1)):
            r = bit_accuracy_per_scale(fwd, text, eval_pool, schedule_of, patchify, noise_strength=strength,
                                       seed=args.seed, dist=dist, precision=args.precision, device=device)
            row[name] = r
        fwd.train()
        if args.train_text_encoder:
            text.model.train()
        if dist.main:
            jsonl_append(eval_path, row)
            accs = row["clean"][str(templates[0])]
            dist.print(f"[eval {step}] held-out loss {row['clean']['loss']:.4f}, bit acc per scale "
                       + " ".join(f"{a:.3f}" for a in accs))
        return row

    # -- loop ------------------------------------------------------------------------------------
    step = start
    t_loop = time.time()
    seen = 0
    last_eval = None
    for step in range(start, args.steps):
        if args.max_minutes and (time.time() - t_start) / 60 > args.max_minutes:
            dist.print(f"time budget of {args.max_minutes} min reached at step {step}")
            break
        ts = time.time()
        cur_lr = lr_at(step, args.steps, lr, args.warmup_steps, args.lr_schedule, args.decay_start)
        for gopt in opt.param_groups:
            gopt["lr"] = cur_lr
        if t5_opt is not None:
            for gopt in t5_opt.param_groups:
                gopt["lr"] = cur_lr * args.text_lr_mult
        b = get_batch(step)
        seed_step(args.seed, step, dist.rank)
        sched = schedule_of(b["template"])
        vsched = S.vae_schedule(sched, patchify)
        x, labels = bitwise_self_correction(b["features"].to(device), vsched, patchify,
                                            max(args.noise_apply_layers, 0), args.noise_apply_strength,
                                            requant=bool(args.noise_apply_requant))
        B = x.shape[0]
        drop = torch.rand(B) < args.cond_drop
        kv, cu = text.encode(b["caption"])
        with autocast(device, args.precision):
            logits = fwd(kv, cu, x, sched, drop)
        lab = torch.cat(labels, 1).to(device)
        loss, per_token = bit_cross_entropy(logits, lab, sched, reweight=bool(args.reweight),
                                            label_smoothing=args.label_smoothing)
        opt.zero_grad(set_to_none=True)
        if t5_opt is not None:
            t5_opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = clip_grad(fwd, params, args.clip)
        if t5_opt is not None:
            torch.nn.utils.clip_grad_norm_(text.model.parameters(), args.clip if args.clip > 0 else float("inf"))
            t5_opt.step()
        opt.step()
        seen += B * dist.world
        if dist.main and (step % args.log_every == 0 or step == args.steps - 1):
            with torch.no_grad():
                pred = logits.detach().float().view(*lab.shape, 2).argmax(-1)
                acc = (pred == lab).float().mean(-1)
                sizes = [h * w for _, h, w in sched]
                accs = [float(a.mean()) for a in acc.split(sizes, dim=1)]
            dt, loss_value = time.time() - ts, float(loss.detach())
            row = {"step": step, "loss": loss_value, "lr": cur_lr, "grad_norm": gnorm, "sec": dt,
                   "acc_per_scale": accs, "elapsed_min": (time.time() - t_start) / 60,
                   "cpu_min": time.process_time() / 60}
            jsonl_append(log_path, row)
            print(f"step {step:5d} loss {loss_value:.4f} acc {sum(accs) / len(accs):.3f} (last {accs[-1]:.3f}) "
                  f"gnorm {gnorm:.2f} lr {cur_lr:.2e} {dt:.2f}s/step {(time.time() - t_start) / 60:.1f}min",
                  flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            last_eval = evaluate(step + 1)
        if args.ckpt_every and (step + 1) % args.ckpt_every == 0 and step + 1 < args.steps:
            save(step + 1)
    else:
        step = args.steps
    final_step = step
    if final_step > start or not ckpt_path.exists():
        save(final_step, final=True)
    last_eval = evaluate(final_step) if final_step > start else last_eval
    summary = {"steps": final_step, "start": start, "seconds": time.time() - t_start,
               "cpu_seconds": time.process_time(),
               "train_seconds": time.time() - t_loop, "samples_seen": seen, "params": nparams,
               "config": _plain(dataclasses.asdict(cfg)), "lr": lr, "eval": last_eval,
               "data": {"source": args.data, "two_object_fraction": args.two_object_fraction,
                        "feature_cache": args.feature_cache,
                        **({"size_radius": dict(D.SIZE_RADIUS)} if args.data == "shapes" else {})},
               "out": str(out)}
    if dist.main:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        dist.print(f"done: {final_step} steps in {summary['seconds'] / 60:.1f} min -> {out}")
    cleanup_distributed(dist)
    return summary


def write_transformer_files(sd: dict, cfg: TransformerConfig, out: Path, save_dtype: str = "fp32"):
    """transformer.pth (flat, official key names) and transformer.safetensors (+ metadata)."""
    from . import __version__
    atomic_torch_save({k: v.contiguous() for k, v in sd.items()}, out / "transformer.pth")
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[save_dtype]
    meta = {"infinity.kind": "transformer", "infinity.config": json.dumps(dataclasses.asdict(cfg)),
            "infinity.source": "infinity_core.train", "infinity.dtype": str(dt).replace("torch.", ""),
            "infinity.converter": f"infinity_core {__version__}"}
    save_safetensors(sd, out / "transformer.safetensors", meta, dtype=dt)


def _plain(obj):
    """JSON-able primitives only (torch.load(weights_only=True) must be able to read checkpoints)."""
    return json.loads(json.dumps(obj, default=str))


def _unprefix_opt(osd: dict) -> dict:
    """Optimizer states keyed by parameter names lose the wrapper's 'gpt.' prefix (official names)."""
    if isinstance(osd.get("state"), dict) and any(isinstance(k, str) for k in osd["state"]):
        st = {(k[4:] if isinstance(k, str) and k.startswith("gpt.") else k): v for k, v in osd["state"].items()}
        groups = [dict(g, params=[(p[4:] if isinstance(p, str) and p.startswith("gpt.") else p) for p in g["params"]])
                  for g in osd["param_groups"]]
        return {"state": st, "param_groups": groups}
    return osd


def _prefix_opt(osd: dict) -> dict:
    if isinstance(osd.get("state"), dict) and any(isinstance(k, str) for k in osd["state"]):
        st = {("gpt." + k if isinstance(k, str) else k): v for k, v in osd["state"].items()}
        groups = [dict(g, params=[("gpt." + p if isinstance(p, str) else p) for p in g["params"]])
                  for g in osd["param_groups"]]
        return {"state": st, "param_groups": groups}
    return osd


if __name__ == "__main__":
    raise SystemExit(command_main(HELP, add_arguments, run))
