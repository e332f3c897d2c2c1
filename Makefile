# The two front-door commands (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist
# torch and torchvision of the GPU machines the project is measured on, put in front of the
# environment's own (PYTHONPATH) for `make test-torch211`; everything else comes from $(VENV)
TORCH211 := .venv-torch211

.PHONY: demo test test-torch211 audit fashion-mnist venv-package

# `python3 -m venv` needs ensurepip, which Debian and Ubuntu ship apart (package python3.X-venv):
# when it fails, that package is installed as the data set is, else one line says what to install.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV) 2>/dev/null || { $(MAKE) --no-print-directory venv-package && $(PYTHON) -m venv --clear $(VENV); }

$(BIN)/crosslayer: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m crosslayer.ops.cpu_kernels  # compile the optional CPU kernels now, not in the first run
	$(BIN)/python tests/timm_sources.py  # timm's own model tests (its sdist) into $(VENV)/timm-src
	touch $@

venv-package:
	@PKG=$$($(PYTHON) -c 'import sys; print("python%d.%d-venv" % sys.version_info[:2])') || exit 1; \
	echo "$(PYTHON) -m venv failed: installing $$PKG"; \
	SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	{ command -v apt-get >/dev/null && $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$PKG >/dev/null; } || { \
	  echo "error: $(PYTHON) -m venv needs the package $$PKG (apt-get install $$PKG), or run make PYTHON=<a python whose venv works>" >&2; \
	  exit 1; }

# Fashion-MNIST comes from Debian's package dataset-fashion-mnist (IDX files under $(FMNIST)).
fashion-mnist:
	@test -d $(FMNIST) || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	} || echo "warning: could not install dataset-fashion-mnist; pass --data-dir to a folder with the Fashion-MNIST IDX files"

demo: $(BIN)/crosslayer fashion-mnist
	$(BIN)/crosslayer demo --out runs/demo

test: $(BIN)/crosslayer fashion-mnist
	$(BIN)/ruff check .
	$(BIN)/lint-imports  # the layers and no-cycles contracts in .importlinter
	$(BIN)/python -m pytest

# The suite again on torch 2.11 / torchvision 0.26, the GPU machines' versions.
$(TORCH211)/torch/__init__.py: $(BIN)/crosslayer
	$(BIN)/python -m pip install -q --no-deps --no-compile --target $(TORCH211) torch==2.11.0 torchvision==0.26.0
	touch $@

test-torch211: $(TORCH211)/torch/__init__.py fashion-mnist
	PYTHONPATH=$(TORCH211) $(BIN)/python -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'
	PYTHONPATH=$(TORCH211) $(BIN)/python -m crosslayer.ops.cpu_kernels
	PYTHONPATH=$(TORCH211) $(BIN)/python -m pytest
# Break one behaviour at a time in a scratch copy and run the tests that claim it (tests/mutation_audit.py)
audit: $(BIN)/crosslayer fashion-mnist
	$(BIN)/python tests/mutation_audit.py
