"""T5 text encoder (flan-t5-xl for the released models) and the packed text condition (spec §8).

Prompts are tokenized T5-style (pieces + `</s>`, truncated to 512 tokens), encoded by a transformers
`T5EncoderModel`, and the valid rows of `last_hidden_state` (EOS included) are packed into one
`[sum(L_i), Ct5]` fp32 tensor with flash-attn style `cu_seqlens`, as the official code does.

Weights come from a Hugging Face folder or from a single encoder-only `.safetensors` file (the usual
ComfyUI download); they are read with safetensors or `torch.load(weights_only=True)`, never from a hub.
Plain PyTorch + transformers: never imports ComfyUI (it only looks for ComfyUI's tokenizer folder).
"""
from __future__ import annotations

import importlib.util
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

# google/flan-t5-xl; used for a weights file given without a config (shapes are still read from the file).
FLAN_T5_XL = dict(
    d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24, num_decoder_layers=24,
    feed_forward_proj="gated-gelu", vocab_size=32128, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, layer_norm_epsilon=1e-6, dropout_rate=0.1,
    tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)
MAX_LENGTH = 512
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")

# -----------------------------------------------------------------------------
# packed text condition


@dataclass
class TextCondition:
    """A batch of B encoded prompts without padding: the official `(kv_compact, lens, cu_seqlens_k,
    max_seqlen_k)` tuple. Prompt i owns rows `kv_compact[cu_seqlens[i]:cu_seqlens[i+1]]`."""
    kv_compact: torch.Tensor  # [sum(L_i), Ct5] fp32
    lens: torch.Tensor        # [B] int32, valid tokens per prompt (EOS included)
    cu_seqlens: torch.Tensor  # [B+1] int32, leading 0
    max_seqlen: int
    prompts: list = field(default_factory=list)           # str per prompt (None if unknown)
    truncated_tokens: list = field(default_factory=list)  # tokens dropped per prompt by truncation

    @classmethod
    def from_rows(cls, rows, prompts=None, truncated_tokens=None) -> "TextCondition":
        """Pack a list of per-prompt `[L_i, C]` feature tensors."""
        if not rows:
            raise ValueError("a TextCondition needs at least one prompt")
        lens = torch.tensor([len(r) for r in rows], dtype=torch.int32, device=rows[0].device)
        cu = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
        return cls(torch.cat(rows), lens, cu, int(lens.max()),
                   list(prompts) if prompts is not None else [None] * len(rows),
                   list(truncated_tokens) if truncated_tokens is not None else [0] * len(rows))

    def __len__(self) -> int:
        return self.lens.numel()

    @property
    def width(self) -> int:
        return self.kv_compact.shape[-1]

    def row(self, i: int) -> torch.Tensor:
        """The `[L_i, C]` features of prompt i."""
        cu = self.cu_seqlens.tolist()
        return self.kv_compact[cu[i]:cu[i + 1]]

    def to(self, device=None, dtype=None) -> "TextCondition":
        return TextCondition(self.kv_compact.to(device, dtype), self.lens.to(device), self.cu_seqlens.to(device),
                             self.max_seqlen, list(self.prompts), list(self.truncated_tokens))

    def select(self, indices) -> "TextCondition":
        """Prompts at `indices` (in that order, repeats allowed)."""
        indices = [int(i) for i in indices]
        return TextCondition.from_rows([self.row(i) for i in indices], [self.prompts[i] for i in indices],
                                       [self.truncated_tokens[i] for i in indices])

    def repeat_each(self, n: int) -> "TextCondition":
        """[a, b] -> [a]*n + [b]*n, e.g. for n images per prompt."""
        return self.select([i for i in range(len(self)) for _ in range(n)])

    def concat(self, other: "TextCondition") -> "TextCondition":
        """Batch concatenation [self..., other...]; e.g. [cond..., uncond/negative...] for CFG (spec §5.1)."""
        if other.width != self.width:
            raise ValueError(f"cannot concat text conditions of widths {self.width} and {other.width}")
        cu = torch.cat([self.cu_seqlens, other.cu_seqlens[1:].to(self.cu_seqlens) + self.cu_seqlens[-1]])
        return TextCondition(torch.cat([self.kv_compact, other.kv_compact.to(self.kv_compact)]),
                             torch.cat([self.lens, other.lens.to(self.lens)]), cu,
                             max(self.max_seqlen, other.max_seqlen), self.prompts + other.prompts,
                             self.truncated_tokens + other.truncated_tokens)

    def as_tuple(self):
        """The official text tuple `(kv_compact, lens: list[int], cu_seqlens_k, max_seqlen_k)`."""
        return self.kv_compact, self.lens.tolist(), self.cu_seqlens, self.max_seqlen


