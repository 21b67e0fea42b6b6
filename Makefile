# Sortie: `make demo` sets everything up and runs a demo on the local cloud; `make test` runs the tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup engine test-deps demo stack-demo test test-unit lint bench clean

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

test: setup lint test-deps
	$(VENV)/bin/pytest -q --durations=15

# The unit tests alone (tests/unit: no engine, no agent processes, no servers): a quick check while editing.
test-unit: setup lint
	$(VENV)/bin/pytest -q tests/unit

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
	rm -rf $(VENV) .pytest_cache .ruff_cache
