# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3

.PHONY: install install-test test demo

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -q -r requirements.txt

install-test: install
	$(PYTHON) -m pip install -q -r requirements-test.txt
	@# tests/test_page.py drives chat.html in headless Chromium (Debian's packages; apt-get needs root)
	@command -v chromedriver >/dev/null 2>&1 || { echo "installing chromium and chromium-driver for tests/test_page.py"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

test: install-test
	$(PYTHON) -m pytest -q tests

# The paper's recipe on a tiny Owl, on CPU, each step a command you can copy: draw the synthetic world, make the
# stand-ins for LLaMA-7B and CLIP (tiny.py), stage 1 and stage 2 exactly as with the real weights (train.py), score
# the held-out questions, then ask about a held-out image.
D ?= data/synth
RUN ?= runs/owl-tiny
DEMO_IMAGE ?= $(D)/images/h_00001.png
# auto: bf16 autocast on a CPU with bf16 instructions (AVX512-BF16, AMX), float32 elsewhere: 19 instead of 24
# minutes on the AMD EPYC, and over four seeds in each its accuracy stays within float32's own seed-to-seed spread
# (docs/lab-notes.md). `make demo DTYPE=float32` trains in float32 everywhere.
DTYPE ?= auto
demo: install
	$(PYTHON) synthetic.py --out $(D)
	$(PYTHON) tiny.py pretrain --data-dir $(D) --out-dir $(RUN) --dtype $(DTYPE)
	$(PYTHON) train.py --stage 1 --llm-init $(RUN)/llm --vit-init $(RUN)/vit --data $(D)/stage1.jsonl --data $(D)/stage1_single.jsonl --val-data $(D)/val_stage1.jsonl --micro-batch 64 --out-dir $(RUN) --dtype $(DTYPE)
	$(PYTHON) train.py --stage 2 --init $(RUN)/stage1 --data $(D)/stage2_owl.jsonl --data $(D)/stage2_llava.json --data $(D)/stage2_alpaca.json:0.3 --val-data $(D)/val_stage2_owl.jsonl --out-dir $(RUN) --dtype $(DTYPE)
	$(PYTHON) tiny.py score --checkpoint $(RUN)/stage2 --heldout $(D)/heldout.jsonl
	$(PYTHON) owl.py --checkpoint $(RUN)/stage2 --image $(DEMO_IMAGE) --prompt "How many shapes are there?" --temperature 0
