"""Sample grids drawn while the U-Net trains: at the epochs asked, a row per prompt, from fixed seeds; training is
bit-identical with them on or off (weights, EMA, global RNG); a resumed run keeps the grids drawn before it."""
import numpy as np
import pytest
import torch
from PIL import Image

from sdlib.config import TrainSamplesConfig
from sdlib.data.latents import Latents
from sdlib.evaluation.visualize import grid_layout
from sdlib.ldm import DiffusionArgs, LatentDiffusion
from sdlib.models.text import TextEncoderArgs, write_clip_tokenizer_files
from sdlib.models.unet import UNetArgs
from sdlib.models.vae import AutoencoderKL, VAEArgs, save_vae
from sdlib.training.grids import TrainingGrids, grid_name, row_label
from sdlib.training.latent_diffusion import LatentDiffusionLoss
from sdlib.training.loop import EMA, Batches, Checkpointer, adamw, fit

PROMPTS = ("1", "seven")
N = 3  # images per prompt
STEPS_PER_EPOCH = 2


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A CLIP tokenizer folder and a random VAE decoding 4x4 latents to 8x8 images."""
    root = tmp_path_factory.mktemp("assets")
    write_clip_tokenizer_files(root / "tok")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        save_vae(root / "vae.safetensors", AutoencoderKL(VAEArgs(in_channels=1, base_channels=8, channel_mult=(1, 2))))
    return root


def train(assets, folder, every: int, epochs: int = 4, stop_at: int | None = None, written: list | None = None):
    """A tiny text-to-latent model trained by `fit`, as train_unet trains it, with grids every `every` epochs (0: none);
    `stop_at` interrupts the run at that step (a kill between checkpoints). Returns (model, EMA, grids)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    n = 32 * STEPS_PER_EPOCH
    latents = Latents(torch.randn(n, 4, 4, 4, generator=gen), 0.1 * torch.rand(n, 4, 4, 4, generator=gen),
                      torch.zeros(n, dtype=torch.long), scale_factor=0.8)
    text = TextEncoderArgs(hidden_size=16, num_layers=1, num_heads=2, max_length=8)
    model = LatentDiffusion(unet=UNetArgs(in_channels=4, context_dim=16, model_channels=8, channel_mult=(1, 2),
                                          num_heads=2), text=text, diffusion=DiffusionArgs(), latent_hw=(4, 4))
    caption_ids = torch.randint(0, 100, (6, text.max_length), generator=gen)
    table = torch.randint(1, 6, (n, 2), generator=gen)
    loss = LatentDiffusionLoss(model, latents, caption_ids, table, torch.full((n,), 2),
                               batches=Batches(n, 32, seed=0, device=torch.device("cpu")), cond_drop=0.1)

    def loss_fn(step, g):
        if step == stop_at:
            raise KeyboardInterrupt
        return loss(step, g)

    ema = EMA(model, 0.9)
    cfg = TrainSamplesConfig(every=every, prompts=PROMPTS, n_per_prompt=N, sampler="euler", steps=3, batch_size=4)
    grids = TrainingGrids(cfg, model=model, ema=ema, vae=assets / "vae.safetensors", tokenizer=assets / "tok",
                          epochs=epochs, folder=folder / "grids",
                          on_write=(written.append if written is not None else lambda path: None))
    fit(model=model, loss_fn=loss_fn, optimizer=adamw(model.parameters(), 3e-3, torch.device("cpu")),
        total_steps=epochs * STEPS_PER_EPOCH, steps_per_epoch=STEPS_PER_EPOCH, seed=0, device=torch.device("cpu"),
        checkpointer=Checkpointer(folder / "ckpt.pt", "a"), checkpoint_every=3, ema=ema,
        on_epoch=lambda row: grids(row["epoch"]), extra_state={"grids": grids})
    return model, ema, grids


