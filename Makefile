VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow fuzz lint bench clean

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
	$(VENV)/bin/ruff check gconv_compile passes tests benchmarks examples scripts
	$(VENV)/bin/ruff format --check gconv_compile passes tests benchmarks examples scripts

bench: $(STAMP)
	$(PY) benchmarks/fold_pass_scaling.py

clean:
	rm -rf $(VENV) build *.egg-info
