# Two commands do all the set-up on a fresh machine:  make train  /  make test
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test venv clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/rlr-train $(ARGS)

# Every suite (unit, integration, statistical): what CI runs.
test: $(STAMP)
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs multirun
