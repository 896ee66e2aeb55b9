"""Tiny random-weight Infinity models for tests that must run on a fresh clone (no fixtures)."""
from __future__ import annotations

import torch

from infinity_core.transformer import Infinity
from infinity_core.vae import BSQVAE
from infinity_core.zoo import TransformerConfig, VAEConfig

TINY_T = TransformerConfig(depth=2, width=64, num_heads=2, vae_bits=16, text_channels=128, block_chunks=2,
                           name="tiny")
TINY_T_PATCHIFY = TINY_T.with_(vae_bits=8, patchify=True, name="tiny_patchify")
TINY_VAE = VAEConfig(bits=16, patch_size=16, ch_mult=(1, 1, 1, 1, 1), base_ch=32, name="tiny_vae")
TINY_VAE_F8 = VAEConfig(bits=8, patch_size=8, ch_mult=(1, 1, 1, 1), base_ch=32, name="tiny_vae_f8")


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Overwrite every parameter with seeded noise (like the fixtures: no zero gates or biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = std if p.dim() < 2 else min(std, 1.5 / p.shape[-1] ** 0.5)
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module


def tiny_transformer(cfg: TransformerConfig = TINY_T, seed: int = 0, **kw) -> Infinity:
    return randomize_(Infinity(cfg, **kw), seed)


def tiny_vae(cfg: VAEConfig = TINY_VAE, seed: int = 1) -> BSQVAE:
    vae = BSQVAE(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if p.dim() == 4:
                torch.nn.init.kaiming_normal_(p, generator=g)
            elif name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return vae


def random_text(B: int, lens=None, width: int = 128, seed: int = 0):
    """Packed stand-in T5 features: (kv_compact [sum L, width], cu_seqlens [B+1] int32)."""
    g = torch.Generator().manual_seed(seed)
    lens = lens or [3 + 2 * i for i in range(B)]
    kv = torch.randn(sum(lens), width, generator=g) * 0.3
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    return kv, cu


CAPTION_WORDS = ("a small big red blue green yellow purple orange white black circle square triangle star "
                 "on the left right top bottom centre background and two of cat dog photo").split()


def tiny_t5_folder(path, d_model: int = 128, seed: int = 0):
    """A Hugging Face T5 encoder folder (config.json, model.safetensors, spiece.model) with seeded
    weights and a sentencepiece tokenizer trained on the fly (pad 0, eos 1, unk 2 like T5)."""
    import random
    from pathlib import Path

    import sentencepiece as spm
    import transformers
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sents = [" ".join(rng.choice(CAPTION_WORDS) for _ in range(rng.randint(3, 10))) for _ in range(300)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sents), model_prefix=str(path / "spiece"), vocab_size=96,
                                   hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    (path / "spiece.vocab").unlink()
    cfg = transformers.T5Config(vocab_size=96, d_model=d_model, d_ff=2 * d_model, d_kv=32, num_heads=d_model // 32,
                                num_layers=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.T5EncoderModel(cfg).eval()
    cfg.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"},
              str(path / "model.safetensors"))
    return path
