# `make run` serves the app and `make test` runs the tests, each in .venv, made when missing:
# Debian's system Python refuses `pip install` outside a virtual environment (PEP 668).
# Requirements are installed again only when a requirements file changed (a stamp in .venv).
# PYTEST_ARGS adds pytest options: CI runs `make test PYTEST_ARGS=--cov` (coverage, pyproject).
VENV := .venv
PYTHON := $(VENV)/bin/python

.PHONY: run test clean

run: $(VENV)/installed-run
	$(PYTHON) server.py

# PYTHONDONTWRITEBYTECODE emptied: pytest keeps the test modules and its plugins (Hypothesis,
# Schemathesis) rewritten for its assertions in __pycache__, instead of rewriting them again in
# every worker of every run (about 2 CPU-seconds a process).
test: $(VENV)/installed-test
	PYTHONDONTWRITEBYTECODE= $(VENV)/bin/pytest $(PYTEST_ARGS)

$(PYTHON):
	python3 -m venv $(VENV)

$(VENV)/installed-run: requirements.txt | $(PYTHON)
	$(PYTHON) -m pip install -r requirements.txt
	touch $@

$(VENV)/installed-test: requirements.txt requirements-dev.txt | $(PYTHON)
	$(PYTHON) -m pip install -r requirements-dev.txt
	touch $@

clean:
	rm -rf $(VENV)
