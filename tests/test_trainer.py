"""The training loop: deterministic resume (bit-identical), also of the U-Net objective on several threads; non-finite
guard, stale and malicious checkpoints."""
import os
import pickle
import re

import pytest
import torch
from torch import nn

from sdlib.data.latents import Latents
from sdlib.errors import TrainingError
from sdlib.io import fingerprint
from sdlib.ldm import DiffusionArgs, LatentDiffusion
from sdlib.models.text import VOCAB_SIZE, TextEncoderArgs
from sdlib.models.unet import UNetArgs
from sdlib.training.latent_diffusion import LatentDiffusionLoss
from sdlib.training.loop import (
    EMA,
    Batches,
    Checkpointer,
    adamw,
    batch_indices,
    epoch_permutation,
    fast_path,
    fit,
    warmup_cosine,
)

X = torch.linspace(-1, 1, 40)[:, None]
Y = 3 * X + 0.5


def run(tmp_path, total, stop_at=None, fp="a", lr=0.05, **fit_args):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, warmup=3))
    ema = EMA(model, 0.9)

    def loss_fn(step, gen):
        if stop_at is not None and step == stop_at:
            raise KeyboardInterrupt  # stands in for a kill between two checkpoints
        idx = batch_indices(len(X), 8, seed=1, step=step)
        noise = 0.01 * torch.randn(8, 1, generator=gen)
        return (model(X[idx] + noise) - Y[idx]).pow(2).mean(), {}

    fit_args = {"steps_per_epoch": 5, "checkpoint_every": 4, **fit_args}
    hist = fit(model=model, loss_fn=loss_fn, optimizer=opt, total_steps=total, seed=1, device=torch.device("cpu"),
               checkpointer=Checkpointer(tmp_path / "ckpt.pt", fp), ema=ema, scheduler=sched, **fit_args)
    return model, ema, hist


def test_resume_is_bit_identical(tmp_path):
    ref, ref_ema, ref_hist = run(tmp_path / "ref", 30)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", 30, stop_at=17)
    assert (tmp_path / "cut" / "ckpt.pt").exists()
    resumed, resumed_ema, hist = run(tmp_path / "cut", 30)
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ref_ema.shadow, resumed_ema.shadow):
        assert torch.equal(a, b)
    assert hist.rows == ref_hist.rows  # the epoch cut at step 17 is logged in full
    assert [r["epoch"] for r in hist.rows] == [1, 2, 3, 4, 5, 6]
    assert ref_hist.rows[-1]["loss"] < ref_hist.rows[0]["loss"]


def train_tiny_ldm(tmp_path, steps: int = 6) -> dict[str, torch.Tensor]:
    """A tiny U-Net and text encoder trained by `fit` on LatentDiffusionLoss, as train_unet does, on made-up latents.

    The context gradient, batch x tokens x width = 128 x 8 x 32, reaches the 32,768 elements (ATen's GRAIN_SIZE)
    from which CPU kernels split their work across threads: smaller, every kernel runs on one thread.
    """
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    n, captions = 256, 12
    latents = Latents(torch.randn(n, 4, 4, 4, generator=gen), 0.1 * torch.rand(n, 4, 4, 4, generator=gen),
                      torch.zeros(n, dtype=torch.long), scale_factor=0.8)
    text = TextEncoderArgs(hidden_size=32, num_layers=1, num_heads=2, max_length=8)
    model = LatentDiffusion(unet=UNetArgs(in_channels=4, context_dim=32, model_channels=8, channel_mult=(1, 2),
                                          num_heads=2), text=text, diffusion=DiffusionArgs(), latent_hw=(4, 4))
    caption_ids = torch.randint(0, VOCAB_SIZE, (captions, text.max_length), generator=gen)
    table = torch.randint(1, captions, (n, 2), generator=gen)
    loss_fn = LatentDiffusionLoss(model, latents, caption_ids, table, torch.full((n,), 2),
                                  batches=Batches(n, 128, seed=0, device=torch.device("cpu")), cond_drop=0.1)
    fit(model=model, loss_fn=loss_fn, optimizer=adamw(model.parameters(), 1e-3, torch.device("cpu")),
        total_steps=steps, steps_per_epoch=2, seed=0, device=torch.device("cpu"),
        checkpointer=Checkpointer(tmp_path / "ckpt.pt", "a"), checkpoint_every=steps)
    return model.state_dict()


def test_ldm_training_on_two_threads_is_bit_identical(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the default on a 2-core machine; a scatter-add with atomics differed between runs
    try:
        a, b = train_tiny_ldm(tmp_path / "a"), train_tiny_ldm(tmp_path / "b")
    finally:
        torch.set_num_threads(threads)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_other_params_do_not_resume(tmp_path, capsys):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, 30, stop_at=9, fp="a")
    run(tmp_path, 30, fp="b")
    assert "made with other params or inputs; starting fresh" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path):
    with pytest.raises(TrainingError, match=r"non-finite loss .* at step \d+"):
        run(tmp_path, 200, lr=1e6)  # diverges
    # the error message points at the last good checkpoint, which is still loadable
    state = Checkpointer(tmp_path / "ckpt.pt", "a").load()
    assert state is not None and all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize("log_every", [1, 7, 1000])
