# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PY = .venv/bin/python
NX = .venv/bin/nextaction
export NEXTACTION_DATA_DIR ?= $(CURDIR)/var
PYTEST_ARGS ?=
# `make test`: pytest-xdist workers (0 = one process); the integration tests stay together on one of them
TEST_WORKERS ?= 2

.PHONY: venv test test-fast test-unit test-integration lint-imports demo kafka-start kafka-stop bench quality clean

venv:
	@scripts/venv.sh >/dev/null

# The whole suite: the layer contract (import-linter), then every test (unit, slow, datasets, integration),
# on TEST_WORKERS processes, the slowest 25 listed at the end.
test: venv lint-imports
	$(PY) -m pytest -n $(TEST_WORKERS) --durations=25 $(PYTEST_ARGS)

# The fast loop (no broker, no dataset, no child process, only tiny trainings): well under a minute.
test-fast: venv lint-imports
	$(PY) -m pytest -m "not integration and not slow and not datasets" $(PYTEST_ARGS)

lint-imports: venv
	.venv/bin/lint-imports --no-cache

test-unit: venv
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

test-integration: venv
	$(PY) -m pytest -m integration $(PYTEST_ARGS)

kafka-start: venv
	$(NX) kafka start

kafka-stop: venv
	$(NX) kafka stop

demo: venv
	$(NX) demo

bench: venv
	$(PY) benchmarks/e2e_throughput.py

quality: venv
	$(PY) benchmarks/quality.py

clean:
	-$(NX) kafka stop
	rm -rf var .pytest_cache
