"""A checkpoint as a model to measure, with its evaluation data: bnprobe's own runs and exports, or a model the
user builds with a factory.

bnprobe checkpoints rebuild their model from the stored TrainConfig and carry their normalisation.
Foreign checkpoints need `--model file.py:factory` (or `pkg.module:factory`) plus factory keyword arguments.
The file itself is read by bnprobe.files.checkpoints (weights only, state dicts found under common keys,
DDP/compile prefixes stripped).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from bnprobe.core.config import TrainConfig, check_load_options
from bnprobe.core.datasets import get_dataset_spec
from bnprobe.core.errors import BnprobeError, first_line
from bnprobe.core.options import NORM_UNITS, LoadOptions
from bnprobe.data.device import DeviceDataset, fixed_subset, load_dataset
from bnprobe.files.checkpoints import check_checkpoint, extract_state_dict, load_state_strict, read_weights
from bnprobe.files.file_tensors import checkpoint_file, checkpoint_label, is_bnprobe_checkpoint, strip_prefixes
from bnprobe.nets.registry import from_config
from bnprobe.training.evaluate import resolve_device

# What the user's code (a --model file, its factory, its forward) may raise that is its failure: sys.exit()
# included, which would otherwise end bnprobe silently with the user's exit status (0 for sys.exit()).
# Ctrl-C stays an interrupt.
USER_CODE_FAILURES = (Exception, SystemExit)


@dataclass
class LoadedModel:
    path: Path
    label: str  # short name for tables: the run directory's name or the file's stem
    model: nn.Module  # in eval mode, on the device
    source: str  # "bnprobe" or "factory"
    dataset: str
    data_dir: Optional[Path]
    download: bool
    verify: bool
    mean: Optional[torch.Tensor]  # pixel units (0..255), broadcastable to (C, H, W); None: training-set stats
    std: Optional[torch.Tensor]
    norm_source: str
    config: Optional[TrainConfig] = None
    meta: dict[str, Any] = field(default_factory=dict)  # epoch, freeze, stored accuracy, ...


# ---- user factories ----------------------------------------------------------------------------------


def parse_model_args(items: Sequence[str]) -> dict[str, Any]:
    """`key=value` pairs; a value is parsed as JSON when it is valid JSON (10, 0.5, true, [1,2]), else a string."""
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise BnprobeError(f"--model-arg must be key=value with a Python identifier as key, got {item!r}")
        try:
            kwargs[key] = json.loads(text)
        except (ValueError, RecursionError):  # not JSON (or a number past Python's 4,300 digits): the text
            kwargs[key] = text
    return kwargs


def load_factory(spec: str, flag: str = "--model", what: str = "factory") -> Callable[..., Any]:
    """`path/to/file.py:name` or `package.module:name` -> the callable. Imports the user's own code; `flag` and
    `what` name it in errors (--model's factory, --eval's evaluate)."""
    location, sep, name = spec.rpartition(":")
    if not sep or not location or not name:
        raise BnprobeError(f"{flag} must be path/to/file.py:{what} or package.module:{what}, got {spec!r}")
    try:
        if location.endswith(".py") or "/" in location or "\\" in location:
            file = Path(location)
            if not file.is_file():
                raise BnprobeError(f"{flag}: no such file {file}")
            module_name = f"bnprobe_user_{flag[2:]}_{abs(hash(str(file.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(module_name, file)
            if module_spec is None or module_spec.loader is None:
                raise BnprobeError(f"{flag}: cannot import {file}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module  # dataclasses and pickling look modules up here
            sys.path.insert(0, str(file.resolve().parent))  # so the file can import its neighbours
            try:
                module_spec.loader.exec_module(module)
            finally:
                sys.path.remove(str(file.resolve().parent))
        else:
            module = importlib.import_module(location)
    except BnprobeError:
        raise
    except USER_CODE_FAILURES as exc:  # the user's module failed to import: say so in one line
        raise BnprobeError(f"{flag}: importing {location} failed: {first_line(exc, typed=True)}{user_line(exc)}")
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        raise BnprobeError(f"{flag}: {location} has no callable {name!r}")
    return factory


def user_line(exc: BaseException, code: Optional[Callable[..., Any]] = None) -> str:
    """" (at FILE:LINE)": where the user's code failed, the last frame of its traceback outside bnprobe (inside the
    file of `code` when given: the user's own file, not a library it called); a SyntaxError's own place; "" when
    no frame is the user's."""
    if isinstance(exc, SyntaxError) and exc.filename and exc.lineno:
        return f" (at {exc.filename}:{exc.lineno})"
    own = Path(__file__).resolve().parents[1]
    home = getattr(getattr(code, "__code__", None), "co_filename", None)
    found = ""
    for frame, line in traceback.walk_tb(exc.__traceback__):
        file = frame.f_code.co_filename
        if (file == home) if home else not Path(file).resolve().is_relative_to(own):
            found = f" (at {file}:{line})"
    return found


