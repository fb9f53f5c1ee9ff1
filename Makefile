# Two commands on a fresh machine: `make run` (the end-to-end job on the bundled sample)
# and `make test` (the whole suite). Both create .venv and install the pinned stack first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# the venv's bundled pip (23.x) mis-resolves lxml[html_clean]: upgrade it first
	$(PY) -m pip install -q --upgrade pip==26.3
	# torch first, from the CPU wheel, so no dependency can pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/refinery run

test: install
	$(PY) -m pytest -q

# the pure-logic tier: no Prefect API, no subprocess, nothing marked slow (markers: tests/conftest.py)
test-fast: install
	$(PY) -m pytest -q -m "not prefect and not subprocess and not slow"

# benchmarks run in their own venv: the stack plus the `bench` extra (DataTrove as the baseline),
# so DataTrove's dependencies never touch .venv
BENCH_VENV  ?= .venv-bench
BENCH_PY    := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed

$(BENCH_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install -q --upgrade pip==26.3
	$(BENCH_PY) -m pip install -q torch==2.13.0
	$(BENCH_PY) -m pip install -q -c constraints.txt -e '.[test,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BENCH_PY) bench/extract.py
	$(BENCH_PY) bench/curate.py
	$(BENCH_PY) bench/curate.py --dedup-memory 200000 1000000
	$(BENCH_PY) bench/selection.py
	$(BENCH_PY) bench/toxicity.py --plot docs/bench-toxicity.png
	$(BENCH_PY) bench/shard.py
	$(BENCH_PY) bench/loader.py
	$(BENCH_PY) bench/e2e.py

clean:
	rm -rf runs .pytest_cache
