# The two front-door commands (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test audit fashion-mnist

$(BIN)/crosslayer: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m crosslayer.ops.cpu_kernels  # compile the optional CPU kernels now, not in the first run
	touch $@

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
	$(BIN)/python -m pytest

# Break one behaviour at a time in a scratch copy and run the tests that claim it (tests/mutation_audit.py)
audit: $(BIN)/crosslayer fashion-mnist
	$(BIN)/python tests/mutation_audit.py
