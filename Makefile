# Two entry points, both on a fresh machine with only Python 3.10+:
#   make demo   create .venv, install, distill the embedded default model
#   make test   install the test extras, run the whole suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first: on the project machines this pin takes the CPU build on disk; a plain
# `torch` requirement would pull a multi-GB CUDA build. Override for GPU hosts,
# e.g. make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# the demo extra: what the README's benchmark commands need beyond the package (scikit-learn)
$(VENV)/.installed: setup.py $(PY)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[demo]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m accel_distill.demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[dev]"
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf outputs build *.egg-info
