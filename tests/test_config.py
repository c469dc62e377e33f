"""params.yaml validation: every bad key or value is one line naming it; DVC's string values are coerced."""
from pathlib import Path

import pytest
import yaml

from sdlib import config

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_validate():
    cfg = config.load_all(REPO / "params.yaml")
    assert cfg["epochs"] >= 1 and cfg["unet"].skip in ("concat", "add")
    flat = config.flatten(cfg)
    assert "unet.lr" in flat and "epochs" in flat and isinstance(flat["unet.channel_mult"], list)


def test_dvc_set_strings_are_coerced():
    # `dvc exp run -S unet.lr=1e-4` can leave "1e-4" in params.yaml, which PyYAML reads as a string.
    assert config.parse_section("unet", {"lr": "1e-4"}).lr == pytest.approx(1e-4)
    assert config.top_level({"epochs": "500"}, "epochs") == 500
    fast = config.parse_section("unet", {"compile": "true", "log_every": "10", "precision": "bf16"})
    assert fast.compile is True and fast.log_every == 10 and fast.precision == "bf16"


def test_training_grids_are_off_unless_asked_and_take_dvc_strings():
    assert config.parse_section("unet", {}).samples.every == 0
    grids = config.parse_section("unet", {"samples": {"every": "5", "steps": "4"}}).samples
    assert (grids.every, grids.steps, grids.n_per_prompt) == (5, 4, 2)
    assert config.flatten({"unet": config.parse_section("unet", {})})["unet.samples.every"] == 0  # MLflow's name


def test_fast_path_defaults_are_cpu_safe():
    for section in ("unet", "vae"):
        cfg = config.parse_section(section, {})
        assert (cfg.precision, cfg.compile, cfg.compile_mode) == ("auto", False, "default") and cfg.log_every >= 1


@pytest.mark.parametrize(
    "section, values, message",
    [
        ("unet", {"lr": "abc"}, "bad value for 'unet.lr'"),
        ("unet", {"lr": -1}, "bad value for 'unet.lr'"),
        ("unet", {"typo": 1}, "unknown key 'unet.typo'"),
        ("unet", {"skip": "mul"}, "bad value for 'unet.skip'"),
        ("unet", {"samples": {"every": -1}}, "bad value for 'unet.samples.every' (-1)"),
        ("unet", {"samples": {"every": 5, "prompts": []}}, "bad value for 'unet.samples.prompts'"),
        ("unet", {"samples": {"evry": 5}}, "unknown key 'unet.samples.evry'"),
        ("unet", {"samples": 5}, "bad value for 'unet.samples' (5)"),
        ("unet", {"channel_mult": [1, 2], "attention_levels": [2]}, "bad value for 'unet.attention_levels'"),
        ("sample", {"guidance": float("inf")}, "bad value for 'sample.guidance' (inf)"),
        ("unet", {"model_channels": 64, "num_heads": 3}, "bad value for 'unet.num_heads' (3)"),
        ("unet", None, "missing section 'unet'"),
        ("sample", {"steps": 0}, "bad value for 'sample.steps'"),
        ("sample", {"prompts": ["8", " "]}, "bad value for 'sample.prompts'"),
        ("data", {"source": "imagenet"}, "bad value for 'data.source'"),
        ("data", {"image_size": 30}, "bad value for 'data.image_size'"),
        ("text", {"hidden_size": 30, "num_heads": 4}, "bad value for 'text.num_heads'"),
        ("vae", "not a mapping", "section 'vae' must be a mapping"),
        ("unet", {"precision": "fp16"}, "bad value for 'unet.precision'"),
        ("vae", {"compile": "maybe"}, "bad value for 'vae.compile'"),
        ("unet", {"compile_mode": "fast"}, "bad value for 'unet.compile_mode'"),
        ("vae", {"log_every": 0}, "bad value for 'vae.log_every'"),
    ],
)
def test_bad_values_name_the_key(section, values, message):
    with pytest.raises(config.ConfigError) as err:
        config.parse_section(section, values)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_sampler_names_come_from_the_registry():
    """The sample section holds any name; the registry, where sampling starts, names the key of a wrong one."""
    from sdlib.diffusion.samplers import SAMPLERS, check_sampler

    assert all(check_sampler(name, "sample.sampler") == name for name in SAMPLERS)
    with pytest.raises(config.ConfigError, match="bad value for 'sample.sampler' \\('magic'\\): choose from ddpm, "):
        check_sampler(config.parse_section("sample", {"sampler": "magic"}).sampler, "sample.sampler")


@pytest.mark.parametrize("value", [0, -3, "many", 2.5, True])
def test_bad_epochs(value):
    with pytest.raises(config.ConfigError, match="bad value for 'epochs'"):
        config.top_level({"epochs": value}, "epochs")


def test_unknown_top_level_key_and_bad_file(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"seed": 0, "epochs": 1, "epochz": 3}))
    with pytest.raises(config.ConfigError, match="unknown top-level key 'epochz'"):
        config.load_all(p)
    p.write_text("seed: [unclosed")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.read_params(p)
    with pytest.raises(config.ConfigError, match="params file not found"):
        config.read_params(tmp_path / "missing.yaml")
