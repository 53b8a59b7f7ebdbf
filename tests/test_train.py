import json

import h5py
import numpy as np
import pytest
import torch

from bnprobe.core.config import TrainConfig
from bnprobe.core.errors import BnprobeError
from bnprobe.files import checkpoints, runs
from bnprobe.nets.check import check_model
from bnprobe.nets.freeze import trainable_parameter_names
from bnprobe.nets.registry import from_config
from bnprobe.training.train import train


def tiny(**changes) -> TrainConfig:
    base = dict(model="resnet8", dataset="digits", epochs=2, batch_size=64, subset=400, test_subset=200,
                milestones="1", device="cpu", eval_batch_size=200)
    return TrainConfig(**{**base, **changes})


def strip(history):
    """The history without wall-clock timings, which differ between equal runs."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in history]


def final_state(run_dir):
    return checkpoints.load_checkpoint(runs.checkpoint_path(run_dir))


def test_same_seed_gives_identical_runs(tmp_path):
    history_a = train(tiny(), tmp_path / "a")
    history_b = train(tiny(), tmp_path / "b")
    assert strip(history_a) == strip(history_b)
    a, b = final_state(tmp_path / "a")["model"], final_state(tmp_path / "b")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = train(tiny(seed=1), tmp_path / "c")
    assert strip(other) != strip(history_a)


def test_bn_only_training_leaves_every_frozen_tensor_bit_identical(tmp_path):
    config = tiny(freeze="non-bn").resolved()
    initial = from_config(config).state_dict()
    train(config, tmp_path / "run")
    trained = final_state(tmp_path / "run")["model"]
    bn = trainable_parameter_names(from_config(config), "non-bn")
    params = {n for n, _ in from_config(config).named_parameters()}
    for name in params:
        if name in bn:
            assert not torch.equal(trained[name], initial[name]), name
        else:
            assert torch.equal(trained[name], initial[name]), f"frozen {name} changed"


def test_run_directory_holds_config_checkpoint_and_metrics(tmp_path):
    run_dir = tmp_path / "run"
    history = train(tiny(), run_dir)
    config = runs.read_config(run_dir)
    assert config == tiny().resolved()
    state = final_state(run_dir)  # loads with weights_only=True
    assert state["format"] == "bnprobe-checkpoint" and state["finished"] and state["epoch"] == 2
    model = from_config(TrainConfig.from_dict(state["config"]))
    model.load_state_dict(state["model"])  # the config alone rebuilds the architecture
    assert json.loads(runs.metrics_path(run_dir).read_text()) == history
    assert [r["lr"] for r in history] == [0.1, pytest.approx(0.01)]
    assert {"train_loss", "train_acc", "test_loss", "test_acc"} <= set(history[0])
    assert not list(run_dir.glob("*.tmp")) and not list(run_dir.glob(".*tmp"))


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    straight = train(tiny(), tmp_path / "straight")
    real_save, saves = runs.save_checkpoint, []

    def crash_before_second_checkpoint(*args, **kwargs):
        saves.append(1)
        if len(saves) == 2:  # epoch 2's telemetry is on disk, its checkpoint is not
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(runs, "save_checkpoint", crash_before_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(), tmp_path / "crashed")
    assert final_state(tmp_path / "crashed")["epoch"] == 1
    monkeypatch.setattr(runs, "save_checkpoint", real_save)
    with pytest.raises(BnprobeError, match="already exists"):
        train(tiny(), tmp_path / "crashed")
    resumed = train(tiny(), tmp_path / "crashed", resume=True)
    assert strip(resumed) == strip(straight)
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "crashed")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # the telemetry of the resumed run has each step and epoch once, equal to the straight run's
    with h5py.File(tmp_path / "straight" / "telemetry.h5") as f, h5py.File(tmp_path / "crashed" / "telemetry.h5") as g:
        assert np.array_equal(f["steps/step"][:], g["steps/step"][:])
        assert np.array_equal(f["steps/grad_l2"][:], g["steps/grad_l2"][:], equal_nan=True)
        assert np.array_equal(f["epochs/test_acc"][:], g["epochs/test_acc"][:])
        assert np.array_equal(f["bn/layer1.0.bn1/gamma"][:], g["bn/layer1.0.bn1/gamma"][:])


def test_resume_refuses_other_settings_and_skips_finished_runs(tmp_path):
    train(tiny(epochs=1), tmp_path / "run")
    with pytest.raises(BnprobeError, match="settings differ .*lr"):
        train(tiny(epochs=1, lr=0.5), tmp_path / "run", resume=True)
    before = runs.checkpoint_path(tmp_path / "run").read_bytes()
    train(tiny(epochs=1), tmp_path / "run", resume=True)  # finished: nothing to do
    assert runs.checkpoint_path(tmp_path / "run").read_bytes() == before


def test_nan_loss_stops_with_the_last_good_checkpoint(tmp_path):
    # lr 0.1 in epoch 1, then 1e6: the loss diverges in epoch 2
    with pytest.raises(BnprobeError, match=r"loss became (nan|inf) in epoch 2.*checkpoint \(epoch 1\)"):
        train(tiny(epochs=3, milestones="1", lr_drop=1e7), tmp_path / "run")
    state = final_state(tmp_path / "run")
    assert state["epoch"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_lr_schedule():
    config = TrainConfig()
    assert [config.lr_at(e) for e in (0, 79, 80, 119, 120, 159)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


@pytest.mark.parametrize("changes,message", [
    (dict(epochs=0), "--epochs must be >= 1"),
    (dict(lr=-1.0), "--lr must be > 0"),
    (dict(milestones="80,x"), "--milestones"),
    (dict(freeze="all"), "--freeze must be one of"),
    (dict(translate=8), "--translate must be in"),
    (dict(dataset="imagenet"), "unknown data set"),
    (dict(model="resnet21"), "unknown model"),
    (dict(momentum=1.5), "--momentum"),
])
def test_config_validation(changes, message):
    with pytest.raises(BnprobeError, match=message):
        check_model(tiny(**changes).resolved())


def test_compiled_step_model_saves_the_plain_state_dict(tmp_path, monkeypatch):
    """--compile trains through a wrapper module; the checkpoint must hold the model's own keys."""
    import torch.nn as nn

    from bnprobe.training import train as train_module

    class Wrapper(nn.Module):  # what torch.compile returns: an OptimizedModule holding _orig_mod
        def __init__(self, model):
            super().__init__()
            self._orig_mod = model

        def forward(self, x):
            return self._orig_mod(x)

    used = []
    monkeypatch.setattr(train_module, "compile_model", lambda model, device: used.append(1) or Wrapper(model))
    history = train(tiny(compile=True), tmp_path / "c")
    state = final_state(tmp_path / "c")
    assert used and not any(k.startswith("_orig_mod") for k in state["model"])
    assert strip(history) == strip(train(tiny(), tmp_path / "plain"))


def test_load_checkpoint_refuses_non_checkpoints(tmp_path):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(BnprobeError, match="is not a PyTorch checkpoint"):
        checkpoints.load_checkpoint(tmp_path / "notes.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(BnprobeError, match="is not a bnprobe checkpoint"):
        checkpoints.load_checkpoint(tmp_path / "list.pt")
    with pytest.raises(BnprobeError, match="no checkpoint at"):
        checkpoints.load_checkpoint(tmp_path / "missing.pt")


def test_running_metrics_of_a_sharded_epoch_are_over_every_rank(monkeypatch):
    """Under DDP each rank sums its shard; the epoch's loss and accuracy are over all ranks' images, not a
    rank's sum divided by the whole data set (which read as 1/world of the truth)."""
    import torch.nn as nn
    import torch.nn.functional as F

    import bnprobe.training.train
    from bnprobe.data.device import DeviceLoader

    torch.manual_seed(0)
    images, labels = torch.randint(0, 256, (100, 1, 8, 8), dtype=torch.uint8), torch.randint(0, 10, (100,))
    mean, std = torch.full((1, 8, 8), 128.0), torch.full((1, 8, 8), 64.0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    generator = torch.Generator().manual_seed(1)
    loader = DeviceLoader(images, labels, mean, std, 16, shuffle=True, generator=generator, shard=(0, 2))
    batches = list(loader)  # what this rank sees; the stand-in other rank sees the same sums
    generator.manual_seed(1)
    with torch.no_grad():
        expected_loss = sum(F.cross_entropy(model(x), y, reduction="sum").item() for x, y in batches) / 50
        expected_acc = sum((model(x).argmax(1) == y).sum().item() for x, y in batches) / 50
    monkeypatch.setattr(bnprobe.training.train, "sum_over_processes", lambda t: t.mul_(2))  # two identical ranks
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)
    loss, acc = bnprobe.training.train.train_one_epoch(model, loader, frozen)
    assert loss == pytest.approx(expected_loss) and acc == pytest.approx(expected_acc)
