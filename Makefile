# Katz: the two set-up commands are `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: install demo test test-unit test-integration clean perf-tools perf

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
	@$(MAKE) --no-print-directory perf-tools || echo "make: perf_analyzer is not installed; its smoke test skips (fails under CI)"
	$(PY) -m pytest -q -ra

test-unit: install
	$(PY) -m pytest -q -ra -m "not integration"

test-integration: install
	$(PY) -m pytest -q -ra -m integration

# perf_analyzer beside the venv (idempotent): the binary from the tritonclient 2.44 wheel,
# Debian's libb64-0d (apt-get, as root) and libcudart from the nvidia-cuda-runtime-cu12 wheel
perf-tools: install
	$(VENV)/bin/katz perf --install

# make perf URL=localhost:8000 [PROTOCOL=grpc] [PERF_ARGS="--concurrency 1:8:1 --controlnet canny --lora style"]
URL      ?= localhost:8000
PROTOCOL ?= http
perf: perf-tools
	$(VENV)/bin/katz perf --url $(URL) --protocol $(PROTOCOL) $(PERF_ARGS)

clean:
	rm -rf $(VENV) out .pytest_cache
