# Quick start: `make demo`, `make test`; `make lab` opens the notebooks in JupyterLab.
VENV ?= .venv
PY := $(VENV)/bin/python
REQ_HASH := $(shell cat requirements.txt pyproject.toml | sha256sum | cut -c1-12)
STAMP := .make/installed-$(REQ_HASH)
JOBS ?= 2

.PHONY: setup demo test lab clean

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@mkdir -p .make && rm -f .make/installed-* && touch $@

setup: $(STAMP)

demo: setup
	$(PY) -m lr_tutorial demo --out outputs/demo

# `make test`: the unit tests, the browser test (skips without Chromium/Playwright) and every built
# notebook re-executed by nbval (--nbval-lax: only cells marked # NBVAL_CHECK_OUTPUT compare
# outputs). --dist loadfile keeps each notebook's cells on one worker. PYTHONPATH makes the
# notebook kernels import this checkout's lr_tutorial.
NOTEBOOKS = $(wildcard notebooks/[0-9][0-9]_*.ipynb)

test: setup
	@$(if $(NOTEBOOKS),,echo "note: no built notebooks in notebooks/ (python notebooks/build.py), nbval skipped")
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} \
	  $(PY) -m pytest -n $(JOBS) --dist loadfile tests \
	  $(if $(NOTEBOOKS),--nbval-lax --nbval-current-env $(NOTEBOOKS))

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf .make outputs .pytest_cache
