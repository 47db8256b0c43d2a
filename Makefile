PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo evc-demo gpu-prep clean

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

# ResNet-20 on CIFAR-10: mask decay (sparsity, L1, L2) vs Torch-Pruning at 50 % and 30 % MACs (docs/resnet_results.md).
# The small quick-start demo of docs/quickstart.md: python -m maskdecay_examples.quickstart.demo
# The demo prunes the study's converged ResNet-20 teacher (DEMO_TEACHER) when it is there; `make demo RETRAIN=1`
# trains a short teacher from scratch instead.
DEMO_TEACHER ?= benchmarks/resnet_study/teacher.pt
DEMO_SETS := $(if $(RETRAIN),,$(if $(wildcard $(DEMO_TEACHER)),--set teacher.checkpoint=$(DEMO_TEACHER) --set name=demo-converged))

# Where the data sets live (README, "Data"): DATA/cifar10 (train.tar, test.tar), DATA/kodak (PNGs),
# DATA/train/imagenet_samples (training images of the EVC demo). Override with `make demo DATA=/path/to/data`.
DATA ?= ../shared/data

demo: $(STAMP)
	@test -f $(DATA)/cifar10/train.tar -o -f $(DATA)/cifar10/cifar-10-python.tar.gz -o -d $(DATA)/cifar10/cifar-10-batches-py || { echo "make demo: neither $(DATA)/cifar10/train.tar nor the official $(DATA)/cifar10/cifar-10-python.tar.gz (or cifar-10-batches-py/) found: set DATA to the folder holding cifar10/ (make demo DATA=/path/to/data; README, Data)" >&2; exit 2; }
	$(BIN)/python -m maskdecay_examples.resnet prune --config examples/resnet/configs/demo.yaml --set data.path=$(DATA)/cifar10 $(DEMO_SETS)

# EVC end to end at a tiny scale: train -> decay to EVC_SS -> RRL -> Kodak real bitstreams -> RD plot, BD-rates
evc-demo: $(STAMP)
	@for d in $(DATA)/kodak $(DATA)/train/imagenet_samples; do test -d $$d || { echo "make evc-demo: $$d not found: set DATA to the folder holding kodak/ and train/ (make evc-demo DATA=/path/to/data; README, Data)" >&2; exit 2; }; done
	$(BIN)/python -m maskdecay_examples.evc.cli.demo --out runs/evc_demo --data $(DATA)

# Inputs of benchmarks/resnet_gpu.sh for a GPU machine that has no copy of the data and no torch-pruning: the
# CIFAR-10 tars gzipped into .gpudata/ and the torch-pruning wheel into .whl/ (both git-ignored, both carried).

gpu-prep: $(STAMP)
	mkdir -p .gpudata .whl
	for f in .gpudata .whl; do grep -qx "/$$f/" "$$(git rev-parse --git-path info/exclude)" 2>/dev/null || \
		echo "/$$f/" >> "$$(git rev-parse --git-path info/exclude)"; done
	for s in train test; do gzip -1 -c $(DATA)/cifar10/$$s.tar > .gpudata/$$s.tar.gz; done
	$(BIN)/pip download -q --no-deps --only-binary=:all: -d .whl \
		torch-pruning==$$($(BIN)/python -c "import importlib.metadata as m; print(m.version('torch-pruning'))")

clean:
	rm -rf $(VENV) runs build *.egg-info
