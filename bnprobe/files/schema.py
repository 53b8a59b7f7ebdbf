"""The one boundary for reading bnprobe's run files back from disk: config.json, metrics.json and the HDF5
files (telemetry.h5, probe.h5, ablation*.h5). Checkpoints and exports: bnprobe.files.checkpoints and headers.

Nothing is opened unless it is a regular file (a FIFO would block forever), JSON is read with a size bound,
and an HDF5 file's layout (its format attribute, every dataset's shape and type) is checked against what the
file's own sizes allow and a hard cap before any data is read, so a small file declaring billions of rows is
refused at once instead of filling memory. Every violation is a BnprobeError of one line naming the file.
No torch import: the report and inspect use it. The files' names, format names and versions live in
bnprobe.core.formats (which the writers import too); the layouts are documented in docs/hdf5-schema.md and
docs/probe-schema.md.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from bnprobe.core.config import MAX_EPOCHS, TrainConfig, check_settings
from bnprobe.core.errors import BnprobeError, first_line
from bnprobe.core.formats import CHECKPOINT_FILE, CONFIG_FILE, SET_ASIDE_FORMAT, SET_ASIDE_MARKER
from bnprobe.core.options import MAX_SWEEP_VALUES
from bnprobe.files.store import file_format, read_view

MAX_HEADER_BYTES = 100 << 20  # safetensors' own cap on its JSON header
MAX_JSON_BYTES = 64 << 20  # a run's metrics.json grows ~300 bytes per epoch
MAX_ELEMENTS = 1 << 26  # per dataset (512 MiB of float64); a real run's largest, steps x tensors, is far below
MAX_TENSORS = 1 << 16  # parameter tensors of a model; the deepest registry model has under 1,000
MAX_TRAIN_IMAGES = 1 << 22  # bounds steps per epoch when the run used a whole data set (ImageNet: 1.28M)
# An ablation's rows (its clamp values) and a probe's τ come from a sweep: at most MAX_SWEEP_VALUES of them
SWEEPS = "bnprobe's sweeps"
MAX_METRICS = 64  # an ablation's named metrics (--eval): bnprobe.analysis.user_eval's cap
NUMBERS, INTEGERS = "biuf", "biu"  # numpy dtype kinds


def _kind_of(mode: int) -> str:
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return "a special file"


def regular_file(path: Path) -> Path:
    """`path`, if it is (or links to) a regular file: anything else is refused before it is opened."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise BnprobeError(f"no such file: {path}") from None
    except OSError as exc:  # a symlink loop, a path through a file, no permission
        raise BnprobeError(f"cannot read {path} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise BnprobeError(f"{path} is not a regular file (it is {_kind_of(mode)})")
    return Path(path)


def read_json(path: Path, what: str = "a bnprobe file") -> Any:
    """The JSON value in a regular file of at most MAX_JSON_BYTES of UTF-8 text (`what`: what a larger one is
    not)."""
    regular_file(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise BnprobeError(f"cannot read {path} ({exc.strerror or exc})") from None
    if len(data) > MAX_JSON_BYTES:
        raise BnprobeError(f"{path} is larger than {MAX_JSON_BYTES >> 20} MiB; not {what}")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BnprobeError(f"{path} is not readable JSON (not UTF-8 text: byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise BnprobeError(f"{path} is not readable JSON ({exc})") from None
    except ValueError:  # Python reads no integer of more than 4,300 digits
        raise BnprobeError(f"{path} is not readable JSON (a number of more than 4,300 digits)") from None
    except RecursionError:
        raise BnprobeError(f"{path} is not readable JSON (nested too deeply)") from None


def read_config(path: Path) -> dict[str, Any]:
    """config.json as a plain dict: a JSON object whose known settings have TrainConfig's types and ranges, as
    inspect and train check them. Unknown or missing settings are left to the caller (the report shows runs of
    older and newer versions)."""
    config = read_json(path)
    if not isinstance(config, dict):
        raise BnprobeError(f"{path} does not hold the run's settings (a JSON object), but {json_type(config)}")
    check_settings(config, path)
    return config


def check_agrees(stored: TrainConfig, checkpoint: Path) -> None:
    """A run's checkpoint.pt and its config.json (when `checkpoint` is a run's, with one beside it) agree on every
    setting that decides what was computed, so that every reader of the run sees one run: the probe and ablation
    (which build the checkpoint's copy), inspect, report and findings (which read config.json)."""
    config_json = Path(checkpoint).parent / CONFIG_FILE
    if Path(checkpoint).name != CHECKPOINT_FILE or not os.path.lexists(config_json):
        return
    written = TrainConfig.from_dict(read_config(config_json), config_json).identity()
    differ = [name for name, value in stored.identity().items() if written.get(name) != value]
    if differ:
        shown = ", ".join(f"{name} ({_short(written[name])} vs {_short(stored.identity()[name])})" for name in differ[:3])
        raise BnprobeError(f"{config_json} and {CHECKPOINT_FILE} disagree on {shown}{', ...' if len(differ) > 3 else ''}; "
                           f"one of them was edited or replaced: restore it, or train the run again")


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def is_run(folder: Path) -> bool:
    """Whether a folder holds a bnprobe run: a config.json that reads as a TrainConfig naming its model and
    data set, as bnprobe writes it (not merely a file of that name: `{}` is some other program's)."""
    try:
        config = read_config(folder / CONFIG_FILE)  # a FIFO or device is refused unopened
        TrainConfig.from_dict(config)
    except (BnprobeError, TypeError, ValueError):
        return False
    return "model" in config and "dataset" in config


def is_set_aside(folder: Path) -> bool:
    """Whether `folder` is an old run that `train --overwrite` set aside (bnprobe.files.runs.Replacement): a real
    folder holding the marker bnprobe writes before it renames a run, not merely a folder of that name."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    try:
        marker = read_json(folder / SET_ASIDE_MARKER)
    except BnprobeError:
        return False
    return isinstance(marker, dict) and marker.get("format") == SET_ASIDE_FORMAT


def run_holding(path: Path) -> Optional[Path]:
    """The run directory a file at `path` would be written in, if any (through links: a linked folder may lie
    inside a run). A run holding files bnprobe did not write is one `train --overwrite` refuses."""
    parent = Path(path).parent.resolve()
    return next((folder for folder in (parent, *parent.parents) if is_run(folder)), None)


def check_outside_runs(path: Path) -> None:
    """Refuse, in one line, to write a file of bnprobe's own (a report, its findings) inside a run directory."""
    run = run_holding(path)
    if run is not None:
        raise BnprobeError(f"will not write {path} inside run directory {run} (train --overwrite would refuse "
                           f"a run holding files it did not write); name a path outside it")


def json_type(value: Any) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), "null")


# ---- HDF5 ----------------------------------------------------------------------------------------------------


def open_h5(path: Path, format: Optional[str] = None):
    """An h5py.File open for reading: a regular file, an HDF5 file, and with the `format` attribute if given."""
    import h5py

    regular_file(path)
    try:
        f = h5py.File(read_view(path), "r")  # through a pending journal, if a kill interrupted an update
    except OSError as exc:
        raise BnprobeError(f"{path} is not a readable HDF5 file ({first_line(exc)})") from None
    if format is not None and file_format(f) != format:
        f.close()
        raise BnprobeError(f"{path} is not a {format} file")
    return f


class Layout:
    """Checks of one open HDF5 file's objects, each failure a one-line BnprobeError naming file and object."""

    def __init__(self, f):
        self.f = f
        self.objects: dict[str, Any] = {}  # path -> each object found: a check looks a path up more than once

    def fail(self, message: str):
        raise BnprobeError(f"{self.f.filename}: {message}")

    def group(self, path: str, required: bool = True):
        """The group at `path`, or None when it is absent and not `required`."""
        import h5py

        obj = self._get(path, required)
        if obj is not None and not isinstance(obj, h5py.Group):
            self.fail(f"/{path} is not a group")
        return obj

    def dataset(self, path: str, shape: tuple[Optional[int], ...], kinds: str = NUMBERS, required: bool = True):
        """The dataset at `path`, if it has `shape` (None: any size, within the cap) and a dtype of `kinds`
        ("str": text); None when it is absent and not `required`."""
        import h5py

        ds = self._get(path, required)
        if ds is None:
            return None
        if not isinstance(ds, h5py.Dataset):
            self.fail(f"/{path} is not a dataset")
        plist = ds.id.get_create_plist()  # once: h5py's is_virtual and external would each fetch it again
        if plist.get_layout() == h5py.h5d.VIRTUAL or plist.get_external_count():
            self.fail(f"/{path} keeps its data in other files")
        got_shape, dtype = ds.id.shape, ds.id.dtype
        if len(got_shape) != len(shape) or any(want is not None and got != want for got, want in zip(got_shape, shape)):
            wanted = "(" + ", ".join("n" if want is None else str(want) for want in shape) + ("," if len(shape) == 1 else "") + ")"
            self.fail(f"/{path} has shape {got_shape}, expected {wanted}")
        if math.prod(got_shape) > MAX_ELEMENTS:
            self.fail(f"/{path} declares {math.prod(got_shape):,} values, more than bnprobe ever writes ({MAX_ELEMENTS:,})")
        text = h5py.check_string_dtype(dtype) is not None
        if (kinds == "str") != text or (not text and dtype.kind not in kinds):
            self.fail(f"/{path} holds {'text' if text else dtype}, expected {'text' if kinds == 'str' else 'numbers'}")
        return ds

    def rows(self, path: str, limit: int, what: str, kinds: str = NUMBERS) -> int:
        """The length of the 1-D dataset at `path` (0 if absent), at most `limit`."""
        ds = self._get(path, required=False)
        n = ds.shape[0] if getattr(ds, "ndim", 0) == 1 else 0
        if n > limit:
            self.fail(f"/{path} has {n:,} rows, more than {what} allow ({limit:,})")
        self.dataset(path, (None,), kinds, required=False)
        return n

    def attr_int(self, name: str, path: str = "", required: bool = False) -> Optional[int]:
        """An integer (or boolean) attribute of the object at `path` (a numpy scalar in h5py); None when it
        is absent or of another kind and not `required`."""
        value = self.f[path or "/"].attrs.get(name)
        if getattr(value, "shape", None) == () and value.dtype.kind in INTEGERS:
            return int(value)
        if required:
            self.fail(f"/{path} lacks the integer attribute {name!r}")
        return None

    def _get(self, path: str, required: bool):
        # h5py's low-level calls: f.get(path, getlink=True) then f[path] resolve the path three times, and a
        # telemetry file of a deep net has thousands of datasets (the report reads hundreds of such files).
        import h5py

        if path in self.objects:
            return self.objects[path]
        name = path.encode()
        try:
            link = self.f.id.links.get_info(name)
        except KeyError:
            link = None
        except (RuntimeError, ValueError, OSError, TypeError) as exc:  # HDF5's "doesn't exist" is a RuntimeError
            if "exist" not in str(exc) and "not found" not in str(exc):
                self.fail(f"/{path} cannot be read ({exc})")
            link = None
        if link is None:
            if required:
                self.fail(f"/{path} is missing")
            return None
        if link.type != h5py.h5l.TYPE_HARD:  # a soft or external link may point anywhere, even at itself
            self.fail(f"/{path} is a link, not stored in the file")
        try:
            self.objects[path] = self.f[path]
        except (KeyError, ValueError, OSError, TypeError) as exc:
            self.fail(f"/{path} cannot be read ({first_line(exc)})")
        return self.objects[path]


@dataclass
class TelemetrySizes:
    epochs: int  # E: rows of /epochs
    steps: int  # S: recorded steps
    params: int  # P: parameter tensors
    snapshots: int  # rows of /bn
    checked: dict[str, Any]  # path -> every group and dataset checked: a reader reads these, not the file again


def check_telemetry(f, bn_fields: Optional[tuple[str, ...]] = None) -> TelemetrySizes:
    """Every dataset of a telemetry.h5 (format `bnprobe-telemetry`) has the shape and type the schema gives it,
    with E <= the run's planned epochs, S <= what E epochs of its batches can have recorded, /bn rows <= E + 1.
    `bn_fields` limits the BN snapshots checked to those a reader will read (the report reads gamma only: a
    deep net has four datasets per BN layer, and opening each is most of the check's time)."""
    layout = Layout(f)
    planned = layout.attr_int("config.epochs")
    epochs_group = layout.group("epochs")
    e = 0
    for name in epochs_group:
        e = max(e, layout.rows(f"epochs/{name}", min(MAX_EPOCHS, planned or MAX_EPOCHS), "the run's epochs"))
    for name in epochs_group:
        layout.dataset(f"epochs/{name}", (e,))
    if "epoch" in epochs_group and not all(np.isfinite(epochs_group["epoch"][:])):
        layout.fail("/epochs/epoch holds a value that is not a number")

    p = layout.rows("params/name", MAX_TENSORS, "a model's tensors", "str")
    layout.dataset("params/name", (p,), "str")
    layout.dataset("params/group", (p,), "str")
    layout.dataset("params/numel", (p,), INTEGERS)
    layout.dataset("params/trainable", (p,))

    s = 0
    steps = layout.group("steps", required=False)
    if steps is not None and "step" in steps:
        batch, subset, every = (layout.attr_int(f"config.{k}") for k in ("batch_size", "subset", "telemetry_every"))
        per_epoch = math.ceil((subset or MAX_TRAIN_IMAGES) / batch) if batch and batch > 0 else MAX_TRAIN_IMAGES
        per_epoch = math.ceil(per_epoch / every) + 1 if every and every > 0 else per_epoch
        s = layout.rows("steps/step", e * per_epoch, f"{e} epoch(s) of its batches")
        layout.dataset("steps/step", (s,), INTEGERS)
        layout.dataset("steps/epoch", (s,), INTEGERS)
        layout.dataset("steps/grad_abs_mean", (s, p), required=False)
        layout.dataset("steps/grad_l2", (s, p), required=False)
        for group in layout.group("steps/groups"):
            path = f"steps/groups/{group}"
            layout.group(path)
            for name in ("frozen", "numel", "tensors"):
                layout.attr_int(name, path, required=True)
            for name in ("grad_abs_mean", "grad_l2"):
                layout.dataset(f"{path}/{name}", (s,))

    b = 0
    bn = layout.group("bn", required=False)
    if bn is not None:
        b = layout.rows("bn/epoch", e + 1, f"{e} epoch(s) and the initial state")
        layout.dataset("bn/epoch", (b,), INTEGERS)
        for layer in bn:
            if layer == "epoch":
                continue
            for name in layout.group(f"bn/{layer}"):
                if bn_fields is None or name in bn_fields:
                    layout.dataset(f"bn/{layer}/{name}", (b, None))
    return TelemetrySizes(epochs=e, steps=s, params=p, snapshots=b, checked=layout.objects)


def check_ablation(f) -> int:
    """An ablation file's columns: all of one length T, 1 <= T <= the values of a sweep; its masks (T, channels),
    channels as its total_channels says; (version 3) its labels, and the named metrics of eval/ where it was
    measured by --eval or --text instead of image accuracy; returns T."""
    layout = Layout(f)
    t = layout.rows("values", MAX_SWEEP_VALUES, SWEEPS)
    if not t:
        layout.fail("holds no ablation values")
    layout.dataset("values", (t,))
    layout.dataset("labels", (t,), "str", required=False)
    metrics = layout.group("eval", required=False)
    layout.dataset("test_acc", (t,), required=metrics is None)
    if metrics is not None:
        if len(metrics) > MAX_METRICS:
            layout.fail(f"/eval holds {len(metrics):,} metrics, more than bnprobe writes ({MAX_METRICS})")
        for name in metrics:
            layout.dataset(f"eval/{name}", (t,))
    for name in ("clamped_fraction", "clamped", "train_acc"):
        layout.dataset(name, (t,), required=False)
    if "clamped_fraction" not in f and "clamped" not in f:
        layout.fail("/clamped_fraction is missing")
    layout.dataset("masks", (t, layout.attr_int("total_channels")), required=False)
    return t


def check_probe(f) -> int:
    """A probe file's checkpoint groups, each `frac_below_all` as long as /taus, and (version 4) the norms' kinds,
    |γ| quantiles and recurring outlier dimensions that the report reads, of consistent shapes; returns the
    number of groups."""
    layout = Layout(f)
    t = layout.rows("taus", MAX_SWEEP_VALUES, SWEEPS)
    if "taus" in f:
        layout.dataset("taus", (t,))
    q = layout.rows("quantile_levels", MAX_SWEEP_VALUES, "quantile levels")
    checkpoints = layout.group("checkpoints")
    for key in checkpoints:
        group = f"checkpoints/{key}"
        layout.group(group)
        layout.dataset(f"{group}/frac_below_all", (t,), required=False)
        if layout.dataset(f"{group}/bn/kind", (None,), "str", required=False) is None:
            continue  # before version 4
        layers = layout.rows(f"{group}/bn/names", MAX_TENSORS, "a model's tensors", "str")
        layout.dataset(f"{group}/bn/kind", (layers,), "str")
        layout.dataset(f"{group}/bn/abs_gamma_quantiles", (layers, q))
        r = layout.rows(f"{group}/recurring/dim", MAX_ELEMENTS, "the layers' channels")
        for name in ("width", "dim", "layers", "of_layers", "max_abs_gamma"):
            layout.dataset(f"{group}/recurring/{name}", (r,))
        if f"{group}/recurring_off" in f:  # version 5
            r = layout.rows(f"{group}/recurring_off/dim", MAX_ELEMENTS, "the layers' channels")
            for name in ("width", "dim", "layers", "of_layers"):
                layout.dataset(f"{group}/recurring_off/{name}", (r,))
    return len(checkpoints)
