# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Reinstall whenever pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
RUN ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

# DeepSpeed JIT-builds ops on first use (~40 s): keep them in a cache that outlives the checkout.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/zephyr-ray/torch_extensions
export WANDB_SILENT ?= true

.PHONY: install demo test bench lint

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: the CPU wheel on local disk, not a multi-GB CUDA build pulled in by a dependency.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: install
	$(PY) -m zephyr_ray.cli sft --config configs/tiny/sft.yaml run.output_dir=$(RUN)/sft
	$(PY) -m zephyr_ray.cli chat --model $(RUN)/sft/model "What is 12 + 30?" "Reverse the word 'piano'."

test: install
	$(PY) -m pytest -q -p no:cacheprovider

bench: install
	$(PY) bench/sft_throughput.py
	$(PY) bench/dpo_throughput.py
	$(PY) bench/generation_throughput.py
	$(PY) bench/aif_throughput.py
	$(PY) bench/eval_mt_bench.py
	$(PY) bench/serve_load.py

lint: install
	$(VENV)/bin/ruff check zephyr_ray jobs bench tests
