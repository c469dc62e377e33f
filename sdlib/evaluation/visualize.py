"""Pictures of what diffusion does: the forward process, the reverse process, and cross-attention maps.

- forward: a real image noised to increasing timesteps, in pixel space and (decoded) in latent space, q(x_t|x_0)
  of Ho et al. 2020 eq. 4;
- reverse: the current sample x_t and the model's x_0 prediction at chosen steps of a sampler;
- attention: where each prompt token's cross-attention lands on the latent grid, averaged over heads, layers and
  steps (the idea of Hertz et al. 2022, "Prompt-to-Prompt", fig. 4).

Every figure is a `labelled_grid`: frames upscaled by nearest neighbour to a visible size, a caption over each column
(timestep, sampler step, token), a label left of each row and a title saying what the figure is. Drawn with Pillow's
built-in font, so the same frames and text give byte-identical PNGs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from sdlib.data.images import to_uint8
from sdlib.generate import Prompts, generate
from sdlib.ldm import LatentDiffusion
from sdlib.models.vae import Autoencoder

FORWARD_STEPS = (0, 50, 100, 200, 300, 500, 700, 999)
FRAME_PX = 96  # frames are upscaled by a whole factor to at least this width: 32 px digits are drawn 3x
GAP = 4  # white pixels between frames
PAD = 6  # white margin around the figure and around its text
CAPTION_PT, TITLE_PT = 13, 15  # font sizes: the built-in font (Aileron) is ASCII-only, hence "sigma", not a glyph


@dataclass(frozen=True)
class GridLayout:
    """Where a labelled grid puts things, in pixels; `labelled_grid` draws by it, tests read it."""

    rows: int
    cols: int
    scale: int  # each frame pixel becomes scale x scale pixels
    frame_w: int  # upscaled frame size
    frame_h: int
    label_w: int  # width of the row-label column (0 without row labels)
    title_h: int
    caption_h: int
    width: int
    height: int

    def frame_box(self, r: int, c: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the frame in row r, column c."""
        x = PAD + self.label_w + c * (self.frame_w + GAP)
        y = PAD + self.title_h + self.caption_h + r * (self.frame_h + GAP)
        return x, y, x + self.frame_w, y + self.frame_h

    def caption_box(self, c: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of column c's caption, over its first frame."""
        x, y, right, _ = self.frame_box(0, c)
        return x - GAP // 2, y - self.caption_h, right + GAP // 2, y


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _line_h(font: ImageFont.FreeTypeFont) -> int:
    ascent, descent = font.getmetrics()
    return ascent + descent


def _fit(text: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """`text` cut to `width` pixels, ending in '..' when cut."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "..") > width:
        text = text[:-1]
    return text + ".."


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """`text` broken at spaces into lines of at most `width` pixels (a longer word is cut)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(_fit(word, font, width))
    return lines


def grid_layout(rows: int, cols: int, frame_hw: tuple[int, int], column_lines: int, row_labels: list[str] | None,
                title_lines: int, frame_px: int = FRAME_PX) -> GridLayout:
    """The layout of `rows` x `cols` frames of size `frame_hw`, captions of `column_lines` lines, a title of
    `title_lines` lines."""
    h, w = frame_hw
    scale = max(1, math.ceil(frame_px / w))
    label_w = 0
    if row_labels:
        font = _font(CAPTION_PT)
        label_w = max(round(font.getlength(line)) for label in row_labels for line in label.split("\n")) + 2 * PAD
    caption_h = column_lines * _line_h(_font(CAPTION_PT)) + PAD
    title_h = title_lines * _line_h(_font(TITLE_PT)) + PAD
    width = 2 * PAD + label_w + cols * w * scale + (cols - 1) * GAP
    height = 2 * PAD + title_h + caption_h + rows * h * scale + (rows - 1) * GAP
    return GridLayout(rows, cols, scale, w * scale, h * scale, label_w, title_h, caption_h, width, height)


def labelled_grid(frames: torch.Tensor, columns: list[str], title: str, row_labels: list[str] | None = None,
                  frame_px: int = FRAME_PX) -> tuple[Image.Image, GridLayout]:
    """Frames (R * C, ch, H, W) uint8, row by row, ch = 1 (an L image) or 3 (RGB), each upscaled to >= `frame_px`
    wide; `columns[c]` (lines split at '\\n') over column c, `row_labels[r]` left of row r, `title` on top."""
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] not in (1, 3):
        raise ValueError(f"expected (N, C, H, W) uint8 frames, C = 1 or 3, got {tuple(frames.shape)} {frames.dtype}")
    cols = len(columns)
    rows = len(frames) // cols
    if rows * cols != len(frames) or (row_labels is not None and len(row_labels) != rows):
        raise ValueError(f"{len(frames)} frames do not fill {cols} columns x "
                         f"{rows if row_labels is None else len(row_labels)} rows")
    caption_font, title_font = _font(CAPTION_PT), _font(TITLE_PT)
    labelled_width = grid_layout(rows, cols, frames.shape[2:], 0, row_labels, 0, frame_px).width
    title_lines = _wrap(title, title_font, labelled_width - 2 * PAD)
    column_lines = max(len(c.split("\n")) for c in columns)
    layout = grid_layout(rows, cols, frames.shape[2:], column_lines, row_labels, len(title_lines), frame_px)

    rgb = frames.shape[1] == 3
    canvas = Image.new("RGB" if rgb else "L", (layout.width, layout.height), "white")
    pixels = frames.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    for n, frame in enumerate(pixels):
        big = np.repeat(np.repeat(frame, layout.scale, axis=0), layout.scale, axis=1)  # nearest neighbour, exact
        left, top, _, _ = layout.frame_box(n // cols, n % cols)
        canvas.paste(Image.fromarray(big if rgb else big[..., 0]), (left, top))

    draw = ImageDraw.Draw(canvas)
    line_h = _line_h(caption_font)
    for c, caption in enumerate(columns):
        left, top, right, bottom = layout.caption_box(c)
        lines = caption.split("\n")
        for k, line in enumerate(lines):  # bottom-aligned, centred over the frame
            y = bottom - PAD // 2 - (len(lines) - k) * line_h
            draw.text(((left + right) // 2, y), _fit(line, caption_font, right - left), font=caption_font, fill="black",
                      anchor="ma")
    for r, label in enumerate(row_labels or []):
        _, top, _, bottom = layout.frame_box(r, 0)
        lines = label.split("\n")
        y0 = (top + bottom) // 2 - len(lines) * line_h // 2
        for k, line in enumerate(lines):
            draw.text((PAD, y0 + k * line_h), line, font=caption_font, fill="black")
    for k, line in enumerate(title_lines):
        draw.text((PAD, PAD + k * _line_h(title_font)), line, font=title_font, fill="black")
    return canvas, layout


def _save(path: Path, figure: tuple[Image.Image, GridLayout]) -> GridLayout:
    """Write the figure's image as a PNG; its layout, for tests to find the captions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure[0].save(path, format="PNG")
    return figure[1]


def _num(x: float) -> str:
    """A sigma or a guidance scale in 3 significant digits: 14.6, 0.0292, 0."""
    return f"{x:.3g}"


@torch.no_grad()
def forward_figure(path: Path, model: LatentDiffusion, vae: Autoencoder, image: torch.Tensor,
                   seed: int = 0) -> GridLayout:
    """Row 1: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps on pixels; row 2: the same on latents, decoded."""
    gen = torch.Generator().manual_seed(seed)
    sigmas = model.denoiser.train_sigmas.double()
    ac = 1.0 / (1.0 + sigmas ** 2)  # alpha-bar_t from the VE sigma_t
    steps = [t for t in FORWARD_STEPS if t < len(ac)]
    scale = model.diffusion.scale_factor
    z0 = vae.encode(image[None]).mean * scale  # (1, z, h, w)
    pixels, latents = [], []
    for t in steps:
        a = float(ac[t])
        eps_x = torch.randn(image.shape, generator=gen).to(image.device)
        eps_z = torch.randn(z0.shape, generator=gen).to(z0.device)
        pixels.append(a ** 0.5 * image + (1 - a) ** 0.5 * eps_x)
        latents.append(vae.decode((a ** 0.5 * z0 + (1 - a) ** 0.5 * eps_z) / scale)[0])
    columns = [f"t = {t}\nsigma = {_num(float(sigmas[t]))}" for t in steps]
    title = (f"forward diffusion of a test image, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with "
             f"abar_t = 1 / (1 + sigma_t^2), seed {seed}")
    return _save(path, labelled_grid(to_uint8(torch.stack(pixels + latents)), columns, title,
                                     ["pixels x_t", "latents z_t\n(decoded)"]))


@torch.no_grad()
def reverse_figure(path: Path, model: LatentDiffusion, vae: Autoencoder, prompts: Prompts, prompt: str, *,
                   seed: int = 0, sampler: str = "dpmpp_2m", steps: int = 20, guidance: float = 3.0,
                   shown: int = 8) -> GridLayout:
    """Row 1: the sample x_t (decoded) after `shown` of the steps, the last one included; row 2: the x_0 prediction
    that step made."""
    trace: list[dict] = []
    generate(model, vae, prompts, [prompt], [seed], sampler=sampler, steps=steps, guidance=guidance,
             callback=lambda d: trace.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in d.items()}))
    picks = torch.linspace(0, len(trace) - 1, min(shown, len(trace))).round().long().tolist()
    scale = model.diffusion.scale_factor
    rows_x, rows_x0, columns = [], [], []
    for i in picks:
        sigma = float(torch.as_tensor(trace[i]["sigma"]).flatten()[0])  # the sigma this step reached
        rows_x.append(vae.decode(trace[i]["x"] / (1 + sigma ** 2) ** 0.5 / scale)[0])  # back to the VP scale
        rows_x0.append(vae.decode(trace[i]["denoised"] / scale)[0])
        columns.append(f"step {trace[i]['i'] + 1}/{len(trace)}\nsigma = {_num(sigma)}")
    title = (f"reverse diffusion: {sampler}, {steps} steps, guidance {_num(guidance)}, prompt '{prompt}', "
             f"seed {seed}")
    return _save(path, labelled_grid(to_uint8(torch.stack(rows_x + rows_x0)), columns, title,
                                     ["sample x_t\n(decoded)", "prediction\nof x_0"]))


@torch.no_grad()
def attention_maps(model: LatentDiffusion, vae: Autoencoder, prompts: Prompts, prompt: str, *, seed: int = 0,
                   sampler: str = "dpmpp_2m", steps: int = 20, guidance: float = 3.0):
    """The generated image (C, H, W) and cross-attention per token (L, H, W), averaged over heads, layers, steps."""
    modules = model.unet.attention_modules()
    size = model.latent_hw[0] * vae.args.factor
    total = torch.zeros(model.text_args.max_length, size, size)
    count = 0

    def accumulate(_: dict) -> None:
        nonlocal total, count
        for m in modules:
            maps = m.maps[-1].mean(0)  # conditional half of the guidance batch, mean over heads: (Nq, L)
            side = int(maps.shape[0] ** 0.5)
            grid = maps.T.reshape(-1, 1, side, side)  # (L, 1, h, w)
            total += F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)[:, 0].cpu()
            count += 1

    for m in modules:
        m.store_maps = True
    try:
        image = generate(model, vae, prompts, [prompt], [seed], sampler=sampler, steps=steps, guidance=guidance,
                         callback=accumulate)[0]
    finally:
        for m in modules:
            m.store_maps, m.maps = False, None
    return image.cpu(), total / max(count, 1)


def attention_overlay(image: torch.Tensor, heat: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """The image (C, H, W) in [-1, 1], C = 1 or 3, under heat map `heat` (H, W) scaled to its own range and coloured by
    the jet colour map: (3, H, W) uint8."""
    gray = to_uint8(image).expand(3, -1, -1).float()  # (3, H, W)
    low, high = heat.min(), heat.max()
    level = (heat - low) / (high - low) if high > low else torch.zeros_like(heat)
    colour = torch.from_numpy(colormaps["jet"](level.numpy(), bytes=True)[..., :3])  # (H, W, 3)
    colour = colour.permute(2, 0, 1).float()  # (3, H, W)
    return ((1 - alpha) * gray + alpha * colour).round().to(torch.uint8)


def attention_figure(path: Path, model: LatentDiffusion, vae: Autoencoder, prompts: Prompts, prompt: str, *,
                     seed: int = 0, sampler: str = "dpmpp_2m", steps: int = 20, guidance: float = 3.0) -> GridLayout:
    """The image, then one heat map per prompt token (start token, words, end token)."""
    kw = {"seed": seed, "sampler": sampler, "steps": steps, "guidance": guidance}
    image, maps = attention_maps(model, vae, prompts, prompt, **kw)
    ids = prompts.ids([prompt])[0].tolist()
    eos = prompts.tokenizer.eos_token_id
    eos = prompts.tokenizer.sep_token_id if eos is None else eos  # BERT ends a prompt with [SEP]
    n = ids.index(eos) + 1 if eos in ids else len(ids)  # up to and including the first end token
    names = {prompts.tokenizer.bos_token: "<start>", prompts.tokenizer.eos_token: "<end>"}
    tokens = [prompts.tokenizer.convert_ids_to_tokens(i) for i in ids[:n]]
    tokens = [names.get(t, t.replace("</w>", "")) for t in tokens]
    frames = [to_uint8(image).expand(3, -1, -1)] + [attention_overlay(image, heat) for heat in maps[:n]]
    title = (f"cross-attention of each token of the prompt '{prompt}', averaged over heads, layers and {steps} steps "
             f"of {sampler}, guidance {_num(guidance)}, seed {seed}; each map scaled to its own range "
             "(blue low, red high)")
    return _save(path, labelled_grid(torch.stack(frames), ["image", *tokens], title))
