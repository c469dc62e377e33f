"""The benchmarks in bench/ run, and print one well-formed JSON line per case (tiny settings, one CPU thread)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sdlib.diffusion.samplers import SAMPLERS
from sdlib.errors import ConfigError
from sdlib.models.unet import UNet, UNetArgs

REPO = Path(__file__).resolve().parents[1]


def bench(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


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


def test_unet_step_of_sdlib_alone_needs_no_diffusers(monkeypatch):
    """What bench/gpu.sh uses to size the GPU pipeline's training; it must run where diffusers is not installed."""
    args = ["--preset", "cpu-small", "--impl", "sdlib", "--batch", "2", "--steps", "1", "--warmup", "1",
            "--repeats", "1", "--threads", "1", "--device", "cpu"]
    no_diffusers = ("import runpy, sys; sys.modules['diffusers'] = None; "  # `import diffusers` now fails
                    f"sys.argv = ['unet_step.py', *{args!r}]; runpy.run_path('bench/unet_step.py', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", no_diffusers], cwd=REPO, capture_output=True, text=True, timeout=120)
    [line] = json_lines(out)
    assert line["impl"] == "sdlib" and line["params"] == 3_984_068 and line["samples_per_s"] > 0
    assert line["baseline"] is None and line["ratio"] is None and line["params_ratio"] is None


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


def load_bench(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))  # as when run: a script imports its sibling bench modules
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_plain_runner_orders_stages_by_their_data(monkeypatch):
    pipeline = load_bench("pipeline", monkeypatch)
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    in_file = [name for name, _ in pipeline.stage_order(dvc_yaml)]
    assert in_file == list(dvc_yaml["stages"])  # dvc.yaml lists its stages in an order that runs
    backwards = {"stages": dict(reversed(dvc_yaml["stages"].items()))}
    order = [name for name, _ in pipeline.stage_order(backwards)]
    assert order.index("download") < order.index("preprocess") < order.index("train_vae") \
        < order.index("encode_latents") < order.index("train_unet") < order.index("sample") \
        < order.index("evaluate") < order.index("report")
    assert order.index("train_classifier") < order.index("evaluate")
    cycle = {"stages": {"a": {"cmd": "x", "deps": ["b.txt"], "outs": ["a.txt"]},
                        "b": {"cmd": "y", "deps": ["a.txt"], "outs": [{"b.txt": {"cache": False}}]}}}
    with pytest.raises(ConfigError, match=r"the stages \['a', 'b'\] depend on each other"):
        pipeline.stage_order(cycle)


