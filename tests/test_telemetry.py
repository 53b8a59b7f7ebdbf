"""telemetry.h5: read with plain h5py by docs/hdf5-schema.md, numbers checked against independent computations."""

import io
import json
import re
import shutil

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import assert_one_line_error, run_cli
from rich.console import Console

from bnprobe.analysis.run_summary import summarize_run
from bnprobe.analysis.run_summary_tables import run_tables
from bnprobe.cli import main
from bnprobe.core.config import TrainConfig
from bnprobe.core.errors import BnprobeError
from bnprobe.data.device import DeviceLoader, fixed_subset, load_dataset
from bnprobe.files import checkpoints, runs
from bnprobe.nets.registry import from_config
from bnprobe.training.evaluate import evaluate
from bnprobe.training.train import train

GROUPS = {"bn_gamma", "bn_beta", "conv_weight", "linear_weight", "bias"}


def tiny(**changes) -> TrainConfig:
    base = dict(model="resnet8", dataset="digits", epochs=2, batch_size=64, subset=300, test_subset=150,
                milestones="", device="cpu", train_eval_subset=200, telemetry_every=1)
    return TrainConfig(**{**base, **changes}).resolved()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    train(tiny(), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def bn_only_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "bn-only"
    train(tiny(freeze="non-bn", telemetry_every=3), run_dir)
    return run_dir


def test_schema_as_documented(full_run):
    with h5py.File(full_run / "telemetry.h5", "r") as f:
        assert f.attrs["format"] == "bnprobe-telemetry" and f.attrs["version"] == 1
        assert TrainConfig.from_dict(__import__("json").loads(f.attrs["config_json"])) == tiny()
        assert f.attrs["config.model"] == "resnet8"
        names = list(f["params/name"].asstr()[:])
        model = from_config(tiny())
        assert names == [n for n, _ in model.named_parameters()]
        assert set(f["params/group"].asstr()[:]) == GROUPS
        assert f["params/numel"][:].sum() == sum(p.numel() for p in model.parameters())
        assert f["params/trainable"][:].all()
        steps_per_epoch = -(-300 // 64)
        s = f["steps"]
        assert s["step"][:].tolist() == list(range(2 * steps_per_epoch))
        assert s["epoch"][:].tolist() == [1] * steps_per_epoch + [2] * steps_per_epoch
        assert s["grad_abs_mean"].shape == s["grad_l2"].shape == (2 * steps_per_epoch, len(names))
        assert s["grad_abs_mean"].compression == "gzip" and s["grad_abs_mean"].chunks
        assert "units" in s["grad_abs_mean"].attrs
        assert set(s["groups"]) == GROUPS
        e = f["epochs"]
        assert e["epoch"][:].tolist() == [1, 2]
        assert np.allclose(e["gap"][:], e["train_eval_acc"][:] - e["test_acc"][:])
        assert f["bn/epoch"][:].tolist() == [0, 1, 2]
        assert f["bn/layer2.0.downsample.1/gamma"].shape == (3, 32)


def test_grad_norms_equal_an_independent_backward_pass(full_run):
    """Step 0 recomputed by hand: same init, same first batch, one backward."""
    config = tiny()
    model = from_config(config)
    data = load_dataset("digits", subset=300, test_subset=150, normalize=config.normalize)
    generator = torch.Generator().manual_seed(config.seed)
    loader = DeviceLoader(data.train_x, data.train_y, data.mean, data.std, 64, shuffle=True,
                          flip=config.flip, translate=config.translate, generator=generator)
    x, y = next(iter(loader))
    F.cross_entropy(model(x), y).backward()
    expected_l2 = np.array([p.grad.norm().item() for p in model.parameters()])
    expected_abs = np.array([p.grad.abs().mean().item() for p in model.parameters()])
    with h5py.File(full_run / "telemetry.h5", "r") as f:
        np.testing.assert_allclose(f["steps/grad_l2"][0], expected_l2, rtol=1e-4)
        np.testing.assert_allclose(f["steps/grad_abs_mean"][0], expected_abs, rtol=1e-4)
        groups = f["params/group"].asstr()[:]
        numel = f["params/numel"][:]
        bn = groups == "bn_gamma"
        group_mean = (expected_abs[bn] * numel[bn]).sum() / numel[bn].sum()
        assert f["steps/groups/bn_gamma/grad_abs_mean"][0] == pytest.approx(group_mean, rel=1e-4)
        assert f["steps/groups/conv_weight/grad_l2"][0] == pytest.approx(
            np.sqrt((expected_l2[groups == "conv_weight"] ** 2).sum()), rel=1e-4)


def test_bn_snapshots_match_init_and_final_checkpoint(full_run):
    initial = from_config(tiny()).state_dict()
    final = checkpoints.load_checkpoint(runs.checkpoint_path(full_run))["model"]
    with h5py.File(full_run / "telemetry.h5", "r") as f:
        for layer, key in (("bn1", "weight"), ("layer3.0.bn2", "bias"), ("layer1.0.bn1", "running_var")):
            name = {"weight": "gamma", "bias": "beta"}.get(key, key)
            np.testing.assert_array_equal(f[f"bn/{layer}/{name}"][0], initial[f"{layer}.{key}"].numpy())
            np.testing.assert_array_equal(f[f"bn/{layer}/{name}"][-1], final[f"{layer}.{key}"].numpy())


def test_train_accuracy_in_eval_mode_is_recomputable(full_run):
    config = tiny()
    model = from_config(config)
    model.load_state_dict(checkpoints.load_checkpoint(runs.checkpoint_path(full_run))["model"])
    data = load_dataset("digits", subset=300, test_subset=150, normalize=config.normalize)
    index = fixed_subset(300, 200, torch.device("cpu"))
    _, acc = evaluate(model, DeviceLoader(data.train_x[index], data.train_y[index], data.mean, data.std, 1000))
    with h5py.File(full_run / "telemetry.h5", "r") as f:
        assert f["epochs/train_eval_acc"][-1] == pytest.approx(acc)


def test_frozen_tensors_are_recorded_as_frozen_not_zero(bn_only_run):
    with h5py.File(bn_only_run / "telemetry.h5", "r") as f:
        groups = f["params/group"].asstr()[:]
        trainable = f["params/trainable"][:]
        assert np.array_equal(trainable, np.isin(groups, ["bn_gamma", "bn_beta"]))
        grads = f["steps/grad_abs_mean"][:]
        assert np.isnan(grads[:, ~trainable]).all()
        assert np.isfinite(grads[:, trainable]).all() and (grads[:, trainable] > 0).all()
        assert f["steps/groups/conv_weight"].attrs["frozen"]
        assert np.isnan(f["steps/groups/conv_weight/grad_abs_mean"][:]).all()
        assert not f["steps/groups/bn_gamma"].attrs["frozen"]
        assert f["steps/step"][:].tolist() == list(range(0, 10, 3))  # every 3rd of 2 x 5 steps


def test_recording_does_not_change_training(full_run, tmp_path):
    train(tiny(telemetry_every=0), tmp_path / "quiet")
    a = checkpoints.load_checkpoint(runs.checkpoint_path(full_run))["model"]
    b = checkpoints.load_checkpoint(runs.checkpoint_path(tmp_path / "quiet"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with h5py.File(tmp_path / "quiet" / "telemetry.h5", "r") as f:
        assert "grad_l2" not in f["steps"] and f["epochs/epoch"].shape == (2,)


def test_bn_parameters_get_larger_gradients_than_convs(full_run):
    """The seed's Figure 2 at CPU scale: it holds on digits for resnet8, so assert it."""
    with h5py.File(full_run / "telemetry.h5", "r") as f:
        mean = {g: np.mean(f[f"steps/groups/{g}/grad_abs_mean"][:]) for g in GROUPS}
    assert mean["bn_gamma"] > 2 * mean["conv_weight"]
    assert mean["bn_beta"] > 2 * mean["conv_weight"]


def test_inspect_computes_its_summary_from_the_telemetry_file(full_run, bn_only_run):
    """summarize_run (what `bnprobe inspect` prints, before any table): each number against /epochs and /steps
    read with plain h5py."""
    for run_dir in (full_run, bn_only_run):
        summary = summarize_run(run_dir, top=2)
        with h5py.File(run_dir / "telemetry.h5", "r") as f:
            epochs = {k: f[f"epochs/{k}"][:].astype(float) for k in ("epoch", "test_acc", "gap", "train_eval_acc",
                                                                     "train_acc", "train_eval_loss", "test_loss")}
            r = summary.results
            assert (r.epoch, r.test_acc, r.gap, r.train_eval_acc, r.train_acc, r.train_eval_loss, r.test_loss) == (
                epochs["epoch"][-1], epochs["test_acc"][-1], epochs["gap"][-1], epochs["train_eval_acc"][-1],
                epochs["train_acc"][-1], epochs["train_eval_loss"][-1], epochs["test_loss"][-1])
            for value, epoch, column in ((r.best_test_acc, r.best_epoch, "test_acc"),
                                         (r.largest_gap, r.largest_gap_epoch, "gap")):
                values = list(epochs[column])
                assert (value, epoch) == (max(values), epochs["epoch"][values.index(max(values))])  # the first
            steps = f["steps/epoch"][:]
            last = steps == steps[-1]
            assert (summary.recorded_epoch, summary.recorded_steps) == (steps[-1], last.sum())
            for g in summary.groups:
                group = f[f"steps/groups/{g.name}"]
                assert (g.tensors, g.elements, g.frozen) == (group.attrs["tensors"], group.attrs["numel"],
                                                             bool(group.attrs["frozen"]))
                if not g.frozen:
                    assert g.grad_abs_mean == pytest.approx(group["grad_abs_mean"][:][last].astype(float).mean())
                    assert g.grad_l2 == pytest.approx(group["grad_l2"][:][last].astype(float).mean())
            trainable = f["params/trainable"][:].astype(bool)
            per_tensor = dict(zip(f["params/name"].asstr()[:][trainable],
                                  f["steps/grad_abs_mean"][:][last][:, trainable].astype(float).mean(0)))
        ranked = sorted(per_tensor, key=per_tensor.get, reverse=True)
        largest, smallest = summary.extremes
        assert [name for name, _ in largest] == ranked[:2] and [name for name, _ in smallest] == ranked[::-1][:2]
        assert all(value == pytest.approx(per_tensor[name]) for name, value in largest + smallest)
        assert not summary.all_tensors and summary.note == ""


def test_inspect_prints_a_summary(full_run, bn_only_run, capsys):
    with pytest.raises(SystemExit) as done:
        main(["inspect", str(full_run)])
    out = capsys.readouterr().out
    assert done.value.code == 0
    for text in ("generalisation gap", "bn_gamma", "conv_weight", "test acc"):
        assert text in out
    with h5py.File(full_run / "telemetry.h5", "r") as f:  # the table names the epoch its steps come from
        epochs = f["steps/epoch"][:]
    assert f"epoch {epochs[-1]}'s {(epochs == epochs[-1]).sum()} recorded step" in " ".join(out.split())
    with h5py.File(full_run / "telemetry.h5", "r") as f:  # the extremes it lists, found independently
        last = f["steps/epoch"][:] == 2
        per_tensor = f["steps/grad_abs_mean"][:][last].mean(0)
        names = f["params/name"].asstr()[:]
    assert names[per_tensor.argmax()] in out and names[per_tensor.argmin()] in out
    with pytest.raises(SystemExit):
        main(["inspect", str(bn_only_run)])
    out = capsys.readouterr().out
    assert "frozen" in out


def test_inspect_top_covering_every_tensor_lists_each_once_sorted(bn_only_run):
    # With 2 * --top >= the trainable tensors, "largest" and "smallest" listed some tensors twice.
    with h5py.File(bn_only_run / "telemetry.h5", "r") as f:  # the per-tensor means, found independently
        epochs = f["steps/epoch"][:]
        trainable = f["params/trainable"][:].astype(bool)
        means = f["steps/grad_abs_mean"][:][epochs == epochs[-1]].mean(0)[trainable]
        shown = {name: f"{mean:.3e}" for name, mean in zip(f["params/name"].asstr()[:][trainable], means)}
    largest_first = [f"{m:.3e}" for m in sorted(means, reverse=True)]

    def rows(top: int) -> tuple[str, list[tuple[str, str]]]:
        out = io.StringIO()
        Console(width=200, file=out, force_terminal=False).print(run_tables(summarize_run(bn_only_run, top=top)))
        cells = [[c.strip() for c in line.split("│")[1:-1]] for line in out.getvalue().splitlines()]
        return " ".join(out.getvalue().split()), [(c[0], c[1]) for c in cells if len(c) == 2 and c[0] in shown]

    half = (len(shown) + 1) // 2
    for top in (half, len(shown), 1000):
        text, listed = rows(top)
        assert f"Mean |grad| of all {len(shown)} trainable tensors, largest first" in text
        assert sorted(name for name, _ in listed) == sorted(shown)  # each once
        assert [value for _, value in listed] == largest_first and all(shown[n] == v for n, v in listed)
    text, listed = rows(half - 1)  # fewer: the two lists as before, apart
    assert f"Largest and smallest mean |grad| per tensor (top {half - 1})" in text
    assert len({name for name, _ in listed}) == len(listed) == 2 * (half - 1)
    assert [value for _, value in listed] == largest_first[:half - 1] + largest_first[::-1][:half - 1]
    assert all(shown[n] == v for n, v in listed)


def _inspect_copy(full_run, run_dir, data_dir, width, **kwargs) -> str:
    """`bnprobe inspect` of a copy of `full_run` named `run_dir` whose config says `data_dir`, at `width` columns."""
    shutil.copytree(full_run, run_dir)
    config = json.loads(runs.config_path(run_dir).read_text())
    config["data_dir"] = data_dir
    runs.config_path(run_dir).write_text(json.dumps(config))
    out = io.StringIO()
    Console(width=width, file=out, force_terminal=False).print(run_tables(summarize_run(run_dir, **kwargs)))
    return out.getvalue()


def test_inspect_is_readable_at_80_columns(full_run, tmp_path):
    """Piped (`bnprobe inspect RUN | cat`) rich uses 80 columns: long values fold, nothing is cut with an ellipsis."""
    run_dir = tmp_path / "a-long-run-name-resnet8-digits-freeze-none-bn-full-seed-0-width-1-shortcut-B"
    text = _inspect_copy(full_run, run_dir, "/scratch/group/shared/datasets/torchvision-cache/cifar10-and-cifar100/"
                         "version-2-final", 80, top=3)
    assert "\u2026" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "version-2-final" in text and "/scratch/group/shared" in text  # folded, not cut
    with h5py.File(run_dir / "telemetry.h5", "r") as f:
        numels = [f"{f[f'steps/groups/{g}'].attrs['numel']:,}" for g in f["steps/groups"]]
    assert all(f" {numel} " in text for numel in numels), text


def test_inspect_shows_brackets_in_names_and_values_as_they_are(full_run, tmp_path):
    text = _inspect_copy(full_run, tmp_path / "r[bold]x", "/data/[old]", 120)
    assert "Run r[bold]x" in text and "/data/[old]" in text, text


def test_inspect_prints_names_from_the_files_escaped(full_run, tmp_path):
    # issue 21 (13): a tensor's name, a setting or the run's folder could hold an escape sequence or a newline
    run_dir = tmp_path / "r\x1b[31m"
    shutil.copytree(full_run, run_dir)
    with h5py.File(run_dir / "telemetry.h5", "a") as f:
        names = f["params/name"].asstr()[:].tolist()
        del f["params/name"]
        f.create_dataset("params/name", data=["w\x1b[2J\nx" + name for name in names], dtype=h5py.string_dtype())
    out = io.StringIO()
    Console(width=200, file=out, force_terminal=False).print(run_tables(summarize_run(run_dir, top=100)))
    text = out.getvalue()
    assert "\x1b" not in text and "Run r\\x1b[31m" in text and "w\\x1b[2J\\nx" + names[0] in text


def test_inspect_top(full_run, capsys):
    def tensor_rows(top):
        out = io.StringIO()
        Console(width=120, file=out, force_terminal=False).print(run_tables(summarize_run(full_run, top=top)))
        return [line for line in out.getvalue().splitlines() if re.match(r"│ \S+\.(weight|bias) ", line)], out.getvalue()

    assert len(tensor_rows(2)[0]) == 4  # the 2 largest and the 2 smallest
    rows, text = tensor_rows(0)
    assert rows == [] and "per tensor" not in text  # 0 lists none: no table at all
    for top in (-1, -5):  # -1 used to list every tensor but one, twice
        with pytest.raises(BnprobeError, match=f"--top must be >= 0 .*got {top}"):
            summarize_run(full_run, top=top)
    code, _, err = run_cli(capsys, "inspect", full_run, "--top", "-1")
    assert_one_line_error(code, err, "--top must be >= 0")


@pytest.mark.parametrize("make,pattern", [
    (lambda p: p, "no run directory"),
    (lambda p: (p.mkdir(), p)[1], "not a run directory"),
    (lambda p: (p.write_text("x"), p)[1], "is a file; inspect takes a run directory"),
])
def test_inspect_errors(tmp_path, capsys, make, pattern):
    target = make(tmp_path / "x")
    with pytest.raises(SystemExit) as done:
        main(["inspect", str(target)])
    err = capsys.readouterr().err
    assert done.value.code == 2 and pattern in err and len(err.strip().splitlines()) == 1


def test_random_features_mean_grad_is_over_the_trained_elements():
    """A --random-features conv trains K elements per output channel; the rest get zero gradient. Its mean
    |grad| (and its group's) is over the trained elements, as for any fully trained tensor, so the baseline's
    conv gradients compare with BN's fairly. Like every other tensor's, what is recorded is the masked loss
    gradient alone, without the weight decay the step adds before SGD (checked against an independent
    backward pass on an unfrozen copy; with this much decay, a recorded decay term would be far off)."""
    from bnprobe.training.graphs import TrainStep
    from bnprobe.training.regularize import after_backward_steps
    from bnprobe.training.telemetry import GradientRecorder
    from bnprobe.training.train import trainable_model

    config = TrainConfig(model="resnet8", dataset="digits", freeze="all-but-output", random_features=2,
                         weight_decay=0.05, device="cpu").resolved()
    model, optimizer, masks, _, _ = trainable_model(config, torch.device("cpu"))
    reference = from_config(config)
    reference.load_state_dict(model.state_dict())  # every tensor trains, no hook: the plain loss gradient
    recorder = GradientRecorder(model, 1, 1, masks)
    step = TrainStep(model, optimizer, after_backward=after_backward_steps(model, config, masks), recorder=recorder)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    step(x, y)
    F.cross_entropy(reference(x), y).backward()
    _, abs_mean, l2 = recorder.drain()
    expected = {n: p.grad * masks[n] if n in masks else p.grad for n, p in reference.named_parameters()}
    params = dict(model.named_parameters())
    checked = 0
    for i, name in enumerate(recorder.names):
        if not params[name].requires_grad:
            continue
        trained = int(masks[name].sum()) if name in masks else params[name].numel()
        assert abs_mean[0, i] == pytest.approx(expected[name].abs().sum().item() / trained, rel=1e-4), name
        assert l2[0, i] == pytest.approx(expected[name].norm().item(), rel=1e-4), name
        checked += name in masks
    assert checked == len(masks) > 0
    conv = [i for i, n in enumerate(recorder.names) if n in masks]
    trained = sum(int(masks[recorder.names[i]].sum()) for i in conv)
    group = sum(expected[recorder.names[i]].abs().sum().item() for i in conv) / trained
    assert np.isclose((abs_mean[0, conv] * recorder.trained[conv]).sum() / recorder.trained[conv].sum(), group)  # the group's weighting


def test_random_features_training_is_the_step_it_always_was(tmp_path, monkeypatch):
    """Recording the loss gradient alone moved the masked tensors' decay out of their gradient hook; the
    weights trained are bit-identical to those of the hook that added it, (grad + wd * w) * mask, as before."""
    import bnprobe.training.train

    config = tiny(freeze="all-but-output", random_features=2, weight_decay=0.05, epochs=1, telemetry_every=0)
    train(config, tmp_path / "now", console=Console(quiet=True))

    def decay_in_the_hook(model, masks, *_):  # the old path: decay inside the gradient hook, no step after backward
        params = dict(model.named_parameters())
        for name, mask in masks.items():
            p = params[name].requires_grad_(True)
            p.register_hook(lambda grad, p=p, m=mask: (grad + config.weight_decay * p.detach()) * m)
        return sum(int(m.sum()) for m in masks.values())

    monkeypatch.setattr(bnprobe.training.train, "apply_random_features", decay_in_the_hook)
    monkeypatch.setattr(bnprobe.training.train, "after_backward_steps", lambda *_: [], raising=False)
    train(config, tmp_path / "before", console=Console(quiet=True))
    now, before = (checkpoints.load_checkpoint(runs.checkpoint_path(tmp_path / d))["model"] for d in ("now", "before"))
    initial = from_config(config).state_dict()
    assert now.keys() == before.keys()
    for name in now:
        assert torch.equal(now[name], before[name]), name
    assert any(not torch.equal(now[n], initial[n]) for n in now if n.endswith("conv1.weight"))  # the masks trained
