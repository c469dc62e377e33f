"""The benchmarks in bench/ run, and print one well-formed JSON line per case (tiny settings, one CPU thread)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sdlib.samplers import SAMPLERS
from sdlib.unet import UNet, UNetArgs

REPO = Path(__file__).resolve().parents[1]


def bench(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def json_lines(out: subprocess.CompletedProcess) -> list[dict]:
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_unet_step_compares_equal_sized_nets():
    pytest.importorskip("diffusers")
    lines = json_lines(bench("unet_step.py", "--preset", "cpu-small", "--batch", "2", "--steps", "1",
                             "--warmup", "1", "--repeats", "1", "--threads", "1", "--device", "cpu"))
    assert [(d["impl"], d["mode"]) for d in lines] == [("sdlib", "eager"), ("diffusers", "eager")]
    for d in lines:
        assert {"params", "params_diffusers", "params_ratio", "samples_per_s", "flops_per_sample", "tflops", "mfu",
                "baseline", "ratio", "sdlib_over_diffusers"} <= d.keys()
        assert abs(d["params_ratio"] - 1) <= 0.05 and d["params"] > 0
        assert d["samples_per_s"] > 0 and d["flops_per_sample"] > 0 and d["mfu"] is None  # no CPU peak
        assert d["baseline"] == "diffusers eager"
    assert lines[1]["ratio"] == 1.0 and lines[0]["sdlib_over_diffusers"] == lines[1]["sdlib_over_diffusers"]


@pytest.mark.parametrize("args", [
    UNetArgs(context_dim=32, model_channels=32),
    UNetArgs(context_dim=32, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(0, 2),
             transformer_depth=2, num_heads=2),
])
def test_diffusers_twin_has_our_parameter_count(args, monkeypatch):
    pytest.importorskip("diffusers")
    spec = importlib.util.spec_from_file_location("unet_step", REPO / "bench" / "unet_step.py")
    unet_step = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "unet_step", unet_step)  # dataclasses look their module up there
    spec.loader.exec_module(unet_step)
    twin = unet_step.diffusers_unet(args, latent_size=8)
    assert unet_step.n_params(twin) == unet_step.n_params(UNet(args))  # same blocks, hence exactly the same count


def test_sampling_times_every_sampler_against_ddpm():
    lines = json_lines(bench("sampling.py", "--steps", "2", "--batch", "2", "--repeats", "1", "--threads", "1",
                             "--device", "cpu"))
    assert [d["sampler"] for d in lines] == list(SAMPLERS)  # ddpm, the baseline, comes first either way
    for d in lines:
        assert {"steps", "model_evals", "images_per_s", "baseline", "ratio"} <= d.keys()
        assert d["steps"] == 2 and d["model_evals"] >= 2 and d["images_per_s"] > 0
        assert d["baseline"] == "ddpm (2 steps)" and d["unet_batch"] == 4  # CFG: one batched call on 2B
    assert lines[0]["ratio"] == 1.0
    assert {d["sampler"]: d["model_evals"] for d in lines}["heun"] == 3  # 2 evaluations a step, 1 on the step to 0


def test_pipeline_rejects_unknown_override_keys():
    out = bench("pipeline.py", "--params-override", "unet.no_such_key=1")
    assert out.returncode == 2 and "params.yaml has no key 'unet.no_such_key'" in out.stderr