def test_non_finite_guard_names_the_first_bad_step_whatever_log_every(tmp_path, log_every):
    # one epoch and no checkpoint: the loss is read only every `log_every` steps and at the end
    with pytest.raises(TrainingError) as err:
        run(tmp_path, 60, lr=1e6, steps_per_epoch=60, checkpoint_every=1000, log_every=log_every)
    first_bad = int(re.search(r"at step (\d+)", str(err.value)).group(1))
    with pytest.raises(TrainingError, match=rf"at step {first_bad};"):
        run(tmp_path / "every", 60, lr=1e6, steps_per_epoch=60, checkpoint_every=1000, log_every=1)
    assert 0 < first_bad < 60


def test_checkpoint_never_holds_non_finite_weights(tmp_path):
    model = nn.Linear(1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)

    def loss_fn(step, gen):  # always 0, but the first gradient is infinite and makes the weights NaN
        return (model.weight - model.weight.detach()).sqrt().nan_to_num(0.0).sum(), {}

    with pytest.raises(TrainingError, match=r"non-finite weights after step 3; the last good checkpoint"):
        fit(model=model, loss_fn=loss_fn, optimizer=opt, total_steps=10, steps_per_epoch=10, seed=0,
            device=torch.device("cpu"), checkpointer=Checkpointer(tmp_path / "ckpt.pt", "a"), checkpoint_every=4)
    assert not (tmp_path / "ckpt.pt").exists()


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_malicious_checkpoint_is_not_executed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "ckpt.pt", "wb") as f:
        pickle.dump({"fingerprint": "a", "model": Payload()}, f)
    assert Checkpointer(tmp_path / "ckpt.pt", "a").load() is None
    assert not (tmp_path / "PWNED").exists()
    assert "ignoring unreadable checkpoint" in capsys.readouterr().err


def test_data_order_is_a_permutation_per_epoch():
    seen = torch.cat([batch_indices(20, 5, seed=3, step=s) for s in range(4)])
    assert sorted(seen.tolist()) == list(range(20))
    assert torch.equal(epoch_permutation(20, 3, 1), epoch_permutation(20, 3, 1))
    assert not torch.equal(epoch_permutation(20, 3, 1), epoch_permutation(20, 3, 2))


def test_fingerprint_sees_file_content(tmp_path):
    f = tmp_path / "data.bin"
    f.write_bytes(b"abc")
    before = fingerprint({"lr": 1}, files=(f,))
    f.write_bytes(b"abd")
    assert fingerprint({"lr": 1}, files=(f,)) != before != fingerprint({"lr": 2}, files=(f,))


def test_warmup_cosine_endpoints():
    f = warmup_cosine(100, warmup=10, final_frac=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)


def test_fast_path_compiles_in_place_in_the_mode_asked(monkeypatch):
    seen = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kwargs: seen.append((type(self).__name__, kwargs)))
    amp = fast_path([nn.Linear(2, 2), nn.Conv2d(1, 1, 1)], torch.device("cpu"), "auto", True, "reduce-overhead")
    assert amp is None  # auto is fp32 on the CPU
    assert seen == [("Linear", {"mode": "reduce-overhead"}), ("Conv2d", {"mode": "reduce-overhead"})]
    assert fast_path([nn.Linear(2, 2)], torch.device("cpu"), "bf16", False) is torch.bfloat16 and len(seen) == 2


def test_a_training_error_is_one_line_for_the_user(capsys):
    """TrainingError is a user error: the stages print it as one `error:` line and exit 2, without a traceback."""
    import typer

    from sdlib.cli import user_errors

    with pytest.raises(typer.Exit) as exit_info:
        with user_errors():
            raise TrainingError("non-finite loss (nan) at step 7; the last good checkpoint is kept at ckpt.pt")
    assert exit_info.value.exit_code == 2
    assert capsys.readouterr().err == "error: non-finite loss (nan) at step 7; the last good checkpoint is kept at ckpt.pt\n"


def test_lognormal_timesteps_follow_ln_sigma_normal_and_uniform_keeps_ddpms_draws():
    from sdlib.diffusion.denoisers import Denoiser
    from sdlib.diffusion.schedules import alphas_cumprod, betas
    from sdlib.training.latent_diffusion import LOGNORMAL, draw_timesteps

    d = Denoiser(lambda x, t, c: x, alphas_cumprod(betas("scaled_linear", 1000)).float())
    t = draw_timesteps(d, "lognormal", 20_000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) <= 999
    # scaled_linear's sigmas span [0.029, 14.6], ln in [-3.5, 2.7]: about 1% of N(-0.5, 1.2) is clamped, so the
    # median and the quartiles (ln sigma = mean -+ 0.674 std) are those of the normal up to the rounding to t
    ln_sigma = d.train_sigmas[t].log()
    mean, std = LOGNORMAL
    q = torch.quantile(ln_sigma, torch.tensor([0.25, 0.5, 0.75]))
    torch.testing.assert_close(q, torch.tensor([mean - 0.674 * std, mean, mean + 0.674 * std]), atol=0.05, rtol=0)
    # uniform is DDPM's randint, the same draws as before the option existed
    g = torch.Generator().manual_seed(3)
    assert torch.equal(draw_timesteps(d, "uniform", 64, g, torch.device("cpu")),
                       torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3)))
