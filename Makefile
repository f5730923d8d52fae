# Two commands do all the set-up on a fresh machine:  make train  /  make test
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test lint venv clean

$(STAMP): pyproject.toml scripts/install_reference_packages.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) scripts/install_reference_packages.py
	touch $(STAMP)

venv: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/rlr-train $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pyright

# Every suite (unit, integration, statistical) after the linters: what CI runs.
test: lint
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs multirun
