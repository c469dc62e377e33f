"""Encoded captions: every distinct training caption tokenized once, and, for a frozen pretrained text encoder
(`text.pretrained`), its token states computed once, so that training never runs the frozen encoder.

On disk, data/captions/: `captions.safetensors` with `ids` int64 (N, L) and, with a frozen encoder, `states`
float32 (N, L, D); its metadata (one JSON value, so that the file's bytes are the same every run) holds the N
captions (index 0 is "", the unconditional prompt, then the rest sorted), `pretrained` and `max_length`.
`tokenizer/` is the tokenizer the ids come from (CLIP's for the trained encoder; a model folder's own when
fine-tuning it), which train_unet copies into the model folder.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sdlib.errors import DataError
from sdlib.io import atomic_dir
from sdlib.models.text import FrozenText, load_tokenizer, tokenize, write_clip_tokenizer_files

FILE = "captions.safetensors"
BATCH = 256  # captions through the frozen encoder at a time


@dataclass
class EncodedCaptions:
    captions: list[str]  # (N,) distinct captions, "" first
    ids: torch.Tensor  # (N, L) token ids
    states: torch.Tensor | None  # (N, L, D) the frozen encoder's token states; None for the trained encoder
    pretrained: str  # text.pretrained they were made with ("": the trained encoder)
    max_length: int


def unique_captions(captions: list[list[str]]) -> list[str]:
    """The distinct captions of a split (image i has `captions[i]`): "" (the unconditional prompt), then sorted."""
    return [""] + sorted({c for caps in captions for c in caps})


@torch.no_grad()
def write_encoded_captions(out: str | Path, captions: list[list[str]], max_length: int,
                           frozen: FrozenText | None = None, device: torch.device | str = "cpu",
                           tokenizer_dir: Path | None = None) -> EncodedCaptions:
    """Tokenize the distinct `captions` (and run `frozen`'s encoder on them, on `device`) into the folder `out`, with
    CLIP's tokenizer, `frozen`'s, or the CLIP tokenizer files in `tokenizer_dir` (a model folder's, copied)."""
    unique = unique_captions(captions)
    with atomic_dir(out) as tmp:
        if tokenizer_dir is not None:
            tokenizer = load_tokenizer(Path(shutil.copytree(tokenizer_dir, tmp / "tokenizer")), max_length)
        elif frozen is None:
            tokenizer = load_tokenizer(write_clip_tokenizer_files(tmp / "tokenizer"), max_length)
        else:
            tokenizer = frozen.tokenizer
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
        ids = tokenize(tokenizer, unique, max_length)  # (N, L)
        tensors = {"ids": ids}
        states = None
        if frozen is not None:
            encoder = frozen.encoder.to(device)
            states = torch.cat([encoder(chunk.to(device)).float().cpu() for chunk in ids.split(BATCH)])  # (N, L, D)
            tensors["states"] = states
        pretrained = "" if frozen is None else frozen.name
        # one metadata key: safetensors writes several in a random order, and the file's bytes (its DVC hash, which
        # decides whether train_unet re-runs) would change with every run
        save_file(tensors, str(tmp / FILE), metadata={"meta": json.dumps(
            {"captions": unique, "pretrained": pretrained, "max_length": max_length}, sort_keys=True)})
    return EncodedCaptions(unique, ids, states, pretrained, max_length)


def load_encoded_captions(folder: str | Path) -> EncodedCaptions:
    """The encoded captions written by `write_encoded_captions`, checked for shape."""
    folder = Path(folder)
    path = folder / FILE
    if not path.is_file():
        raise DataError(f"{folder}: no {FILE} (run the encode_captions stage first)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(meta["meta"])
        unique, pretrained, max_length = list(meta["captions"]), str(meta["pretrained"]), int(meta["max_length"])
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise DataError(f"{path}: corrupt encoded captions ({str(e).splitlines()[0]}); re-run encode_captions") from None
    ids, states = tensors.get("ids"), tensors.get("states")
    n = len(unique)
    if ids is None or ids.shape != (n, max_length) or (states is None) != (not pretrained) or (
            states is not None and states.shape[:2] != (n, max_length)):
        raise DataError(f"{path}: expected ids ({n}, {max_length}) and, with a pretrained encoder, states "
                        f"({n}, {max_length}, D); re-run encode_captions")
    return EncodedCaptions(unique, ids, states, pretrained, max_length)
