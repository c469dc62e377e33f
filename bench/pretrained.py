"""SD v1.5's architecture in sdlib vs diffusers, same random weights: equal outputs, time and memory per image.

diffusers initialises SD v1.5's U-Net and VAE (its own default init) and transformers CLIP ViT-L/14's text tower,
from the config files sdlib's exporter writes for SD v1 (`write_diffusers_configs`, the same as v1.5's), and saves
them as a diffusers folder in float32: written once into `--dir` and reused by later runs. Then, each in a fresh
process, in float32 on the CPU:

1. equality: one U-Net forward (batch 2, timestep 500, a 77-token random context), one VAE decode (latent to image)
   and the text encoder on a prompt and "", sdlib's models (`load_pretrained`) vs diffusers' from the same folder:
   the max abs difference and the max abs value of diffusers' output, so the relative error is visible;
2. speed: a whole text-to-image run (encode prompt and "", 20 steps of dpmpp_2m with CFG 7.5, VAE decode), batch 1:
   sdlib's `generate` vs diffusers' `StableDiffusionPipeline` with `DPMSolverMultistepScheduler` set up as sdlib's
   dpmpp_2m on its `discrete` schedule (`DPMPP_2M`), from the same initial latents; the processes alternate (sdlib,
   diffusers, sdlib, ...) for `--rounds`, and the lines report the medians, the median of the per-round ratios
   sdlib / diffusers, and the max abs difference of the two final images in [0, 1] (the same math: ~1e-5);
3. memory: each sampling process's peak resident set (VmHWM, loading included), and its ratio sdlib / diffusers.

One JSON line per case. `--architecture tiny_sd_v1` runs the same code at a few million parameters and 64 x 64
images in about a minute. Full size (`sd_v1`, the default) has not been run. It needs 4.3 GB of disk in `--dir`
(4.0 GiB of float32 weights) and, as ESTIMATES, ~5 GiB per sampling process and ~10 GiB for the equality process
(sdlib's weights, diffusers' U-Net and a 512 x 512 VAE decode). Its time is an ESTIMATE too:
counted with FlopCounterMode, an image is 34.7 TFLOP (U-Net 0.80 TFLOP per evaluation x 2 for CFG x 20 steps, VAE
decode 2.5 TFLOP), 4,600 times the tiny run's 7.5 GFLOP; at the ~0.08 TFLOP/s one Zen 4 thread reached in
bench/unet_step.py that is ~7 minutes per image per process, so `--rounds 3 --threads 1` takes about 45 minutes on
the CPU plus ~3 minutes of equality and ~2 minutes writing the weights (scaling the tiny run's own time by the FLOPs
ratio would overestimate: at tiny size the time is mostly Python overhead, not arithmetic).

    python bench/pretrained.py --dir /tmp/sd-random            # full size: ~4.3 GB of disk, ~50 min at 1 thread
    python bench/pretrained.py --architecture tiny_sd_v1       # the same code at a few million parameters
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from torch.utils.flop_counter import FlopCounterMode

from load_memory import empty_models, memory_kib  # bench/load_memory.py: models on no memory, /proc/self/status
from sdlib.diffusion.samplers import ImageRNG
from sdlib.generate import Prompts, generate
from sdlib.io import atomic_dir
from sdlib.ldm import LatentDiffusion
from sdlib.models.vae import AutoencoderKL
from sdlib.pretrained.export import write_diffusers_configs
from sdlib.pretrained.load import load_pretrained
from sdlib.pretrained.sd_v1 import ARCHITECTURES, SDConfig

app = typer.Typer(add_completion=False)
IMPLS = ("sdlib", "diffusers")  # sampling order within a round; diffusers is the baseline
PROMPT = "a photograph of an astronaut riding a horse"
SEED = 0
TIMESTEP = 500.0  # the U-Net equality's timestep, mid-schedule
SAMPLER, SCHEDULE = "dpmpp_2m", "discrete"
# diffusers' DPMSolverMultistepScheduler as sdlib's dpmpp_2m on the `discrete` schedule, as
# tests/test_pretrained.py::_schedulers sets it (test_bench checks they agree): SD's betas, `trailing` timesteps,
# first order on the last step, ending at sigma 0. It starts from VP latents x_T / sqrt(1 + sigma_max^2).
DPMPP_2M = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
            "algorithm_type": "dpmsolver++", "solver_order": 2, "timestep_spacing": "trailing",
            "final_sigmas_type": "zero", "lower_order_final": True}
GIB = 2**30


# --- the weights -----------------------------------------------------------------------------------------------------

def write_random_folder(cfg: SDConfig, out: Path) -> Path:
    """A diffusers folder of `cfg`'s architecture with weights as diffusers and transformers initialise them."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    model, vae = empty_models(cfg)  # for the config files only
    with atomic_dir(out) as tmp:
        write_diffusers_configs(model, vae, tmp)
        torch.manual_seed(0)  # the init draws from the global RNG; this script owns its process
        for part, cls in (("unet", UNet2DConditionModel), ("vae", DiffusersVAE)):
            print(f"initialising and writing {part}", file=sys.stderr)
            cls.from_config(cls.load_config(tmp / part)).save_pretrained(tmp / part)
        print("initialising and writing text_encoder", file=sys.stderr)
        CLIPTextModel(CLIPTextConfig.from_pretrained(tmp / "text_encoder")).save_pretrained(tmp / "text_encoder")
    return out


