# `make repro` runs the whole pipeline from a fresh clone; `make test` runs the tests (what CI calls).
# `make test-avx2` runs them on the kernels of an AVX2-only CPU (ATen, oneDNN and MKL alike), as an AVX-512 machine
# otherwise never does: test tolerances must hold for either ISA's summation order. It keeps torch.compile's kernel cache
# apart: inductor's cache key leaves out ATEN_CPU_CAPABILITY, and a kernel cached by an AVX-512 run gives NaN (or a
# segfault) when reused under AVX2 ATen (torch 2.14).
VENV ?= .venv
PYTHON ?= python3
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: all install repro compare pretrained plots test test-fast test-avx2 ui regress bench clean

all: install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

repro: install  ## run the DVC pipeline (download -> ... -> evaluate)
	dvc repro

compare: install  ## the sampler comparison (reports/samplers.csv, samplers.png) on the trained default model
	dvc repro compare/dvc.yaml

pretrained: install  ## your SD v1.x checkpoint (set pretrained.checkpoint in params.yaml): convert, draw, score
	dvc repro pretrained/dvc.yaml

plots: install  ## `dvc plots show` as an offline page: dvc_plots/index.html
	python -m stages.plots --out dvc_plots

test: install  ## unit tests + the end-to-end pipeline test on a tiny config
	pytest -q

test-fast: install  ## unit tests only
	pytest -q -m "not slow"

test-avx2: install  ## the tests on the AVX2 code paths of ATen, oneDNN and MKL
	ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
	TORCHINDUCTOR_CACHE_DIR=$${TMPDIR:-/tmp}/torchinductor-$$(id -u)-avx2 pytest -q

regress: install  ## fail if reports/metrics.json regressed against the one committed on main
	python -m stages.regress --baseline main

bench: install  ## U-Net training step vs diffusers, and images/s per sampler, on the CPU (bench/RESULTS.md)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	python bench/unet_step.py --preset cpu-small --device cpu
	python bench/sampling.py --device cpu

ui: install  ## the MLflow UI on http://127.0.0.1:5000, with links to the runs tables
	python -m stages.ui --host 127.0.0.1 --port 5000

clean:
	rm -rf $(VENV) .pytest_cache
