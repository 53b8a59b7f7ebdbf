"""Training telemetry: gradient magnitudes per step, metrics and norm-layer snapshots per epoch, in telemetry.h5.

Per recorded step, two fused reductions over the gradients of every trainable tensor
(`torch._foreach_norm` with ord 1 and 2) are written into a buffer on the device; the buffer goes to
the host once per epoch. Frozen tensors have no gradient and are stored as NaN with `trainable=False`,
never as zero. The file layout is documented in docs/hdf5-schema.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import h5py
import numpy as np
import torch
import torch.nn as nn

from bnprobe.core.config import TrainConfig
from bnprobe.core.errors import BnprobeError, first_line
from bnprobe.core.formats import PARAMETER_GROUPS as GROUPS
from bnprobe.core.formats import TELEMETRY_FILE, TELEMETRY_FORMAT, TELEMETRY_VERSION
from bnprobe.files.store import append_rows, appending_h5, atomic_h5, set_attrs, write_array
from bnprobe.nets.norms import norm_kind, norm_layers

EPOCH_FIELDS = (
    "epoch", "lr", "train_loss", "train_acc", "train_eval_loss", "train_eval_acc",
    "test_loss", "test_acc", "gap", "seconds", "images_per_s",
)
EPOCH_UNITS = {
    "epoch": "epochs completed", "lr": "learning rate", "seconds": "s", "images_per_s": "images/s",
    "gap": "train_eval_acc - test_acc (fraction)",
}

# libver v110: chunk indexes (extensible arrays) whose append changes a few bytes, not a B-tree node;
# persistent free space: the space of a chunk rewritten (a partial one at an epoch's edge) is used again.
FILE_OPTIONS = dict(libver=("v110", "latest"), fs_strategy="fsm", fs_persist=True)


def telemetry_path(run_dir: Path) -> Path:
    return run_dir / TELEMETRY_FILE


def parameter_group(model: nn.Module, name: str) -> str:
    """bn_gamma, bn_beta (gn_..., ln_... for GroupNorm and LayerNorm), conv_weight, linear_weight, or bias (of a
    conv or linear layer)."""
    module_name, _, param_name = name.rpartition(".")
    module = model.get_submodule(module_name)
    kind = norm_kind(module)
    if kind:
        return f"{kind}_gamma" if param_name == "weight" else f"{kind}_beta"
    if param_name == "bias":
        return "bias"
    if isinstance(module, nn.Linear):
        return "linear_weight"
    return "conv_weight"


class GradientRecorder:
    """Collects mean |grad| and grad L2 norm of every trainable tensor on the device, every `every` steps."""

    def __init__(self, model: nn.Module, every: int, steps_per_epoch: int,
                 masks: Optional[dict[str, torch.Tensor]] = None):
        self.every = every
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.trainable = np.array([p.requires_grad for _, p in named])
        self.params = [p for _, p in named if p.requires_grad]
        self.numel = np.array([p.numel() for _, p in named], dtype=np.int64)
        # Elements that train: all of a tensor, or a --random-features mask's (the rest get zero gradient), so
        # a mean |grad| is over what trains and the baseline compares with BN fairly.
        masks = masks or {}
        self.trained = np.array([int(masks[n].sum()) if n in masks else p.numel() for n, p in named], dtype=np.int64)
        device = self.params[0].device if self.params else torch.device("cpu")
        capacity = -(-steps_per_epoch // every) if every else 0
        self.buffer = torch.zeros((capacity, 2, len(self.params)), device=device)
        self.steps: list[int] = []
        self.step = 0  # global step index, restored on resume

    # bnprobe.training.graphs.TrainStep takes a recorded step in three parts, so that a CUDA graph can hold `record`
    # (tensor ops into a fixed row) while Python decides `due` and `advance` around each replay.
    def due(self) -> bool:
        """Whether this step is recorded."""
        return bool(self.every and self.params) and self.step % self.every == 0

    def record(self, row: torch.Tensor) -> None:
        """(sum |grad|, L2 norm) of every trainable tensor's gradient into `row` (2, P), on the device."""
        grads = [p.grad for p in self.params]
        torch.stack(torch._foreach_norm(grads, 1), out=row[0])
        torch.stack(torch._foreach_norm(grads, 2), out=row[1])

    def advance(self, recorded: bool) -> None:
        """Count the step; a recorded one keeps the buffer row it was written into."""
        if recorded:
            self.steps.append(self.step)
        self.step += 1

    def drain(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(steps, mean |grad| (S, P), L2 norm (S, P)) of this epoch, NaN for frozen tensors; resets."""
        n = len(self.steps)
        recorded = self.buffer[:n].cpu().numpy()  # the one host copy per epoch
        abs_mean = np.full((n, len(self.names)), np.nan, dtype=np.float32)
        l2 = np.full_like(abs_mean, np.nan)
        abs_mean[:, self.trainable] = recorded[:, 0] / np.maximum(1, self.trained[self.trainable])
        l2[:, self.trainable] = recorded[:, 1]
        steps, self.steps = np.array(self.steps, dtype=np.int64), []
        return steps, abs_mean, l2


class TelemetryWriter:
    """Appends one epoch at a time to telemetry.h5, in place through bnprobe.files.store's journal: each epoch
    costs its own rows, and a kill at any moment leaves every finished epoch readable."""

    def __init__(self, run_dir: Path, model: nn.Module, config: TrainConfig, recorder: GradientRecorder,
                 counts: Optional[tuple[int, int]] = None):
        self.path = telemetry_path(run_dir)
        self.model, self.config, self.recorder = model, config, recorder
        self.counts = counts  # (trainable, total) numbers as training counts them: masked elements only
        self.groups = [parameter_group(model, n) for n in recorder.names]

    def start(self, epochs_done: int) -> None:
        """A new file with the schema and the epoch-0 norm snapshot, or drop rows past a resumed checkpoint."""
        if epochs_done and self.path.exists():
            try:
                self.trim(epochs_done)
            except (OSError, KeyError, TypeError) as exc:  # h5py's answers for a cut-short or foreign file
                raise BnprobeError(f"cannot resume: {self.path} is damaged ({first_line(exc)}); move it aside to resume "
                                   f"without the telemetry recorded so far")
            return
        with atomic_h5(self.path, **FILE_OPTIONS) as f:
            set_attrs(f, {"format": TELEMETRY_FORMAT, "version": TELEMETRY_VERSION, "config_json": json.dumps(self.config.to_dict())})
            set_attrs(f, {f"config.{k}": v for k, v in self.config.to_dict().items()})
            if self.counts is not None:  # params/trainable flags whole tensors; --random-features trains a few elements
                set_attrs(f, {"trainable_params": self.counts[0], "total_params": self.counts[1]})
            params = f.create_group("params")
            write_array(params, "name", self.recorder.names, description="parameter names as in the state_dict")
            write_array(params, "group", self.groups, description=", ".join(GROUPS))
            write_array(params, "numel", self.recorder.numel, units="elements")
            write_array(params, "trainable", self.recorder.trainable, description="False: frozen, no gradient")
            f.create_group("steps")
            f.create_group("epochs")
            self._append_bn_snapshot(f, 0)

    def trim(self, epochs_done: int) -> None:
        """Drop the rows recorded after epoch `epochs_done` (those of an epoch whose checkpoint was not saved)."""
        with appending_h5(self.path) as f:
            _truncate_to_epoch(f, epochs_done)

    def write_epoch(self, record: dict[str, Any]) -> None:
        steps, abs_mean, l2 = self.recorder.drain()
        with appending_h5(self.path) as f:
            if len(steps):
                s = f["steps"]
                append_rows(s, "step", steps, units="optimizer steps since the start of training")
                append_rows(s, "epoch", np.full(len(steps), record["epoch"], dtype=np.int32), units="1-based epoch")
                append_rows(s, "grad_abs_mean", abs_mean, units="mean |dL/dw| over the tensor's trained elements",
                            columns="params/name; NaN where frozen")
                append_rows(s, "grad_l2", l2, units="L2 norm of dL/dw", columns="params/name; NaN where frozen")
                for group in GROUPS:
                    members = np.array([g == group for g in self.groups])
                    if not members.any():
                        continue
                    trainable = members & self.recorder.trainable
                    g = s.require_group(f"groups/{group}")
                    set_attrs(g, {"frozen": not trainable.any(), "numel": int(self.recorder.numel[members].sum()),
                                  "tensors": int(members.sum())})
                    if trainable.any():
                        trained = self.recorder.trained[trainable]
                        group_mean = (abs_mean[:, trainable] * trained).sum(1) / trained.sum()
                        group_l2 = np.sqrt((l2[:, trainable] ** 2).sum(1))
                    else:
                        group_mean = group_l2 = np.full(len(steps), np.nan, dtype=np.float32)
                    append_rows(g, "grad_abs_mean", group_mean.astype(np.float32), units="mean |dL/dw| over the group")
                    append_rows(g, "grad_l2", group_l2.astype(np.float32), units="L2 norm over the group")
            for field in EPOCH_FIELDS:
                append_rows(f["epochs"], field, np.array([record[field]], dtype=np.float64),
                            units=EPOCH_UNITS.get(field, "mean over the set" if "loss" in field else "fraction"))
            self._append_bn_snapshot(f, record["epoch"])

    def _append_bn_snapshot(self, f, epoch: int) -> None:
        bn = f.require_group("bn")
        append_rows(bn, "epoch", np.array([epoch], dtype=np.int32), units="epochs completed at the snapshot")
        for name, layer in norm_layers(self.model):  # the group keeps BN's name: GN/LN layers have no running stats
            g = bn.require_group(name)
            tensors = {"gamma": layer.weight, "beta": layer.bias, "running_mean": getattr(layer, "running_mean", None),
                       "running_var": getattr(layer, "running_var", None)}
            for key, tensor in tensors.items():
                if tensor is not None:
                    append_rows(g, key, tensor.detach().float().cpu().numpy()[None], units="per channel")


def _truncate_to_epoch(f, epochs_done: int) -> None:
    """Drop rows recorded after the checkpoint being resumed (a crash between the two writes)."""
    def cut(dataset, keep: int) -> None:
        if dataset.shape[0] > keep:
            dataset.resize(keep, axis=0)

    if "epoch" in f["steps"]:
        keep = int((f["steps/epoch"][:] <= epochs_done).sum())
        for name in ("step", "epoch", "grad_abs_mean", "grad_l2"):
            cut(f["steps"][name], keep)
        for group in f["steps/groups"].values():
            for dataset in group.values():
                cut(dataset, keep)
    for dataset in f["epochs"].values():
        cut(dataset, epochs_done)
    cut(f["bn/epoch"], epochs_done + 1)
    for group in f["bn"].values():
        if isinstance(group, h5py.Group):
            for dataset in group.values():
                cut(dataset, epochs_done + 1)
