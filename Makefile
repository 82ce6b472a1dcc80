# Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test install bench clean

install: $(STAMP)

# torch is installed first on its own, pinned to the CPU build that lies on disk, so that
# nothing else can resolve a different (CUDA) build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ava train configs/demo.yaml

# Code rules first (seconds): ruff, then the import contracts of pyproject.toml (DESIGN.md,
# "Who may import whom"); a violation of either fails before the tests run.
test: $(STAMP)
	$(VENV)/bin/ruff check --no-cache src tests benchmarks
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/moe_layer.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
