# revseg: `make train` runs the demo, `make test` the tests (both set up the venv when needed).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# extra arguments for train.py, e.g. make train ARGS="model=unet_baseline"
ARGS ?=

.PHONY: setup train train-folds test test-all lint format clean wheel-test gpu-wheels docs

setup: $(VENV)/.installed

# CPU torch into the venv whose bin/ is $(1): a local wheel when the machine has one, else the
# PyTorch CPU index (never the multi-GB CUDA build)
define install_cpu_torch
$(1)/pip install "torch==$(TORCH_VERSION)+cpu" \
	|| $(1)/pip install "torch==$(TORCH_VERSION)" --index-url https://download.pytorch.org/whl/cpu
endef

# CPU machines get the CPU build of torch (a local wheel when the machine has one, else the
# PyTorch CPU index), never the multi-GB CUDA build; machines with an NVIDIA driver get CUDA torch
# from PyPI, within pyproject.toml's range (>= 2.6: see the comment there).
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing CUDA torch"; \
		$(BIN)/pip install "torch>=2.6,<3"; \
	elif ! $(BIN)/python -c "import torch" >/dev/null 2>&1; then \
		echo "no GPU: installing CPU torch $(TORCH_VERSION)"; \
		$(call install_cpu_torch,$(BIN)); \
	fi
	$(BIN)/pip install -e ".[dev]"
	touch $@

train: setup
	$(BIN)/python train.py $(ARGS)

# k-fold cross-validation: one Hydra multirun training every fold (data.fold=0..FOLDS-1) into
# outputs/multirun_<time>/fold_<k>/; predict with the ensemble of the folds by giving that folder
# as run=. e.g. make train-folds FOLDS=5 ARGS="data=brats data.root=/data/BraTS2021"
FOLDS ?= 5
train-folds: setup
	$(BIN)/python train.py -m data.num_folds=$(FOLDS) data.fold=$$(seq -s, 0 $$(($(FOLDS) - 1))) \
		'hydra.sweep.subdir=fold_$${data.fold}' $(ARGS)

test: setup
	$(BIN)/python -m pytest -q

# the default run plus the tests marked slow
test-all: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

# the documentation site (site/) with warnings as errors (mkdocs.yml: strict), after checking that
# docs/reference/config-keys.md is what configs/ says (python scripts/config_reference.py rewrites it)
docs: setup
	$(BIN)/python scripts/config_reference.py --check
	$(BIN)/mkdocs build --strict

lint: setup
	$(BIN)/ruff check src tests scripts train.py
	$(BIN)/ruff format --check src tests scripts train.py

format: setup
	$(BIN)/ruff format src tests scripts train.py
	$(BIN)/ruff check --fix src tests scripts train.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info build dist site

# revseg as a library: build the wheel, install it (not editable) in a fresh venv with CPU
# torch, check it with revseg-doctor and train one debug=fast epoch of the demo from another
# directory with revseg-train
WHEEL_VENV ?= /tmp/revseg-wheel-venv
wheel-test: setup
	rm -rf dist build && $(BIN)/pip wheel --no-deps -w dist .
	rm -rf $(WHEEL_VENV) && $(PYTHON) -m venv $(WHEEL_VENV)
	$(call install_cpu_torch,$(WHEEL_VENV)/bin)
	$(WHEEL_VENV)/bin/pip install dist/revseg-*.whl
	work=$$(mktemp -d) && cd $$work \
		&& $(WHEEL_VENV)/bin/revseg-doctor \
		&& $(WHEEL_VENV)/bin/revseg-train debug=fast trainer.progress_bar=false hydra.run.dir=run \
		&& test -f run/checkpoints/last.pt && test -f run/summary.json \
		&& echo "wheel-test: trained from $$work" && rm -rf $$work

# peak memory and step time vs memcnn, revlib, checkpointing and plain autograd -> docs/benchmarks/
# (make bench ARGS=--quick: tiny sizes, for CI). The peers are the `bench` extra; they are
# installed without their dependencies so that memcnn's torchvision requirement cannot swap torch.
.PHONY: bench
bench: setup
	$(BIN)/pip install --no-deps "memcnn>=1.5.2" "revlib>=1.7.2" pathlib2
	$(BIN)/pip install "matplotlib>=3.7"
	$(BIN)/python scripts/bench.py $(ARGS)

# The packages a lent GPU machine lacks (its image has CUDA torch, numpy, scipy, pillow, tqdm and
# tensorboard, and no network), as wheels in .whl/ to carry there with the working tree; see
# docs/benchmarks/gpu/README.md for the command that installs them and runs the validation.
GPU_PYTHON_VERSION ?= 3.12
GPU_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64,--platform $(p))
gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --implementation cp \
		--python-version $(GPU_PYTHON_VERSION) $(GPU_PLATFORMS) -d .whl \
		hydra-core==1.3.2 omegaconf==2.3.0 monai==1.6.1 nibabel==5.4.2 simpleitk==2.5.7
	$(PYTHON) -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
	du -sh .whl
