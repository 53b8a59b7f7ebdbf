"""Data sets held on the device as one uint8 tensor, with batched augmentation (airbench's data path).

Files are read in their official on-disk formats (MNIST IDX, CIFAR python pickles); missing ones are
downloaded with torchvision's utilities. Augmentation (random translation by pad + crop, horizontal
flip) and normalisation are a few tensor ops per batch, with random numbers drawn on the device.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from bnprobe.errors import BnprobeError, first_line

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # train x, train y, test x, test y


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    channels: int
    size: int
    num_classes: int
    flip: bool  # default augmentation: flipping digits changes their meaning, so it is off for them
    translate: int
    normalize: str
    load: Callable[[Path, bool, bool], Arrays]  # (data_dir, download, verify) -> arrays


def default_data_dir() -> Path:
    return Path(os.environ.get("BNPROBE_DATA_DIR", "data"))


# ---- readers of the official formats -----------------------------------------------------------


# An IDX file's data as its header announces it; MNIST's largest (train-images) is 47 MB. Nothing is read
# beyond the header's size: a 3 MB .gz inflating to 3.3 GB is refused after reading that size and one byte.
MAX_IDX_BYTES = 1 << 30


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST's format), gzipped or not: the size its header announces, and no more."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            ndim = head[3] if len(head) == 4 and head[:3] == b"\0\0\x08" else -1  # magic: 0, 0, uint8, ndim
            shape = f.read(4 * max(ndim, 0))
            if ndim < 0 or len(shape) < 4 * ndim:
                raise BnprobeError(f"{path} is not an IDX file of unsigned bytes")
            dims = tuple(int(d) for d in np.frombuffer(shape, dtype=">u4"))
            size = math.prod(dims)
            if size > MAX_IDX_BYTES:
                raise BnprobeError(f"{path}: its header announces {dims} = {size:,} bytes of data, more than an IDX "
                                   f"file bnprobe reads ({MAX_IDX_BYTES:,})")
            raw = f.read(size)
            longer = f.read(1)
    # A cut-short .gz raises EOFError, which click would take for Ctrl-C: name the file instead.
    except EOFError:
        raise BnprobeError(f"{path} is truncated (its gzip stream ends early); replace it with a complete copy")
    except (OSError, zlib.error) as exc:
        raise BnprobeError(f"cannot read {path} ({getattr(exc, 'strerror', None) or exc})")
    if len(raw) != size:
        raise BnprobeError(f"{path} is truncated: expected {size} bytes of data, found {len(raw)}")
    if longer:
        raise BnprobeError(f"{path} is longer than its header says ({dims} = {size:,} bytes of data); replace it "
                           f"with a complete copy")
    return np.frombuffer(raw, dtype=np.uint8).reshape(dims)


def _check_split(images: np.ndarray, labels: np.ndarray, shape: tuple[int, ...], classes: int, where: str) -> None:
    """Every reader's output, checked before any of it reaches a model: a wrong file is one line naming it,
    never a reshape error, an index error on the device, or a model trained on labels it cannot predict."""
    if images.ndim != len(shape) + 1 or images.shape[1:] != shape:
        raise BnprobeError(f"{where}: images of shape {images.shape[1:]}, not {shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise BnprobeError(f"{where}: {len(images)} images but {labels.size} labels")
    if not len(labels):
        raise BnprobeError(f"{where}: no images")
    if labels.min() < 0 or labels.max() >= classes:
        bad = labels[(labels < 0) | (labels >= classes)][0]
        raise BnprobeError(f"{where}: label {bad} is outside 0..{classes - 1}")


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only what numpy arrays need, so a data file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise BnprobeError(f"refusing to load {module}.{name} from a data pickle")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, label_key: str, classes: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise BnprobeError(f"{path} is not a CIFAR python batch ({exc})")
    except OSError as exc:
        raise BnprobeError(f"cannot read {path} ({exc.strerror or exc})")
    if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
        raise BnprobeError(f"{path} lacks the 'data' and '{label_key}' entries of a CIFAR batch")
    try:
        images, labels = np.asarray(batch["data"]), np.asarray(batch[label_key])
    except ValueError as exc:  # ragged lists
        raise BnprobeError(f"{path} is not a CIFAR python batch ({exc})")
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        raise BnprobeError(f"{path}: 'data' must be uint8 rows of 3072 pixels, got {images.dtype} {images.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise BnprobeError(f"{path}: '{label_key}' must be whole numbers, got {labels.dtype}")
    images, labels = images.reshape(-1, 3, 32, 32), labels.astype(np.int64)
    _check_split(images, labels, (3, 32, 32), classes, str(path))
    return images, labels


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(what: str, fetch: Callable[[], None], where: Path, also: Sequence[Path] = ()) -> None:
    """Run torchvision's downloader, which fills the folder `where` (and writes the files `also` outside it);
    any network failure becomes one clear line.

    A failed attempt removes what it created, and nothing that was there before: the folders it made on the
    way to `where`, new entries in a `where` that existed, and those of the files `also` that did not exist.
    """
    created = next((p for p in reversed((where, *where.parents)) if not os.path.lexists(p)), None)
    entries = set(os.listdir(where)) if created is None and where.is_dir() else None
    new_files = [p for p in also if not os.path.lexists(p)]
    try:
        where.mkdir(parents=True, exist_ok=True)
        fetch()
    except BaseException as exc:
        if created is not None:
            _remove(created)
        elif entries is not None:
            for name in set(os.listdir(where) if where.is_dir() else ()) - entries:
                _remove(where / name)
        for path in new_files:
            _remove(path)
        if not isinstance(exc, Exception):  # Ctrl-C: cleaned up too, but still an interrupt
            raise
        # urllib, http and file errors all mean the same to the user
        raise BnprobeError(
            f"{what} is not in {where} and downloading it failed ({first_line(exc)}); "
            f"put the files there or pass --data-dir"
        )


_warned: set[str] = set()  # messages given in this process


def _warn_once(message: str) -> None:
    """A one-line UserWarning, given once per process and by rank 0 only: a sweep, a probe of several
    checkpoints or a DDP run loads the same data many times, and Python's own once-per-location filter is
    reset by every `warnings.catch_warnings` (torch.load has some)."""
    import torch.distributed as dist

    if message in _warned or (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        return
    _warned.add(message)
    import warnings

    warnings.warn(message, UserWarning, stacklevel=2)


def _remove(path: Path) -> None:
    """Best effort: a failed clean-up must not hide the download's own error."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()
    except OSError:
        pass


