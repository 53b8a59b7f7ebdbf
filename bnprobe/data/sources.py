"""The data sets' files, read in their official on-disk formats (MNIST IDX, CIFAR python pickles, scikit-learn's
bundled digits) with every size checked, and downloaded with torchvision's utilities when missing. What is
known of a data set without its files is bnprobe.core.datasets; the images on the device, bnprobe.data.device.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import shutil
import zlib
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from bnprobe.core.errors import BnprobeError, first_line

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # train x, train y, test x, test y


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


# Each data set's reader: (data_dir, download, verify) -> (train x, train y, test x, test y), uint8 images N x C x H x W.
LOADERS: dict[str, Callable[[Path, bool, bool], Arrays]] = {
    "mnist": load_mnist,
    "cifar10": _load_cifar("CIFAR10", "labels", 10),
    "cifar100": _load_cifar("CIFAR100", "fine_labels", 100),
    "digits": load_digits,
}
