# Quick start: `make demo`, `make test`; `make lab` opens the notebooks in JupyterLab.
VENV ?= .venv
PY := $(VENV)/bin/python
# requirements.txt holds the runtime lower bounds (Colab, pip users), requirements-test.txt the
# test tools (JupyterLab, nbval, pytest, Playwright); requirements-lock.txt the exact versions
# that setup installs, so every machine and CI test the same packages.
LOCK := requirements-lock.txt
REQS := -r requirements.txt -r requirements-test.txt
REQ_HASH := $(shell cat requirements.txt requirements-test.txt $(LOCK) pyproject.toml | sha256sum | cut -c1-12)
STAMP := .make/installed-$(REQ_HASH)
JOBS ?= 2

.PHONY: setup demo test run-tests test-latest lock test-diffusers-min lab clean

$(STAMP): requirements.txt requirements-test.txt $(LOCK) pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(REQS) -c $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@mkdir -p .make && rm -f .make/installed-* && touch $@

setup: $(STAMP)

demo: setup
	$(PY) -m lr_tutorial demo --out outputs/demo --overwrite

# `make test`: the unit tests, the browser test (skips without Chromium/Playwright) and every built
# notebook re-executed by nbval (--nbval-lax: only cells marked # NBVAL_CHECK_OUTPUT compare
# outputs). --dist loadfile keeps each notebook's cells on one worker. PYTHONPATH makes the
# notebook kernels import this checkout's lr_tutorial; LR_EXERCISE_SOLUTIONS=1 makes every
# exercise cell that goes through exercises.attempt run the package's solution through its checker.
NOTEBOOKS = $(wildcard notebooks/[0-9][0-9]_*.ipynb)

test: setup
	@$(MAKE) --no-print-directory run-tests PY=$(PY)

run-tests:
	@$(if $(NOTEBOOKS),,echo "note: no built notebooks in notebooks/ (python notebooks/build.py), nbval skipped")
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 LR_EXERCISE_SOLUTIONS=1 PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} \
	  $(PY) -m pytest -n $(JOBS) --dist loadfile tests \
	  $(if $(NOTEBOOKS),--nbval-lax --nbval-current-env $(NOTEBOOKS))

# `make test-latest`: the same suite on the newest releases that requirements.txt admits, in a
# virtual environment of its own (.venv-latest), so a drift in a dependency is found on purpose.
# Not part of CI. When it passes and you want CI on those versions: `make lock`.
LATEST_VENV ?= .venv-latest

test-latest:
	@test -x $(LATEST_VENV)/bin/python || python3 -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager $(REQS)
	$(LATEST_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	@$(LATEST_VENV)/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|diffusers|transformers|peft|accelerate) '
	@$(MAKE) --no-print-directory run-tests PY=$(LATEST_VENV)/bin/python

# `make lock`: rewrite requirements-lock.txt from a fresh environment built from requirements.txt.
lock:
	rm -rf .make/lock-venv && python3 -m venv .make/lock-venv
	.make/lock-venv/bin/python -m pip install -q --upgrade pip
	.make/lock-venv/bin/python -m pip install -q $(REQS)
	{ sed -n '/^#/p' $(LOCK); .make/lock-venv/bin/python -m pip freeze --exclude-editable; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .make/lock-venv

# The pipeline tests against the lowest supported diffusers (requirements.txt's lower bound),
# installed once (pure Python, no dependencies) into a cached --target folder put first on PYTHONPATH.
DIFFUSERS_MIN := $(shell sed -n 's/^diffusers>=\([0-9.]*\).*/\1/p' requirements.txt)
DIFFUSERS_MIN_DIR ?= $(HOME)/.cache/lr_tutorial/diffusers-$(DIFFUSERS_MIN)

test-diffusers-min: setup
	@test -f $(DIFFUSERS_MIN_DIR)/.complete || { rm -rf $(DIFFUSERS_MIN_DIR) && \
	  $(PY) -m pip install -q --no-deps --target $(DIFFUSERS_MIN_DIR) diffusers==$(DIFFUSERS_MIN) && \
	  touch $(DIFFUSERS_MIN_DIR)/.complete; }
	PYTHONPATH=$(DIFFUSERS_MIN_DIR) $(PY) -c "import diffusers as d; \
	  assert d.__version__ == '$(DIFFUSERS_MIN)', d.__file__; print('diffusers', d.__version__)"
	PYTHONPATH=$(DIFFUSERS_MIN_DIR) OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest \
	  -p no:cacheprovider -q tests/test_pipeline.py tests/test_sd_loading.py

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf .make outputs .pytest_cache
