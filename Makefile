VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow fuzz lint bench clean gpu-kit gpu-kit-rehearse

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/01_chunked_conv/run_demo.py

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

fuzz: $(STAMP)
	$(PY) -m pytest -q tests/test_fuzz.py --hypothesis-profile=long

lint: $(STAMP)
	$(VENV)/bin/ruff check gconv_compile passes tests benchmarks examples scripts gpu_kit
	$(VENV)/bin/ruff format --check gconv_compile passes tests benchmarks examples scripts gpu_kit

bench: $(STAMP)
	$(PY) benchmarks/fold_pass_scaling.py

clean:
	rm -rf $(VENV) build *.egg-info

# The GPU kit (docs/gpu.md): dist/gpu-kit/, at most 56 MiB, for a bare CPython 3.12 GPU machine.
KIT := dist/gpu-kit
WHEELS := build/wheels
FFI_WHEEL := $(WHEELS)/.apache-tvm-ffi-cp312
# The rehearsal's interpreter: pyenv's 3.12 (plain `python3.12` is refused by the pyenv shim).
PY312 ?= $(shell pyenv root 2>/dev/null)/versions/3.12.1/bin/python3.12
BARE := build/py312-bare
REHEARSAL ?= build/gpu-kit-rehearsal

$(FFI_WHEEL): $(STAMP)
	$(PIP) download -q apache-tvm-ffi==0.1.14.post1 --python-version 3.12 --implementation cp \
		--only-binary=:all: --platform manylinux_2_28_x86_64 --no-deps -d $(WHEELS)
	touch $@

gpu-kit: $(STAMP) $(FFI_WHEEL)
	CUDA_PATH=$${CUDA_PATH:-/usr/local/cuda} $(PY) scripts/make_gpu_kit.py --out $(KIT)

# numpy, onnx and onnxruntime only, as on the GPU machine minus torch; the kit then runs with
# PIP_NO_INDEX=1 from a copy outside the checkout.
$(BARE)/.installed:
	$(PY312) -m venv $(BARE)
	$(BARE)/bin/pip install -q numpy 'onnx==1.23.*' onnxruntime
	touch $@

gpu-kit-rehearse: $(BARE)/.installed
	@test -f $(KIT)/manifest.json || { echo "gpu-kit-rehearse: no $(KIT); run make gpu-kit first" >&2; exit 2; }
	copy=$$(mktemp -d /tmp/gpu-kit-copy.XXXXXX) && cp -r $(KIT)/. $$copy/ && \
	PIP_NO_INDEX=1 PYTHON=$(CURDIR)/$(BARE)/bin/python bash $$copy/run.sh --rehearse \
		--out $(abspath $(REHEARSAL)); status=$$?; rm -rf $$copy; exit $$status
