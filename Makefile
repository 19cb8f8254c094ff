# The commands a newcomer needs.  `make demo` and `make test` work on a fresh
# machine: they install what they need first (uv, pinned; then the locked
# dependencies from uv.lock into .venv).

PYTHON ?= python3
UV_VERSION := 0.13.8
UV := .tools/bin/uv
VENV := .venv
BIN := $(VENV)/bin
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.installed: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --extra demo --python $(PYTHON)
	touch $@

demo: install
	$(BIN)/kyrie-engine demo

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check kyrie_engine tests
	$(BIN)/mypy

bench: install
	$(BIN)/kyrie-engine bench

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache
