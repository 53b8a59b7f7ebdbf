"""Loading checkpoints for probes: bnprobe runs, user factories, nested/prefixed state dicts, strict keys,
normalisation flags, and refusing checkpoints that carry code."""

import pickle
import random
import re

import pytest
import torch
import torch.nn as nn
from probe_helpers import (
    assert_one_line_error,
    randomize_bn,
    run_cli,
    single_thread,  # noqa: F401 - autouse: one thread for tiny models
    trained_runs,
    write_model_file,
)

from bnprobe.analysis.loading import (
    build_from_factory,
    check_forward,
    load_eval_data,
    load_model,
    parse_model_args,
    resolve_normalization,
)
from bnprobe.core.config import TrainConfig
from bnprobe.core.errors import BnprobeError, first_line
from bnprobe.core.options import LoadOptions
from bnprobe.files import checkpoints, runs
from bnprobe.files.checkpoints import extract_state_dict, read_checkpoint
from bnprobe.nets.registry import from_config

CPU = LoadOptions(device="cpu")


@pytest.fixture(scope="module")
def runs_dirs(tmp_path_factory):
    return trained_runs(tmp_path_factory)


@pytest.fixture
def user_model(tmp_path):
    """A user's model file, a trained-looking instance of it, and an options object that builds it."""
    path = write_model_file(tmp_path)
    model = randomize_bn(build_from_factory(f"{path}:small_net", ["width=4"]))
    options = LoadOptions(model=f"{path}:small_net", model_arg=["width=4"], dataset="digits", device="cpu")
    return path, model, options


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


# ---- bnprobe checkpoints -----------------------------------------------------------------------------


def test_bnprobe_checkpoint_from_run_dir_or_file(runs_dirs):
    run = runs_dirs["full"]
    state = checkpoints.load_checkpoint(runs.checkpoint_path(run))
    config = TrainConfig.from_dict(state["config"])
    reference = from_config(config)
    reference.load_state_dict(state["model"])
    for given in (run, runs.checkpoint_path(run)):
        loaded = load_model(given, CPU)
        assert loaded.source == "bnprobe" and loaded.label == "full" and loaded.dataset == "digits"
        assert not loaded.model.training
        for key, tensor in reference.state_dict().items():
            assert torch.equal(loaded.model.state_dict()[key], tensor), key
        assert torch.equal(loaded.mean, state["normalization"]["mean"])
        assert torch.equal(loaded.std, state["normalization"]["std"])
        assert loaded.meta["freeze"] == "none" and loaded.meta["epoch"] == 2


def test_run_trained_on_a_subset_is_measured_on_its_own_images(runs_dirs):
    from bnprobe.data.device import fixed_subset, load_dataset

    loaded = load_model(runs_dirs["full"], CPU)
    data = load_eval_data(loaded, torch.device("cpu"), test_subset=50, train_subset=10000)
    trained_on = load_dataset("digits", subset=300, test_subset=200)  # what the run's config loaded
    assert torch.equal(data.train_x, trained_on.train_x) and torch.equal(data.train_y, trained_on.train_y)
    assert len(data.test_y) == 50
    smaller = load_eval_data(loaded, torch.device("cpu"), train_subset=100)  # as training picks its 100 of them
    assert torch.equal(smaller.train_x, trained_on.train_x[fixed_subset(300, 100)])


# ---- user factories and foreign state dicts ------------------------------------------------------


@pytest.mark.parametrize("layout", ["bare", "state_dict", "model", "net", "nested", "dataparallel", "compiled"])
def test_foreign_state_dict_layouts(tmp_path, user_model, layout):
    _, model, options = user_model
    state = model.state_dict()
    if layout == "dataparallel":
        state = nn.DataParallel(model).state_dict()  # keys start with "module."
        assert all(k.startswith("module.") for k in state)
    elif layout == "compiled":
        state = {f"_orig_mod.{k}": v for k, v in state.items()}
    saved = {
        "bare": state, "dataparallel": state, "compiled": state,
        "state_dict": {"state_dict": state, "epoch": 3, "arch": "small"},
        "model": {"model": state, "optimizer": {"lr": 0.1}},
        "net": {"net": state, "acc": 91.0},
        "nested": {"checkpoint": 1, "model": {"state_dict": state, "note": "x"}},
    }[layout]
    path = tmp_path / "foreign.pth"
    torch.save(saved, path)
    loaded = load_model(path, options)
    assert loaded.source == "factory" and loaded.label == "foreign"
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(outputs(loaded.model, x), outputs(model, x), rtol=0, atol=0)


