"""End to end: `dvc repro pretrained/dvc.yaml` in a temporary copy of the repository, on a tiny SD-v1-shaped diffusers
folder outside it (random weights, the real layout).

With the default params (no checkpoint set) DVC stops before any work, in one line that says to set the path. Set, the
pipeline converts, draws and scores; what re-runs afterwards is what each change invalidates: new reference params
re-run `pretrained_evaluate` alone, an image added to the reference folder too, and new weights under the same
checkpoint path re-run all three stages.
"""
from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml

diffusers = pytest.importorskip("diffusers")
from test_pipeline import REPO, copy_project, run  # noqa: E402
from test_pretrained import diffusers_models, randomize, write_diffusers_folder  # noqa: E402

pytestmark = pytest.mark.slow
STAGES = ("pretrained_convert", "pretrained_sample", "pretrained_evaluate")
SAMPLE = {"prompts": ["a red cube", "a blue sphere"], "n_per_prompt": 2, "sampler": "euler", "steps": 2,
          "guidance": 5.0, "schedule": "auto", "negative_prompt": "", "seed": 0, "batch_size": 4,
          "height": 64, "width": 64, "clip_skip": 1}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The repository with its own params.yaml: the pretrained section's default, no checkpoint."""
    return copy_project(tmp_path_factory.mktemp("project"), yaml.safe_load((REPO / "params.yaml").read_text()))


def repro(project, check: bool = True):
    return run(["dvc", "repro", "pretrained/dvc.yaml"], project, check=check)


def ran(out) -> set[str]:
    return set(re.findall(r"Running stage 'pretrained/dvc.yaml:(\w+)'", out.stdout))


def set_params(project, **sections: dict) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for name, values in sections.items():
        params[name] |= values
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def metrics(project) -> dict:
    return json.loads((project / "reports/pretrained/metrics.json").read_text())


def test_without_a_checkpoint_dvc_stops_in_one_line(project):
    out = repro(project, check=False)
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1, out.stdout + out.stderr
    assert lines[0].startswith("ERROR: ") and "set pretrained.checkpoint in params.yaml" in lines[0]
    assert not (project / "models/pretrained").exists()


def test_repro_converts_draws_scores_and_reruns_what_changed(project, tmp_path, inception_weights):
    """Planted bugs caught: `${pretrained.checkpoint}` left out of convert's deps, `models/pretrained` out of
    sample's, `${pretrained.reference}` out of evaluate's (each: a stage not re-run below)."""
    unet, vae, text = diffusers_models()
    checkpoint = write_diffusers_folder(tmp_path / "sd", unet, vae, text)
    set_params(project, pretrained={"checkpoint": str(checkpoint), "sample": SAMPLE})
    assert ran(repro(project)) == set(STAGES)
    samples = project / "reports/pretrained/samples"
    assert len(list(samples.glob("0*.png"))) == 4 and (samples / "schedule.json").is_file()
    assert metrics(project) == {"n_samples": 4, "n_reference": 0}  # pretrained/reference holds only its README
    grid = (samples / "grid.png").read_bytes()

    refs = tmp_path / "refs"
    refs.mkdir()
    for p in sorted(samples.glob("0*.png"))[:3]:
        shutil.copyfile(p, refs / p.name)
    set_params(project, pretrained={"reference": str(refs)}, evaluate={"inception_weights": str(inception_weights)})
    assert ran(repro(project)) == {"pretrained_evaluate"}
    scored = metrics(project)
    assert scored["n_reference"] == 3 and {"fid", "kid", "kid_std"} <= scored.keys()

    shutil.copyfile(samples / "01_0001.png", refs / "01_0001.png")
    assert ran(repro(project)) == {"pretrained_evaluate"}
    assert metrics(project)["n_reference"] == 4

    randomize(unet, seed=5)  # new weights under the same path
    write_diffusers_folder(checkpoint, unet, vae, text)
    assert ran(repro(project)) == set(STAGES)
    assert (samples / "grid.png").read_bytes() != grid
    assert "up to date" in run(["dvc", "status", "pretrained/dvc.yaml"], project).stdout