def pack_features(features: torch.Tensor, attention_mask: torch.Tensor, prompts=None,
                  truncated_tokens=None) -> TextCondition:
    """`features [B,T,C]` + right-padded `attention_mask [B,T]` -> TextCondition (spec §8):
    lens = mask.sum(-1) (EOS counted), kv_compact = cat_i features[i, :lens_i] as fp32."""
    lens = attention_mask.sum(-1)
    if not torch.equal(attention_mask.bool(), torch.arange(features.shape[1], device=lens.device) < lens[:, None]):
        raise ValueError("attention_mask must be right-padded (ones, then zeros)")
    return TextCondition.from_rows([f[:n] for f, n in zip(features.float(), lens.tolist())], prompts,
                                   truncated_tokens)


def check_text_width(encoder_width: int, transformer_text_channels: int, encoder_name: str = "",
                     transformer_name: str = "") -> None:
    """Raise if the text encoder's feature width is not the transformer's `text_channels` (Ct5)."""
    if encoder_width != transformer_text_channels:
        enc = f"text encoder {encoder_name!r}" if encoder_name else "the text encoder"
        tr = f"transformer {transformer_name!r}" if transformer_name else "the transformer"
        raise ValueError(
            f"{enc} outputs {encoder_width}-wide features but {tr} expects text_channels="
            f"{transformer_text_channels}. Infinity 2B/8B were trained with flan-t5-xl (d_model 2048); "
            f"load a T5 encoder of width {transformer_text_channels}.")

# -----------------------------------------------------------------------------
# tokenizer


def _comfy_t5_tokenizer_dir() -> Path | None:
    """ComfyUI's shipped T5 tokenizer folder, located without importing `comfy`."""
    try:
        spec = importlib.util.find_spec("comfy")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(root) / "text_encoders" / "t5_tokenizer"
        if any((folder / f).is_file() for f in TOKENIZER_FILES):
            return folder
    return None


def find_tokenizer(model_path=None, tokenizer_path=None) -> Path:
    """The folder to load the T5 tokenizer from: `tokenizer_path` (a folder, or a file inside it) if given,
    else the model folder, else ComfyUI's `comfy/text_encoders/t5_tokenizer`."""
    candidates = []
    if tokenizer_path is not None:
        p = Path(tokenizer_path)
        candidates.append(p.parent if p.is_file() else p)
    if model_path is not None and Path(model_path).is_dir():
        candidates.append(Path(model_path))
    comfy = _comfy_t5_tokenizer_dir()
    candidates += [comfy] if comfy else []
    for folder in candidates:
        if any((folder / f).is_file() for f in TOKENIZER_FILES):
            return folder
    where = f"the model folder {model_path} or " if model_path is not None and Path(model_path).is_dir() else ""
    raise FileNotFoundError(
        f"No T5 tokenizer found (looked in: {', '.join(map(str, candidates)) or 'no folder'}). Put spiece.model or "
        f"tokenizer.json (from google/flan-t5-xl) in {where}a folder passed as tokenizer_path.")


class T5PromptTokenizer:
    """prompts -> full token id lists (pieces + `</s>`, untruncated). Uses tokenizer.json through transformers'
    fast T5 tokenizer (as the official code), else spiece.model through sentencepiece directly (same ids
    as the slow legacy T5 tokenizer; transformers 5 would need protobuf to convert it)."""

    def __init__(self, folder):
        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            from transformers import T5TokenizerFast
            tok = T5TokenizerFast.from_pretrained(str(folder), legacy=True, local_files_only=True)
            self._encode = lambda prompts: tok(prompts, verbose=False)["input_ids"]
            self.eos_id, self.pad_id, self.size = tok.eos_token_id, tok.pad_token_id, len(tok)
        else:
            import sentencepiece as spm
            sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
            self._encode = lambda prompts: [ids + [sp.eos_id()] for ids in sp.encode(prompts)]
            self.eos_id, self.pad_id, self.size = sp.eos_id(), sp.pad_id(), sp.get_piece_size()
        self.folder = folder

    def __len__(self) -> int:
        return self.size

    def __call__(self, prompts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self._encode(list(prompts))]

# -----------------------------------------------------------------------------
# checkpoint reading


