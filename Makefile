# Two commands do all set-up: `make demo` and `make test`. Both create .venv when it is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# sam2 ships an optional CUDA extension; we never need it (and CPU machines cannot build it).
export SAM2_BUILD_CUDA := 0
export PYTHONHASHSEED  := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint format clean-venv

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python -m lenslib.demo --out runs/demo

test: $(BIN)/.installed
	$(BIN)/ruff check lenslib scripts tests notebooks benchmarks
	$(BIN)/ruff format --check lenslib tests benchmarks
	$(BIN)/python -m pytest --nbval tests notebooks

lint: $(BIN)/.installed
	$(BIN)/ruff check lenslib scripts tests notebooks benchmarks
	$(BIN)/ruff format --check lenslib tests benchmarks

format: $(BIN)/.installed
	$(BIN)/ruff check --fix lenslib scripts tests notebooks benchmarks
	$(BIN)/ruff format lenslib tests benchmarks

clean-venv:
	rm -rf $(VENV)
