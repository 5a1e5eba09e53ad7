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

# The tiny Owl through all stages on CPU: draw the data, train stages 0, 1, 2, then ask about a held-out image.
DEMO_IMAGE ?= data/synth/images/h_00001.png
demo: install
	$(PYTHON) data.py synth --out data/synth
	$(PYTHON) train.py --stage all --data-dir data/synth --out-dir runs/owl-tiny
	@echo
	@echo "Q: How many shapes are there? ($(DEMO_IMAGE))"
	@printf "A: "
	@$(PYTHON) owl.py --checkpoint runs/owl-tiny/stage2 --image $(DEMO_IMAGE) --prompt "How many shapes are there?" --temperature 0
