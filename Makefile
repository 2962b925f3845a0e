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

# Reinstall (which rebuilds the native module mixfast._C with CMake) when the pins, the
# package metadata or the native sources change.
NATIVE := CMakeLists.txt pyproject.toml $(shell find csrc -type f 2>/dev/null)

$(STAMP): $(PY) constraints.txt setup.py $(NATIVE)
	$(PIP) install --quiet --upgrade pip
	# torch first and alone, from the pin (the CPU wheel here, CUDA elsewhere).
	$(PIP) install --quiet -c constraints.txt torch
	# torchvision 0.28.0 requires torch==2.13.0 exactly, so it cannot pull in another torch.
	$(PIP) install --quiet -c constraints.txt torchvision
	$(PIP) install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m mixfast.train --config configs/demo.json

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs build *.egg-info