class _Checkpoint:
    """Read-only, lazy view over weight files: safetensors read per tensor, torch files mmapped."""

    def __init__(self, files):
        self.src = {}  # key -> (file, safetensors handle or None, tensor or None)
        for f in map(Path, files):
            try:
                if f.suffix == ".safetensors":
                    from safetensors import safe_open
                    h = safe_open(str(f), framework="pt", device="cpu")
                    self.src.update({k: (f, h, None) for k in h.keys()})
                else:
                    sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
                    self.src.update({k: (f, None, v) for k, v in sd.items() if isinstance(v, torch.Tensor)})
            except Exception as e:
                raise ValueError(f"could not read weights file {f}: {e}") from e
        self.name = ", ".join(sorted({str(s[0]) for s in self.src.values()})) or ", ".join(map(str, files))

    def shape(self, key) -> tuple:
        f, h, t = self.src[key]
        return tuple(h.get_slice(key).get_shape()) if h is not None else tuple(t.shape)

    def tensor(self, key) -> torch.Tensor:
        f, h, t = self.src[key]
        return h.get_tensor(key) if h is not None else t


def _weight_files(folder: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            return sorted({folder / f for f in json.loads((folder / index).read_text())["weight_map"].values()})
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"{folder}: no weights found (*.safetensors or pytorch_model*.bin)")
    return files


def _t5_key_map(ckpt: _Checkpoint) -> dict[str, str]:
    """T5EncoderModel name -> checkpoint key. Accepts HF full/encoder-only names under any wrapper prefix,
    drops the decoder, and takes the embedding from `shared.weight` or `encoder.embed_tokens.weight`."""
    anchor = "encoder.final_layer_norm.weight"
    hits = sorted((k for k in ckpt.src if k.endswith(anchor)), key=len)
    if not hits:
        raise ValueError(f"{ckpt.name} is not a T5 encoder checkpoint: missing key {anchor!r}")
    prefix = hits[0][:-len(anchor)]
    names = {k[len(prefix):]: k for k in ckpt.src if k.startswith(prefix)}
    out = {n: k for n, k in names.items() if n.startswith("encoder.") and n != "encoder.embed_tokens.weight"}
    emb = names.get("shared.weight") or names.get("encoder.embed_tokens.weight")
    if emb is None:
        raise ValueError(f"{ckpt.name} has no token embedding: missing key {prefix + 'shared.weight'!r} "
                         f"(or {prefix + 'encoder.embed_tokens.weight'!r})")
    return {"shared.weight": emb, **out}


def _infer_config(ckpt: _Checkpoint, keys: dict[str, str]) -> dict:
    """The size fields of a T5Config, read from weight shapes."""
    def shape(name):
        if name not in keys:
            raise ValueError(f"{ckpt.name} is not a T5 encoder checkpoint: missing key {name!r}")
        return ckpt.shape(keys[name])
    b0 = "encoder.block.0.layer."
    vocab, d_model = shape("shared.weight")
    heads = shape(b0 + "0.SelfAttention.relative_attention_bias.weight")[1]
    gated = b0 + "1.DenseReluDense.wi_0.weight" in keys
    return dict(vocab_size=vocab, d_model=d_model, num_heads=heads,
                d_kv=shape(b0 + "0.SelfAttention.q.weight")[0] // heads,
                d_ff=shape(b0 + f"1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight")[0],
                num_layers=1 + max(int(n.split(".")[2]) for n in keys if n.startswith("encoder.block.")),
                feed_forward_proj="gated-gelu" if gated else "relu")


def _load_config(config):
    from transformers import T5Config
    if isinstance(config, T5Config):
        return config
    if isinstance(config, dict):
        return T5Config(**config)
    path = Path(config)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"T5 config not found: {path}")
    return T5Config.from_json_file(str(path))


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on CUDA (fp16 without bf16 support), fp32 on CPU and MPS; also 'fp16'/'bf16'/'fp32'."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use 'auto' or one of {sorted(names)}")
    return names[dtype]


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")

# -----------------------------------------------------------------------------
# the encoder


