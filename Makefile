# The two commands a newcomer runs: `make serve` and `make test`. Each creates the venv it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU by default; on a CUDA machine: `make serve CONSTRAINTS=` takes a CUDA torch from pyproject's range.
CONSTRAINTS ?= constraints-cpu.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

.PHONY: setup setup-test serve test test-fast lint train clean

$(VENV)/.runtime: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PIP_C) -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PY) -m pip install -q $(PIP_C) -e '.[test]'
	touch $@

setup: $(VENV)/.runtime
setup-test: $(VENV)/.test

serve: setup
	$(VENV)/bin/glm-serve $(ARGS)

lint: setup-test
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The inner loop: everything but the tests that start a server subprocess (marker `server`, tests/conftest.py).
test-fast: lint
	$(PY) -m pytest -q -m "not server" $(PYTEST_ARGS)

# Retrain the default model from the stdlib (model/train.py): corpus, tokenizer, then the run, exported to
# $(RUNS)/export. Resumable: run it again after an interruption and it continues from the last checkpoint.
RUNS ?= runs
$(RUNS)/data/train.jsonl: | $(VENV)/.runtime
	$(PY) -m model.corpus --out $(RUNS)/data $(CORPUS_ARGS)
$(RUNS)/tokenizer/tokenizer.json: $(RUNS)/data/train.jsonl
	$(PY) -m model.build_tokenizer --corpus $(RUNS)/data --out $(RUNS)/tokenizer

train: setup $(RUNS)/tokenizer/tokenizer.json
	$(PY) -m model.train --data $(RUNS)/data --tokenizer $(RUNS)/tokenizer --out $(RUNS)/train \
		--export $(RUNS)/export --resume $(ARGS)

clean:
	rm -rf $(VENV)
