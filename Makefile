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

test: setup
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -n $(JOBS) --dist loadfile

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf .make outputs .pytest_cache
