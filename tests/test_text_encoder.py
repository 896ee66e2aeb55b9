"""T5 text encoder: loading (HF folder / single file), tokenization, packing, and error messages.

Uses a tiny seeded T5 and a sentencepiece tokenizer trained on the fly: no downloads."""
import json
import random
import shutil

import pytest
import torch
from safetensors.torch import save_file

from infinity_core import text_encoder as te
from infinity_core.text_encoder import T5TextEncoder, TextCondition, check_text_width, pack_features

spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu a cat dog red blue green photo of "
         "the on in with sky tree house car man woman big small sitting running painting portrait landscape "
         "sunset mountain river city night light dark").split()
PROMPTS = ["a red cat sitting on the car", "", "portrait of a woman in the city at night, painting"]
TINY = dict(vocab_size=128, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
            tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("t5")


@pytest.fixture(scope="module")
def spm_dir(tmp):
    """A T5-style sentencepiece model (pad 0, eos 1, unk 2) in a folder of its own."""
    rng = random.Random(0)
    sents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    d = tmp / "spm"
    d.mkdir()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sents), model_prefix=str(d / "spiece"), vocab_size=128,
                                   hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    (d / "spiece.vocab").unlink()
    return d


@pytest.fixture(scope="module")
def sp(spm_dir):
    return spm.SentencePieceProcessor(model_file=str(spm_dir / "spiece.model"))


