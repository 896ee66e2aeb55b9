"""Model zoo: every released and paper configuration of Infinity as plain data.

A transformer config says how wide and deep the model is and how many bits one token carries;
a VAE config says how many bits one latent cell carries and how far the image is downsampled.
The two meet at the bits: `transformer.vae_bits == vae.bits` and patchify <=> stride-8 VAE.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace


def mlp_hidden_for(width: int, mlp_ratio: float = 4.0) -> int:
    # Python's round() is half-to-even, as in the official code: 2080*4/256 = 32.5 -> 32.
    return round(width * mlp_ratio / 256) * 256


@dataclass(frozen=True)
class TransformerConfig:
    depth: int
    width: int                 # C (= D, the condition width)
    num_heads: int
    vae_bits: int = 32         # d: bits per VAE latent cell
    patchify: bool = False     # 2x2 latent cells folded into one token (8B)
    text_channels: int = 2048  # Ct5
    block_chunks: int = 4      # changes state-dict key names: block_chunks.{i//n}.module.{i%n}
    mlp_hidden: int = 0        # 0 -> round(4C/256)*256
    text_maxlen: int = 512
    drop_path_rate: float = 0.1
    name: str = "custom"

    def __post_init__(self):
        if self.mlp_hidden == 0:
            object.__setattr__(self, "mlp_hidden", mlp_hidden_for(self.width))
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.depth % self.block_chunks:
            raise ValueError(f"depth {self.depth} is not divisible by block_chunks {self.block_chunks}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def bits_per_token(self) -> int:  # d_in
        return self.vae_bits * (4 if self.patchify else 1)

    @property
    def head_width(self) -> int:  # V = 2 * d_in logits per token
        return 2 * self.bits_per_token

    @property
    def blocks_per_chunk(self) -> int:
        return self.depth // self.block_chunks

    @property
    def text_pool_heads(self) -> int:
        return self.text_channels // (128 if self.width <= 4096 else 64)

    def with_(self, **kw) -> "TransformerConfig":
        if "width" in kw and "mlp_hidden" not in kw:
            kw["mlp_hidden"] = 0
        return replace(self, **kw)


@dataclass(frozen=True)
class VAEConfig:
    bits: int                          # codebook_dim d = z channels
    patch_size: int = 16               # spatial stride
    ch_mult: tuple = (1, 2, 4, 4, 4)   # encoder and decoder
    base_ch: int = 128
    num_res_blocks: int = 2            # encoder; the decoder uses num_res_blocks + 1
    # GroupNorm groups. Every released VAE uses 32 (with 128 base channels: 4 channels per group).
    # Small VAEs need fewer groups: with 32 channels, 32 groups are a per-channel instance norm, and
    # the decoder's last norm then erases the absolute colour of the picture before conv_out (the
    # bundled model uses 8 = 4 channels per group, as the released ones). Not visible in a state
    # dict; converted/trained safetensors record it in their 'infinity.config' metadata.
    norm_groups: int = 32
    name: str = "custom"

    @property
    def channel_counts(self) -> set[int]:
        """Every channel count a GroupNorm of this VAE sees (base and each level)."""
        return {self.base_ch, *(self.base_ch * m for m in self.ch_mult)}

    @property
    def patchify_vae(self) -> bool:
        return self.patch_size == 8


TRANSFORMERS: dict[str, TransformerConfig] = {
    "infinity_2b": TransformerConfig(depth=32, width=2048, num_heads=16, block_chunks=8, name="infinity_2b"),
    "infinity_8b": TransformerConfig(depth=40, width=3584, num_heads=28, vae_bits=14, patchify=True,
                                     block_chunks=8, name="infinity_8b"),
    "infinity_20b": TransformerConfig(depth=58, width=4608, num_heads=36, block_chunks=2,
                                      drop_path_rate=0.25, name="infinity_20b"),
    "infinity_layer12": TransformerConfig(depth=12, width=768, num_heads=8, name="infinity_layer12"),
    "infinity_layer16": TransformerConfig(depth=16, width=1152, num_heads=12, name="infinity_layer16"),
    "infinity_layer24": TransformerConfig(depth=24, width=1536, num_heads=16, name="infinity_layer24"),
    "infinity_layer32": TransformerConfig(depth=32, width=2080, num_heads=20, name="infinity_layer32"),
    "infinity_layer40": TransformerConfig(depth=40, width=2688, num_heads=24, name="infinity_layer40"),
    "infinity_layer48": TransformerConfig(depth=48, width=3360, num_heads=28, name="infinity_layer48"),
}
# The 20B chunk count was never released; 2 chunks of 29 blocks is our choice (only key names depend on it).

VAES: dict[str, VAEConfig] = {
    "infinity_vae_d16": VAEConfig(bits=16, name="infinity_vae_d16"),
    "infinity_vae_d24": VAEConfig(bits=24, name="infinity_vae_d24"),
    "infinity_vae_d32": VAEConfig(bits=32, name="infinity_vae_d32"),
    "infinity_vae_d32reg": VAEConfig(bits=32, name="infinity_vae_d32reg"),
    "infinity_vae_d64": VAEConfig(bits=64, name="infinity_vae_d64"),
    "infinity_vae_d56_f8_14_patchify": VAEConfig(bits=14, patch_size=8, ch_mult=(1, 2, 4, 4),
                                                 name="infinity_vae_d56_f8_14_patchify"),
}

# The released pairings (official download names).
RELEASED_PAIRS = {
    "infinity_2b_reg": ("infinity_2b", "infinity_vae_d32reg"),
    "infinity_8b": ("infinity_8b", "infinity_vae_d56_f8_14_patchify"),
}


def vae_fits(t: TransformerConfig, v: VAEConfig) -> bool:
    """A VAE fits a transformer when the bits per latent cell agree and the patchify choice matches
    the VAE's stride (stride-8 VAEs are folded 2x2 so a token still covers 16x16 pixels)."""
    return t.vae_bits == v.bits and t.patchify == v.patchify_vae


def describe_needed_vae(t: TransformerConfig) -> str:
    stride = 8 if t.patchify else 16
    names = [n for n, v in VAES.items() if vae_fits(t, v)]
    hint = f" (e.g. {', '.join(n + '.pth' for n in names)})" if names else ""
    return f"a {t.vae_bits}-bit BSQ VAE with stride {stride}{' and 2x2 patchify' if t.patchify else ''}{hint}"
