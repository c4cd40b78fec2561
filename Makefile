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

# Offline: trains a small RotNet on a photograph shipped inside matplotlib, probes it against its untrained self,
# and draws both in demo_output/demo.png (keras_oneimage/demo.py); saves demo_output/model.keras.
demo: $(STAMP)
	$(BIN)/keras-oneimage demo --output_dir demo_output

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Issue #12's study, supervised reference and full table; resumable, hours on 2 cores (needs ../shared).
reproduce: $(STAMP)
	bash experiments/reproduce.sh

clean:
	rm -rf demo_output .pytest_cache
