# `make demo` and `make test` set everything up on a fresh machine (offline except for package registries).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.14.1 torchvision==0.29.1
DEMO   := --dataset digits --epochs 20 --milestones 15 --runs-dir runs --overwrite
# CIFAR-10 for `make study`: the shared copy next to the checkout if there is one, else downloaded into ./data.
DATA_DIR ?= $(if $(wildcard ../shared/data),../shared/data,data)

.PHONY: install demo study gpu-data gpu-study-tiny test lint fuzz bench clean recall

install: $(VENV)/.installed

# Torch first and pinned, so the ranges in pyproject.toml are already satisfied and pip fetches nothing big.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

demo: install
	$(BIN)/bnprobe train resnet20 --name demo-full $(DEMO)
	$(BIN)/bnprobe train resnet20 --name demo-bn-only --freeze non-bn --lr 0.2 $(DEMO)
	$(BIN)/bnprobe inspect runs/demo-full
	$(BIN)/bnprobe inspect runs/demo-bn-only
	$(BIN)/bnprobe probe runs/demo-full runs/demo-bn-only --brief --out runs/probe.h5
	$(BIN)/bnprobe ablate runs/demo-bn-only --clamp-gamma 0:0.3:7
	$(BIN)/bnprobe report runs -o runs/report.pdf

# examples/cpu-study.toml on this machine's CPUs (about 75-90 minutes on 2 quiet cores; resumable: finished runs and their
# clamp sweeps are skipped), then its report with findings, committed under docs/cpu-study/.
study: install
	BNPROBE_DATA_DIR=$(DATA_DIR) $(BIN)/bnprobe sweep examples/cpu-study.toml --runs-dir runs-study
	$(BIN)/bnprobe report runs-study -o docs/cpu-study/report.html

# For the GPU study (docs/gpu-study.md): CIFAR-10 packed into data/cifar-10-gpu.tar.xz for the device call to carry,
# and bench/gpu_study.sh rehearsed on this CPU (1 epoch, 256 images, two depths; ~1-2 minutes), its archive in
# gpu-study-tiny/.
gpu-data:
	bash bench/gpu_data.sh $(DATA_DIR)

gpu-study-tiny: install
	GPU_STUDY_TINY=1 OUT=gpu-study-tiny BNPROBE_DATA_DIR=$(DATA_DIR) PYTHON=$(BIN)/python bash bench/gpu_study.sh

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check bnprobe tests bench

# The fuzz harness of tests/fuzz_readers.py, long: FUZZ_EXAMPLES mutated files per reader (the suite runs 12).
FUZZ_EXAMPLES ?= 2000
fuzz: install
	BNPROBE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q tests/test_fuzz_readers.py

bench: install
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/telemetry_overhead.py
	$(BIN)/python bench/ablate_sweep.py
	$(BIN)/python bench/report_speed.py

clean:
	rm -rf $(VENV) runs runs-study runs-gpu runs-gpu-tiny gpu-study gpu-study-tiny *.egg-info

# The norm finder's recall over every timm family and every transformers model type (tests/test_norm_recall.py;
# the suite runs every timm family and 55 transformers families).
recall: install
	BNPROBE_RECALL=all $(BIN)/python -m pytest -q -s tests/test_norm_recall.py -k "every_norm or recall_figure"