@pytest.fixture(scope="module")
def fast_dir(tmp, sp):
    """The same vocabulary as a tokenizer.json folder (built with `tokenizers`: no protobuf needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    tok = Tokenizer(models.Unigram([(sp.id_to_piece(i), sp.get_score(i)) for i in range(len(sp))], unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    d = tmp / "fast"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="T5Tokenizer", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
        model_max_length=512)))
    return d


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return transformers.T5EncoderModel(transformers.T5Config(**TINY)).eval()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}


@pytest.fixture(scope="module")
def hf_dir(tmp, model, spm_dir):
    d = tmp / "hf"
    model.save_pretrained(str(d))
    shutil.copy(spm_dir / "spiece.model", d)
    return d


@pytest.fixture(scope="module")
def st_file(tmp, model):
    """Encoder-only single file + a separate config.json."""
    save_file(_state(model), str(tmp / "t5_encoder.safetensors"))
    model.config.to_json_file(str(tmp / "tiny_config.json"))
    return tmp / "t5_encoder.safetensors"


@pytest.fixture(scope="module")
def ref(hf_dir):
    return T5TextEncoder(hf_dir, device="cpu").encode(PROMPTS)


def test_hf_folder_matches_transformers(ref, model, sp):
    ids = [sp.encode(p) + [1] for p in PROMPTS]
    T = max(map(len, ids))
    input_ids = torch.tensor([x + [0] * (T - len(x)) for x in ids])
    mask = (input_ids != 0).long()
    with torch.no_grad():
        want = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    assert ref.lens.tolist() == [len(x) for x in ids] and ref.lens.dtype == torch.int32
    assert ref.kv_compact.dtype == torch.float32 and ref.kv_compact.shape == (sum(map(len, ids)), 32)
    for i, x in enumerate(ids):
        torch.testing.assert_close(ref.row(i), want[i, :len(x)], atol=1e-6, rtol=1e-5)
    assert ref.prompts == PROMPTS and ref.truncated_tokens == [0, 0, 0]


def test_single_file_with_config_equals_folder(ref, st_file, spm_dir):
    enc = T5TextEncoder(st_file, config=st_file.parent / "tiny_config.json", tokenizer_path=spm_dir, device="cpu")
    assert enc.width == 32
    assert torch.equal(enc.encode(PROMPTS).kv_compact, ref.kv_compact)


def test_single_file_without_config_reads_sizes(ref, st_file, spm_dir):
    enc = T5TextEncoder(st_file, tokenizer_path=spm_dir / "spiece.model", device="cpu")
    c = enc.config
    assert (c.d_model, c.d_ff, c.d_kv, c.num_heads, c.num_layers, c.vocab_size) == (32, 64, 8, 4, 2, 128)
    assert c.relative_attention_max_distance == 128 and c.feed_forward_proj == "gated-gelu"
    assert torch.equal(enc.encode(PROMPTS).kv_compact, ref.kv_compact)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_wrapped_full_checkpoint(ref, tmp, model, spm_dir, suffix):
    """Prefixed keys, decoder weights to skip, embedding only under encoder.embed_tokens."""
    sd = _state(model)
    sd["encoder.embed_tokens.weight"] = sd.pop("shared.weight")
    sd["decoder.final_layer_norm.weight"] = torch.ones(32)
    sd = {"text_encoders.t5.transformer." + k: v for k, v in sd.items()}
    sd["clip_l.weight"] = torch.zeros(3)
    f = tmp / f"wrapped{suffix}"
    save_file(sd, str(f)) if suffix == ".safetensors" else torch.save(sd, f)
    enc = T5TextEncoder(f, tokenizer_path=spm_dir, device="cpu")
    assert torch.equal(enc.encode(PROMPTS).kv_compact, ref.kv_compact)
    assert enc.model.encoder.embed_tokens is enc.model.shared


def test_pack_features():
    feats = torch.randn(3, 6, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    feats[mask == 0] = float("nan")  # padded positions must not leak in
    cond = pack_features(feats, mask, ["a", "", "b"])
    assert cond.lens.tolist() == [3, 1, 5] and cond.lens.dtype == torch.int32
    assert cond.cu_seqlens.tolist() == [0, 3, 4, 9] and cond.cu_seqlens.dtype == torch.int32
    assert cond.max_seqlen == 5 and len(cond) == 3 and cond.kv_compact.shape == (9, 4)
    assert not cond.kv_compact.isnan().any()
    for i, n in enumerate([3, 1, 5]):
        assert torch.equal(cond.row(i), feats[i, :n])
    with pytest.raises(ValueError, match="right-padded"):
        pack_features(feats, mask.flip(1))


def test_text_condition_batch_helpers():
    cond = TextCondition.from_rows([torch.full((n, 2), float(n)) for n in (3, 1, 5)], ["a", "b", "c"])
    rep = cond.repeat_each(2)
    assert rep.lens.tolist() == [3, 3, 1, 1, 5, 5] and rep.prompts == ["a", "a", "b", "b", "c", "c"]
    sel = cond.select([2, 0])
    assert sel.cu_seqlens.tolist() == [0, 5, 8] and sel.max_seqlen == 5 and torch.equal(sel.row(1), cond.row(0))
    both = sel.concat(cond.select([1]))  # spec §5.1: cu = cat(cu, cu[1:] + cu[-1])
    assert both.cu_seqlens.tolist() == [0, 5, 8, 9] and both.cu_seqlens.dtype == torch.int32
    assert both.prompts == ["c", "a", "b"] and both.kv_compact.shape == (9, 2) and both.max_seqlen == 5
    kv, lens, cu, m = both.to("cpu", torch.float64).as_tuple()
    assert kv.dtype == torch.float64 and lens == [5, 3, 1] and m == 5
    with pytest.raises(ValueError, match="widths 2 and 3"):
        cond.concat(TextCondition.from_rows([torch.zeros(1, 3)]))


def test_empty_prompt_is_eos_only(ref):
    assert ref.lens[1] == 1 and ref.cu_seqlens[2] - ref.cu_seqlens[1] == 1


def test_long_prompt_truncated_with_warning(hf_dir, sp):
    long = " ".join(WORDS[i % len(WORDS)] for i in range(600))
    dropped = len(sp.encode(long)) + 1 - 512
    assert dropped > 0
    enc = T5TextEncoder(hf_dir, device="cpu")
    with pytest.warns(UserWarning, match=rf"\b{dropped} tokens dropped"):
        cond = enc.encode([long, "a cat"])
    assert cond.lens.tolist()[0] == 512 and cond.max_seqlen == 512 and cond.truncated_tokens == [dropped, 0]
    with pytest.warns(UserWarning):
        ids, mask, _ = enc.tokenize([long])
    assert ids[0, -1] == 1 and ids[0, :511].tolist() == sp.encode(long)[:511]


def test_tokenize_matches_hf_tokenizer(hf_dir, fast_dir):
    """Own truncation/padding == tokenizer(max_length=512, padding='max_length', truncation=True), and the
    spiece.model and tokenizer.json routes give the same ids."""
    long = " ".join(WORDS[i % len(WORDS)] for i in range(600))
    prompts = PROMPTS + [long]
    tok = transformers.T5TokenizerFast.from_pretrained(str(fast_dir), legacy=True, local_files_only=True)
    want = tok(prompts, max_length=512, padding="max_length", truncation=True, return_tensors="pt")
    for path, tp in [(hf_dir, None), (hf_dir, fast_dir)]:
        enc = T5TextEncoder(path, tokenizer_path=tp, device="cpu", pad_to_max_length=True)
        with pytest.warns(UserWarning, match="tokens dropped"):
            ids, mask, _ = enc.tokenize(prompts)
        assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"])


def test_pad_to_max_length_same_features(ref, hf_dir):
    padded = T5TextEncoder(hf_dir, device="cpu", pad_to_max_length=True).encode(PROMPTS)
    assert torch.equal(padded.lens, ref.lens)
    torch.testing.assert_close(padded.kv_compact, ref.kv_compact, atol=1e-5, rtol=1e-5)


def test_dtypes_and_offload(hf_dir):
    enc = T5TextEncoder(hf_dir, device="cpu", dtype="fp16")
    assert enc.model.shared.weight.dtype == torch.float16
    assert enc.model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32  # as HF fp16
    enc = T5TextEncoder(hf_dir, device="cpu", dtype="bf16")
    assert enc.encode(["a cat"]).kv_compact.dtype == torch.float32
    assert enc.offload("meta") is enc and enc.model.shared.weight.is_meta
    assert te.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert te.resolve_dtype("auto", torch.device("mps")) == torch.float32


def test_missing_tokenizer_error(st_file, monkeypatch):
    monkeypatch.setattr(te, "_comfy_t5_tokenizer_dir", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"spiece\.model or tokenizer\.json"):
        T5TextEncoder(st_file, device="cpu")


def test_comfy_tokenizer_folder_found(tmp, st_file, spm_dir, monkeypatch):
    folder = tmp / "site" / "comfy" / "text_encoders" / "t5_tokenizer"
    folder.mkdir(parents=True)
    (tmp / "site" / "comfy" / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    shutil.copy(spm_dir / "spiece.model", folder)
    monkeypatch.syspath_prepend(str(tmp / "site"))
    enc = T5TextEncoder(st_file, config=st_file.parent / "tiny_config.json", device="cpu")
    assert enc.tokenizer.folder == folder


def test_width_mismatch_message():
    check_text_width(2048, 2048)
    with pytest.raises(ValueError, match=r"'flan-t5-large' outputs 1024.*'infinity_2b' expects text_channels=2048"):
        check_text_width(1024, 2048, "flan-t5-large", "infinity_2b")


def test_bad_weight_files(tmp, st_file, spm_dir):
    bad = tmp / "corrupt.safetensors"
    bad.write_bytes(b"this is not a safetensors file")
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        T5TextEncoder(bad, tokenizer_path=spm_dir, device="cpu")
    other = tmp / "unet.safetensors"
    save_file({"down.0.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ValueError, match=r"unet\.safetensors.*missing key 'encoder\.final_layer_norm\.weight'"):
        T5TextEncoder(other, tokenizer_path=spm_dir, device="cpu")
    sd = _state(transformers.T5EncoderModel(transformers.T5Config(**TINY)))
    del sd["encoder.block.1.layer.0.SelfAttention.q.weight"]
    partial = tmp / "partial.safetensors"
    save_file(sd, str(partial))
    with pytest.raises(ValueError, match=r"partial\.safetensors.*encoder\.block\.1\.layer\.0\.SelfAttention\.q"):
        T5TextEncoder(partial, config=tmp / "tiny_config.json", tokenizer_path=spm_dir, device="cpu")
