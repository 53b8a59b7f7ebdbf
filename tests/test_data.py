import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnprobe.core.errors import BnprobeError
from bnprobe.data import sources
from bnprobe.data.device import DeviceLoader, load_dataset, normalization_stats, random_flip, random_translate


def test_random_translate_equals_per_image_pad_and_crop():
    images = torch.randint(0, 256, (64, 3, 12, 10), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(3)
    replay = torch.Generator().manual_seed(3)
    shifted = random_translate(images, 4, generator)
    offsets = torch.randint(0, 9, (2, 64), generator=replay)  # the same draws, replayed
    padded = F.pad(images, (4, 4, 4, 4))
    for i in range(64):
        dy, dx = offsets[:, i].tolist()
        assert torch.equal(shifted[i], padded[i, :, dy : dy + 12, dx : dx + 10])
    assert len({tuple(o) for o in offsets.T.tolist()}) > 20  # offsets vary per image


def test_random_flip_mirrors_about_half_of_the_images():
    images = torch.randint(0, 256, (400, 1, 5, 5), dtype=torch.uint8)
    flipped = random_flip(images, torch.Generator().manual_seed(0))
    same = [torch.equal(a, b) for a, b in zip(flipped, images)]
    mirrored = [torch.equal(a, b.flip(2)) for a, b in zip(flipped, images)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 150 < sum(mirrored) < 250


def test_loader_visits_every_example_once_per_epoch_with_its_label():
    images = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1).expand(50, 1, 2, 2).contiguous()
    labels = torch.arange(50)
    loader = DeviceLoader(images, labels, torch.zeros(1, 1, 1), torch.ones(1, 1, 1), 16,
                          shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(loader) == 4
    seen = []
    for x, y in loader:
        assert x.dtype == torch.float32
        assert torch.equal(x[:, 0, 0, 0].long(), y)  # pixel value encodes the label
        seen += y.tolist()
    assert sorted(seen) == list(range(50)) and seen != list(range(50))


def test_per_pixel_normalisation_standardises_every_pixel():
    images = (torch.rand(500, 3, 4, 4) * torch.linspace(20, 200, 16).view(1, 1, 4, 4)).to(torch.uint8)
    mean, std = normalization_stats(images, "per-pixel")
    assert mean.shape == (3, 4, 4)
    z = (images.float() - mean) / std
    assert torch.allclose(z.mean(0), torch.zeros(3, 4, 4), atol=1e-4)
    assert torch.allclose(z.std(0), torch.ones(3, 4, 4), atol=1e-3)
    mean_c, _ = normalization_stats(images, "per-channel")
    assert mean_c.shape == (3, 1, 1)


def test_constant_pixels_do_not_divide_by_zero():
    """A pixel that never varies gets a floor of a tenth of the mean std (+1e-6), the others their own sample
    std: every number against numpy's, and the images standardised without an infinity."""
    images = torch.zeros(10, 1, 3, 3, dtype=torch.uint8)
    images[:, 0, 1, 1] = torch.arange(10, dtype=torch.uint8) * 20
    mean, std = normalization_stats(images, "per-pixel")
    varying = np.std(np.arange(10) * 20.0, ddof=1)  # 60.55...: the centre pixel's sample std
    floor = 0.1 * varying / 9 + 1e-6  # a tenth of the mean over the 9 pixels, 8 of them 0
    expected_std = np.full((1, 3, 3), floor)
    expected_std[0, 1, 1] = varying
    expected_mean = np.zeros((1, 3, 3))
    expected_mean[0, 1, 1] = 90.0
    np.testing.assert_allclose(std.numpy(), expected_std, rtol=1e-6)
    np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=1e-6)
    z = (images.float() - mean) / std
    assert torch.isfinite(z).all() and (z[:, 0][:, [0, 0, 2, 2], [0, 2, 0, 2]] == 0).all()
    assert z[:, 0, 1, 1].mean().abs() < 1e-5 and abs(z[:, 0, 1, 1].std().item() - 1) < 1e-5
    _, channel_std = normalization_stats(torch.zeros(4, 2, 3, 3, dtype=torch.uint8), "per-channel")
    np.testing.assert_allclose(channel_std.numpy(), np.full((2, 1, 1), 1e-6), rtol=1e-6)  # all constant: the floor


def test_mnist_from_official_files(shared_data):
    ds = load_dataset("mnist", shared_data, download=False)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_x.dtype == torch.uint8
    pixels = ds.train_x.double() / 255
    assert abs(pixels.mean().item() - 0.1307) < 1e-4 and abs(pixels.std().item() - 0.3081) < 1e-4
    assert sorted(ds.train_y.unique().tolist()) == list(range(10))


def test_cifar10_layout_and_md5_check(shared_data):
    with pytest.raises(BnprobeError, match="md5"):
        load_dataset("cifar10", shared_data, download=False, verify=True)
    with pytest.warns(UserWarning, match="only 1 of 5 training batches"):
        ds = load_dataset("cifar10", shared_data, download=False, verify=False, subset=1000)
    assert ds.train_x.shape == (1000, 3, 32, 32) and ds.test_x.shape == (10000, 3, 32, 32)
    assert torch.bincount(ds.test_y).tolist() == [1000] * 10
    assert ds.mean.shape == (3, 32, 32)


def _write_cifar100(folder, n_train=20, n_test=10):
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name, n in (("train", n_train), ("test", n_test)):
        batch = {"data": rng.randint(0, 256, (n, 3072)).astype(np.uint8), "fine_labels": list(rng.randint(0, 100, n))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)


def test_cifar100_reader(tmp_path):
    _write_cifar100(tmp_path / "cifar-100-python")
    ds = load_dataset("cifar100", tmp_path, download=False, verify=False)
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_y.shape == (10,)
    assert ds.spec.num_classes == 100


def test_data_pickles_cannot_run_code(tmp_path):
    folder = tmp_path / "cifar-100-python"
    _write_cifar100(folder)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    with open(folder / "train", "wb") as f:
        pickle.dump({"data": Exploit(), "fine_labels": []}, f, protocol=2)
    with pytest.raises(BnprobeError, match="refusing"):
        load_dataset("cifar100", tmp_path, download=False, verify=False)
    assert not marker.exists()


def test_missing_data_offline_is_a_clear_error(tmp_path):
    with pytest.raises(BnprobeError, match="--no-download"):
        load_dataset("mnist", tmp_path, download=False)
    with pytest.raises(BnprobeError, match="not in"):
        load_dataset("cifar10", tmp_path, download=True)  # the fixture makes every download fail


def test_failed_download_names_the_reason(tmp_path, monkeypatch):
    monkeypatch.undo()  # the real _download, with a downloader that fails like an offline machine

    def offline():
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    with pytest.raises(BnprobeError, match="downloading it failed .*name resolution"):
        sources._download("MNIST", offline, tmp_path)


def test_digits_split_is_fixed_and_stratified():
    ds = load_dataset("digits")
    assert len(ds.train_y) + len(ds.test_y) == 1797
    per_class = torch.bincount(torch.cat([ds.train_y, ds.test_y]), minlength=10)
    assert torch.equal(torch.bincount(ds.test_y, minlength=10), per_class // 5)  # 20% of every class
    again = load_dataset("digits")
    assert torch.equal(ds.test_x, again.test_x)
    assert ds.train_x.max() > 200  # 0..16 scaled to 0..255


def test_unknown_dataset():
    with pytest.raises(BnprobeError, match="unknown data set 'svhn'"):
        load_dataset("svhn")


def _write_partial_cifar10(root, n=20):
    """A CIFAR-10 folder with 1 of the 5 training batches (like the shared copy), whose md5 sums are not official."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name in ("data_batch_1", "test_batch"):
        batch = {"data": rng.randint(0, 256, (n, 3072)).astype(np.uint8), "labels": list(rng.randint(0, 10, n))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder


def test_failed_md5_check_is_the_only_message(tmp_path):
    _write_partial_cifar10(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(BnprobeError, match="md5"):
            load_dataset("cifar10", tmp_path, download=False, verify=True)
    assert [str(w.message) for w in caught] == []


def test_failed_md5_check_is_one_line_from_the_cli(capsys, tmp_path):
    from cli_helpers import assert_one_line_error, run_cli

    _write_partial_cifar10(tmp_path / "data")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = run_cli(capsys, "train", "resnet8", "--dataset", "cifar10", "--data-dir", tmp_path / "data",
                               "--no-download", "--device", "cpu", "--runs-dir", tmp_path / "runs")
    assert_one_line_error(code, err, "fails its md5 check")
    assert [str(w.message) for w in caught] == []


def test_partial_cifar_warning_is_one_line_and_given_once(tmp_path):
    folder = _write_partial_cifar10(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # as after any catch_warnings (torch.load has them): Python's own dedup is reset
        for _ in range(3):  # e.g. a sweep, or probe on several checkpoints, in one process
            ds = load_dataset("cifar10", tmp_path, download=False, verify=False)
    assert len(ds.train_y) == 20
    assert [(w.category, str(w.message)) for w in caught] == [
        (UserWarning, f"CIFAR10: only 1 of 5 training batches in {folder}")
    ]


def test_partial_cifar_warning_comes_from_rank_0_only(tmp_path, monkeypatch):
    import torch.distributed as dist

    _write_partial_cifar10(tmp_path)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_dataset("cifar10", tmp_path, download=False, verify=False)
    assert caught == []


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _offline_cifar_downloader(monkeypatch):
    """torchvision's archive downloader as it fails offline, after creating its folder and a partial archive."""
    from urllib.error import URLError

    import torchvision.datasets.utils

    def fail(url, download_root, filename=None, md5=None, **kwargs):
        os.makedirs(download_root, exist_ok=True)
        (Path(download_root) / filename).write_bytes(b"partial")
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", fail)


@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_failed_cifar_download_removes_what_it_created(tmp_path, monkeypatch, name, folder):
    monkeypatch.undo()  # the real _download
    _offline_cifar_downloader(monkeypatch)
    with pytest.raises(BnprobeError, match="downloading it failed .*name resolution"):
        load_dataset(name, tmp_path / "new" / "data", download=True)
    assert _listing(tmp_path) == []  # not even the data dir, which the attempt created

    root = tmp_path / "data"  # a data dir that holds other things already
    (root / "MNIST" / "raw").mkdir(parents=True)
    (root / "MNIST" / "raw" / "keep").write_text("mine")
    (root / "notes.txt").write_text("mine")
    before = _listing(root)
    with pytest.raises(BnprobeError, match="downloading it failed"):
        load_dataset(name, root, download=True)
    assert _listing(root) == before and (root / "notes.txt").read_text() == "mine"
    assert not (root / folder).exists()


def test_failed_download_into_a_partial_cifar_folder_keeps_its_files(tmp_path, monkeypatch):
    monkeypatch.undo()
    _offline_cifar_downloader(monkeypatch)
    folder = _write_partial_cifar10(tmp_path)
    (folder / "test_batch").unlink()  # no test batch: loading downloads
    with pytest.raises(BnprobeError, match="downloading it failed"):
        load_dataset("cifar10", tmp_path, download=True)
    assert _listing(tmp_path) == ["cifar-10-batches-py", "cifar-10-batches-py/data_batch_1"]


def test_failed_mnist_download_removes_what_it_created(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.undo()

    def offline_mnist(root, train=True, download=False):
        raw = Path(root) / "MNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        (raw / "train-images-idx3-ubyte.gz").write_bytes(b"partial")
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://...")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline_mnist)
    root = tmp_path / "data"
    _write_cifar100(root / "cifar-100-python")
    before = _listing(root)
    with pytest.raises(BnprobeError, match="MNIST is not in .*downloading it failed"):
        load_dataset("mnist", root, download=True)
    assert _listing(root) == before

    raw = root / "MNIST" / "raw"  # a raw folder with some of the files: they stay, the attempt's go
    raw.mkdir(parents=True)
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(b"mine")
    before = _listing(root)
    with pytest.raises(BnprobeError, match="downloading it failed"):
        load_dataset("mnist", root, download=True)
    assert _listing(root) == before


def test_interrupted_download_is_cleaned_up_and_still_an_interrupt(tmp_path, monkeypatch):
    monkeypatch.undo()
    where = tmp_path / "data" / "cifar-10-batches-py"

    def interrupted():
        (where / "part").write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sources._download("CIFAR10", interrupted, where, also=[tmp_path / "data" / "cifar-10-python.tar.gz"])
    assert _listing(tmp_path) == []


def test_partial_cifar_warning_is_one_line_from_the_cli(capsys, tmp_path):
    from cli_helpers import run_cli

    folder = _write_partial_cifar10(tmp_path / "data")
    code, _, err = run_cli(capsys, "train", "resnet8", "--dataset", "cifar10", "--data-dir", tmp_path / "data",
                           "--no-download", "--no-verify", "--epochs", "1", "--device", "cpu",
                           "--runs-dir", tmp_path / "runs")
    assert code == 0
    assert err.strip().splitlines() == [f"bnprobe: warning: CIFAR10: only 1 of 5 training batches in {folder}"]
