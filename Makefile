# revseg: `make train` runs the demo, `make test` the tests (both set up the venv when needed).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# extra arguments for train.py, e.g. make train ARGS="model=unet_baseline"
ARGS ?=

.PHONY: setup train test test-all lint format clean

setup: $(VENV)/.installed

# CPU machines get the CPU build of torch (a local wheel when the machine has one, else the
# PyTorch CPU index), never the multi-GB CUDA build; machines with an NVIDIA driver get CUDA torch.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing CUDA torch"; \
		$(BIN)/pip install "torch>=2.3,<3"; \
	elif ! $(BIN)/python -c "import torch" >/dev/null 2>&1; then \
		echo "no GPU: installing CPU torch $(TORCH_VERSION)"; \
		$(BIN)/pip install "torch==$(TORCH_VERSION)+cpu" \
		|| $(BIN)/pip install "torch==$(TORCH_VERSION)" --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(BIN)/pip install -e ".[dev]"
	touch $@

train: setup
	$(BIN)/python train.py $(ARGS)

test: setup
	$(BIN)/python -m pytest -q

# the default run plus the tests marked slow
test-all: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint: setup
	$(BIN)/ruff check src tests scripts train.py
	$(BIN)/ruff format --check src tests scripts train.py

format: setup
	$(BIN)/ruff format src tests scripts train.py
	$(BIN)/ruff check --fix src tests scripts train.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info

# peak memory and step time vs memcnn, revlib, checkpointing and plain autograd -> docs/benchmarks/
# (make bench ARGS=--quick: tiny sizes, for CI). The peers are the `bench` extra; they are
# installed without their dependencies so that memcnn's torchvision requirement cannot swap torch.
.PHONY: bench
bench: setup
	$(BIN)/pip install --no-deps "memcnn>=1.5.2" "revlib>=1.7.2" pathlib2
	$(BIN)/pip install "matplotlib>=3.7"
	$(BIN)/python scripts/bench.py $(ARGS)
