# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3

.PHONY: install install-test test demo

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -q -r requirements.txt

install-test: install
	$(PYTHON) -m pip install -q -r requirements-test.txt

test: install-test
	$(PYTHON) -m pytest -q tests
