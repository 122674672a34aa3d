# The two commands of the README: `make demo` and `make test`.
# Both create or update the virtualenv themselves (.venv), installing torch first so that
# pip takes the local CPU wheel instead of resolving a CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test venv bench-simulate clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps sbibm==1.1.0
	@# the compiled Lotka–Volterra kernel, built once per machine (≈ 25 s) and kept
	$(PY) -c "from simulators.lotka_volterra import build_kernel; build_kernel()"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/implicitbayes run lotka_volterra_sde --out results/lotka_volterra_sde

# one worker per core (each on one thread), whole test files to a worker so that their fitted
# fixtures are made once, the longest files first (tests/conftest.py): on 2 cores the suite
# runs in about half the time of one process
test: venv
	$(PY) -m pytest -q -n auto --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

bench-simulate: venv
	$(PY) -m pip install --quiet "torchsde>=0.2.6"
	$(PY) benchmarks/simulate_lv.py

clean:
	rm -rf $(VENV) results
