#!/usr/bin/env bash
# Issue 26's GPU check, one command on a fresh copy of the repository (no venv needed, ~8 minutes on an H100):
#     OUT=/some/dir bash bench/gpu_check.sh
# Each step runs under its own time limit, so that one that hangs costs only itself; every output is printed
# and kept in $OUT (eight files at most: the device tool brings back no more).
#   tests    the tests that need CUDA: real graphs against eager (fp32, bf16), frozen tensors bit-identical
#            under graphs, and train -> ablate -> probe through the CLI on the GPU
#   speed    bench/gpu_speed.py: ResNet-20 and ResNet-110, BN-only and full, fp32 and bf16, eager vs graphed;
#            1 and 4 ResNet-20 BN-only runs packed with `sweep --per-device`
#   compile  ResNet-20 eager vs graphed vs --compile, fp32 and bf16 (each compile takes about a minute)
#   ablate   bench/ablate_sweep.py: a 20-threshold clamp sweep against the naive DataLoader loop
#   static   bench/static_probe.py: the static probe of a sharded 7B checkpoint against reading every tensor
#            (CPU and disk only: last, with what time is left)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # this checkout's bnprobe, installed or not
export COLUMNS=200 PYTHONUNBUFFERED=1  # rich's tables unwrapped in the logs; output as it happens

step() {  # step NAME SECONDS COMMAND...: output to the screen and $OUT/NAME.txt, then the exit status
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee "$OUT/$name.txt"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.txt"
    echo "== $name exit ${PIPESTATUS[0]} ($SECONDS s since the start)" | tee -a "$OUT/$name.txt"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    echo "cpus $(nproc)"
} 2>&1 | tee "$OUT/machine.txt"
# bnprobe's imports (not just this folder): torch, typer, h5py, ...; pytest for the tests
$PY -c "import bnprobe.cli, bnprobe.training.train, pytest" 2>/dev/null || $PY -m pip install -q -e ".[dev]" 2>&1 | tail -5

step tests 150 $PY -m pytest -q -p no:cacheprovider -rs tests/test_graphs.py -k cuda
step speed 240 $PY bench/gpu_speed.py --packed 1,4 --json "$OUT/speed.json"
step compile 270 $PY bench/gpu_speed.py --models resnet20 --compile-models resnet20 --packed '' --json "$OUT/compile.json"
step ablate 90 $PY bench/ablate_sweep.py --device cuda
step static 120 $PY bench/static_probe.py --cases llm
