# Two commands do all set-up on a fresh machine with Python 3.11:
#   make demo   - creates .venv if missing, installs, runs the demo
#   make test   - creates .venv if missing, installs, runs the tests
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-slow bench venv

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,demo]"
	@touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/normsurgeon demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_convert.py
	$(PY) benchmarks/bench_layers.py
	$(PY) benchmarks/bench_diagnostics.py
	$(PY) benchmarks/bench_domains.py
	$(PY) benchmarks/bench_stateful.py
	$(PY) benchmarks/bench_deploy.py
	$(PY) benchmarks/bench_distributed.py
