"""Key maps from sdlib's state-dict keys to those of SD v1.x checkpoints, one per layout, as data.

Two layouts hold the same weights under different names:
- `compvis`: the original single file (`model.diffusion_model.*`, `first_stage_model.*`,
  `cond_stage_model.transformer.*`), following CompVis' `openaimodel.py` and `autoencoder.py`;
- `diffusers`: a folder with `unet/`, `vae/` and `text_encoder/`, following diffusers' `UNet2DConditionModel`,
  `AutoencoderKL` and transformers' `CLIPTextModel`.

A map is built in two steps: `*_blocks` walks sdlib's module tree (the order in which sdlib builds its blocks, which is
SD's) and names the matching block in the layout; the tables below rename the parameters inside each kind of block.
"""
from __future__ import annotations

import re
from typing import Literal

from sdlib.models.unet import UNetArgs
from sdlib.models.vae import VAEArgs

Layout = Literal["compvis", "diffusers"]
LAYOUTS: tuple[Layout, ...] = ("compvis", "diffusers")
# Where each part's weights live in a CompVis single file; the parts are the folders of a diffusers one.
COMPVIS_PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                  "text_encoder": "cond_stage_model.transformer."}

# Inside a block: sdlib's module name -> the layout's, per kind of block. "{i}" stands for a transformer block index.
# "module" is a plain layer (conv, linear, norm) named by its block prefix alone.
LEAVES: dict[str, dict[Layout, dict[str, str]]] = {
    "module": {"compvis": {"": ""}, "diffusers": {"": ""}},
    "unet_res": {
        "compvis": {"norm1": "in_layers.0", "conv1": "in_layers.2", "emb_proj": "emb_layers.1",
                    "norm2": "out_layers.0", "conv2": "out_layers.3", "skip": "skip_connection"},
        "diffusers": {"norm1": "norm1", "conv1": "conv1", "emb_proj": "time_emb_proj",
                      "norm2": "norm2", "conv2": "conv2", "skip": "conv_shortcut"},
    },
    "vae_res": {
        "compvis": {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "skip": "nin_shortcut"},
        "diffusers": {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "skip": "conv_shortcut"},
    },
    "transformer": {  # CompVis and diffusers name SD's spatial transformer alike
        layout: {"norm": "norm", "proj_in": "proj_in", "proj_out": "proj_out",
                 "blocks.{i}.norm1": "transformer_blocks.{i}.norm1",
                 "blocks.{i}.norm2": "transformer_blocks.{i}.norm2",
                 "blocks.{i}.norm3": "transformer_blocks.{i}.norm3",
                 **{f"blocks.{{i}}.{a}.{p}": f"transformer_blocks.{{i}}.{a}.{p}"
                    for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v")},
                 "blocks.{i}.attn1.to_out": "transformer_blocks.{i}.attn1.to_out.0",
                 "blocks.{i}.attn2.to_out": "transformer_blocks.{i}.attn2.to_out.0",
                 "blocks.{i}.ff.proj": "transformer_blocks.{i}.ff.net.0.proj",
                 "blocks.{i}.ff.out": "transformer_blocks.{i}.ff.net.2"}
        for layout in LAYOUTS
    },
    "vae_attention": {
        "compvis": {"norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"},
        "diffusers": {"norm": "group_norm", "to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    },
}

Blocks = dict[str, tuple[str, str]]  # sdlib block prefix -> (layout block prefix, kind of block)


def unet_blocks(a: UNetArgs, layout: Layout) -> Blocks:
    """sdlib U-Net blocks -> CompVis `input_blocks/middle_block/output_blocks` or diffusers `down/mid/up_blocks`."""
    cv = layout == "compvis"
    last = len(a.channel_mult) - 1
    blocks: Blocks = {
        "time_embed.0": ("time_embed.0" if cv else "time_embedding.linear_1", "module"),
        "time_embed.2": ("time_embed.2" if cv else "time_embedding.linear_2", "module"),
        "conv_in": ("input_blocks.0.0" if cv else "conv_in", "module"),
        "out.0": ("out.0" if cv else "conv_norm_out", "module"),
        "out.2": ("out.2" if cv else "conv_out", "module"),
        "mid.0.res": ("middle_block.0" if cv else "mid_block.resnets.0", "unet_res"),
        "mid.0.attn": ("middle_block.1" if cv else "mid_block.attentions.0", "transformer"),
        "mid.1.res": ("middle_block.2" if cv else "mid_block.resnets.1", "unet_res"),
    }
    k = 0  # index into sdlib's `down`; CompVis' input_blocks are k + 1 (input_blocks.0 is conv_in)
    for lvl in range(last + 1):
        for j in range(a.num_res_blocks):
            blocks[f"down.{k}.res"] = (f"input_blocks.{k + 1}.0" if cv else f"down_blocks.{lvl}.resnets.{j}",
                                       "unet_res")
            if lvl in a.attention_levels:
                blocks[f"down.{k}.attn"] = (f"input_blocks.{k + 1}.1" if cv else f"down_blocks.{lvl}.attentions.{j}",
                                            "transformer")
            k += 1
        if lvl < last:
            blocks[f"down.{k}.conv"] = (f"input_blocks.{k + 1}.0.op" if cv else f"down_blocks.{lvl}.downsamplers.0.conv",
                                        "module")
            k += 1
    k = n = 0  # n: CompVis output block, one per ResNet block (an upsampler joins the level's last one)
    for u, lvl in enumerate(reversed(range(last + 1))):  # diffusers numbers up_blocks from the deepest level
        attn = lvl in a.attention_levels
        for j in range(a.num_res_blocks + 1):
            blocks[f"up.{k}.res"] = (f"output_blocks.{n}.0" if cv else f"up_blocks.{u}.resnets.{j}", "unet_res")
            if attn:
                blocks[f"up.{k}.attn"] = (f"output_blocks.{n}.1" if cv else f"up_blocks.{u}.attentions.{j}",
                                          "transformer")
            k, n = k + 1, n + 1
        if lvl > 0:
            blocks[f"up.{k}.conv"] = (f"output_blocks.{n - 1}.{2 if attn else 1}.conv" if cv
                                      else f"up_blocks.{u}.upsamplers.0.conv", "module")
            k += 1
    return blocks


def vae_blocks(a: VAEArgs, layout: Layout) -> Blocks:
    """sdlib VAE blocks -> CompVis `encoder.down.{level}.block.{j}`... or diffusers `encoder.down_blocks...`."""
    cv = layout == "compvis"
    last = len(a.channel_mult) - 1
    blocks: Blocks = {"quant_conv": ("quant_conv", "module"), "post_quant_conv": ("post_quant_conv", "module")}
    for part in ("encoder", "decoder"):
        blocks |= {
            f"{part}.conv_in": (f"{part}.conv_in", "module"),
            f"{part}.mid.0": (f"{part}.mid.block_1" if cv else f"{part}.mid_block.resnets.0", "vae_res"),
            f"{part}.mid.1": (f"{part}.mid.attn_1" if cv else f"{part}.mid_block.attentions.0", "vae_attention"),
            f"{part}.mid.2": (f"{part}.mid.block_2" if cv else f"{part}.mid_block.resnets.1", "vae_res"),
            f"{part}.norm_out": (f"{part}.norm_out" if cv else f"{part}.conv_norm_out", "module"),
            f"{part}.conv_out": (f"{part}.conv_out", "module"),
        }
    k = 0
    for lvl in range(last + 1):
        for j in range(a.num_res_blocks):
            blocks[f"encoder.down.{k}"] = (f"encoder.down.{lvl}.block.{j}" if cv
                                           else f"encoder.down_blocks.{lvl}.resnets.{j}", "vae_res")
            k += 1
        if lvl < last:
            blocks[f"encoder.down.{k}.conv"] = (f"encoder.down.{lvl}.downsample.conv" if cv
                                                else f"encoder.down_blocks.{lvl}.downsamplers.0.conv", "module")
            k += 1
    k = 0
    for u, lvl in enumerate(reversed(range(last + 1))):  # CompVis numbers decoder levels as the encoder's
        for j in range(a.num_res_blocks + 1):
            blocks[f"decoder.up.{k}"] = (f"decoder.up.{lvl}.block.{j}" if cv
                                         else f"decoder.up_blocks.{u}.resnets.{j}", "vae_res")
            k += 1
        if lvl > 0:
            blocks[f"decoder.up.{k}.conv"] = (f"decoder.up.{lvl}.upsample.conv" if cv
                                              else f"decoder.up_blocks.{u}.upsamplers.0.conv", "module")
            k += 1
    return blocks


def expand(blocks: Blocks, keys: list[str], layout: Layout) -> dict[str, str]:
    """Every sdlib state-dict key in `keys` -> the layout's key; a key outside the map raises KeyError (a bug here)."""
    out = {}
    for key in keys:
        module, _, param = key.rpartition(".")  # param: weight or bias
        prefix = max((p for p in blocks if module == p or module.startswith(p + ".")), key=len, default=None)
        if prefix is None:
            raise KeyError(f"no {layout} block for sdlib key {key}")
        target, kind = blocks[prefix]
        inner = module[len(prefix) + 1:]
        template = re.sub(r"^blocks\.(\d+)\.", "blocks.{i}.", inner)
        index = re.match(r"^blocks\.(\d+)\.", inner)
        name = LEAVES[kind][layout][template]
        if index:
            name = name.format(i=index.group(1))
        out[key] = ".".join(s for s in (target, name, param) if s)
    return out


def text_keymap(keys: list[str], nested: bool) -> dict[str, str]:
    """sdlib's TextEncoder wraps transformers' CLIPTextModel as `model`: its keys are CLIP's with that prefix.

    SD files (and transformers < 5) nest CLIP's text tower under `text_model.`; transformers >= 5 saves it without,
    as did the transformers of the oldest CompVis files. `nested` says which the file uses.
    """
    core = {key: key.removeprefix("model.").removeprefix("text_model.") for key in keys}
    return {key: ("text_model." if nested else "") + name for key, name in core.items()}
