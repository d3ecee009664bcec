# ScaleRec: `make run` runs the whole pipeline on an embedded local Ray cluster,
# `make test` installs and runs the fast tests. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
CONFIG ?= jobs/configs/synthetic.yaml
ARGS ?=
# torch is pinned to a CPU build; set TORCH_INDEX=https://download.pytorch.org/whl/cpu where
# the default index would hand out a CUDA build.
TORCH_INDEX ?=
STAMP := $(VENV)/.installed

.PHONY: install run test test-slow lint style bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, on its own, so that the resolver keeps the CPU build.
	$(PIP) install -q "torch==2.13.0" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	RAY_DATA_DISABLE_PROGRESS_BARS=$${RAY_DATA_DISABLE_PROGRESS_BARS:-0} \
	$(PY) -m jobs.pipeline --config $(CONFIG) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check app jobs tests bench
	$(VENV)/bin/ruff format --check app jobs tests bench

style: $(STAMP)
	$(VENV)/bin/ruff format app jobs tests bench
	$(VENV)/bin/ruff check --fix app jobs tests bench

bench: $(STAMP)
	$(PIP) install -q -e ".[dev,bench]"
	@for f in bench/[a-z]*.py; do \
	  m=$$(basename $$f .py); echo "== bench.$$m"; $(PY) -m bench.$$m || exit 1; \
	done

clean:
	rm -rf lake .pytest_cache .ruff_cache
