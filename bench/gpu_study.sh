#!/usr/bin/env bash
# Issue 35 on the GPU machine, one command (docs/gpu-study.md gives the device call to make, with its carry list):
#     OUT=/some/dir bash bench/gpu_study.sh
# Stages, each under its own `timeout`, in order; one that fails or times out does not stop the later ones:
#   data    CIFAR-10 into data/cifar-10-batches-py: unpacked from data/cifar-10-gpu.tar.xz (made here by
#           `make gpu-data` and carried) unless the files are there already
#   tests   the CUDA tests alone (tests/test_graphs.py -k cuda): if all pass, graphs can become the default
#   sweep   `bnprobe sweep examples/gpu-study.toml --calibrate --time-budget S`: the plan's table with each run's
#           time measured on this GPU (the dry run's calibration), then its runs in plan order while the next is
#           expected to end within S, S being what is left of GPU_STUDY_SECONDS after the stages before it, less
#           the pack stage's reserve; under a `timeout` of S + 5 s in case an estimate was short
#   pack    every run in runs-gpu/ without its checkpoint (config.json, metrics.json, telemetry.h5, ablation.h5)
#           into $OUT/gpu-study-runs.tar.gz (split into 15 MiB parts .00, .01, ... when larger: the device tool
#           brings back files of 16 MiB at most; `cat gpu-study-runs.tar.gz.* > gpu-study-runs.tar.gz` joins them)
# Every stage's output is printed and kept in $OUT: setup.txt (the machine, the data), tests.txt, sweep.txt, pack.txt,
# and the archive (4 parts at most: the device tool brings back 8 files, 64 MiB in all).
# Settings (environment):
#   GPU_STUDY_SECONDS  this command's whole time, from its start [570: a device call of timeout_s 600]
#   GPU_STUDY_STAGES   which stages to run [data tests sweep pack]; a second call on the same warm machine can
#                      run "data sweep pack": runs-gpu/ is still there, finished runs are skipped, the rest resume
#   GPU_STUDY_PLAN     the plan [examples/gpu-study.toml]
#   GPU_STUDY_TINY=1   a rehearsal on the CPU (`make gpu-study-tiny`): the plan cut down by bench/tiny_plan.py
#                      (1 epoch of 256 images, seed 0, the first two depths, on the CPU), runs in runs-gpu-tiny/,
#                      GPU_STUDY_SECONDS 240 unless set
#   BNPROBE_DATA_DIR   where cifar-10-batches-py is [data]
#   GPU_STUDY_RUNS, GPU_STUDY_ARCHIVE   the runs folder [runs-gpu] and the data archive [data/cifar-10-gpu.tar.xz]
set -u
cd "$(dirname "$0")/.."
STARTED=$(date +%s)
OUT=${OUT:-gpu-study}
mkdir -p "$OUT"
OUT_ABS=$(cd "$OUT" && pwd)
rm -f "$OUT"/setup.txt "$OUT"/tests.txt "$OUT"/sweep.txt "$OUT"/pack.txt "$OUT"/gpu-study-runs.tar.gz*  # a rerun's own
PY=${PYTHON:-python3}
TINY=${GPU_STUDY_TINY:-0}
SECONDS_ALL=${GPU_STUDY_SECONDS:-$([ "$TINY" = 1 ] && echo 240 || echo 570)}
STAGES=" ${GPU_STUDY_STAGES:-data tests sweep pack} "
PLAN=${GPU_STUDY_PLAN:-examples/gpu-study.toml}
RUNS=${GPU_STUDY_RUNS:-runs-gpu}
ARCHIVE=${GPU_STUDY_ARCHIVE:-data/cifar-10-gpu.tar.xz}
PACK_RESERVE=30  # seconds kept for the pack stage after the sweep
export BNPROBE_DATA_DIR=${BNPROBE_DATA_DIR:-data}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # this checkout's bnprobe, installed or not
export COLUMNS=200 PYTHONUNBUFFERED=1  # rich's tables unwrapped in the logs; output as it happens

left() { echo $((STARTED + SECONDS_ALL - $(date +%s))); }

step() {  # step NAME SECONDS COMMAND...: output to the screen and $OUT/NAME.txt; returns the command's status
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s, $(left) s left): $*" | tee -a "$OUT/$name.txt"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.txt"
    local status=${PIPESTATUS[0]}
    echo "== $name exit $status$([ "$status" = 124 ] && echo ' (timed out)') ($(($(date +%s) - STARTED)) s since the start)" \
        | tee -a "$OUT/$name.txt"
    return "$status"
}

wants() { [[ $STAGES == *" $1 "* ]]; }

