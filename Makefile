PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo evc-demo clean

setup: $(STAMP)

# torch is pinned first: 2.13.0 is the CPU wheel on this machine; a bare `torch` would pull a CUDA build.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests

demo: $(STAMP)
	$(BIN)/python examples/quickstart/demo.py --data ../shared/data/cifar10 --out runs/demo

# EVC end to end at a tiny scale: train -> decay to EVC_SS -> RRL -> Kodak real bitstreams -> RD plot, BD-rates
evc-demo: $(STAMP)
	$(BIN)/python -m evc.demo --out runs/evc_demo

clean:
	rm -rf $(VENV) runs build *.egg-info
