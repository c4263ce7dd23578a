# Two commands a new machine needs: `make run` and `make test`.
# Both create .venv, install torch first (a pinned build, so pip never pulls a
# different one), then diffqueue in editable mode.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
DATA_DIR ?= diffqueue-data

.PHONY: install run test clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[worker,test]" --config-settings editable_mode=compat
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/diffqueue up --host $(HOST) --port $(PORT) --data-dir $(DATA_DIR)

test: install
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(DATA_DIR) *.egg-info
