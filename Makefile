# transferlab: `make demo` runs the main job on the mini Tiny ImageNet copy; `make test` runs the suite.
# Both create .venv if absent and install what they need (torch comes from the pinned wheel pair).

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
SHARED_DATA := $(abspath ../shared/datasets)
OUT ?= runs
BUDGET ?= 20m

# Put ../shared/datasets on the dataset search path when it exists, so `--data tiny-imagenet-mini`
# (the default) finds the mini zip with no flag.
ifneq ($(wildcard $(SHARED_DATA)),)
export TRANSFERLAB_DATA := $(SHARED_DATA)$(if $(TRANSFERLAB_DATA),:$(TRANSFERLAB_DATA))
endif

.PHONY: install demo quick test bench lint format clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=python3.x)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# The main job: `transferlab auto` on the mini zip within 20 minutes on 2 cores (measurement included): tuned
# linear probes on Lite0/1/2 at their native resolutions, the zero-shot model, ensembles fitted on the train
# holdout, the label-budget curve, and the report in $(OUT)/auto/report. Re-running reuses finished members.
demo: install
	$(BIN)/transferlab auto --data tiny-imagenet-mini --budget $(BUDGET) --out $(OUT)/auto

# The hand-written quick study (zero-shot, two probes, a BatchNorm-only fine-tune, a small CNN, four ensembles).
quick: install
	$(BIN)/transferlab study studies/quick.yaml --out $(OUT)/quick

test: install
	$(BIN)/python -m pytest -q

# transferlab vs the plain docs-style script (benchmarks/baseline.py), same model, images and batch size,
# alternating repeats; prints a table of ratios and writes benchmarks/results/<time>-<device>.json.
# About 35 min on 2 idle cores (the head row's baseline alone is ~15 min); BENCH_ARGS="--rows eval" etc.
bench: install
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

# ruff, then the import layers declared in pyproject.toml ([tool.importlinter]).
lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache
