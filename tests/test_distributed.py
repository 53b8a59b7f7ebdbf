"""Data-parallel training: sharding, and a real 2-process torchrun run with the gloo backend on CPU."""

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

from bnprobe.core.config import TrainConfig
from bnprobe.core.errors import BnprobeError
from bnprobe.data.device import DeviceLoader
from bnprobe.files import checkpoints, runs
from bnprobe.nets.freeze import trainable_parameter_names
from bnprobe.nets.registry import from_config
from bnprobe.training.train import train


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
    state = checkpoints.load_checkpoint(runs.checkpoint_path(tmp_path / "ddp"))
    assert state["processes"] == 2 and state["finished"]
    config = TrainConfig.from_dict(state["config"])
    initial = from_config(config).state_dict()
    trained = trainable_parameter_names(from_config(config), "non-bn")
    for name, tensor in initial.items():
        if name in trained:
            assert not torch.equal(state["model"][name], tensor)
        elif "running" not in name and "num_batches" not in name:
            assert torch.equal(state["model"][name], tensor), f"frozen {name} changed under DDP"
    # 400 images in 2 shards of 200, batches of 32 per rank: 7 steps per epoch on each rank
    assert state["history"][-1]["images_per_s"] > 0 and len(state["history"]) == 2
    assert state["model"]["bn1.num_batches_tracked"].item() == 2 * 7


def test_ddp_outside_torchrun_is_a_clear_error(tmp_path):
    with pytest.raises(BnprobeError, match="needs torchrun"):
        train(TrainConfig(model="resnet8", dataset="digits", ddp=True, device="cpu"), tmp_path / "x")
    with pytest.raises(BnprobeError, match="--sync-bn needs CUDA"):
        train(TrainConfig(model="resnet8", dataset="digits", sync_bn=True, device="cpu"), tmp_path / "y")


# Ctrl-C on every rank once epoch 1 is checkpointed: each rank stops before epoch 2 starts.
STOP_AFTER_FIRST_EPOCH = """
import bnprobe.training.train
from bnprobe.cli import main

real, calls = bnprobe.training.train.train_one_epoch, []


def first_epoch_only(*args, **kwargs):
    if calls:
        raise KeyboardInterrupt
    calls.append(1)
    return real(*args, **kwargs)


bnprobe.training.train.train_one_epoch = first_epoch_only
main()
"""


def test_interrupted_ddp_run_resumes_bit_identical_on_every_rank(tmp_path):
    args = ["train", "resnet8", "--ddp", "--device", "cpu", "--dataset", "digits", "--epochs", "2",
            "--subset", "256", "--test-subset", "50", "--train-eval-subset", "50", "--batch-size", "32",
            "--flip", "--translate", "1", "--milestones", "", "--runs-dir", str(tmp_path)]
    straight = torchrun(*args, "--name", "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]

    script = tmp_path / "stop_after_first_epoch.py"
    script.write_text(STOP_AFTER_FIRST_EPOCH)
    stopped = torchrun(*args, "--name", "resumed", script=script)
    assert stopped.returncode != 0 and "interrupted" in stopped.stderr
    stored = checkpoints.load_checkpoint(runs.checkpoint_path(tmp_path / "resumed"))
    assert stored["epoch"] == 1 and stored["processes"] == 2
    with pytest.raises(BnprobeError, match="trained by 2 processes, not 1; resume it under torchrun --nproc_per_node 2"):
        train(dataclasses.replace(TrainConfig.from_dict(stored["config"]), ddp=False), tmp_path / "resumed", resume=True)

    resumed = torchrun(*args, "--name", "resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming" in resumed.stdout
    a = checkpoints.load_checkpoint(runs.checkpoint_path(tmp_path / "straight"))
    b = checkpoints.load_checkpoint(runs.checkpoint_path(tmp_path / "resumed"))
    assert b["finished"] and b["epoch"] == 2 and a["model"].keys() == b["model"].keys()
    differing = [name for name in a["model"] if not torch.equal(a["model"][name], b["model"][name])]
    assert not differing, f"resumed DDP run differs in {differing}"  # parameters and BN buffers, bit for bit
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(x["momentum_buffer"], y["momentum_buffer"])
    timing = {"seconds", "images_per_s"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in a["history"]] == \
        [{k: v for k, v in r.items() if k not in timing} for r in b["history"]]


def test_ranks_augment_independently_and_their_shards_stay_disjoint_every_epoch():
    # Under DDP the order stream draws permutations only; augmentation comes from a stream per (epoch, rank).
    from bnprobe.training.distributed import augmentation_seed

    labels = torch.arange(64)
    images = torch.arange(64 * 16, dtype=torch.int64).remainder(251).to(torch.uint8).view(64, 1, 4, 4)
    loaders = [
        DeviceLoader(images, labels, torch.zeros(1, 1, 1), torch.ones(1, 1, 1), 8, shuffle=True, flip=True,
                     translate=1, generator=torch.Generator().manual_seed(0),
                     augment_generator=torch.Generator(), shard=(rank, 2))
        for rank in range(2)
    ]
    for epoch in range(3):
        for rank, loader in enumerate(loaders):
            loader.augment_generator.manual_seed(augmentation_seed(0, epoch, rank))
        seen = torch.cat([y for loader in loaders for _, y in loader])
        assert len(seen.unique()) == 64, f"ranks' shards overlap in epoch {epoch + 1}"
    assert len({augmentation_seed(0, e, r) for e in range(3) for r in range(2)} | {augmentation_seed(1, 0, 0)}) == 7
