# nostall developer targets.
#   make venv   create .venv (torch==2.13.0 first: a local CPU wheel; then the package + test extra)
#   make demo   torch's DataLoader vs nostall on the SpotGEO-like workload
#   make test   the test suite
#   make bench  the side-by-side benchmark (see BENCHMARKS.md)

PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed
BENCH_ARGS ?=

.PHONY: venv demo test bench clean

venv: $(STAMP)

# Re-installs when pyproject.toml changes; otherwise a no-op.
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet 'torch==2.13.0'
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: venv
	$(VENV)/bin/nostall demo

test: venv
	$(VENV)/bin/python -m pytest -q

bench: venv
	$(VENV)/bin/python benchmarks/bench_core.py --out bench-results/bench_core.json $(BENCH_ARGS)

clean:
	rm -rf build dist src/*.egg-info .pytest_cache
