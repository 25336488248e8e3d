# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv
# and installs the project (with its dev tools) when that hasn't happened yet.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stageflow-installed
# The tests also run batch scoring on Spark: the optional `spark` extra (pyspark), kept
# out of `make demo`, which needs only the base install.
SPARK_STAMP := $(VENV)/.stageflow-spark-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-loaded unit lint format bench bench-tuning bench-serving bench-batch bench-deps ui-deps java-deps airflow-venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Airflow (`stageflow[airflow]`, for dags/ and tests/test_dags.py) gets a venv of its own:
# it pins fastapi below what the dev venv resolves (0.136 vs 0.165), and the scheduler is
# not something Stageflow's own processes need.
AIRFLOW_VENV := .venv-airflow
AIRFLOW_STAMP := $(AIRFLOW_VENV)/.stageflow-installed

$(AIRFLOW_STAMP): pyproject.toml
	test -x $(AIRFLOW_VENV)/bin/python || $(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet -e '.[airflow]'
	touch $(AIRFLOW_STAMP)

airflow-venv: $(AIRFLOW_STAMP)

$(SPARK_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,spark]'
	touch $(SPARK_STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/stageflow demo

# Most tests wait on servers starting and switching; two processes keep both cores busy.
# Tests go out slowest first (tests/conftest.py, SLOWEST_FIRST), one at a time to
# whichever worker is free; tests marked xdist_group share a server on one worker.
TEST_WORKERS ?= 2

test: $(SPARK_STAMP) $(AIRFLOW_STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -n $(TEST_WORKERS) \
		--dist loadgroup --no-loadscope-reorder

# `make test` with one CPU-bound process busy beside it, as on a laptop doing other work.
# The load stops when the tests end, fail or are interrupted.
test-loaded: $(STAMP)
	@$(PYTHON) -c 'while True: pass' & load=$$!; \
	trap 'kill $$load 2>/dev/null' EXIT; trap 'exit 130' INT TERM; \
	echo "test-loaded: a CPU-bound process (pid $$load) is busy on one core"; \
	$(MAKE) --no-print-directory test

unit: $(SPARK_STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/tracking_latency.py

bench-tuning: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/tuning_overhead.py

# Local chunked scoring against Spark local[2] (needs Java: `make java-deps`).
bench-batch: $(SPARK_STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/batch_scoring.py

# Needs wrk: `make bench-deps`.
bench-serving: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/serving_throughput.py

# The HTTP load generator for bench-serving (Debian/Ubuntu; sudo unless root).
bench-deps:
	$(SUDO) apt-get update
	$(SUDO) apt-get install -y wrk

# Headless Chromium and its WebDriver for tests/test_ui.py (Debian/Ubuntu; sudo unless root).
ui-deps:
	$(SUDO) apt-get update
	$(SUDO) apt-get install -y chromium chromium-driver

# The Java runtime Spark needs for `score --engine spark` and its tests (Debian/Ubuntu).
java-deps:
	$(SUDO) apt-get update
	$(SUDO) apt-get install -y openjdk-17-jre-headless

clean:
	rm -rf .stageflow mlruns mlartifacts .pytest_cache .ruff_cache
