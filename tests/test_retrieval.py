"""Caption retrieval: analytic ranks and scores, the retrieval set the sample stage draws, evaluate scoring it in the
classifier's and in pixel space, and data without classes (train_classifier's placeholder)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sdlib.data.images import from_uint8, save_png, to_uint8
from sdlib.data.splits import load_split
from sdlib.errors import CheckpointError, DataError
from sdlib.evaluation.report import render
from sdlib.evaluation.retrieval import (pick_captions, pixel_features, read_retrieval_manifest, retrieval_ranks,
                                       retrieval_scores)
from sdlib.models.classifier import embed, is_trained, load_classifier, save_no_classifier
from stages.evaluate import app as evaluate_app
from stages.sample import app as sample_app
from stages.train_classifier import app as train_classifier_app
from test_data import assert_user_error

runner = CliRunner()
N = 8


def one_hot(idx: list[int], n: int = N) -> torch.Tensor:
    return torch.eye(n)[idx]


# ------------------------------------------------------------------------------------------------------ the math

def test_samples_equal_to_their_images_are_all_found_first():
    gallery = torch.randn(20, 16, generator=torch.Generator().manual_seed(0))
    ranks = retrieval_ranks(gallery.clone(), gallery)
    assert ranks.tolist() == [0] * 20
    assert retrieval_scores(ranks) == {"retrieval_top1": 1.0, "retrieval_chance_top1": 1 / 20,
                                       "retrieval_top5": 1.0, "retrieval_chance_top5": 5 / 20}


def test_a_known_permutation_gives_its_fixed_points():
    """Sample i looks exactly like image sigma(i): found first only where sigma(i) = i; elsewhere its own image ties
    with every other (centred one-hots are equally far apart), and ties count against it: rank N - 1."""
    sigma = [0, 2, 1, 3, 5, 4, 7, 6]  # fixed points 0 and 3
    ranks = retrieval_ranks(one_hot(sigma), one_hot(list(range(N))))
    assert ranks.tolist() == [0, N - 1, N - 1, 0, N - 1, N - 1, N - 1, N - 1]
    scores = retrieval_scores(ranks)
    assert scores["retrieval_top1"] == 2 / N and scores["retrieval_top5"] == 2 / N


def test_own_image_second_most_similar_is_a_top5_hit():
    """Sample i = image sigma(i) + half of image i: its own image ranks second (1) unless sigma(i) = i."""
    sigma = [0, 2, 1, 3, 5, 4, 7, 6]
    ranks = retrieval_ranks(one_hot(sigma) + 0.5 * one_hot(list(range(N))), one_hot(list(range(N))))
    assert ranks.tolist() == [0, 1, 1, 0, 1, 1, 1, 1]
    scores = retrieval_scores(ranks)
    assert scores["retrieval_top1"] == 2 / N and scores["retrieval_top5"] == 1.0


def test_a_caption_blind_model_scores_chance():
    """One image for every caption finds exactly one test image (the one it resembles most) at each rank: top-k is k/N.
    Drawn as the mean image, it is as like every image as another (all tie) and finds none."""
    gallery = torch.randn(N, 5, generator=torch.Generator().manual_seed(1))
    ranks = retrieval_ranks(torch.randn(1, 5).expand(N, 5), gallery)
    assert sorted(ranks.tolist()) == list(range(N))
    scores = retrieval_scores(ranks)
    assert scores["retrieval_top1"] == 1 / N and scores["retrieval_top5"] == 5 / N
    mean_image = torch.full((N, N), 1 / N)  # the mean of the one-hots, exactly: no direction of its own
    assert retrieval_ranks(mean_image, one_hot(list(range(N)))).tolist() == [N - 1] * N


def test_top5_is_at_least_top1_and_chance_caps_at_one():
    gen = torch.Generator().manual_seed(2)
    gallery = torch.randn(30, 8, generator=gen)
    scores = retrieval_scores(retrieval_ranks(gallery + torch.randn(30, 8, generator=gen), gallery))
    assert 0.0 < scores["retrieval_top1"] <= scores["retrieval_top5"] < 1.0
    assert retrieval_scores(torch.tensor([0, 2, 1]))["retrieval_chance_top5"] == 1.0


def test_ranks_ignore_what_every_image_shares():
    """Features centred on the real images' mean: adding one vector to every feature (a background, a ReLU offset)
    changes no rank."""
    gen = torch.Generator().manual_seed(3)
    gallery = torch.randn(30, 8, generator=gen, dtype=torch.float64)
    queries = gallery + torch.randn(30, 8, generator=gen, dtype=torch.float64)
    offset = 20 * torch.randn(8, generator=gen, dtype=torch.float64)
    assert torch.equal(retrieval_ranks(queries + offset, gallery + offset), retrieval_ranks(queries, gallery))


def test_ranks_need_matching_shapes():
    with pytest.raises(ValueError, match="same shape"):
        retrieval_ranks(torch.zeros(3, 4), torch.zeros(4, 4))


def test_pixel_features_are_8x8_block_means():
    x = torch.randn(2, 3, 16, 16)
    expected = x.view(2, 3, 8, 2, 8, 2).mean((3, 5)).flatten(1)  # (2, 3 * 64)
    assert torch.allclose(pixel_features(x), expected, atol=1e-6)


def test_pick_captions_takes_the_first_image_of_each_caption():
    captions = [["a"], ["b", "x"], ["a", "y"], ["c"], ["b"], ["d"]]
    assert pick_captions(captions, 3) == [0, 1, 3]
    assert pick_captions(captions, 0) == []
    with pytest.raises(DataError, match="evaluate.retrieval is 5 but the test split has 4 image"):
        pick_captions(captions, 5)


# --------------------------------------------------------------------------------------------------- the stages

@pytest.fixture
def digits(tmp_path, noise_digits) -> Path:
    return noise_digits(tmp_path / "processed", 40, 20, channels=1, size=8)


def sample_args(tiny_models: Path, params: Path, data: Path, out: Path) -> list[str]:
    return ["--params", str(params), "--unet", str(tiny_models / "unet"), "--vae", str(tiny_models / "vae.safetensors"),
            "--out", str(out / "samples"), "--data", str(data), "--retrieval", str(out / "retrieval"),
            "--device", "cpu"]


def test_sample_draws_one_image_per_distinct_test_caption(tmp_path, tiny_models, params_file, digits):
    params = params_file(sample={"prompts": ["3"], "n_per_prompt": 2, "steps": 2, "seed": 7},
                         evaluate={"retrieval": 4})
    done = runner.invoke(sample_app, sample_args(tiny_models, params, digits, tmp_path))
    assert done.exit_code == 0, done.output
    manifest = pd.read_csv(tmp_path / "retrieval" / "manifest.csv", dtype=str)
    assert list(manifest.columns) == ["index", "caption", "seed", "path"]
    # noise digits are labelled 0..9 in turn, each image's first caption is its digit
    assert manifest["index"].tolist() == ["0", "1", "2", "3"] and manifest["caption"].tolist() == ["0", "1", "2", "3"]
    assert manifest["seed"].tolist() == ["7", "8", "9", "10"]
    with Image.open(tmp_path / "retrieval" / "grid.png") as grid:
        assert grid.size == (2 + 4 * 10, 2 + 2 * 10)  # 4 columns of 8-pixel images, real over sample, 2-pixel gaps
    test = load_split(digits, "test")
    assert read_retrieval_manifest(tmp_path / "retrieval" / "manifest.csv", test.captions, 4)[0] == [0, 1, 2, 3]

    params = params_file(sample={"prompts": ["3"], "n_per_prompt": 2, "steps": 2}, evaluate={"retrieval": 11})
    assert_user_error(runner.invoke(sample_app, sample_args(tiny_models, params, digits, tmp_path / "b")),
                      "evaluate.retrieval is 11 but the test split has 10 image(s) with distinct captions")
    assert not (tmp_path / "b").exists()  # before any drawing


def test_retrieval_off_writes_an_empty_manifest(tmp_path, tiny_models, params_file, digits):
    params = params_file(sample={"prompts": ["3"], "n_per_prompt": 1, "steps": 1})
    done = runner.invoke(sample_app, sample_args(tiny_models, params, digits, tmp_path))
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in (tmp_path / "retrieval").iterdir()) == ["manifest.csv"]
    assert pd.read_csv(tmp_path / "retrieval" / "manifest.csv").empty


def write_retrieval_set(folder: Path, images: torch.Tensor, indices: list[int], captions: list[str]) -> None:
    """A retrieval folder by hand: `images` (N, C, S, S) in [-1, 1] as the samples of test images `indices`."""
    folder.mkdir(parents=True)
    rows = []
    for k, (img, i, c) in enumerate(zip(to_uint8(images), indices, captions)):
        save_png(folder / f"{k:04d}.png", img)
        rows.append((i, c, k, str(folder / f"{k:04d}.png")))
    pd.DataFrame(rows, columns=["index", "caption", "seed", "path"]).to_csv(folder / "manifest.csv", index=False)


def evaluate(tmp_path: Path, params: Path, data: Path, classifier: Path, vae: Path):
    return runner.invoke(evaluate_app, ["--params", str(params), "--samples", str(tmp_path / "samples"),
                                        "--retrieval", str(tmp_path / "retrieval"), "--data", str(data),
                                        "--classifier", str(classifier), "--vae", str(vae),
                                        "--out", str(tmp_path / "metrics.json"),
                                        "--confusion", str(tmp_path / "confusion.csv"), "--device", "cpu"])


@pytest.mark.parametrize("space", ["classifier", "pixels"])
def test_evaluate_finds_every_real_image_drawn_as_its_own_sample(tmp_path, tiny_models, params_file, digits, space):
    """The retrieval set is the test images themselves (a perfect model): top-1 is 1 in either space; shifted by one
    (every sample shows the next image), top-1 is 0."""
    params = params_file(sample={"prompts": ["3", "5"], "n_per_prompt": 6, "steps": 1},
                         classifier={"epochs": 1, "batch_size": 16},
                         evaluate={"retrieval": 10, "retrieval_space": space, "seed_sets": 1})
    classifier = tmp_path / "classifier.safetensors"
    done = runner.invoke(train_classifier_app, ["--params", str(params), "--data", str(digits), "--out",
                                                str(classifier), "--metrics", str(tmp_path / "c.json")])
    assert done.exit_code == 0, done.output
    args = sample_args(tiny_models, params_file(sample={"prompts": ["3", "5"], "n_per_prompt": 6, "steps": 1}),
                       digits, tmp_path)
    assert runner.invoke(sample_app, args).exit_code == 0
    test = load_split(digits, "test")
    picked = [13, 4, 15, 6, 17, 8, 19, 0, 11, 2]  # distinct digits, not the first ten test images
    captions = [test.captions[i][0] for i in picked]
    shutil.rmtree(tmp_path / "retrieval")  # the stage's, empty (evaluate.retrieval is 0 in its params)
    write_retrieval_set(tmp_path / "retrieval", test.images[picked], picked, captions)
    done = evaluate(tmp_path, params, digits, classifier, tiny_models / "vae.safetensors")
    assert done.exit_code == 0, done.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["retrieval_space"] == space and metrics["retrieval_n"] == 10
    assert (metrics["retrieval_top1"], metrics["retrieval_top5"]) == (1.0, 1.0)
    assert (metrics["retrieval_chance_top1"], metrics["retrieval_chance_top5"]) == (0.1, 0.5)
    assert "fid" in metrics and "cond_acc" in metrics

    shutil.rmtree(tmp_path / "retrieval")
    nxt = picked[1:] + picked[:1]
    write_retrieval_set(tmp_path / "retrieval", test.images[nxt], picked, captions)
    done = evaluate(tmp_path, params, digits, classifier, tiny_models / "vae.safetensors")
    assert done.exit_code == 0, done.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["retrieval_top1"] == 0.0
    # and the top-5 of the space asked for (each space ranks the next image's neighbours its own way)
    model, _ = load_classifier(classifier)
    features = ((lambda x: embed(model, from_uint8(to_uint8(x)), "cpu")) if space == "classifier" else
                (lambda x: pixel_features(from_uint8(to_uint8(x)))))
    expected = retrieval_scores(retrieval_ranks(features(test.images[nxt]), features(test.images[picked])))
    assert metrics["retrieval_top5"] == pytest.approx(expected["retrieval_top5"], abs=1e-5)


def test_evaluate_checks_the_retrieval_set_against_the_data(tmp_path, tiny_models, params_file, digits):
    params = params_file(sample={"prompts": ["3"], "n_per_prompt": 3, "steps": 1}, evaluate={"retrieval": 3})
    assert runner.invoke(sample_app, sample_args(tiny_models, params, digits, tmp_path)).exit_code == 0
    classifier = tmp_path / "none.safetensors"
    save_no_classifier(classifier, [])
    test = load_split(digits, "test")
    manifest = tmp_path / "retrieval" / "manifest.csv"
    table = pd.read_csv(manifest, dtype=str)
    table.loc[1, "caption"] = "7"
    table.to_csv(manifest, index=False)
    with pytest.raises(DataError, match="line 3: test image 1 has not the caption '7'"):
        read_retrieval_manifest(manifest, test.captions, 3)
    with pytest.raises(DataError, match="3 sample\\(s\\) but evaluate.retrieval is 4"):
        read_retrieval_manifest(manifest, test.captions, 4)
    # the digits have classes: a placeholder classifier is stale
    assert_user_error(evaluate(tmp_path, params, digits, classifier, tiny_models / "vae.safetensors"),
                      "the placeholder of data without classes, but")


# ------------------------------------------------------------------------------------------ data without classes

def test_the_placeholder_classifier(tmp_path):
    path = tmp_path / "c.safetensors"
    save_no_classifier(path, [])
    assert not is_trained(path)
    with pytest.raises(CheckpointError, match="no classifier, only the placeholder of data with fewer than 2 classes"):
        load_classifier(path)


def test_evaluate_without_classes(tmp_path, tiny_models, params_file):
    """Captions, no classes, the placeholder classifier: retrieval in pixels and the VAE's PSNR, nothing else; the
    classifier space is a one-line error."""
    from sdlib.data.images import from_uint8
    from sdlib.data.splits import Split, write_processed

    gen = torch.Generator().manual_seed(0)
    names = [f"picture {chr(97 + i)}" for i in range(20)]

    def split(n: int, offset: int) -> Split:
        images = from_uint8(torch.randint(0, 256, (n, 1, 8, 8), generator=gen))  # what the shards store exactly
        return Split(images, torch.full((n,), -1),
                     [[names[offset + i]] for i in range(n)], [], False)

    data = tmp_path / "processed"
    write_processed(data, split(10, 10), split(10, 0), {"source": "folder", "classes": [], "digits": False,
                                                       "image_size": 8, "channels": 1, "n_train": 10, "n_test": 10,
                                                       "templates": []})
    classifier = tmp_path / "none.safetensors"
    save_no_classifier(classifier, [])
    params = params_file(sample={"prompts": ["picture a"], "n_per_prompt": 2, "steps": 1},
                         evaluate={"retrieval": 6})
    assert runner.invoke(sample_app, sample_args(tiny_models, params, data, tmp_path)).exit_code == 0
    done = evaluate(tmp_path, params, data, classifier, tiny_models / "vae.safetensors")
    assert done.exit_code == 0, done.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) - {"machine"} == {"n_samples", "vae_psnr", "retrieval_n", "retrieval_space", "retrieval_top1",
                                          "retrieval_top5", "retrieval_chance_top1", "retrieval_chance_top5"}
    assert metrics["retrieval_space"] == "pixels" and metrics["retrieval_n"] == 6 and metrics["n_samples"] == 2
    params = params_file(sample={"prompts": ["picture a"], "n_per_prompt": 2, "steps": 1},
                         evaluate={"retrieval": 6, "retrieval_space": "classifier"})
    assert_user_error(evaluate(tmp_path, params, data, classifier, tiny_models / "vae.safetensors"),
                      "evaluate.retrieval_space is classifier, but the data has no classes to train one on")


def test_report_of_data_without_classes(tmp_path):
    metrics = {"n_samples": 6, "retrieval_top1": 0.25, "retrieval_top5": 0.75, "retrieval_chance_top1": 0.125,
               "retrieval_chance_top5": 0.625, "retrieval_n": 8, "retrieval_space": "pixels"}
    text = render(metrics=metrics, stages={}, params={}, confusion=pd.DataFrame(columns=["actual", "predicted"]),
                  report_dir=tmp_path, images=[], title="t")
    assert "| retrieval top-1 | 0.250 |" in text and "| retrieval top-5 | 0.750 |" in text
    assert "No FID, KID, precision/recall or conditional accuracy: the data has no classes" in text
    assert "each of 8 test images" in text and "cosine similarity of the pixels averaged over 8x8 cells" in text
    assert "chance is 0.125 at top-1 and 0.625 at top-5" in text


# Nine colours x three rows x three columns: a 4x4 block of colour on white, each image its own caption
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20),
           "black": (0, 0, 0), "purple": (140, 30, 160), "orange": (250, 140, 0), "cyan": (0, 200, 220),
           "grey": (128, 128, 128)}
PLACES = ("top", "middle", "bottom"), ("left", "centre", "right")


def write_blocks(root: Path) -> Path:
    """A captions-only image folder (captions.csv without labels): 81 16x16 images, 'a red block, top left', ..."""
    root.mkdir(parents=True)
    rows = ["file,caption"]
    for name, rgb in COLOURS.items():
        for r, row in enumerate(PLACES[0]):
            for c, col in enumerate(PLACES[1]):
                image = Image.new("RGB", (16, 16), (255, 255, 255))
                image.paste(rgb, (1 + 5 * c, 1 + 5 * r, 5 + 5 * c, 5 + 5 * r))
                file = f"{name}_{row}_{col}.png"
                image.save(root / file)
                rows.append(f"{file},\"a {name} block, {row} {col}\"")
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.slow
def test_captions_only_folder_runs_the_pipeline(tmp_path):
    """Data without classes through `dvc repro`: train_classifier writes its placeholder, evaluate scores caption
    retrieval in pixel space and the VAE's PSNR, and the report says why FID and cond_acc are missing."""
    from test_pipeline import TINY, copy_project, run

    folder = write_blocks(tmp_path / "blocks")
    prompts = ["a red block, top left", "a blue block, middle centre"]
    params = {**TINY, "epochs": 3,
              "data": {**TINY["data"], "source": "folder", "root": str(folder), "limit": 0, "channels": 3},
              "vae": {**TINY["vae"], "epochs": 2},
              "unet": {**TINY["unet"], "samples": {**TINY["unet"]["samples"], "prompts": prompts}},
              "sample": {**TINY["sample"], "prompts": prompts, "n_per_prompt": 3, "steps": 4},
              "evaluate": {**TINY["evaluate"], "retrieval": 12}}
    project = copy_project(tmp_path / "project", params)
    run(["dvc", "repro"], project)
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert json.loads((project / "reports/classifier.json").read_text()) == {"n_classes": 0}
    assert not {"fid", "kid", "precision", "cond_acc", "vae_rfid"} & set(metrics)
    assert metrics["retrieval_space"] == "pixels" and metrics["retrieval_n"] == 12
    assert metrics["retrieval_chance_top1"] == pytest.approx(1 / 12, rel=1e-4) and "vae_psnr" in metrics
    assert 0.0 <= metrics["retrieval_top1"] <= metrics["retrieval_top5"] <= 1.0
    manifest = pd.read_csv(project / "reports/retrieval/manifest.csv")
    assert len(manifest) == 12 and manifest["caption"].is_unique and all((project / p).is_file()
                                                                          for p in manifest["path"])
    report = (project / "reports/report.md").read_text()
    assert "the data has no classes" in report and "| retrieval top-1 |" in report and "](retrieval/grid.png)" in report


def test_manifests_errors_name_the_file_and_the_columns(tmp_path):
    """Both manifests (retrieval's and the samples') are read by sdlib.io.read_csv: a missing file, an unreadable one
    and absent columns are one-line errors naming the file and the header it needs."""
    from sdlib.evaluation.retrieval import read_retrieval_manifest
    from sdlib.evaluation.scoring import read_manifest

    path = tmp_path / "manifest.csv"
    with pytest.raises(DataError, match=r"manifest\.csv: no retrieval manifest \(run the sample stage with --retrieval"):
        read_retrieval_manifest(path, [["a"]], 1)
    path.write_text("")
    with pytest.raises(DataError, match=r"manifest\.csv: not a readable CSV"):
        read_retrieval_manifest(path, [["a"]], 1)
    path.write_text("index,caption\n0,a\n")
    with pytest.raises(DataError, match=r"missing column seed, path \(needs index,caption,seed,path\)$"):
        read_retrieval_manifest(path, [["a"]], 1)
    path.write_text("prompt,seed\n0,1\n")
    with pytest.raises(DataError, match=r"missing column label, path \(needs prompt,label,seed,path\)$"):
        read_manifest(path, 10)
