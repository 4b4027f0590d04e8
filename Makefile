# The two set-up commands: `make demo` and `make test`. Each creates the virtualenv
# and installs what it needs (redis-server through apt-get where it is missing).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast proto bench install redis-server clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch first, so that no dependency pulls a CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP) redis-server proto

redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; }

proto: $(STAMP)
	$(PY) -m qlmserve.protos

demo: install
	$(VENV)/bin/qlm demo

test: install
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

bench: install
	$(VENV)/bin/qlm bench

clean:
	rm -rf $(VENV) var build *.egg-info
