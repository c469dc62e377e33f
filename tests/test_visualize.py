"""Visualisations and generation on a tiny untrained model: attention maps are distributions; the figures are labelled
grids whose frames are upscaled exactly, whose captions are drawn and differ per column, and whose PNGs are
byte-identical from the same inputs."""
import io
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tolerances import forward_tol, rounding_tol

from sdlib.evaluation.visualize import (
    FRAME_PX,
    GAP,
    PAD,
    GridLayout,
    attention_figure,
    attention_maps,
    attention_overlay,
    forward_figure,
    labelled_grid,
    reverse_figure,
)
from sdlib.generate import Prompts, generate
from sdlib.ldm import DiffusionArgs, LatentDiffusion
from sdlib.models.text import TextEncoderArgs, write_clip_tokenizer_files
from sdlib.models.unet import UNetArgs
from sdlib.models.vae import AutoencoderKL, VAEArgs


def tiny_model(tok_dir, channels: int = 1):
    """A random LatentDiffusion with 4x4 latents and a VAE for 8x8 images of `channels` channels."""
    torch.manual_seed(0)
    text = TextEncoderArgs(hidden_size=16, num_layers=1, num_heads=2, max_length=8)
    model = LatentDiffusion(unet=UNetArgs(in_channels=4, context_dim=16, model_channels=8, channel_mult=(1, 2),
                                          attention_levels=(0, 1), num_heads=2), text=text, diffusion=DiffusionArgs(),
                            latent_hw=(4, 4)).eval()
    for p in model.unet.parameters():  # random, non-zero weights so that attention reaches the output
        torch.nn.init.normal_(p, std=0.1)
    vae = AutoencoderKL(VAEArgs(in_channels=channels, base_channels=8, channel_mult=(1, 2))).eval()
    return model, vae, Prompts(tok_dir, model)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_clip_tokenizer_files(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tiny(tok_dir):
    return tiny_model(tok_dir)


def test_generate_shapes_and_seed_invariance(tiny):
    model, vae, prompts = tiny
    both = generate(model, vae, prompts, ["8", "3"], [5, 6], sampler="ddim", steps=3, guidance=3.0)
    alone = generate(model, vae, prompts, ["3"], [6], sampler="ddim", steps=3, guidance=3.0)
    assert both.shape == (2, 1, 8, 8) and both.abs().max() <= 1.0
    # image i with seed s does not depend on its batch, up to rounding: after the text encoder, 3 DDIM steps (convex
    # combinations of x and the denoised x0_u + 3 (x0_c - x0_u), which weighs the U-Net's rounding by |1 - 3| + 3 = 5)
    # and the VAE's decoder
    tol = forward_tol(both[1], model.text, *[model.unet] * (3 * 5), vae.decoder)
    assert (both[1] - alone[0]).abs().max() <= tol


def test_attention_maps_are_distributions_over_tokens(tiny):
    model, vae, prompts = tiny
    image, maps = attention_maps(model, vae, prompts, "a handwritten 8", steps=3)
    assert image.shape == (1, 8, 8) and maps.shape == (8, 8, 8)  # (tokens, H, W)
    # float32 sums: the softmax's over 8 tokens, the mean over heads, the bilinear upsampling, the total over 3 steps x
    # the cross-attention layers (the most terms), its mean, and this sum over tokens
    count = 3 * len(model.unet.attention_modules())
    assert (maps.sum(0) - 1).abs().max() <= rounding_tol(steps=6, terms=count)
    assert all(m.maps is None and not m.store_maps for m in model.unet.attention_modules())


def frames_of(n: int, channels: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def crop(image: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    return np.asarray(image.crop(box)).astype(int)


def inked(region: np.ndarray) -> bool:
    """Some dark text on the white background."""
    return bool((region < 128).any())


@pytest.mark.parametrize("channels, h, w", [(1, 32, 32), (3, 32, 32), (1, 8, 8), (3, 16, 24), (3, 64, 64)])
def test_grid_size_follows_frame_count_and_scale(channels, h, w):
    columns = ["t = 0\nsigma = 0.03", "t = 1"]
    image, layout = labelled_grid(frames_of(4, channels, h, w), columns, "a title", ["row 1", "row 2"])
    scale = math.ceil(FRAME_PX / w)
    assert layout.scale == scale and FRAME_PX <= w * scale < FRAME_PX + w
    assert image.size == (layout.width, layout.height) and image.mode == ("L" if channels == 1 else "RGB")
    # one more column widens the figure by one frame and a gap, one more row heightens it by one frame and a gap
    wider, _ = labelled_grid(frames_of(6, channels, h, w), columns + ["t = 2"], "a title", ["row 1", "row 2"])
    taller, _ = labelled_grid(frames_of(6, channels, h, w), columns, "a title", ["row 1", "row 2", "row 3"])
    assert wider.size == (image.width + w * scale + GAP, image.height)
    assert taller.size == (image.width, image.height + h * scale + GAP)


@pytest.mark.parametrize("channels", [1, 3])
def test_grid_frames_are_exact_nearest_neighbour_upscales(channels):
    frames = frames_of(6, channels, 8, 16)
    image, layout = labelled_grid(frames, ["a", "b", "c"], "title", ["x", "y"])
    for n, frame in enumerate(frames):
        want = F.interpolate(frame[None].float(), scale_factor=layout.scale, mode="nearest")[0]  # (C, H', W')
        got = crop(image, layout.frame_box(n // 3, n % 3)).reshape(want.shape[1], want.shape[2], channels)
        assert np.array_equal(got, want.permute(1, 2, 0).int().numpy()), f"frame {n}"


def test_grid_captions_are_drawn_and_differ_per_column():
    columns = ["step 1/20\nsigma = 14.6", "step 4/20\nsigma = 5.79", "step 20/20\nsigma = 0"]
    image, layout = labelled_grid(frames_of(6, 1, 32, 32), columns, "reverse diffusion", ["sample", "x_0"])
    captions = [crop(image, layout.caption_box(c)) for c in range(3)]
    assert all(inked(c) for c in captions)
    assert not np.array_equal(captions[0], captions[1]) and not np.array_equal(captions[1], captions[2])
    assert inked(crop(image, (0, 0, image.width, PAD + layout.title_h)))  # the title
    left = layout.frame_box(0, 0)[0]
    for r in range(2):  # row labels, left of the frames
        _, top, _, bottom = layout.frame_box(r, 0)
        assert inked(crop(image, (0, top, left, bottom)))


def test_grid_text_stays_in_its_box():
    """A caption wider than its frame is cut, not drawn over its neighbour; a long title wraps within the figure."""
    word = "supercalifragilisticexpialidocious"
    image, layout = labelled_grid(frames_of(2, 1, 8, 8), [word, ""], " ".join([word] * 6))
    assert not inked(crop(image, layout.caption_box(1)))
    assert layout.title_h > labelled_grid(frames_of(2, 1, 8, 8), [word, ""], word)[1].title_h
    assert not inked(crop(image, (image.width - PAD, 0, image.width, image.height)))  # the right margin


def test_grid_png_is_deterministic():
    def png() -> bytes:
        image, _ = labelled_grid(frames_of(4, 3, 16, 16), ["t = 0", "t = 1"], "title", ["a", "b"])
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    assert png() == png()


def test_attention_overlay_colours_high_attention_red_and_low_blue():
    image = -torch.ones(1, 8, 8)  # black
    heat = torch.linspace(0.1, 0.3, 64).reshape(8, 8)  # any range: each map is scaled to its own
    out = attention_overlay(image, heat)
    assert out.shape == (3, 8, 8) and out.dtype == torch.uint8
    hot, cold = out[:, -1, -1].int(), out[:, 0, 0].int()
    assert hot[0] > hot[2] and cold[2] > cold[0]
    assert attention_overlay(-torch.ones(3, 8, 8), heat).equal(out)  # an RGB image of the same grey, the same


def caption_check(path, layout: GridLayout, cols: int, rows: int, size: int = 8) -> None:
    """The figure at `path` has `rows` x `cols` frames of `size` px upscaled, inked, distinct captions."""
    image = Image.open(path)
    assert (layout.rows, layout.cols) == (rows, cols) and layout.frame_w == layout.scale * size >= FRAME_PX
    assert image.size == (layout.width, layout.height)
    captions = [crop(image, layout.caption_box(c)) for c in range(cols)]
    assert all(inked(c) for c in captions)
    assert all(not np.array_equal(a, b) for a, b in itertools.pairwise(captions))


@pytest.mark.parametrize("channels", [1, 3])
def test_figures_are_labelled_and_deterministic(tok_dir, tmp_path, channels):
    model, vae, prompts = tiny_model(tok_dir, channels)

    def draw(folder):
        folder.mkdir()
        return (forward_figure(folder / "f.png", model, vae, torch.rand(channels, 8, 8) * 2 - 1),
                reverse_figure(folder / "r.png", model, vae, prompts, "8", steps=4, sampler="heun"),
                attention_figure(folder / "a.png", model, vae, prompts, "8", steps=2))

    torch.manual_seed(0)
    forward, reverse, attention = draw(tmp_path / "one")
    caption_check(tmp_path / "one" / "f.png", forward, cols=8, rows=2)
    caption_check(tmp_path / "one" / "r.png", reverse, cols=4, rows=2)
    caption_check(tmp_path / "one" / "a.png", attention, cols=4, rows=1)  # image, <start>, 8, <end>
    torch.manual_seed(0)
    draw(tmp_path / "two")
    for name in ("f.png", "r.png", "a.png"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
