# `make demo` and `make test` are the two commands a newcomer needs (README.md).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test install bench clean-demo

# The environment is (re)built when pyproject.toml changes.
$(BIN)/ddpm: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/ddpm

demo: $(BIN)/ddpm
	$(BIN)/ddpm demo

test: $(BIN)/ddpm
	$(BIN)/pytest -q

clean-demo:
	rm -rf demo-run
