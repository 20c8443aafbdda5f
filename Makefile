# Two entry points on a fresh machine with Python 3.11:
#   make run    create .venv if missing, install, run the default experiment (digits)
#   make test   same set-up, run the test suite
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench mutate clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/cascade run configs/digits.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks --benchmark-enable
	$(BIN)/python benchmarks/router_speedup.py

# mutation testing of the numeric core (sweep, selection, guarantee, violations, the
# AppealNet objective; pyproject.toml's [tool.mutmut]), then the routing kernels by hand
# (tests/mutants_by_hand.py). Not part of CI; about 20 minutes on 2 cores, at low priority.
mutate: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,mutate]'
	rm -rf mutants
	nice -n 19 $(BIN)/mutmut run --max-children 2
	$(BIN)/mutmut results
	nice -n 19 $(BIN)/python tests/mutants_by_hand.py

clean:
	rm -rf runs .pytest_cache mutants