def tflop_per_image(cfg: SDConfig, steps: int) -> float:
    """FLOPs of one text-to-image run, counted on the meta device (no memory, no arithmetic): prompt and "" through
    the text encoder, `steps` U-Net evaluations on the CFG batch of 2, one VAE decode."""
    h, w = cfg.latent_hw
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        model = LatentDiffusion(unet=cfg.unet, text=cfg.text, diffusion=cfg.diffusion, latent_hw=cfg.latent_hw)
        vae = AutoencoderKL(cfg.vae)
        model.encode_text(torch.zeros(2, cfg.text.max_length, dtype=torch.long))
        text = counter.get_total_flops()
        model.unet(torch.randn(2, 4, h, w), torch.full((2,), TIMESTEP), torch.randn(2, 77, cfg.unet.context_dim))
        unet = counter.get_total_flops() - text
        vae.decode(torch.randn(1, 4, h, w))
        decode = counter.get_total_flops() - text - unet
    return (text + steps * unet + decode) / 1e12


# --- one process each ------------------------------------------------------------------------------------------------

def difference(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    diff, scale = float((ours - theirs).abs().max()), float(theirs.abs().max())
    return {"shape": list(theirs.shape), "max_abs_diff": diff, "max_abs": scale, "rel_diff": diff / scale}


@torch.no_grad()
def equality(folder: Path) -> dict[str, dict]:
    """sdlib's and diffusers' U-Net, VAE decoder and text encoder on the same inputs, by case."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    sd = load_pretrained(folder)
    (h, w), g = sd.model.latent_hw, torch.Generator().manual_seed(SEED)
    x, z = torch.randn(2, 4, h, w, generator=g), torch.randn(1, 4, h, w, generator=g)
    ctx = torch.randn(2, 77, sd.model.unet_args.context_dim, generator=g)
    t = torch.full((2,), TIMESTEP)
    out = {}
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    out["unet"] = difference(sd.model.unet(x, t, ctx), unet(x, t, encoder_hidden_states=ctx).sample)
    del unet
    vae = DiffusersVAE.from_pretrained(folder / "vae").eval()
    out["vae_decode"] = difference(sd.vae.decode(z), vae.decode(z).sample)
    del vae
    text = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    prompts = Prompts.from_tokenizer(sd.tokenizer, sd.model)
    ids = prompts.ids([PROMPT, ""])
    out["text_encoder"] = difference(prompts.context([PROMPT, ""], "cpu"), text(input_ids=ids).last_hidden_state)
    return out


@torch.no_grad()
def sample(impl: str, folder: Path, steps: int, guidance: float) -> tuple[torch.Tensor, float, float]:
    """One image of PROMPT from SEED's latents: (image (3, H, W) in [0, 1], seconds loading, seconds sampling)."""
    start = time.perf_counter()
    if impl == "sdlib":
        sd = load_pretrained(folder)
        prompts = Prompts.from_tokenizer(sd.tokenizer, sd.model)
        loaded = time.perf_counter()
        images = generate(sd.model, sd.vae, prompts, [PROMPT], [SEED], sampler=SAMPLER, steps=steps,
                          guidance=guidance, schedule=SCHEDULE)
        images = (images + 1) / 2
    else:
        from diffusers import AutoencoderKL as DiffusersVAE
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        scheduler = DPMSolverMultistepScheduler(**DPMPP_2M)
        pipe = StableDiffusionPipeline(
            vae=DiffusersVAE.from_pretrained(folder / "vae"),
            unet=UNet2DConditionModel.from_pretrained(folder / "unet"),
            text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
            tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"), scheduler=scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        loaded = time.perf_counter()
        h = w = pipe.unet.config.sample_size  # SD v1 is square
        scheduler.set_timesteps(steps)
        sigma_max = scheduler.sigmas[0]
        # sdlib's x_T = noise * sigma_max (VE); the pipeline takes VP latents and scales them by init_noise_sigma = 1
        latents = ImageRNG([SEED]).randn((4, h, w)) * sigma_max / (1 + sigma_max**2) ** 0.5
        images = pipe(prompt=[PROMPT], negative_prompt=[""], num_inference_steps=steps, guidance_scale=guidance,
                      latents=latents, output_type="pt", height=8 * h, width=8 * w).images
    done = time.perf_counter()
    return images[0], loaded - start, done - loaded


def worker(task: str, folder: Path, image: Optional[Path], steps: int, guidance: float) -> dict:
    if task == "equality":
        return equality(folder)
    picture, load_s, seconds = sample(task, folder, steps, guidance)
    torch.save(picture, image)
    return {"load_s": load_s, "s_per_image": seconds, "peak_rss_gib": memory_kib("VmHWM") * 1024 / GIB,
            "diffusers_imported": "diffusers" in sys.modules}


def run_worker(task: str, folder: Path, threads: int, *extra: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", task, "--folder", str(folder), "--threads",
                          str(threads), *extra], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{task} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


@app.command()
def main(
    architecture: Annotated[str, typer.Option(help=f"one of {', '.join(ARCHITECTURES)}")] = "sd_v1",
    dir: Annotated[Optional[Path], typer.Option(help="where to keep the random weights, DIR/random-<architecture>: "
                                                     "written if missing, reused if present (default: a temporary "
                                                     "folder, removed at the end)")] = None,
    rounds: Annotated[int, typer.Option(min=1, help="sampling processes per implementation, alternating")] = 3,
    steps: Annotated[int, typer.Option(min=1, help="sampling steps (dpmpp_2m)")] = 20,
    guidance: Annotated[float, typer.Option(help="classifier-free guidance scale")] = 7.5,
    threads: Annotated[int, typer.Option(min=1, help="torch CPU threads of each process")] = 1,
    worker_task: Annotated[Optional[str], typer.Option("--worker", hidden=True)] = None,
    folder: Annotated[Optional[Path], typer.Option(hidden=True)] = None,
    image: Annotated[Optional[Path], typer.Option(hidden=True)] = None,
) -> None:
    """Equality, seconds per image and peak memory of SD v1.5's architecture, sdlib vs diffusers; one JSON line each.

    Random float32 weights (diffusers' init) in a diffusers folder; U-Net, VAE decode and text encoder compared on the
    same inputs; then 512 x 512 text-to-image, 20 steps of dpmpp_2m, CFG 7.5, batch 1, sdlib and diffusers in
    alternating fresh processes: median seconds and peak RSS (VmHWM) per image, ratios sdlib / diffusers, and the
    max abs difference of the two images. Full size: 4.3 GB of disk and, estimated from FLOPs, ~50 minutes at
    --threads 1. --architecture tiny_sd_v1: the same code at a few million parameters, about a minute.
    """
    torch.set_num_threads(threads)
    if worker_task is not None:
        print(json.dumps(worker(worker_task, folder, image, steps, guidance)))
        return
    if architecture not in ARCHITECTURES:
        raise typer.BadParameter(f"must be one of {', '.join(ARCHITECTURES)}", param_hint="--architecture")
    cfg = ARCHITECTURES[architecture]
    if dir is not None:
        dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dir) as tmp:
        weights = (dir or Path(tmp)) / f"random-{architecture}"
        if not weights.is_dir():
            print(f"writing random weights to {weights}", file=sys.stderr)
            write_random_folder(cfg, weights)
        head = {"architecture": architecture, "dtype": "float32", "threads": threads}
        print("equality", file=sys.stderr)
        for case, result in run_worker("equality", weights, threads).items():
            print(json.dumps({**head, "case": case, **result}), flush=True)
        runs: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
        for r in range(rounds):
            for impl in IMPLS:
                print(f"round {r + 1}/{rounds}: {impl}", file=sys.stderr)
                path = Path(tmp) / f"{impl}-{r}.pt"
                runs[impl].append({**run_worker(impl, weights, threads, "--image", str(path), "--steps", str(steps),
                                                "--guidance", str(guidance)), "image": torch.load(path)})
        first = {impl: runs[impl][0]["image"] for impl in IMPLS}
        tflop = tflop_per_image(cfg, steps)
        for impl in IMPLS:
            seconds = [run["s_per_image"] for run in runs[impl]]
            rss = [run["peak_rss_gib"] for run in runs[impl]]
            print(json.dumps({
                **head, "case": "sampling", "impl": impl, "sampler": SAMPLER, "schedule": SCHEDULE, "steps": steps,
                "guidance": guidance, "image_hw": list(first[impl].shape[1:]), "rounds": rounds,
                "s_per_image": statistics.median(seconds), "s_per_image_rounds": seconds,
                "load_s": statistics.median(run["load_s"] for run in runs[impl]),
                "peak_rss_gib": statistics.median(rss), "tflop_per_image": tflop,
                "tflop_per_s": tflop / statistics.median(seconds),
                "diffusers_imported": any(run["diffusers_imported"] for run in runs[impl]),
                "baseline": "diffusers",
                "ratio": median_ratio(seconds, [run["s_per_image"] for run in runs["diffusers"]]),
                "rss_ratio": median_ratio(rss, [run["peak_rss_gib"] for run in runs["diffusers"]]),
                "image_max_abs_diff": float((first[impl] - first["diffusers"]).abs().max()),
                "image_repeat_diff": max(float((run["image"] - first[impl]).abs().max()) for run in runs[impl]),
            }), flush=True)


if __name__ == "__main__":
    app()
