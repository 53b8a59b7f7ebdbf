"""Data sets held on the device as one uint8 tensor, with batched augmentation (airbench's data path).

Augmentation (random translation by pad + crop, horizontal flip) and normalisation are a few tensor ops per
batch, with random numbers drawn on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from bnprobe.core.datasets import DatasetSpec, default_data_dir, get_dataset_spec
from bnprobe.data.sources import LOADERS

# ---- the data set on the device ----------------------------------------------------------------


@dataclass
class DeviceDataset:
    """Train and test images as uint8 tensors on one device, plus the normalisation statistics."""

    spec: DatasetSpec
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: torch.Tensor  # float32, broadcastable to (C, H, W), in pixel units 0..255
    std: torch.Tensor


def normalization_stats(images: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std over the training images, per pixel (C, H, W) or per channel (C, 1, 1)."""
    x = images.double()
    dims = (0,) if mode == "per-pixel" else (0, 2, 3)
    mean, std = x.mean(dim=dims), x.std(dim=dims)
    if mode == "per-channel":
        mean, std = mean[:, None, None], std[:, None, None]
    # A pixel that never varies (a digit's border) would be divided by ~0: floor its std.
    std = std.clamp_min(0.1 * std.mean().item() + 1e-6)
    return mean.float(), std.float()


def fixed_subset(n: int, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Indices of `size` of `n` training images, the same for every run: the first `size` of one fixed shuffle
    (numpy seed 0); all n in order when size is 0 or >= n. `--subset N` trains on these images, and training,
    probe and ablate measure train accuracy on these of the images a run trained on."""
    if not size or size >= n:
        return torch.arange(n, device=device)
    return torch.from_numpy(np.random.RandomState(0).permutation(n)[:size]).to(device)


def load_dataset(
    name: str,
    data_dir: Optional[Path] = None,
    *,
    device: torch.device | str = "cpu",
    normalize: str = "per-pixel",
    subset: int = 0,
    test_subset: int = 0,
    download: bool = True,
    verify: bool = True,
) -> DeviceDataset:
    spec = get_dataset_spec(name)
    root = Path(data_dir) if data_dir else default_data_dir()
    train_x, train_y, test_x, test_y = LOADERS[name](root, download, verify)
    if subset:
        keep = fixed_subset(len(train_y), subset).numpy()
        train_x, train_y = train_x[keep], train_y[keep]
    if test_subset:
        test_x, test_y = test_x[:test_subset], test_y[:test_subset]
    to = lambda a: torch.from_numpy(np.require(a, requirements=['C', 'W'])).to(device)  # noqa: E731
    train_x_t = to(train_x)
    mean, std = normalization_stats(train_x_t, normalize)
    return DeviceDataset(spec, train_x_t, to(train_y), to(test_x), to(test_y), mean.to(device), std.to(device))


def random_translate(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by its own random (dy, dx) in [-max_shift, max_shift]: zero-pad, then crop.

    The same as torchvision's RandomCrop(size, padding=max_shift) applied image by image, done as one gather.
    """
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n), device=images.device, generator=generator)
    rows = offsets[0][:, None] + torch.arange(h, device=images.device)  # (n, h)
    cols = offsets[1][:, None] + torch.arange(w, device=images.device)  # (n, w)
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (n, h, w, c) -> (n, c, h, w)


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


class DeviceLoader:
    """Batches of normalised float images from uint8 tensors already on the device.

    No worker processes and no per-image Python: one permutation per epoch, one gather per batch.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        flip: bool = False,
        translate: int = 0,
        generator: Optional[torch.Generator] = None,
        augment_generator: Optional[torch.Generator] = None,
        shard: tuple[int, int] = (0, 1),
        channels_last: bool = False,
    ):
        if (shuffle or flip or translate) and generator is None:
            raise ValueError("random batches need a generator on the data's device")
        if shard[1] > 1 and not shuffle:
            raise ValueError("sharding splits the shuffled order; evaluation loaders are not sharded")
        self.images, self.labels = images, labels
        self.mean, self.inv_std = mean, 1.0 / std
        self.batch_size, self.shuffle, self.flip, self.translate = batch_size, shuffle, flip, translate
        # The order comes from `generator` (the same on every rank); augmentation may use its own.
        self.generator, self.augment_generator = generator, augment_generator or generator
        self.rank, self.world = shard
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    @property
    def examples(self) -> int:
        """Examples this loader yields per epoch: its shard of the data, equal on every rank."""
        return len(self.labels) // self.world

    def __len__(self) -> int:
        return -(-self.examples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        device = self.images.device
        if self.shuffle:
            order = torch.randperm(n, device=device, generator=self.generator)
            if self.world > 1:  # equal shards, or ranks would run different numbers of steps and hang
                order = order[: self.examples * self.world][self.rank :: self.world]
        for start in range(0, self.examples, self.batch_size):
            if self.shuffle:
                index = order[start : start + self.batch_size]
                x, y = self.images[index], self.labels[index]
            else:
                x, y = self.images[start : start + self.batch_size], self.labels[start : start + self.batch_size]
            if self.translate:
                x = random_translate(x, self.translate, self.augment_generator)
            if self.flip:
                x = random_flip(x, self.augment_generator)
            x = ((x.float() - self.mean) * self.inv_std).contiguous(memory_format=self.memory_format)
            yield x, y
