# Two commands set everything up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test reproduce clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Offline: trains a small RotNet on an image shipped inside matplotlib, saves the checkpoint and a conv1 filter PNG.
demo: $(STAMP)
	$(BIN)/keras-oneimage fit --method rotnet --output_dir demo_output --image_size 32 --batch_size 32 \
	    --epochs 3 --steps_per_epoch 40 --precision auto

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Issue #12's study, supervised reference and full table; resumable, hours on 2 cores (needs ../shared).
reproduce: $(STAMP)
	bash experiments/reproduce.sh

clean:
	rm -rf demo_output .pytest_cache