class T5TextEncoder:
    """T5 encoder + tokenizer turning prompts into a packed TextCondition.

    path: a Hugging Face folder (config.json + weights [+ tokenizer]) or one weights file
        (`.safetensors`, or a torch file loaded with weights_only=True).
    config: T5Config / dict / config.json path / folder; default: the folder's config.json, else the
        bundled flan-t5-xl config with the sizes read from the weight shapes.
    tokenizer_path: folder (or file inside it) with tokenizer.json or spiece.model; see `find_tokenizer`.
    pad_to_max_length: pad every prompt to 512 tokens as the official code (default on CUDA), or only to
        the longest prompt (default elsewhere: much cheaper; valid rows equal up to float rounding).
    """

    def __init__(self, path, config=None, tokenizer_path=None, device=None, dtype="auto",
                 max_length: int = MAX_LENGTH, pad_to_max_length: bool | None = None):
        from transformers import T5EncoderModel
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"T5 weights not found: {path}")
        self.name = path.name
        self.device = torch.device(device) if device is not None else _default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_length = max_length
        self.pad_to_max_length = self.device.type == "cuda" if pad_to_max_length is None else pad_to_max_length
        self.tokenizer = T5PromptTokenizer(find_tokenizer(path, tokenizer_path))

        ckpt = _Checkpoint(_weight_files(path) if path.is_dir() else [path])
        keys = _t5_key_map(ckpt)
        if config is None and path.is_dir() and (path / "config.json").is_file():
            config = path / "config.json"
        self.config = _load_config(config if config is not None else {**FLAN_T5_XL, **_infer_config(ckpt, keys)})
        if len(self.tokenizer) > self.config.vocab_size:
            raise ValueError(f"tokenizer in {self.tokenizer.folder} has {len(self.tokenizer)} tokens but the T5 "
                             f"embedding only {self.config.vocab_size} rows: wrong tokenizer for {self.name}?")

        # Build on the meta device, then assign the (cast) checkpoint tensors: no random init, no extra copy.
        with torch.device("meta"):
            model = T5EncoderModel(self.config)
        expected = {n: t.shape for n, t in model.state_dict().items() if n != "encoder.embed_tokens.weight"}
        missing = [n for n in expected if n not in keys]
        if missing:
            raise ValueError(f"{ckpt.name} does not match the T5 config: missing key(s) {missing[:4]}"
                             f"{' ...' if len(missing) > 4 else ''} ({len(missing)} in all)")
        unexpected = [keys[n] for n in keys if n not in expected]
        if unexpected:
            warnings.warn(f"{ckpt.name}: ignoring {len(unexpected)} unexpected T5 key(s), e.g. {unexpected[:3]}")
        # As transformers' from_pretrained (and so the official fp16 encoder): fp16 keeps `wo` in fp32.
        keep32 = set(getattr(model, "_keep_in_fp32_modules", None) or []) if self.dtype == torch.float16 else set()
        state = {}
        for n, shape in expected.items():
            t = ckpt.tensor(keys[n])
            if t.shape != shape:
                raise ValueError(f"{ckpt.name}: {keys[n]!r} has shape {tuple(t.shape)} but the T5 config expects "
                                 f"{tuple(shape)}")
            state[n] = t.to(torch.float32 if keep32 & set(n.split(".")) else self.dtype)
        model.load_state_dict(state, strict=False, assign=True)
        model.set_input_embeddings(model.shared)  # tie encoder.embed_tokens to shared
        self.model = model.eval().requires_grad_(False).to(self.device)

    @property
    def width(self) -> int:
        return self.config.d_model

    def tokenize(self, prompts: list[str]):
        """-> input_ids [B,T] long, attention_mask [B,T] long, tokens dropped per prompt. Same result as the
        official `tokenizer(max_length=512, padding='max_length', truncation=True)` (T = longest prompt
        unless pad_to_max_length); a prompt over max_length keeps its first max_length-1 tokens + `</s>`."""
        ids = self.tokenizer(prompts)
        dropped = [max(len(x) - self.max_length, 0) for x in ids]
        for i, n in enumerate(dropped):
            if n:
                warnings.warn(f"T5TextEncoder: prompt {i} has {len(ids[i])} tokens; truncated to {self.max_length}, "
                              f"{n} tokens dropped")
                ids[i] = ids[i][:self.max_length - 1] + [self.tokenizer.eos_id]
        T = self.max_length if self.pad_to_max_length else max(map(len, ids))
        input_ids = torch.tensor([x + [self.tokenizer.pad_id] * (T - len(x)) for x in ids], dtype=torch.long)
        mask = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in ids], dtype=torch.long)
        return input_ids, mask, dropped

    @torch.no_grad()
    def encode(self, prompts) -> TextCondition:
        """Prompts (a str or a list; '' is allowed: just `</s>`) -> TextCondition on self.device.
        Moves the encoder back to self.device if it was offloaded."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode() needs at least one prompt")
        input_ids, mask, dropped = self.tokenize(prompts)
        self.model.to(self.device)
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        feats = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
        return pack_features(feats, mask, prompts, dropped)

    def offload(self, device="cpu") -> "T5TextEncoder":
        """Move the encoder's weights to `device` (e.g. to free GPU memory after encoding)."""
        self.model.to(device)
        return self
