"""Pictures of what diffusion does: the forward process, the reverse process, and cross-attention maps.

- forward: a real image noised to increasing timesteps, in pixel space and (decoded) in latent space, q(x_t|x_0)
  of Ho et al. 2020 eq. 4;
- reverse: the current sample x_t and the model's x_0 prediction at chosen steps of a sampler;
- attention: where each prompt token's cross-attention lands on the latent grid, averaged over heads, layers and
  steps (the idea of Hertz et al. 2022, "Prompt-to-Prompt", fig. 4).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from sdlib.data.images import make_grid_png, to_uint8
from sdlib.generate import Prompts, generate
from sdlib.ldm import LatentDiffusion
from sdlib.models.vae import AutoencoderKL

FORWARD_STEPS = (0, 50, 100, 200, 300, 500, 700, 999)


@torch.no_grad()
def forward_figure(path: Path, model: LatentDiffusion, vae: AutoencoderKL, image: torch.Tensor, seed: int = 0) -> None:
    """Row 1: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps on pixels; row 2: the same on latents, decoded."""
    gen = torch.Generator().manual_seed(seed)
    ac = 1.0 / (1.0 + model.denoiser.train_sigmas.double() ** 2)  # alpha-bar_t from the VE sigma_t
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
    make_grid_png(path, to_uint8(torch.stack(pixels + latents).cpu()), nrow=len(steps))


@torch.no_grad()
def reverse_figure(path: Path, model: LatentDiffusion, vae: AutoencoderKL, prompts: Prompts, prompt: str, *,
                   seed: int = 0, sampler: str = "dpmpp_2m", steps: int = 20, guidance: float = 3.0,
                   shown: int = 8) -> None:
    """Row 1: the sample x_t (decoded) at `shown` steps; row 2: the x_0 prediction at the same steps."""
    trace: list[dict] = []
    generate(model, vae, prompts, [prompt], [seed], sampler=sampler, steps=steps, guidance=guidance,
             callback=lambda d: trace.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in d.items()}))
    picks = torch.linspace(0, len(trace) - 1, min(shown, len(trace))).round().long().tolist()
    scale = model.diffusion.scale_factor
    rows_x, rows_x0 = [], []
    for i in picks:
        sigma = float(torch.as_tensor(trace[i]["sigma"]).flatten()[0])
        rows_x.append(vae.decode(trace[i]["x"] / (1 + sigma ** 2) ** 0.5 / scale)[0])  # back to the VP scale
        rows_x0.append(vae.decode(trace[i]["denoised"] / scale)[0])
    make_grid_png(path, to_uint8(torch.stack(rows_x + rows_x0).cpu()), nrow=len(picks))


@torch.no_grad()
def attention_maps(model: LatentDiffusion, vae: AutoencoderKL, prompts: Prompts, prompt: str, *, seed: int = 0,
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


def attention_figure(path: Path, model: LatentDiffusion, vae: AutoencoderKL, prompts: Prompts, prompt: str,
                     **kw) -> None:
    """The image, then one heat map per prompt token (start token, words, end token)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image, maps = attention_maps(model, vae, prompts, prompt, **kw)
    ids = prompts.ids([prompt])[0].tolist()
    eos = prompts.tokenizer.eos_token_id
    eos = prompts.tokenizer.sep_token_id if eos is None else eos  # BERT ends a prompt with [SEP]
    n = ids.index(eos) + 1 if eos in ids else len(ids)  # up to and including the first end token
    tokens = [prompts.tokenizer.convert_ids_to_tokens(i).replace("</w>", "") for i in ids[:n]]
    fig, axes = plt.subplots(1, n + 1, figsize=(1.6 * (n + 1), 1.9))
    shown = (image.permute(1, 2, 0).squeeze(-1) + 1) / 2
    axes[0].imshow(shown.clamp(0, 1).numpy(), cmap="gray")
    axes[0].set_title(prompt[:18], fontsize=8)
    for ax, token, heat in zip(axes[1:], tokens, maps[:n]):
        ax.imshow(shown.clamp(0, 1).numpy(), cmap="gray")
        ax.imshow(heat.numpy(), cmap="jet", alpha=0.5)
        ax.set_title(token, fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
