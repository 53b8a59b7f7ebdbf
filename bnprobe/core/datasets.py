"""What bnprobe knows of each data set without reading it: shape, classes, default augmentation and
normalisation, training images. Torch-free, so settings are checked and filled before torch loads; the
readers of the files themselves are bnprobe.data.sources."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bnprobe.core.errors import BnprobeError, printable


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    channels: int
    size: int
    num_classes: int
    flip: bool  # default augmentation: flipping digits changes their meaning, so it is off for them
    translate: int
    normalize: str
    train_images: int  # the whole training set: the cost of an epoch when a run takes no --subset


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("mnist", 1, 28, 10, flip=False, translate=2, normalize="per-channel", train_images=60_000),
        DatasetSpec("cifar10", 3, 32, 10, flip=True, translate=4, normalize="per-pixel", train_images=50_000),
        DatasetSpec("cifar100", 3, 32, 100, flip=True, translate=4, normalize="per-pixel", train_images=50_000),
        DatasetSpec("digits", 1, 8, 10, flip=False, translate=1, normalize="per-channel", train_images=1_437),
    )
}


def get_dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise BnprobeError(f"unknown data set {printable(str(name), limit=100)!r}; choose from {', '.join(DATASETS)}")
    return DATASETS[name]


def default_data_dir() -> Path:
    return Path(os.environ.get("BNPROBE_DATA_DIR", "data"))
