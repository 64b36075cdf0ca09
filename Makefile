# Katz: the two set-up commands are `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: install demo test test-unit test-integration clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Without a GPU, take the CPU build of torch (a plain `torch` pulls several GB of CUDA wheels).
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q torch==2.13.0; fi
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash scripts/demo.sh

test: install
	$(PY) -m pytest -q -ra

test-unit: install
	$(PY) -m pytest -q -ra -m "not integration"

test-integration: install
	$(PY) -m pytest -q -ra -m integration

clean:
	rm -rf $(VENV) out .pytest_cache