def test_plain_runner_runs_commands_in_order_and_stops_at_a_failure(tmp_path, monkeypatch):
    pipeline = load_bench("pipeline", monkeypatch)
    stages = {"second": {"cmd": "cat one.txt > two.txt", "deps": ["one.txt"], "outs": ["two.txt"]},
              "first": {"cmd": "echo 1 > one.txt", "outs": ["one.txt"]}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    starts, total = pipeline.timed_plain(tmp_path, tmp_path / "log")
    assert [name for name, _ in starts] == ["first", "second"] and total >= starts[-1][1]
    assert (tmp_path / "two.txt").read_text() == "1\n"
    stages["third"] = {"cmd": "echo boom; exit 3", "deps": ["two.txt"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    with pytest.raises(SystemExit, match=r"(?s)stage third failed \(exit 3\).*boom"):
        pipeline.timed_plain(tmp_path, tmp_path / "log")


def test_load_memory_fabricates_loadable_checkpoints_and_measures_a_load(tmp_path, monkeypatch):
    """The tiny architecture through the same code: both layouts load, and a child process reports one case."""
    from sdlib.pretrained.load import load_pretrained
    from sdlib.pretrained.sd_v1 import TINY_SD_V1
    load_memory = load_bench("load_memory", monkeypatch)
    paths = load_memory.fabricate(TINY_SD_V1, tmp_path)
    assert set(paths) == {("compvis", "float32"), ("compvis", "float16"), ("diffusers", "float32")}
    sd = load_pretrained(paths["diffusers", "float32"])
    n_params = sum(p.numel() for m in (sd.model.unet, sd.model.text, sd.vae) for p in m.parameters())
    assert load_memory.weight_bytes(paths["diffusers", "float32"]) == 4 * n_params
    [line] = json_lines(bench("load_memory.py", "--architecture", "tiny_sd_v1", "--load",
                              str(paths["compvis", "float16"]), "--dtype", "bfloat16"))
    assert line["weights_gib"] * 2**30 == 2 * n_params
    assert line["peak_gib"] >= line["peak_loaded_gib"] >= line["before_gib"] > 0
    assert line["ratio"] == pytest.approx(line["peak_gib"] / line["weights_gib"])


def test_pretrained_equals_diffusers_and_times_both(tmp_path, monkeypatch):
    """The tiny architecture through the same code as full size: outputs equal diffusers' up to float32 rounding, the
    two final images up to the schedules' float32-vs-float64 digits, one sampling line per implementation.

    Planted bugs caught: diffusers' sampling process with `timestep_spacing="leading"` (images differ by 0.13, bound
    1e-4), diffusers' U-Net given timestep 501 (max abs difference 0.024, rounding bound 2.1e-3; measured 0.0)."""
    pytest.importorskip("diffusers")
    from test_pretrained import _schedulers
    from tolerances import forward_tol

    from sdlib.pretrained.load import load_pretrained
    pretrained = load_bench("pretrained", monkeypatch)
    from diffusers import DPMSolverMultistepScheduler
    assert DPMSolverMultistepScheduler(**pretrained.DPMPP_2M).config == _schedulers()["dpmpp_2m"][0].config

    lines = json_lines(bench("pretrained.py", "--architecture", "tiny_sd_v1", "--rounds", "1", "--steps", "20",
                             "--dir", str(tmp_path), timeout=300))
    assert [d["case"] for d in lines] == ["unet", "vae_decode", "text_encoder", "sampling", "sampling"]
    sd = load_pretrained(tmp_path / "random-tiny_sd_v1")  # the weights the run wrote and kept
    nets = {"unet": sd.model.unet, "vae_decode": sd.vae, "text_encoder": sd.model.text}
    for d in lines[:3]:
        assert {"shape", "max_abs_diff", "max_abs", "rel_diff"} <= d.keys() and d["max_abs"] > 0.1
        assert d["max_abs_diff"] <= forward_tol(torch.tensor(d["max_abs"]), nets[d["case"]]), d
    assert [d["shape"] for d in lines[:3]] == [[2, 4, 8, 8], [1, 3, 64, 64], [2, 77, 32]]
    ours, theirs = lines[3:]
    assert (ours["impl"], theirs["impl"]) == ("sdlib", "diffusers")
    for d in (ours, theirs):
        assert {"s_per_image", "s_per_image_rounds", "load_s", "peak_rss_gib", "tflop_per_image", "baseline",
                "ratio", "rss_ratio", "image_max_abs_diff", "image_repeat_diff"} <= d.keys()
        assert d["steps"] == 20 and d["guidance"] == 7.5 and d["image_hw"] == [64, 64] and d["baseline"] == "diffusers"
        assert d["s_per_image"] > 0 and d["peak_rss_gib"] > 0 and d["ratio"] > 0 and d["rss_ratio"] > 0
    assert theirs["ratio"] == theirs["rss_ratio"] == 1.0 and theirs["diffusers_imported"]
    assert not ours["diffusers_imported"]  # sdlib's process pays for no diffusers import, in time or memory
    # as in test_pretrained's whole-run comparison: float64 vs float32 schedules move pixels by ~1e-5
    assert ours["image_max_abs_diff"] <= 1e-4


def test_stream_memory_reports_every_case_on_the_same_data():
    """Each case in its own process, one line each; the script itself stops if a streamed case read other data."""
    lines = json_lines(bench("stream_memory.py", "--images", "300", "--size", "8", "--shard-size", "64",
                             "--batches", "4", "--batch-size", "16", "--classifier-images", "100", timeout=600))
    assert [(d["phase"], d["case"]) for d in lines] == [("preprocess", "memory"), ("preprocess", "stream"),
                                                        ("batches", "memory"), ("batches", "stream"),
                                                        ("batches", "mmap"), ("classifier", "memory"),
                                                        ("classifier", "stream"), ("features", "memory"),
                                                        ("features", "stream"), ("image", "memory"),
                                                        ("image", "stream")]
    assert all(d["ratio"] == 1.0 for d in lines if d["case"] == "memory")
    assert all(d["peak_mib"] >= d["before_mib"] > 0 and d["images"] == 300 for d in lines)
    for phase in ("batches", "classifier", "features", "image"):  # the same batches, weights, features, image
        assert len({d["digest"] for d in lines if d["phase"] == phase}) == 1, phase
    assert len({d["digest"] for d in lines}) == 5
