# corral: `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# Debug builds for tests (fast to compile); release builds only for benchmarks.
DEV_BUILD     := --config-settings=build-args="--profile dev"
RELEASE_BUILD := --config-settings=build-args="--profile release"

.PHONY: help venv dev dev-release demo test test-rust test-python typecheck bench-smoke lint bench bench-rust bench-python bench-bringup bench-survive bench-metrics bench-proxy bench-real clean

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

venv: $(PY) ## Create .venv (reused when present)

# An editable install leaves python/ uncompiled, and with PYTHONDONTWRITEBYTECODE set every
# command would compile the package again (~100 ms); a wheel's install compiles it, so does this.
dev: venv ## Build the extension (debug) and install it editable with the dev extras
	$(PIP) install -q -e '.[dev]' $(DEV_BUILD)
	$(PY) -m compileall -q python/corral

dev-release: venv ## Build the extension in release mode and install it editable
	$(PIP) install -q -e '.[dev]' $(RELEASE_BUILD)
	$(PY) -m compileall -q python/corral

# The demo stack stops by itself after DEMO_FOR (Ctrl-C stops it sooner); DEMO_FOR= runs until Ctrl-C.
DEMO_FOR ?= 20s
demo: dev ## Build, install into .venv and run the demo stack (examples/stack) in the foreground
	$(VENV)/bin/corral up examples/stack/corral.yaml $(if $(DEMO_FOR),--run-for $(DEMO_FOR))
	@echo "--- what the worker (on its exclusive core) did through the three API replicas:"
	$(VENV)/bin/corral logs worker examples/stack/corral.yaml -n 6

test: dev test-rust test-python typecheck bench-smoke ## Everything CI runs: cargo test, pytest, mypy --strict, stubtest, bench smoke

test-rust: ## cargo test for the workspace (the core has no Python in its tree)
	cargo test --workspace
	@if cargo tree -p corral-core -e normal,build | grep -q pyo3; then echo "corral-core depends on pyo3"; exit 1; fi

test-python: dev ## pytest
	$(PY) -m pytest

typecheck: dev ## mypy --strict and stubtest
	$(PY) -m mypy
	$(PY) -m mypy.stubtest corral._core

bench-smoke: dev ## Build the Criterion benches and run pytest-benchmark once per case, without timing
	cargo bench -p corral-core --no-run --profile dev
	$(PY) -m pytest benches/python --benchmark-disable -q

lint: dev ## rustfmt, clippy -D warnings, ruff, mypy --strict, stubtest
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(PY) -m ruff check python tests benches examples
	$(PY) -m mypy
	$(PY) -m mypy.stubtest corral._core

bench: bench-rust bench-python ## Both suites in release mode, then one table: operation, target, median
	$(PY) benches/report.py bench-results/python.json

# supervisord and circus run the same workload in the same run as references (the machine is noisy).
# make bench-bringup N=1000: the scale figures, with the cost at 200 in the same run (linearity)
# and `corral ls` over 10 stacks of 100.
N ?= 200
BRINGUP_ARGS ?= --baseline $(if $(filter-out 200,$(N)),--linear 200 --ls 10x100)
bench-survive: dev-release ## kill -9 of the agent under 200 instances: keeper restart, re-adoption, lines lost, keeper memory
	cargo build --release -p corral-core --example tiny_server
	$(PY) benches/survive.py $(SURVIVE_ARGS)

bench-metrics: dev-release ## /metrics under 200 instances: one scrape (median), agent CPU with a scrape a second
	cargo build --release -p corral-core --example tiny_server
	$(PY) benches/metrics.py $(METRICS_ARGS)

bench-bringup: dev-release ## N instances (N=200; N=1000 adds linearity, corral ls) under corral up -d beside supervisord, circus
	cargo build --release -p corral-core --example tiny_server
	$(PIP) install -q supervisor circus
	$(PY) benches/bringup.py --instances $(N) $(BRINGUP_ARGS)

bench-proxy: dev-release ## The front proxy beside HAProxy (same run): req/s, CPU per request, added latency
	cargo build --release -p corral-core --example http_backend
	@command -v wrk >/dev/null && command -v haproxy >/dev/null || { echo "needs wrk and haproxy: sudo apt-get install -y wrk haproxy"; exit 1; }
	$(PY) benches/proxy.py $(PROXY_ARGS)

bench-real: dev-release ## PostgreSQL, Redis and nginx examples under pgbench, redis-benchmark, HTTP, beside direct and HAProxy
	$(PY) benches/real.py $(REAL_ARGS)

bench-rust: ## Criterion benches (release)
	cargo bench -p corral-core --bench core

bench-python: dev-release ## pytest-benchmark against a release build
	mkdir -p bench-results
	$(PY) -m pytest benches/python -q --benchmark-json=bench-results/python.json --benchmark-columns=median,iqr,rounds

clean: ## Remove build outputs and the venv
	cargo clean
	rm -rf $(VENV) bench-results .pytest_cache .mypy_cache python/corral/*.so
