# Sortie: `make demo` sets everything up and runs a demo on the local cloud; `make test` runs the tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed
# Extra pytest arguments for the test targets, e.g. `make test-unit PYTEST_ARGS="-n 2"` (pytest-xdist workers: on a
# quiet machine with cores to spare; bench/suite.py -n measures whether it pays).
PYTEST_ARGS ?=

.PHONY: setup engine test-deps test-plan demo stack-demo test test-unit test-unit-all test-integration test-e2e test-fast lint \
	bench bench-suite docs docs-check clean

setup: $(STAMP) engine

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

engine: $(STAMP)
	$(VENV)/bin/sortie engine install

demo: setup
	$(VENV)/bin/sortie jobs launch -y -n hello examples/hello.yaml
	$(VENV)/bin/sortie jobs queue

stack-demo: setup
	$(VENV)/bin/python examples/stack_demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

# What the tests need beyond the venv: Debian packages (apt-get as root, else the one command to run), the
# Kubernetes provider plugin, and the test cluster's binaries (kube-apiserver, -controller-manager, -scheduler and
# kubelet v1.37.2, kwok): built from the Go module proxy on a machine's first run, cached under ~/.cache/sortie
# keyed by version (with Go's own caches, ~/.cache/go-build and ~/go/pkg/mod). A failed build fails `make test`.
test-deps: setup
	.ci/test-deps.sh
	$(VENV)/bin/sortie engine install --plugin kubernetes
	$(VENV)/bin/python -m orchestrator.infra.kube_binaries

# What a first run on this machine will build, and about how long it takes (nothing on a warm machine).
test-plan:
	@.ci/plan.sh

# Every test, every tier (what CI runs: .ci/run), after the docs check. Each run records its tests' times for
# `make bench-suite`.
test: test-plan setup lint docs-check test-deps
	$(VENV)/bin/pytest -q --durations=15 $(PYTEST_ARGS)

# The docs site (MkDocs Material, docs/ and mkdocs.yml): the generated references rewritten from the code, then the
# site built into site/ with --strict (a broken link or anchor, or a page missing from the nav, fails it).
# `docs-check` (run by `make test`) also fails when a generated reference is stale, and writes nothing in docs/.
docs: $(STAMP)
	$(VENV)/bin/python docs/gen_reference.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-check: $(STAMP)
	$(VENV)/bin/python docs/gen_reference.py --check
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# One tier at a time (markers set by tests/conftest.py): `unit` (tests/unit: no engine, no agent processes, no
# servers; the quick check while editing, so without the tests marked `slow`: the crash-point harness and the
# dashboard's 10,000-job API, which `make test` and `make test-unit-all` run), `integration` (one real part on its
# own), `e2e` (the CLI and controller end to end); `test-fast` is every tier but the tests marked `slow`.
test-unit: setup lint
	$(VENV)/bin/pytest -q -m "unit and not slow" tests/unit $(PYTEST_ARGS)

test-unit-all: setup lint
	$(VENV)/bin/pytest -q -m unit tests/unit --durations=10 $(PYTEST_ARGS)

test-integration: setup test-deps
	$(VENV)/bin/pytest -q -m integration tests/e2e --durations=10 $(PYTEST_ARGS)

test-e2e: setup test-deps
	$(VENV)/bin/pytest -q -m e2e tests/e2e --durations=10 $(PYTEST_ARGS)

test-fast: setup lint test-deps
	$(VENV)/bin/pytest -q -m "not slow" --durations=10 $(PYTEST_ARGS)

# The suite's own figures: per tier, from the last pytest run's record (tests/support/timing.py).
bench-suite:
	$(VENV)/bin/python bench/suite.py

bench: setup test-deps
	$(VENV)/bin/python bench/stack_ops.py
	$(VENV)/bin/python bench/jobs.py
	$(VENV)/bin/python bench/recovery.py
	$(VENV)/bin/python bench/pools.py
	$(VENV)/bin/python bench/optimizer.py
	$(VENV)/bin/python bench/controller_sizing.py
	$(VENV)/bin/python bench/dashboard.py
	$(VENV)/bin/python bench/node_events.py
	$(VENV)/bin/python bench/kubernetes.py
	$(VENV)/bin/python bench/replicas.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site
