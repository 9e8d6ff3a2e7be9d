# Two commands for a fresh machine: `make demo` (ingest the sample corpus) and `make test`.
UV ?= $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
CORPUS ?= ../shared/corpus
LIBRARY ?= library
SHARD_SIZE ?= 100
# PostgreSQL 15 server binaries: the production-profile tests start one (as `nobody` when root).
PG_BIN ?= $(or $(ASSET_LIBRARY_PG_BIN),/usr/lib/postgresql/15/bin)
SUDO ?= $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install demo ui test lint bench

install:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 \
		|| python3 -m pip install --quiet uv
	@# Compiled once here: with PYTHONDONTWRITEBYTECODE set, every process (the CLI, each run
	@# worker) would otherwise compile Dagster's sources again on import (~2 s of `status`).
	$(UV) sync --frozen --compile-bytecode
	@test -x $(PG_BIN)/postgres || { \
		if command -v apt-get >/dev/null 2>&1; then \
			$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15; \
		else \
			echo "PostgreSQL 15 not found at $(PG_BIN): install it and set ASSET_LIBRARY_PG_BIN" \
				"for asset_library_tests/test_production_profile.py"; \
		fi; }
	@test -x /usr/bin/chromedriver || { \
		if command -v apt-get >/dev/null 2>&1; then \
			$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
		else \
			echo "Chromium and chromedriver not found in /usr/bin: install them" \
				"for asset_library_tests/test_serve_browser.py"; \
		fi; }

demo: install
	$(UV) run asset-library ingest $(CORPUS) --library $(LIBRARY) --shard-size $(SHARD_SIZE)

# The UI on the demo's library: its own Dagster instance holds the runs the CLI made.
ui: install
	@# The instance reads the project's dagster.yaml through a link: an edit reaches it at once.
	mkdir -p $(LIBRARY)/.dagster && ln -sfn $(abspath dagster.yaml) $(LIBRARY)/.dagster/dagster.yaml
	ASSET_LIBRARY_HOME=$(abspath $(LIBRARY)) DAGSTER_HOME=$(abspath $(LIBRARY))/.dagster \
		$(UV) run dg dev

test: install
	$(UV) run ruff check .
	$(UV) run pytest

lint: install
	$(UV) run ruff check .
	$(UV) run ruff format --check .

bench: install
	$(UV) run python benchmarks/fingerprint.py
	$(UV) run python benchmarks/ingest.py
	$(UV) run python benchmarks/search.py