def test_factory_by_module_path_and_json_arguments(tmp_path, monkeypatch):
    write_model_file(tmp_path, "my_pkg_models.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_from_factory("my_pkg_models:small_net", ["width=3", "num_classes=7"])
    assert model.head.out_features == 7 and model.features[0].out_channels == 3
    assert parse_model_args(["a=10", "b=0.5", "c=true", "d=[1, 2]", 'e="x"', "f=resnet", "g="]) == {
        "a": 10, "b": 0.5, "c": True, "d": [1, 2], "e": "x", "f": "resnet", "g": "",
    }
    with pytest.raises(BnprobeError, match="key=value"):
        parse_model_args(["width"])


def test_factory_errors_are_one_line(tmp_path):
    path = write_model_file(tmp_path)
    cases = [
        (f"{path}:broken", "raised ValueError: no such variant"),
        (f"{path}:not_a_model", "returned a int, not a torch.nn.Module"),
        (f"{path}:missing", "has no callable 'missing'"),
        (f"{tmp_path}/nope.py:small_net", "no such file"),
        ("no_such_module_xyz:f", "importing no_such_module_xyz failed: ModuleNotFoundError"),
        ("small_net", "path/to/file.py:factory"),
    ]
    for spec, message in cases:
        with pytest.raises(BnprobeError, match=message.replace("(", r"\(").replace(")", r"\)")):
            build_from_factory(spec, [])
    with pytest.raises(BnprobeError, match=r"raised TypeError"):
        build_from_factory(f"{path}:small_net", ["depth=3"])


def test_an_exception_is_quoted_by_its_first_line_or_its_type(tmp_path):
    # One helper for every message quoting an exception: first line only, capped, the type when there is no text.
    assert first_line(ValueError("  bad value\nsecond line")) == "bad value"
    assert first_line(ValueError("x" * 1000)) == "x" * 300
    assert first_line(KeyError()) == "KeyError" and first_line(OSError(" \n ")) == "OSError"
    assert first_line(ValueError("bad\nmore"), typed=True) == "ValueError: bad"
    assert first_line(RuntimeError(), typed=True) == "RuntimeError"  # not "RuntimeError: RuntimeError"
    (tmp_path / "silent.py").write_text("def make():\n    raise RuntimeError()\n")
    with pytest.raises(BnprobeError) as caught:
        build_from_factory(f"{tmp_path}/silent.py:make", [])
    # and where, in the user's file (as --eval's errors say it)
    assert str(caught.value) == f"--model: {tmp_path}/silent.py:make() raised RuntimeError (at {tmp_path}/silent.py:2)"


def test_wrong_architecture_lists_missing_unexpected_and_shapes(tmp_path, user_model):
    path, model, options = user_model
    state = model.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["head.bias"]
    torch.save(state, tmp_path / "a.pt")
    with pytest.raises(BnprobeError) as info:
        load_model(tmp_path / "a.pt", options)
    message = str(info.value)
    assert "1 missing: head.bias" in message and "1 unexpected: extra.weight" in message
    assert "wrong architecture" in message and "\n" not in message

    wider = build_from_factory(f"{path}:small_net", ["width=6"])
    torch.save(wider.state_dict(), tmp_path / "b.pt")
    with pytest.raises(BnprobeError, match=r"of other shape .*features\.0\.weight \(6, 1, 3, 3\) vs \(4, 1, 3, 3\)"):
        load_model(tmp_path / "b.pt", options)


def test_old_checkpoints_without_num_batches_tracked_load(tmp_path, user_model):
    _, model, options = user_model
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pt")
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(outputs(load_model(tmp_path / "old.pt", options).model, x), outputs(model, x))


def test_foreign_checkpoint_needs_model_and_dataset(tmp_path, user_model):
    _, model, options = user_model
    torch.save(model.state_dict(), tmp_path / "f.pt")
    with pytest.raises(BnprobeError, match="not a bnprobe checkpoint; say how to build its model with --model"):
        load_model(tmp_path / "f.pt", CPU)
    with pytest.raises(BnprobeError, match="pass --dataset"):
        load_model(tmp_path / "f.pt", LoadOptions(model=options.model, model_arg=options.model_arg, device="cpu"))


def test_model_that_does_not_fit_the_data_is_one_line(tmp_path):
    path = write_model_file(tmp_path)
    model = build_from_factory(f"{path}:small_net", ["in_channels=3"])
    with pytest.raises(BnprobeError, match=r"fails on digits images of shape \(1, 8, 8\)"):
        check_forward(model.eval(), torch.randn(2, 1, 8, 8), "rgb-net", "digits")


# ---- normalisation -------------------------------------------------------------------------------


def test_torchvision_style_statistics_are_converted_to_pixel_units():
    mean, std, source = resolve_normalization("0.4914,0.4822,0.4465", "0.247,0.243,0.261", "auto", 3)
    torch.testing.assert_close(mean.flatten(), torch.tensor([0.4914, 0.4822, 0.4465]) * 255)
    torch.testing.assert_close(std.flatten(), torch.tensor([0.247, 0.243, 0.261]) * 255)
    assert mean.shape == (3, 1, 1) and "0..1" in source
    mean, std, _ = resolve_normalization("125.3,123,113.9", "63,62,66.7", "auto", 3)
    assert mean.flatten().tolist() == pytest.approx([125.3, 123, 113.9])
    mean, std, _ = resolve_normalization("0.5", "0.5", "pixel", 3)  # explicit units win over the guess
    assert mean.flatten().tolist() == [0.5] * 3
    mean, std, _ = resolve_normalization("0.1307", "0.3081", "auto", 1)
    assert mean.item() == pytest.approx(0.1307 * 255) and std.item() == pytest.approx(0.3081 * 255)
    for args, message in [
        (("0.1,0.2", "0.3,0.3", "auto", 3), "1 or 3 values"),
        (("0.1", "0", "auto", 1), "--std must be > 0"),
        (("0.1", None, "auto", 1), "go together"),
        (("a", "0.2", "auto", 1), "comma-separated numbers"),
        (("0.1", "0.2", "percent", 1), "--norm-units"),
    ]:
        with pytest.raises(BnprobeError, match=message):
            resolve_normalization(*args)


def test_given_statistics_are_what_the_model_sees(runs_dirs):
    options = LoadOptions(mean="0.25", std="0.5", device="cpu")
    loaded = load_model(runs_dirs["full"], options)
    data = load_eval_data(loaded, torch.device("cpu"), test_subset=10)
    assert data.mean.item() == pytest.approx(0.25 * 255) and data.std.item() == pytest.approx(0.5 * 255)
    assert "--mean/--std" in loaded.norm_source


# ---- files that are not checkpoints, or hold code ----------------------------------------------


class MakesAFile:
    """Unpickling this calls open(path, "w"): a real payload that creates a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoint_with_pickled_code_never_runs(tmp_path):
    """weights_only refuses it; the inert reader then reads it with the call stood in for (never run), and a
    bare pickle that is no torch.save file is refused as pickled code."""
    from bnprobe.files.inert_pickle import Stand

    marker = tmp_path / "pwned"
    torch.save({"model": MakesAFile(marker), "epoch": 1}, tmp_path / "evil.pt")  # zip format
    with open(tmp_path / "evil.pkl", "wb") as f:  # a bare pickle, as the legacy format is
        pickle.dump({"state_dict": MakesAFile(marker)}, f, protocol=2)
    obj = read_checkpoint(tmp_path / "evil.pt")
    assert isinstance(obj["model"], Stand) and obj["epoch"] == 1 and not marker.exists()
    with pytest.raises(BnprobeError, match="is not a bnprobe checkpoint"):  # no model to build it into
        load_model(tmp_path / "evil.pt", CPU)
    with pytest.raises(BnprobeError, match="refused to load .* pickled code") as info:
        read_checkpoint(tmp_path / "evil.pkl")
    assert "\n" not in str(info.value) and "no torch magic number" in str(info.value)
    with pytest.raises(BnprobeError, match="refused"):
        load_model(tmp_path / "evil.pkl", CPU)
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    with open(tmp_path / "evil.pkl", "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_cli_refuses_code_in_a_checkpoint(capsys, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": MakesAFile(marker)}, tmp_path / "evil.pt")
    # Both read it inertly (weights_only refuses it): the call is stood in for, never run.
    for command, message in ((["probe", tmp_path / "evil.pt"], "1 io object in state_dict stood in for"),
                             (["ablate", tmp_path / "evil.pt", "--clamp-gamma", "0.1"], "is not a bnprobe checkpoint")):
        code, _, err = run_cli(capsys, *command, "--device", "cpu")
        assert_one_line_error(code, err, message)
        assert not marker.exists()


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello world\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"a": torch.ones(3)}, tmp_path / "ok.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:200])
    torch.save([1, 2, 3], tmp_path / "pickled-list.pt")
    for name, message in [
        ("notes.txt", "is not a PyTorch checkpoint"),
        ("empty.pt", "is not a PyTorch checkpoint"),
        ("truncated.pt", "is not a readable PyTorch checkpoint"),
        ("missing.pt", "no such checkpoint"),
    ]:
        with pytest.raises(BnprobeError, match=message):
            load_model(tmp_path / name, CPU)
    with pytest.raises(BnprobeError, match="holds a list, not a state dict"):
        extract_state_dict(read_checkpoint(tmp_path / "pickled-list.pt"), tmp_path / "pickled-list.pt")
    with pytest.raises(BnprobeError, match="holds no state dict"):
        extract_state_dict({"epoch": 3, "note": "x"}, tmp_path / "x.pt")
    (tmp_path / "rundir").mkdir()
    with pytest.raises(BnprobeError, match="directory without checkpoint.pt"):
        load_model(tmp_path / "rundir", CPU)


def _corrupt_files(tmp_path):
    torch.save({"model": {"w": torch.randn(64, 64)}, "epoch": 3}, tmp_path / "ok.pt")
    torch.save({"model": {"w": torch.randn(64, 64)}}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    zipped, legacy = (tmp_path / "ok.pt").read_bytes(), (tmp_path / "legacy.pt").read_bytes()
    rng = random.Random(0)
    noise = bytes(rng.randrange(256) for _ in range(4096))
    return {
        "truncated-half.pt": zipped[: len(zipped) // 2],  # a copy or a save cut short
        "truncated-300.pt": zipped[:300],
        "zip-magic-then-noise.pt": b"PK\x03\x04" + noise,
        "legacy-truncated.pt": legacy[:10],
        "random.pt": noise,
        "pickle-proto-then-noise.pt": b"\x80\x11" + noise,  # 0x80 and no pickle protocol number
    }


def _balanced(text):
    depth = 0
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0


def test_corrupt_checkpoint_is_one_clean_complete_line(tmp_path):
    for name, content in _corrupt_files(tmp_path).items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(BnprobeError) as info:
            checkpoints.load_checkpoint(tmp_path / name)
        message = str(info.value)
        # torch's advice ("...there is a high likelihood that your checkpoint file is") used to be cut mid-sentence
        assert "\n" not in message and "likelihood" not in message and "miniz" not in message, message
        assert re.fullmatch(rf"{re.escape(str(tmp_path / name))} is not a (readable )?PyTorch checkpoint \(.+\)", message)
        assert _balanced(message) and len(message) < len(str(tmp_path)) + 180, message
        if name.startswith(("truncated", "zip-magic")):
            assert "is not a readable PyTorch checkpoint (truncated or damaged: " in message, message
        elif name == "legacy-truncated.pt":
            assert message.endswith("(the file ends early)"), message
        else:  # not a zip archive, not a pickle: never handed to an unpickler
            assert message.endswith("is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)")


def test_corrupt_checkpoint_through_the_cli(capsys, tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(_corrupt_files(tmp_path)["truncated-300.pt"])
    code, _, err = run_cli(capsys, "probe", tmp_path / "ckpt.pt", "--device", "cpu")
    assert_one_line_error(code, err, "is not a readable PyTorch checkpoint (truncated or damaged: ")
    assert err.rstrip().endswith(")") and _balanced(err)


def test_long_load_error_is_cut_at_a_word_before_an_open_bracket(tmp_path, monkeypatch):
    torch.save({"a": torch.ones(1)}, tmp_path / "ok.pt")
    words = " ".join(["word"] * 25)
    long = f"failed to map storage: {words} (hint: {' '.join(['more'] * 40)}) and then some. Second sentence."

    def fail(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(torch, "load", fail)
    message = long
    with pytest.raises(BnprobeError) as info:
        read_checkpoint(tmp_path / "ok.pt")
    assert str(info.value) == f"{tmp_path / 'ok.pt'} is not a readable PyTorch checkpoint (failed to map storage: {words}...)"
    message = "short. Second sentence."
    with pytest.raises(BnprobeError, match=r"checkpoint \(short\)$"):
        read_checkpoint(tmp_path / "ok.pt")


def test_flags_that_need_each_other(runs_dirs):
    for options, message in [
        (LoadOptions(model_arg=["width=4"], device="cpu"), "pass --model too"),
        (LoadOptions(norm_units="pixel", device="cpu"), "pass them too"),
        (LoadOptions(norm_units="percent", device="cpu"), "--norm-units must be one of"),
        (LoadOptions(mean="0.5", device="cpu"), "go together"),
        (LoadOptions(device="tpu"), "--device must be one of"),
    ]:
        with pytest.raises(BnprobeError, match=message):
            load_model(runs_dirs["full"], options)
