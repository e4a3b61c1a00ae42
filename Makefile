# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU build of torch lies on local disk as this exact release; an unpinned torch would pull
# a multi-GB CUDA build. On a machine with an NVIDIA GPU we let pip choose the CUDA build.
TORCH_CPU := torch==2.13.0
HAS_GPU   := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
# The shared real data beside the checkout, when it is there (the demo's scenes use its MNIST digits).
export FROMSCRATCH_DATA ?= $(wildcard $(abspath ../shared/data))

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifneq ($(HAS_GPU),yes)
	$(PY) -m pip install -q $(TORCH_CPU)
endif
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m fromscratch demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/bench_transformer.py
	$(PY) bench/bench_llama.py
	$(PY) bench/bench_moe.py
	$(PY) bench/bench_vlm.py

clean:
	rm -rf $(VENV) runs build *.egg-info
