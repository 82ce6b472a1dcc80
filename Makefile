# Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test install bench docs docs-check clean

install: $(STAMP)

# torch is installed first on its own, pinned to the CPU build that lies on disk, so that
# nothing else can resolve a different (CUDA) build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev,test,docs]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ava train configs/demo.yaml

# Code rules first (seconds): ruff, then the import contracts of pyproject.toml (DESIGN.md,
# "Who may import whom"); a violation of either fails before the tests run.
test: $(STAMP)
	$(VENV)/bin/ruff check --no-cache src tests benchmarks
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q
	$(MAKE) docs

# The docs site (MkDocs + Material) into site/. --strict fails on a broken link, a missing page or a
# bad API reference; docs/gen_reference.py regenerates the reference pages from the code first.
# (No --quiet: it hides the warnings from --strict, which then passes.)
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# Opens the built site in headless Chromium (installed with apt-get if missing): renders the home
# page and a reference page, checks the navigation and the search index, and writes a screenshot
# of the home page to build/docs-check/home.png. Not part of `make test`.
docs-check: docs
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
		|| command -v google-chrome >/dev/null 2>&1 \
		|| { echo "installing chromium (apt-get)"; \
		     if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		     $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; }
	$(PY) docs/check_site.py site --screenshot build/docs-check/home.png

bench: $(STAMP)
	$(PY) benchmarks/moe_layer.py

clean:
	rm -rf $(VENV) runs build site docs/reference *.egg-info src/*.egg-info
