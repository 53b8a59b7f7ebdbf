"""Shared by test_loading.py, test_probe.py and test_ablate.py: tiny trained runs (made once per session),
a user-defined model file for foreign checkpoints, and the CLI error assertions."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli  # noqa: F401 (probe tests import them from here)

from bnprobe.core.config import TrainConfig

_RUNS: dict[str, dict[str, Path]] = {}


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread while these modules run: the models are tiny, and on a small shared machine
    OpenMP threads waiting for each other made a 0.1 s epoch take 6 s. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**changes) -> TrainConfig:
    base = dict(model="resnet8", dataset="digits", epochs=2, batch_size=64, subset=300, test_subset=200,
                milestones="", device="cpu", eval_batch_size=200, lr=0.05)
    return TrainConfig(**{**base, **changes})


def trained_runs(tmp_path_factory) -> dict[str, Path]:
    """A full and a BN-only resnet8 on digits, trained once per test session (a few seconds each)."""
    from rich.console import Console

    from bnprobe.training.train import train

    key = str(tmp_path_factory.getbasetemp())
    if key not in _RUNS:
        root = tmp_path_factory.mktemp("probe-runs")
        quiet = Console(quiet=True)
        train(tiny_config(), root / "full", console=quiet)
        train(tiny_config(freeze="non-bn", lr=0.2), root / "bn-only", console=quiet)
        _RUNS[key] = {"full": root / "full", "bn-only": root / "bn-only"}
    return _RUNS[key]


MODEL_FILE = textwrap.dedent('''
    import torch.nn as nn

    class SmallNet(nn.Module):
        def __init__(self, in_channels=1, num_classes=10, width=8):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            )
            self.head = nn.Linear(2 * width, num_classes)

        def forward(self, x):
            return self.head(self.features(x).mean((2, 3)))

    def small_net(**kwargs):
        return SmallNet(**kwargs)

    def broken(**kwargs):
        raise ValueError("no such variant")

    def not_a_model():
        return 42
''')


def write_model_file(directory: Path, name: str = "user_models.py") -> Path:
    path = directory / name
    path.write_text(MODEL_FILE)
    return path


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial γ, β and running statistics, so folding and clamping have something to do."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            with torch.no_grad():
                if module.affine:
                    module.weight.copy_(torch.rand(n, generator=generator) * 2 - 0.5)
                    module.bias.copy_(torch.randn(n, generator=generator) * 0.3)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    return model.eval()


def forged_bn_archive(path: Path, edit) -> Path:
    """A torch.save zip archive of one BatchNorm's four 4-element tensors whose data.pkl is rewritten by `edit`
    (bytes -> bytes): a file torch wrote, forged, stored uncompressed as torch stores it."""
    import zipfile

    torch.save({"bn.weight": torch.ones(4), "bn.bias": torch.ones(4), "bn.running_mean": torch.ones(4),
                "bn.running_var": torch.ones(4)}, path)
    with zipfile.ZipFile(path) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    name = next(n for n in entries if n.endswith("data.pkl"))
    entries[name] = edit(entries[name])
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for entry, data in entries.items():
            archive.writestr(entry, data)
    return path
