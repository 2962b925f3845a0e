# Two commands do all set-up on a fresh machine with Python 3.10+:
#   make demo   create .venv, install, pre-train MoCo v2 + MixMask + Un-Mix on the built-in demo data
#   make test   create/update .venv, install, run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall when the pins or the package metadata change.
$(STAMP): $(PY) constraints.txt setup.py
	$(PIP) install --quiet --upgrade pip
	# torch first and alone, from the pin (the CPU wheel here, CUDA elsewhere).
	$(PIP) install --quiet -c constraints.txt torch
	# torchvision without its deps: its torch pin would otherwise pull the CUDA build.
	$(PIP) install --quiet --no-deps -c constraints.txt torchvision
	$(PIP) install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m mixfast.train --config configs/demo.json

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs build *.egg-info
