# Two entry points that work on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test lint install

# NiiVue's self-contained bundle for the service's viewer is built from npm, not tracked in git.
VIEWER := src/medseg/serve/static/niivue.umd.js

$(VIEWER):
	scripts/build_viewer.sh || echo "warning: no npm: medseg serve will run without its viewer" >&2

$(BIN)/.installed: pyproject.toml constraints.txt | $(VIEWER)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# constraints.txt pins the CPU build of torch, so nothing pulls a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/medseg demo --work-dir medseg_demo --overwrite

# ruff, the layers and independence contracts of pyproject's [tool.importlinter], and no
# private name imported across packages nor medseg import hidden in a function.
lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports --no-cache
	$(BIN)/python scripts/check_private_imports.py --also benchmarks

test: $(BIN)/.installed lint
	$(BIN)/pytest -q
