# Two commands for a fresh machine: `make demo` (ingest the sample corpus) and `make test`.
UV ?= $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
CORPUS ?= ../shared/corpus
LIBRARY ?= library
SHARD_SIZE ?= 100
# PostgreSQL 15 server binaries: the production-profile tests start one (as `nobody` when root).
PG_BIN ?= $(or $(ASSET_LIBRARY_PG_BIN),/usr/lib/postgresql/15/bin)
SUDO ?= $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install test-services demo ui test test-fast test-durations lint types docs docs-serve bench

# The Python environment from uv.lock, and nothing else: what the demo, the UI and the docs need.
install:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 \
		|| python3 -m pip install --quiet uv
	@echo "uv sync: the locked Python environment in .venv"
	@# Compiled once here: with PYTHONDONTWRITEBYTECODE set, every process (the CLI, each run
	@# worker) would otherwise compile Dagster's sources again on import (~2 s of `status`).
	@$(UV) sync --frozen --compile-bytecode --quiet

# What only the tests start: PostgreSQL 15 (test_production_profile.py), strace
# (test_durable_writes.py), iproute2 (test_cluster.py: the loopback of its network namespace) and
# Chromium with its driver (test_serve_browser.py), from apt when missing.
test-services:
	@test -x $(PG_BIN)/postgres || { \
		if command -v apt-get >/dev/null 2>&1; then \
			$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15; \
		else \
			echo "PostgreSQL 15 not found at $(PG_BIN): install it and set ASSET_LIBRARY_PG_BIN" \
				"for asset_library_tests/test_production_profile.py"; \
		fi; }
	@test -x /usr/bin/strace || { \
		if command -v apt-get >/dev/null 2>&1; then \
			$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace; \
		else \
			echo "strace not found in /usr/bin: install it for asset_library_tests/test_durable_writes.py"; \
		fi; }
	@command -v ip >/dev/null 2>&1 || { \
		if command -v apt-get >/dev/null 2>&1; then \
			$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2; \
		else \
			echo "ip not found: install iproute2 for asset_library_tests/test_cluster.py"; \
		fi; }
	@test -x /usr/bin/chromedriver || { \
		if command -v apt-get >/dev/null 2>&1; then \
			$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
		else \
			echo "Chromium and chromedriver not found in /usr/bin: install them" \
				"for asset_library_tests/test_serve_browser.py"; \
		fi; }

demo: install
	@$(UV) run --frozen asset-library ingest $(CORPUS) --library $(LIBRARY) --shard-size $(SHARD_SIZE)

# The UI on the demo's library: its own Dagster instance holds the runs the CLI made.
ui: install
	@# The instance reads the project's dagster.yaml through a link: an edit reaches it at once.
	mkdir -p $(LIBRARY)/.dagster && ln -sfn $(abspath dagster.yaml) $(LIBRARY)/.dagster/dagster.yaml
	ASSET_LIBRARY_HOME=$(abspath $(LIBRARY)) DAGSTER_HOME=$(abspath $(LIBRARY))/.dagster \
		$(UV) run --frozen dg dev

test: install test-services lint types docs
	$(UV) run --frozen pytest

# The edit-test loop (about two minutes): no test that starts a service (S3, PostgreSQL, a
# browser, Dagster's daemon), none over the per-test budget in asset_library_tests/conftest.py.
test-fast: install
	$(UV) run --frozen pytest -q -m "not s3 and not postgres and not browser and not daemon and not slow"

# Measure every test again (the whole suite) for test-fast's budget: asset_library_tests/durations.json.
test-durations: install test-services
	$(UV) run --frozen pytest -q --record-durations

lint: install
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .

# mypy on the package ([tool.mypy] in pyproject.toml: stubs for pandas, boto3 and scipy).
types: install
	$(UV) run --frozen mypy

# The documentation site (docs/, mkdocs.yml) into site/; --strict fails on a broken link, a
# page missing from the nav or a reference that no longer generates.
docs: install
	NO_MKDOCS_2_WARNING=1 $(UV) run --frozen mkdocs build --strict --quiet

docs-serve: install
	NO_MKDOCS_2_WARNING=1 $(UV) run --frozen mkdocs serve

bench: install
	$(UV) run --frozen python benchmarks/fingerprint.py
	$(UV) run --frozen python benchmarks/ingest.py
	$(UV) run --frozen python benchmarks/search.py