def _missing(what: str, where: Path) -> BnprobeError:
    return BnprobeError(f"{what} is not in {where} and --no-download was given; put the files there or pass --data-dir")


def load_mnist(root: Path, download: bool, verify: bool) -> Arrays:
    raw = root / "MNIST" / "raw"
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]

    def find(stem: str) -> Optional[Path]:
        for candidate in (raw / stem, raw / f"{stem}.gz"):
            if candidate.exists():
                return candidate
        return None

    if any(find(stem) is None for stem in stems):
        if not download:
            raise _missing("MNIST", raw)
        import torchvision

        # torchvision's MNIST downloader knows the mirrors and checks the md5 sums.
        _download("MNIST", lambda: torchvision.datasets.MNIST(str(root), train=True, download=True), raw)
    files = [find(stem) for stem in stems]
    train_x, train_y, test_x, test_y = (_read_idx(file) for file in files)
    for images, labels, image_file, label_file in ((train_x, train_y, *files[:2]), (test_x, test_y, *files[2:])):
        _check_split(images, labels, (28, 28), 10, f"{image_file} with {label_file.name}")
    return train_x[:, None], train_y.astype(np.int64), test_x[:, None], test_y.astype(np.int64)


def _load_cifar(cls_name: str, label_key: str, classes: int) -> Callable[[Path, bool, bool], Arrays]:
    def load(root: Path, download: bool, verify: bool) -> Arrays:
        import torchvision

        cls = getattr(torchvision.datasets, cls_name)  # its class attributes list files, url and md5 sums
        folder = root / cls.base_folder
        if not (folder / cls.test_list[0][0]).exists():
            if not download:
                raise _missing(cls_name, folder)
            from torchvision.datasets.utils import download_and_extract_archive

            _download(
                cls_name,
                lambda: download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5),
                folder,
                also=[root / cls.filename],  # the archive, next to the folder it unpacks
            )
        present = [(name, md5) for name, md5 in cls.train_list if (folder / name).exists()]
        if not present:
            raise BnprobeError(f"{cls_name}: no training batch in {folder}")
        if verify:
            for name, md5 in present + list(cls.test_list):
                if _md5(folder / name) != md5:
                    raise BnprobeError(
                        f"{folder / name} fails its md5 check (not the official file); pass --no-verify to use it"
                    )
        train = [_read_cifar_batch(folder / name, label_key, classes) for name, _ in present]
        test_x, test_y = _read_cifar_batch(folder / cls.test_list[0][0], label_key, classes)
        if len(present) < len(cls.train_list):  # only once the data loaded: a failure is then its error alone
            _warn_once(f"{cls_name}: only {len(present)} of {len(cls.train_list)} training batches in {folder}")
        return np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), test_x, test_y

    return load


def load_digits(root: Path, download: bool, verify: bool) -> Arrays:
    """scikit-learn's bundled 8x8 digits: works offline. A fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.clip(bunch.images * 16, 0, 255).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    labels = bunch.target.astype(np.int64)
    order = np.random.RandomState(0).permutation(len(labels))
    test = np.zeros(len(labels), dtype=bool)
    for digit in range(10):
        members = order[labels[order] == digit]
        test[members[: len(members) // 5]] = True
    return images[~test], labels[~test], images[test], labels[test]


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("mnist", 1, 28, 10, flip=False, translate=2, normalize="per-channel", load=load_mnist),
        DatasetSpec("cifar10", 3, 32, 10, flip=True, translate=4, normalize="per-pixel",
                    load=_load_cifar("CIFAR10", "labels", 10)),
        DatasetSpec("cifar100", 3, 32, 100, flip=True, translate=4, normalize="per-pixel",
                    load=_load_cifar("CIFAR100", "fine_labels", 100)),
        DatasetSpec("digits", 1, 8, 10, flip=False, translate=1, normalize="per-channel", load=load_digits),
    )
}


def get_dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise BnprobeError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")
    return DATASETS[name]


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
    train_x, train_y, test_x, test_y = spec.load(root, download, verify)
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
