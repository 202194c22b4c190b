# Two set-up commands for a fresh machine. The venv needs a Python 3.10 to 3.13 (pyproject.toml's
# requires-python); PYTHON=python3.12 make demo picks another interpreter than python3.
#   make demo   install into .venv, then run `ftddm-trt demo` end to end (ONNX Runtime on the CPU)
#   make test   install into .venv, then run the whole test suite
#   make docs   regenerate docs/cli.md from the commands' --help
#   make lint   ruff over the package, the tests, the benchmarks and the docs scripts
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench quality figures docs lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch==2.13.0 resolves to the CPU wheel on disk; pinned in pyproject.toml too
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ftddm-trt demo --out demo_out --force

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Benchmarks (minutes to tens of minutes on 2 CPU cores); results land in benchmarks/results/
bench: $(STAMP)
	$(BIN)/python benchmarks/per_nfe.py --out benchmarks/results
	$(BIN)/python benchmarks/latency.py --out benchmarks/results
	$(BIN)/python benchmarks/triton_load.py --out benchmarks/results
	$(BIN)/ftddm-trt bench --out benchmarks/results
	$(BIN)/python benchmarks/bf16_drift.py --out benchmarks/results
	$(BIN)/python benchmarks/generalization.py --out benchmarks/results
	$(BIN)/python benchmarks/fine_mask.py --out benchmarks/results
	$(BIN)/python benchmarks/finetune_unseen.py --out benchmarks/results
	$(BIN)/python benchmarks/robustness.py --out benchmarks/results

figures: demo
	$(BIN)/python docs/make_phantom_figure.py docs/phantom.png
	$(BIN)/python docs/make_styles_figure.py docs/phantom_styles.png
	$(BIN)/python docs/make_before_after.py demo_out --out docs/before_after.png

docs: $(STAMP)
	$(BIN)/python docs/make_cli_reference.py

lint: $(STAMP)
	$(BIN)/ruff check ftddm_trt tests benchmarks docs

clean:
	rm -rf $(VENV) .pytest_cache
