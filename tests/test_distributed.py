"""Data-parallel training: sharding, and a real 2-process torchrun run with the gloo backend on CPU."""

import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from bnprobe import runs
from bnprobe.config import TrainConfig
from bnprobe.data import DeviceLoader
from bnprobe.freeze import trainable_parameter_names
from bnprobe.train import build_model


def test_shards_split_each_epoch_into_equal_disjoint_parts():
    labels = torch.arange(103)
    images = labels.to(torch.uint8).view(-1, 1, 1, 1)
    seen = []
    for rank in range(3):
        loader = DeviceLoader(images, labels, torch.zeros(1, 1, 1), torch.ones(1, 1, 1), 10, shuffle=True,
                              generator=torch.Generator().manual_seed(5), shard=(rank, 3))
        assert loader.examples == 34 and len(loader) == 4
        seen.append(torch.cat([y for _, y in loader]))
    everything = torch.cat(seen)
    assert len(everything) == 102 and len(everything.unique()) == 102  # one image of 103 dropped, none twice


def torchrun(*args: str, processes: int = 2, script: Optional[Path] = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N -m bnprobe ARGS` (or SCRIPT ARGS) on CPU, which picks gloo.

    The workers inherit this process's environment, PYTHONPATH included, so they import this checkout."""
    target = [str(script)] if script else ["-m", "bnprobe"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               *target, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_torchrun_two_processes_on_cpu(tmp_path):
    done = torchrun("train", "resnet8", "--ddp", "--device", "cpu", "--dataset", "digits",
                    "--epochs", "2", "--subset", "400", "--test-subset", "100", "--batch-size", "64", "--freeze", "non-bn",
                    "--milestones", "", "--runs-dir", str(tmp_path), "--name", "ddp")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("2 processes") == 1  # rank 0 alone speaks
    state = runs.load_checkpoint(runs.checkpoint_path(tmp_path / "ddp"))
    assert state["processes"] == 2 and state["finished"]
    config = TrainConfig.from_dict(state["config"])
    initial = build_model(config, 1, 10).state_dict()
    trained = trainable_parameter_names(build_model(config, 1, 10), "non-bn")
    for name, tensor in initial.items():
        if name in trained:
            assert not torch.equal(state["model"][name], tensor)
        elif "running" not in name and "num_batches" not in name:
            assert torch.equal(state["model"][name], tensor), f"frozen {name} changed under DDP"
    # 400 images in 2 shards of 200, batches of 32 per rank: 7 steps per epoch on each rank
    assert state["history"][-1]["images_per_s"] > 0 and len(state["history"]) == 2
    assert state["model"]["bn1.num_batches_tracked"].item() == 2 * 7


def test_ddp_outside_torchrun_is_a_clear_error(tmp_path):
    import pytest

    from bnprobe.errors import BnprobeError
    from bnprobe.train import train

    with pytest.raises(BnprobeError, match="needs torchrun"):
        train(TrainConfig(model="resnet8", dataset="digits", ddp=True, device="cpu"), tmp_path / "x")
    with pytest.raises(BnprobeError, match="--sync-bn needs CUDA"):
        train(TrainConfig(model="resnet8", dataset="digits", sync_bn=True, device="cpu"), tmp_path / "y")
