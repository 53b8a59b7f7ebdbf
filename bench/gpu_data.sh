#!/usr/bin/env bash
# CIFAR-10 for the GPU machine (`make gpu-data`, run in the checkout that the device call sends):
#     bash bench/gpu_data.sh [DATA_DIR]        # DATA_DIR holds cifar-10-batches-py [../shared/data]
# The device tool copies the working tree and at most 8 carried ignored paths, 64 MiB in all; ../shared does not
# travel. The three files the GPU study reads (batches.meta, data_batch_1: the 10,000 training images,
# test_batch: the 10,000 test images; 60 MB) go xz-packed into data/cifar-10-gpu.tar.xz (ignored by /data/*,
# about 47 MB), which bench/gpu_study.sh unpacks there. Then the size of everything the call will send is
# checked against the limit.
set -eu
cd "$(dirname "$0")/.."
SRC=${1:-../shared/data}/cifar-10-batches-py
ARCHIVE=data/cifar-10-gpu.tar.xz
LIMIT=$((63 * 1024 * 1024))  # the tool's 64 MiB, less a margin for files written between now and the call
FILES="batches.meta data_batch_1 test_batch"
for f in $FILES; do
    [ -f "$SRC/$f" ] || { echo "gpu-data: no $SRC/$f" >&2; exit 2; }
done
if [ ! -f "$ARCHIVE" ] || [ -n "$(find "$SRC" -newer "$ARCHIVE" -type f)" ]; then
    mkdir -p data
    # xz -9: 1-2 minutes, once; xz's own CRC checks the unpacked bytes
    XZ_OPT=-9 tar -C "$SRC/.." -cJf "$ARCHIVE.tmp" $(for f in $FILES; do echo "cifar-10-batches-py/$f"; done)
    mv "$ARCHIVE.tmp" "$ARCHIVE"
fi
tree=$(git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
archive=$(stat -c %s "$ARCHIVE")
total=$((tree + archive))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "gpu-data: $ARCHIVE $(mib "$archive"); working tree $(mib "$tree"); together $(mib "$total") of the 64 MiB a call carries"
[ "$total" -le "$LIMIT" ] || { echo "gpu-data: over $(mib "$LIMIT"): the device call would be refused" >&2; exit 1; }
