"""Tokenize the training captions once and, with a frozen pretrained text encoder (`text.pretrained`), compute their
token states once, so that train_unet looks them up instead of running the frozen encoder every step. With
`unet.init_from`, the model folder's own tokenizer and length (77 tokens for SD) tokenize them."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdlib import config, tracking
from sdlib.cli import check_outputs, pick_device, user_errors, wrote
from sdlib.data.encoded_captions import write_encoded_captions
from sdlib.data.splits import load_split
from sdlib.finetune import TOKENIZER, init_model
from sdlib.models.text import load_frozen_text

app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Annotated[Path, typer.Option(
        help="params.yaml (`text.pretrained`, `text.max_length`, `unet.init_from`)")] = Path("params.yaml"),
    data: Annotated[Path, typer.Option(help="preprocessed dataset folder (captions)")] = Path("data/processed"),
    out: Annotated[Path, typer.Option(help="encoded captions folder to write")] = Path("data/captions"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = "auto",
) -> None:
    """Write data/captions/captions.safetensors (distinct captions, token ids, frozen encoder states) and tokenizer/."""
    with user_errors():
        text = config.load_section("text", params)
        init_from = config.load_section("unet", params).init_from
        config.check_init_text(init_from, text.pretrained)
        check_outputs(out)
        dev = pick_device(device)
        init = init_model(init_from) if init_from else None
        max_length = text.max_length if init is None else init.text_max_length  # text.max_length is not read then
        frozen = load_frozen_text(text.pretrained, max_length) if text.pretrained else None
        split = load_split(data, "train", "stream")  # its captions: the images are not read
        with tracking.stage_run("encode_captions", {"text.pretrained": text.pretrained, "text.max_length": max_length,
                                                    "unet.init_from": init_from}):
            encoded = write_encoded_captions(out, split.captions, max_length, frozen, dev,
                                             init.folder / TOKENIZER if init is not None else None)
        wrote(out)
        what = (f"{tuple(encoded.states.shape)} states of {text.pretrained}" if frozen else
                f"token ids of {init.folder}'s tokenizer" if init is not None else "CLIP token ids")
        print(f"encode_captions: {len(encoded.captions)} distinct captions, {what}")


if __name__ == "__main__":
    app()
