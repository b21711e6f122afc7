# Two entry points: `make demo` (set up, synthesize the demo corpus, run the pipeline) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_MINUTES ?= 10

.PHONY: demo test bench clean

$(BIN)/hubert-pipeline: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

demo-corpus: | $(BIN)/hubert-pipeline
	rm -rf demo-corpus.partial
	$(BIN)/hubert-pipeline demo-corpus demo-corpus.partial --minutes $(DEMO_MINUTES) --seed 0
	mv demo-corpus.partial demo-corpus

demo: $(BIN)/hubert-pipeline demo-corpus
	$(BIN)/hubert-pipeline run configs/demo.yaml

test: $(BIN)/hubert-pipeline
	$(BIN)/python -m pytest -q

bench: $(BIN)/hubert-pipeline
	$(BIN)/python bench/features.py

clean:
	rm -rf runs demo-corpus demo-corpus.partial bench-out