pack_runs() {  # pack_runs RUNS OUT: the files the report and findings read, of every run that has any; no checkpoint
    set -e -o pipefail
    local runs=$1 out=$2 size parts
    [ -d "$runs" ] || { echo "no $runs: nothing to pack"; return 1; }
    cd "$runs"
    find . -mindepth 2 -maxdepth 2 -type f \( -name config.json -o -name metrics.json -o -name telemetry.h5 \
        -o -name ablation.h5 \) | sort > "$out/.pack-list"
    find . -maxdepth 1 -type f -name "*.log" | sort >> "$out/.pack-list"  # --per-device workers log here
    echo "$(grep -c config.json "$out/.pack-list" || true) runs, $(wc -l < "$out/.pack-list") files"
    tar -czf "$out/gpu-study-runs.tar.gz" -T "$out/.pack-list"
    rm "$out/.pack-list"
    size=$(stat -c %s "$out/gpu-study-runs.tar.gz")
    echo "gpu-study-runs.tar.gz: $size bytes"
    if [ "$size" -gt $((15 * 1024 * 1024)) ]; then
        split -b 15M -d "$out/gpu-study-runs.tar.gz" "$out/gpu-study-runs.tar.gz."
        rm "$out/gpu-study-runs.tar.gz"
        ls -l "$out"/gpu-study-runs.tar.gz.*
        parts=$(ls "$out"/gpu-study-runs.tar.gz.* | wc -l)
        [ "$parts" -le 4 ] || { echo "$parts parts: more than the device tool brings back (8 files, 64 MiB)"; return 1; }
    fi
}

if [ "$TINY" = 1 ]; then
    RUNS=${GPU_STUDY_RUNS:-runs-gpu-tiny}
    mkdir -p "$RUNS"
    $PY bench/tiny_plan.py "$PLAN" "$RUNS/plan.toml" || exit 2
    PLAN=$RUNS/plan.toml
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
    echo "cpus $(nproc); plan $PLAN; runs $RUNS; stages$STAGES; ${SECONDS_ALL} s in all"
} 2>&1 | tee -a "$OUT/setup.txt"
# bnprobe's imports: torch, typer, h5py, rich, ...; pytest for the tests (the GPU image has them all; offline)
$PY -c "import bnprobe.cli, bnprobe.training.train, pytest" 2>&1 | tee -a "$OUT/setup.txt"

if wants data; then
    export ARCHIVE
    step setup 60 $PY - <<'EOF'
import os, sys, tarfile
from pathlib import Path
data = Path(os.environ["BNPROBE_DATA_DIR"])
need = ["batches.meta", "data_batch_1", "test_batch"]
if all((data / "cifar-10-batches-py" / name).is_file() for name in need):
    print(f"CIFAR-10 already in {data}/cifar-10-batches-py")
    sys.exit(0)
archive = Path(os.environ["ARCHIVE"])
if not archive.is_file():
    sys.exit(f"no CIFAR-10 in {data}/cifar-10-batches-py and no {archive}: run `make gpu-data` in the checkout the "
             f"device call sends, and carry {archive}")
with tarfile.open(archive, "r:xz") as tar:
    tar.extractall(data, filter="data")
missing = [name for name in need if not (data / "cifar-10-batches-py" / name).is_file()]
print(f"unpacked {archive} into {data}")
sys.exit(f"{archive} lacks {', '.join(missing)}" if missing else 0)
EOF
    ls -l "$BNPROBE_DATA_DIR/cifar-10-batches-py" 2>&1 | tee -a "$OUT/setup.txt"
fi

if wants tests; then
    if step tests 150 $PY -m pytest -q -p no:cacheprovider -rs tests/test_graphs.py -k cuda \
            && ! grep -q "skipped" "$OUT/tests.txt"; then
        echo "== tests: every CUDA test passed: graphs can become the default (docs/gpu-study.md)" | tee -a "$OUT/tests.txt"
    fi
fi

sweep() {  # sweep ESTIMATE...: the plan under a budget of what is left, less the pack stage's reserve
    local budget=$(($(left) - PACK_RESERVE - 5))
    if [ "$budget" -lt 20 ]; then
        echo "== sweep: only $budget s left for it; not started" | tee -a "$OUT/sweep.txt"
        return 0
    fi
    step sweep $((budget + 5)) $PY -m bnprobe sweep "$PLAN" --runs-dir "$RUNS" "$@" --time-budget "$budget"
}

if wants sweep; then
    # Should the calibration itself fail (before any run starts: its table is the first thing the sweep prints),
    # the sweep goes on with FLOP estimates at 8 TFLOP/s (graphed fp32 CIFAR ResNets trained at 11-13 on the H100,
    # evaluation not counted), rescaled by the budget as runs finish.
    if ! sweep --calibrate && ! grep -q "runs already done" "$OUT/sweep.txt"; then
        echo "== sweep: failed before its first run; again without --calibrate" | tee -a "$OUT/sweep.txt"
        sweep --tflops 8
    fi
fi

if wants pack; then
    step pack $((PACK_RESERVE > $(left) ? PACK_RESERVE : $(left))) bash -c "$(declare -f pack_runs); pack_runs $(printf '%q %q' "$RUNS" "$OUT_ABS")"
fi
echo "== done in $(($(date +%s) - STARTED)) s; in $OUT: $(ls "$OUT" | tr '\n' ' ')"
