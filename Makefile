# mrsync developer targets (GNU make).
#
#   make venv        .venv with python3 (>= 3.11) and `pip install -e '.[test]'`
#   make demo        sync a sample tree to demo/t1 demo/t2 demo/t3 and check it with rsync
#   make test        lint + type check + pytest (as root: inside a private network namespace)
#   make lint        ruff + mypy only
#   make bench       bench/local_sync.py (BENCH_ARGS="--runs 5 ...")
#   make clean       remove demo/ and caches; `make distclean` also removes .venv
#
# Variables: PYTHON (interpreter for a new venv), VENV (default .venv), PYTEST_ARGS, BENCH_ARGS.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mrsync-installed
PYTEST_ARGS ?=
BENCH_ARGS ?=
export PYTHON

# Network safety: the tests run in a network namespace of their own, where only lo exists, so
# nothing they do can put a packet on a real interface (as a normal user, inside a user
# namespace too: unshare -rn). tests/conftest.py refuses to run anywhere else.
ifeq ($(shell id -u),0)
ISOLATE := unshare -n sh -c 'ip link set lo up && exec "$$0" "$$@"'
else
ISOLATE := unshare -rn sh -c 'ip link set lo up && exec "$$0" "$$@"'
endif

.PHONY: help venv demo test test-deps lint bench clean distclean

help:
	@sed -n '3,10s/^# \{0,1\}//p' Makefile

## --- environment -----------------------------------------------------------------------------

venv: $(STAMP)

# Re-run pip only when the build inputs (pyproject.toml, setup.py, the compiled receive path)
# are newer than the stamp, or the venv is missing.
ifeq ($(wildcard $(PY)),)
$(STAMP): FORCE
endif
$(STAMP): pyproject.toml setup.py src/mrsync/_speedups.c
	bash scripts/venv.sh $(VENV) $@

.PHONY: FORCE
FORCE:

## --- demo ------------------------------------------------------------------------------------

demo: venv
	bash scripts/demo.sh $(VENV)

## --- checks ----------------------------------------------------------------------------------

lint: venv
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/mypy

test-deps:
	@bash scripts/test-deps.sh

test: venv test-deps lint
ifeq ($(shell id -u),0)
	@unshare -n true 2>/dev/null || { \
	  echo "make test: running as root, the tests must run in a private network namespace," \
	       "but 'unshare -n' failed here (no CAP_SYS_ADMIN?). Run as a normal user, or" \
	       "give the container that capability." >&2; exit 1; }
endif
	$(info $(strip $(ISOLATE) $(PY) -m pytest -q $(PYTEST_ARGS)))
	@$(ISOLATE) $(PY) -m pytest -q $(PYTEST_ARGS) || { \
	  rc=$$?; echo "make test: pytest exited with status $$rc" >&2; exit $$rc; }

## --- benchmarks ------------------------------------------------------------------------------

bench: venv
	$(PY) bench/local_sync.py $(BENCH_ARGS)

# mrsync against rsync, uftp and udpcast on the network lab (root only; the script runs itself
# in a private network namespace). The full matrix takes hours: BENCH_ARGS="--targets 4 --runs 1"
# or see bench/README.md. Writes bench/RESULTS.md unless BENCH_ARGS has --output.
.PHONY: lab-bench
lab-bench: venv
	@bash scripts/bench-deps.sh
	$(PY) bench/lab_bench.py $(BENCH_ARGS)

## --- cleaning --------------------------------------------------------------------------------

clean:
	rm -rf demo bench/out build .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find src tests bench scripts -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) src/*.egg-info
