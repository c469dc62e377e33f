"""CLIP tokenizer against open_clip's reference, and the text encoders' shapes, behaviour and checkpoints."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from tolerances import forward_tol
from transformers import AutoTokenizer, BertConfig, BertModel, BertTokenizer

from sdlib.io import load_weights, save_weights
from sdlib.models.text import (
    VOCAB_SIZE,
    TextEncoder,
    TextEncoderArgs,
    load_pretrained_text_encoder,
    load_tokenizer,
    tokenize,
    write_clip_tokenizer_files,
)

TINY = TextEncoderArgs(hidden_size=32, num_layers=1, num_heads=2, max_length=16)
BOS, EOS = 49406, 49407
PROMPTS = ["a handwritten digit eight", "8", "A photo of a cat!", "café ☕", "", "  Two   SPACES  ",
           "don't 123 &amp; x", "日本語のテキスト", "naïve façade 🐱"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_clip_tokenizer_files(tmp_path_factory.mktemp("clip_tokenizer"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir, max_length=TINY.max_length)


@pytest.fixture(scope="module")
def reference():
    simple = pytest.importorskip("open_clip.tokenizer").SimpleTokenizer
    return simple()


def test_vocab_matches_open_clip(tok_dir, tok, reference):
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == VOCAB_SIZE == len(tok)
    # open_clip renames only the two special tokens; every other id is CLIP's
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    assert vocab == {renamed.get(t, t): i for t, i in reference.encoder.items()}
    merges = (tok_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS, EOS, EOS)


def test_ids_identical_to_open_clip(tok, reference):
    ids = tokenize(tok, PROMPTS, max_length=32)
    for row, prompt in zip(ids, PROMPTS):
        expected = [BOS] + reference.encode(prompt) + [EOS]
        assert row.tolist() == expected + [EOS] * (32 - len(expected)), prompt  # SD pads with EOS


def test_autotokenizer_reads_the_folder(tok_dir, tok):
    auto = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    assert auto("A photo of a cat!")["input_ids"] == tok("A photo of a cat!")["input_ids"]


def test_padding_shapes_and_empty_prompt(tok):
    ids = tokenize(tok, ["", "8", "a handwritten digit eight"], max_length=16)
    assert ids.shape == (3, 16) and ids.dtype == torch.long
    assert ids[0].tolist() == [BOS] + [EOS] * 15  # unconditional prompt: start, end, then EOS padding
    assert ids[1, :3].tolist() == [BOS, 279, EOS] and (ids[1, 3:] == EOS).all()
    assert tokenize(tok, [], max_length=16).shape == (0, 16)


def test_truncation_warns_once_and_keeps_end_token(tok):
    long = " ".join(["digit"] * 40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = tokenize(tok, [long, "8", long + " again"], max_length=8)
    assert ids.shape == (3, 8)
    assert ids[0].tolist() == [BOS] + [ids[0, 1].item()] * 6 + [EOS]
    assert len(caught) == 1 and "2 of 3 prompts" in str(caught[0].message) and "digit digit" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize(tok, ["a handwritten digit eight"], max_length=8)  # fits: no warning


def test_bad_input_is_a_clear_error(tok):
    with pytest.raises(TypeError, match="list of strings"):
        tokenize(tok, "8", max_length=16)
    with pytest.raises(ValueError, match="at least 2"):
        tokenize(tok, ["8"], max_length=1)


def test_encoder_shape_and_prompt_sensitivity(tok):
    torch.manual_seed(0)
    enc = TextEncoder(TINY).eval()
    assert enc.dim == 32 and enc.model.config._attn_implementation == "sdpa"
    ids = tokenize(tok, ["1", "2", "a handwritten digit eight"], max_length=TINY.max_length)
    with torch.no_grad():
        out = enc(ids)
    assert out.shape == (3, TINY.max_length, 32) and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1], atol=1e-4)  # different prompts, different context
    # Causal attention: the start token's state cannot depend on the prompt after it.
    assert (out[0, 0] - out[1, 0]).abs().max() <= forward_tol(out[:2, 0], enc)
    with pytest.raises(ValueError, match="max_length"):
        enc(torch.full((1, TINY.max_length + 1), EOS))


def test_padding_length_does_not_change_prompt_states(tok):
    torch.manual_seed(0)
    enc = TextEncoder(TINY).eval()
    with torch.no_grad():
        short = enc(tokenize(tok, ["a cat"], max_length=6))
        full = enc(tokenize(tok, ["a cat"], max_length=16))
    assert (short - full[:, :6]).abs().max() <= forward_tol(full[:, :6], enc)  # the same sums over fewer keys


def test_gradients_reach_the_encoder(tok):
    enc = TextEncoder(TINY)
    enc(tokenize(tok, ["8"], max_length=TINY.max_length)).square().mean().backward()
    assert enc.model.embeddings.token_embedding.weight.grad.abs().sum() > 0


def test_safetensors_round_trip(tmp_path, tok):
    torch.manual_seed(0)
    enc = TextEncoder(TINY).eval()
    state = enc.state_dict()
    assert "model.embeddings.position_ids" not in state  # non-persistent buffer, rebuilt by the constructor
    assert len({t.untyped_storage().data_ptr() for t in state.values()}) == len(state)  # no shared tensors
    path = tmp_path / "text.safetensors"
    save_weights(path, enc.state_dict(), {"kind": "text_encoder", "config": TINY.to_dict()})
    tensors, meta = load_weights(path, kind="text_encoder")
    again = TextEncoder(TextEncoderArgs(**meta["config"])).eval()
    again.load_state_dict(tensors, strict=True)
    fresh = TextEncoder(TINY).eval()
    fresh.load_state_dict(enc.state_dict(), strict=True)
    ids = tokenize(tok, ["a handwritten digit eight", ""], max_length=TINY.max_length)
    with torch.no_grad():
        torch.testing.assert_close(again(ids), enc(ids), rtol=0, atol=0)
        torch.testing.assert_close(fresh(ids), enc(ids), rtol=0, atol=0)


def _tiny_bert(folder):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "handwritten", "digit", "eight", "cat", "8", "##s"]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(folder)
    config = BertConfig(vocab_size=len(words), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=32)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)


def test_pretrained_bert_folder(tmp_path):
    _tiny_bert(tmp_path)
    enc, tok = load_pretrained_text_encoder(str(tmp_path))
    assert enc.dim == 24 and not enc.causal
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training  # frozen stays in eval mode (no dropout)
    ids = tokenize(tok, ["a handwritten digit eight", "8 cats", ""], max_length=10)
    assert ids[0].tolist()[:6] == [2, 5, 6, 7, 8, 3] and ids[2, :3].tolist() == [2, 3, 0]
    out = enc(ids)
    assert out.shape == (3, 10, 24) and not out.requires_grad
    # Pads are masked out, so padding length does not change the prompt's states.
    assert (enc(tokenize(tok, ["8 cats"], max_length=5)) - out[1:2, :5]).abs().max() <= forward_tol(out[1:2, :5], enc)


def test_pretrained_from_installed_package(tmp_path, monkeypatch):
    _tiny_bert(tmp_path / "fake_text_pkg" / "model")
    (tmp_path / "fake_text_pkg" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    enc, _ = load_pretrained_text_encoder("fake-text-pkg")
    assert enc.dim == 24


def test_pretrained_clip_folder(tmp_path, tok_dir):
    write_clip_tokenizer_files(tmp_path)
    TextEncoder(TINY).model.save_pretrained(tmp_path)
    enc, tok = load_pretrained_text_encoder(str(tmp_path))
    assert enc.causal and enc.dim == 32 and tok.pad_token_id == EOS
    assert enc(tokenize(tok, ["8"], max_length=TINY.max_length)).shape == (1, TINY.max_length, 32)


def test_missing_pretrained_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no local transformers text encoder"):
        load_pretrained_text_encoder(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no local transformers text encoder"):
        load_pretrained_text_encoder(str(tmp_path))  # a folder without a model
