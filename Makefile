# Two commands for a fresh machine: `make demo` (ingest the sample corpus) and `make test`.
UV ?= $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
CORPUS ?= ../shared/corpus
LIBRARY ?= library

.PHONY: install demo ui test lint bench

install:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen

demo: install
	$(UV) run asset-library ingest $(CORPUS) --library $(LIBRARY)

ui: install
	ASSET_LIBRARY_HOME=$(abspath $(LIBRARY)) $(UV) run dagster dev -w workspace.yaml

test: install
	$(UV) run ruff check .
	$(UV) run pytest

lint: install
	$(UV) run ruff check .
	$(UV) run ruff format --check .

bench: install
	$(UV) run python benchmarks/fingerprint.py