def test_grids_at_every_nth_epoch_and_the_last_a_row_per_prompt(assets, tmp_path):
    _, _, grids = train(assets, tmp_path, every=2, epochs=5)
    assert sorted(p.name for p in (tmp_path / "grids").iterdir()) == [grid_name(e) for e in (2, 4, 5)]
    assert grids.paths() == [tmp_path / "grids" / grid_name(e) for e in (2, 4, 5)]
    frames = grids.frames[4]
    assert frames.shape == (len(PROMPTS) * N, 1, 8, 8) and frames.dtype == torch.uint8
    assert not torch.equal(grids.frames[2], frames)  # the weights moved on
    assert torch.equal(grid_frames(tmp_path / "grids" / grid_name(4), list(PROMPTS), N, (8, 8)), frames)


def grid_frames(path, prompts: list[str], n: int, hw: tuple[int, int]) -> torch.Tensor:
    """The frames a grid PNG shows, (len(prompts) * n, 1, H, W) uint8 row by row: prompt r's image c at row r, column c
    (grayscale grids)."""
    image = np.asarray(Image.open(path))
    layout = grid_layout(len(prompts), n, hw, 1, [row_label(p) for p in prompts], 1)
    assert image.shape[1] == layout.width  # the height grows with the title's lines
    top = image.shape[0] - layout.height  # the title's extra lines
    frames = []
    for r in range(len(prompts)):
        for c in range(n):
            left, y, right, bottom = layout.frame_box(r, c)
            frames.append(image[top + y:top + bottom:layout.scale, left:right:layout.scale])  # (H, W): 1 px each
    return torch.from_numpy(np.stack(frames))[:, None]


def test_each_grid_draws_the_same_noise(assets, tmp_path):
    """Fixed seeds: the same weights give the same grid at any epoch, however many grids came before."""
    _, _, grids = train(assets, tmp_path, every=1, epochs=2)
    grids(4)  # the weights of epoch 2, drawn again as if at epoch 4
    assert torch.equal(grids.frames[4], grids.frames[2])


def test_training_is_bit_identical_with_grids_on_or_off(assets, tmp_path):
    off_model, off_ema, _ = train(assets, tmp_path / "off", every=0)
    off_rng = torch.get_rng_state()
    on_model, on_ema, grids = train(assets, tmp_path / "on", every=1)
    assert len(grids.paths()) == 4
    assert torch.equal(torch.get_rng_state(), off_rng)  # the global RNG was not drawn from
    off, on = off_model.state_dict(), on_model.state_dict()
    assert [k for k in off if not torch.equal(off[k], on[k])] == []
    assert all(torch.equal(a, b) for a, b in zip(off_ema.shadow, on_ema.shadow))
    assert list((tmp_path / "off" / "grids").iterdir()) == []  # off: an empty folder (a DVC output all the same)


def test_resume_rewrites_the_grids_drawn_before_and_redraws_the_rest_identically(assets, tmp_path):
    _, _, ref = train(assets, tmp_path / "ref", every=1)
    with pytest.raises(KeyboardInterrupt):  # killed at step 5: the checkpoint of step 3 holds epoch 1's grid
        train(assets, tmp_path / "cut", every=1, stop_at=5)
    assert sorted(p.name for p in (tmp_path / "cut" / "grids").iterdir()) == [grid_name(1), grid_name(2)]
    (tmp_path / "cut" / "grids" / grid_name(1)).unlink()  # DVC deletes a stage's outputs before running it
    written = []
    _, _, resumed = train(assets, tmp_path / "cut", every=1, written=written)
    assert [p.name for p in written] == [grid_name(e) for e in (1, 2, 3, 4)]  # epoch 1 restored, then reported
    for epoch in (1, 2, 3, 4):
        assert torch.equal(resumed.frames[epoch], ref.frames[epoch]), epoch
        ref_png = (tmp_path / "ref" / "grids" / grid_name(epoch)).read_bytes()
        assert (tmp_path / "cut" / "grids" / grid_name(epoch)).read_bytes() == ref_png, epoch
