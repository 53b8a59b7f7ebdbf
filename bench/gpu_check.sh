#!/usr/bin/env bash
# Issue 14's GPU check, one command on a fresh copy of the repository (no venv needed):
#     OUT=/some/dir bash bench/gpu_check.sh
# Installs bnprobe only if it does not import, then runs the benchmark (~3-4 minutes on an H200) and the
# tests that need CUDA, each under a time limit, everything written to $OUT as well as printed.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # this checkout's bnprobe, installed or not
export COLUMNS=160  # rich's tables, unwrapped in the logs
{ nvidia-smi; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } 2>&1 | tee "$OUT/machine.txt"
# bnprobe's imports (not just the folder here): torch, typer, h5py, ...; pytest for the tests
$PY -c "import bnprobe.cli, bnprobe.train, pytest" 2>/dev/null || $PY -m pip install -q -e ".[dev]" 2>&1 | tail -5 | tee "$OUT/pip.txt"
# The benchmark first: it is what needs this machine. It prints every number, then exits 1 if any failed.
timeout 420 $PY bench/gpu_speed.py --json "$OUT/gpu_speed.json" 2>&1 | tee "$OUT/gpu_speed.txt"
echo "gpu_speed exit ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_speed.txt"
# Tests that need CUDA (named for it); exit 5 means none were collected.
timeout 150 $PY -m pytest -q -x -k cuda tests 2>&1 | tail -30 | tee "$OUT/tests-cuda.txt"
echo "pytest -k cuda exit ${PIPESTATUS[0]}" | tee -a "$OUT/tests-cuda.txt"