def build_from_factory(spec: str, model_args: Sequence[str]) -> nn.Module:
    factory = load_factory(spec)
    kwargs = parse_model_args(model_args)
    try:
        model = factory(**kwargs)
    except USER_CODE_FAILURES as exc:  # the user's factory failed: one line, no traceback
        raise BnprobeError(f"--model: {spec}({_kwargs_text(kwargs)}) raised {first_line(exc, typed=True)}"
                           f"{user_line(exc, factory)}")
    if not isinstance(model, nn.Module):
        raise BnprobeError(f"--model: {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


# ---- normalisation -------------------------------------------------------------------------------


def parse_floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise BnprobeError(f"{flag} must be comma-separated numbers like 0.4914,0.4822,0.4465, got {text!r}")
    if not values or not all(np.isfinite(values)):
        raise BnprobeError(f"{flag} must be finite numbers, got {text!r}")
    return values


def resolve_normalization(
    mean_text: Optional[str], std_text: Optional[str], units: str, channels: int
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """--mean/--std to (C, 1, 1) tensors in pixel units (0..255), the unit bnprobe's loader works in.

    torchvision users write 0..1 statistics (Normalize after ToTensor); `auto` takes the values as 0..1
    when every mean and std is <= 1, since a std of at most one grey level is implausible for images.
    """
    if (mean_text is None) != (std_text is None):
        raise BnprobeError("--mean and --std go together; pass both")
    if units not in NORM_UNITS:
        raise BnprobeError(f"--norm-units must be one of {', '.join(NORM_UNITS)}; got {units!r}")
    mean, std = parse_floats(mean_text, "--mean"), parse_floats(std_text, "--std")
    for flag, values in (("--mean", mean), ("--std", std)):
        if len(values) not in (1, channels):
            wanted = "1 value" if channels == 1 else f"1 or {channels} values (one per channel)"
            raise BnprobeError(f"{flag} needs {wanted} for images with {channels} channel(s), got {len(values)}")
    if any(s <= 0 for s in std):
        raise BnprobeError(f"--std must be > 0, got {std_text}")
    unit = units == "unit" or (units == "auto" and max(mean + std) <= 1.0)
    scale = 255.0 if unit else 1.0
    as_tensor = lambda v: (torch.tensor(v, dtype=torch.float32) * scale).expand(channels).reshape(channels, 1, 1)  # noqa: E731
    source = f"--mean/--std ({'0..1 units, x255' if unit else 'pixel units 0..255'})"
    return as_tensor(mean).clone(), as_tensor(std).clone(), source


# ---- the whole load --------------------------------------------------------------------------------


def load_model(path: Path | str, options: LoadOptions, device: Optional[torch.device] = None,
               need_data: bool = True) -> LoadedModel:
    """Rebuild the model of one checkpoint, with its weights, in eval mode on `device`. `need_data=False`: the
    model is evaluated by the user's own code (ablate --eval), so a foreign checkpoint needs no --dataset."""
    check_load_options(options)
    device = device or resolve_device(options.device)
    file = checkpoint_file(path)
    obj = read_weights(file)
    is_bnprobe = is_bnprobe_checkpoint(obj)
    label = checkpoint_label(file)
    meta: dict[str, Any] = {}
    config: Optional[TrainConfig] = None

    if is_bnprobe:
        config = check_checkpoint(obj, file)
        meta = {
            "model": config.model, "freeze": config.freeze, "epoch": obj["epoch"], "trained_dataset": config.dataset,
        }
        if obj["history"] and isinstance(obj["history"][-1].get("test_acc"), (int, float)):
            meta["stored_test_acc"] = float(obj["history"][-1]["test_acc"])
    if options.model:
        model = build_from_factory(options.model, options.model_arg or ())
        source, what = "factory", f"the model built by {options.model}"
        meta.setdefault("model", options.model)
    elif is_bnprobe:
        # The trainer's own builder (BN placement, affine-off layers, ...), so the two never drift apart;
        # it seeds torch's global RNG for its init, which the checkpoint's weights then replace.
        with torch.random.fork_rng(devices=[]):
            model = from_config(config)
        source, what = "bnprobe", f"{config.model} as its config describes it"
    else:
        raise BnprobeError(
            f"{file} is not a bnprobe checkpoint; say how to build its model with --model file.py:factory "
            f"(plus --model-arg key=value) and which data to use with --dataset (or --eval)"
        )

    state, _ = extract_state_dict(obj["model"] if is_bnprobe else obj, file)
    state, _ = strip_prefixes(state)
    load_state_strict(model, state, file, what)
    model.to(device).eval()

    dataset = options.dataset or (config.dataset if config else None)
    if dataset is None and not need_data:
        return LoadedModel(file.resolve(), label, model, source, "", None, False, False, None, None,
                           "none (evaluated by --eval)", config, meta)
    if dataset is None:
        raise BnprobeError(f"{file} is not a bnprobe checkpoint: pass --dataset to say which data to evaluate it on")
    spec = get_dataset_spec(dataset)
    if options.mean is not None or options.std is not None:
        mean, std, norm_source = resolve_normalization(options.mean, options.std, options.norm_units, spec.channels)
    elif is_bnprobe and isinstance(obj.get("normalization"), dict) and dataset == config.dataset:
        mean = obj["normalization"]["mean"].float().cpu()
        std = obj["normalization"]["std"].float().cpu()
        norm_source = "checkpoint"
    else:
        mean = std = None
        norm_source = "per-channel statistics of the training set (pass --mean/--std to match the checkpoint's)"
    data_dir = options.data_dir or (Path(config.data_dir) if config and config.data_dir else None)
    download = options.download if options.download is not None else (config.download if config else True)
    verify = options.verify if options.verify is not None else (config.verify if config else True)
    return LoadedModel(file.resolve(), label, model, source, dataset, data_dir, download, verify, mean, std,
                       norm_source, config, meta)


@dataclass
class EvalData:
    """Images resident on the device (uint8) and the statistics that normalise them for one model."""

    dataset: DeviceDataset
    test_x: torch.Tensor
    test_y: torch.Tensor
    train_x: torch.Tensor
    train_y: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def load_eval_data(
    loaded: LoadedModel,
    device: torch.device,
    *,
    test_subset: int = 0,
    train_subset: int = 0,
    cache: Optional[dict] = None,
) -> EvalData:
    """The data set a model is evaluated on, on `device`: the first `test_subset` test images (0 = all) and
    `train_subset` of the training images (0 = all; a run trained on a --subset is measured on the images it
    trained on), chosen by `fixed_subset` as training chooses them."""
    key = (loaded.dataset, str(loaded.data_dir), test_subset, str(device))
    if cache is not None and key in cache:
        data = cache[key]
    else:
        data = load_dataset(
            loaded.dataset, loaded.data_dir, device=device, normalize="per-channel", subset=0,
            test_subset=test_subset, download=loaded.download, verify=loaded.verify,
        )
        if cache is not None:
            cache[key] = data
    # The images a run trained on (its --subset), then `train_subset` of those: the images training measured
    # its eval-mode train accuracy on when train_subset is the run's --train-eval-subset.
    trained_on = loaded.config.subset if loaded.config and loaded.config.dataset == loaded.dataset else 0
    index = fixed_subset(len(data.train_y), trained_on, device)
    index = index[fixed_subset(len(index), train_subset, device)]
    train_x, train_y = data.train_x, data.train_y
    if len(index) < len(train_y):  # all of them stay in order, uncopied
        train_x, train_y = train_x[index], train_y[index]
    mean = (loaded.mean if loaded.mean is not None else data.mean).to(device)
    std = (loaded.std if loaded.std is not None else data.std).to(device)
    if mean.shape[0] != data.spec.channels:
        raise BnprobeError(
            f"the normalisation has {mean.shape[0]} channels but {data.spec.name} images have {data.spec.channels}"
        )
    return EvalData(data, data.test_x, data.test_y, train_x, train_y, mean, std)


def check_forward(model: nn.Module, x: torch.Tensor, label: str, dataset: str) -> torch.Tensor:
    """Run one batch; a model that does not fit the data's shape gets a one-line error, not a traceback."""
    try:
        with torch.inference_mode():
            out = model(x)
    except USER_CODE_FAILURES as exc:
        raise BnprobeError(
            f"{label} fails on {dataset} images of shape {tuple(x.shape[1:])}: {first_line(exc, typed=True)}"
        )
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise BnprobeError(f"{label} must return class scores of shape (batch, classes); got {getattr(out, 'shape', type(out))}")
    return out
