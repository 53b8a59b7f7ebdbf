"""Probes of a trained model's BatchNorm: γ/β per layer, small-γ fractions, channels turned off, and the
sparsity of every ReLU's output on real images.

γ/β come straight from the BN modules (affine ones, in module order = depth), or, for a checkpoint file
probed alone (no --model, no --dataset), from its tensors (bnprobe.static), with no forward pass.
Activation sparsity uses forward hooks on nn.ReLU modules. torchvision's BasicBlock/Bottleneck call ONE
`relu` module two or three times per block, so the hooks count invocations within each forward pass and every invocation is
its own "site": `layer1.0.relu#1` (after bn1), `layer1.0.relu#2` (after the residual add). Where
torch.fx can trace the model, each site also names what feeds it. ReLUs called as functions (F.relu)
have no module to hook and are not seen.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from bnprobe.data import DeviceLoader
from bnprobe.errors import printable
from bnprobe.evaluate import evaluate, resolve_device
from bnprobe.formats import CHECKPOINT_FILE, PROBE_FILE, PROBE_FORMAT, PROBE_VERSION
from bnprobe.measures import fraction_below, histogram_edges
from bnprobe.models import bn_layers
from bnprobe.options import DEFAULT_TAUS, MAX_BINS, ProbeOptions  # noqa: F401 - part of this API
from bnprobe.store import atomic_h5, check_replaceable, provenance, set_attrs, write_array

if TYPE_CHECKING:
    from bnprobe.options import LoadOptions

FORWARD_ATTRS = ("accuracy", "loss", "images", "relu_sites", "relu_channels", "zero_fraction", "dead_channels")


# ---- γ and β ---------------------------------------------------------------------------------------


@dataclass
class BNStats:
    names: list[str]
    gamma: list[np.ndarray]  # per layer, float64
    beta: list[np.ndarray]
    running_mean: list[np.ndarray]
    running_var: list[np.ndarray]
    stats_only: list[tuple[str, int]] = field(default_factory=list)  # BN without affine: (name, channels)

    @classmethod
    def from_tensors(cls, layers: Sequence[tuple[str, Sequence[Optional[torch.Tensor]]]],
                     stats_only: Sequence[tuple[str, int]] = ()) -> "BNStats":
        """layers: (name, (weight, bias, running_mean, running_var)) in depth order; copied to float64."""
        get = lambda t: t.detach().double().cpu().numpy().copy() if t is not None else np.zeros(0)  # noqa: E731
        columns = list(zip(*[[get(t) for t in tensors] for _, tensors in layers])) or [(), (), (), ()]
        return cls([name for name, _ in layers], *(list(column) for column in columns), stats_only=list(stats_only))

    @property
    def channels(self) -> np.ndarray:
        return np.array([g.size for g in self.gamma], dtype=np.int64)

    def frac_below(self, taus: Sequence[float]) -> np.ndarray:
        """(L, T): fraction of each layer's channels with |γ| < τ."""
        return fraction_below(self.gamma, taus)

    def frac_below_all(self, taus: Sequence[float]) -> np.ndarray:
        """(T,): the same over every channel of the network."""
        return fraction_below(self.gamma, taus, per_layer=False)

    def off(self, threshold: float) -> np.ndarray:
        """Channels turned off per layer: |γ| < threshold, so the BN output is (almost) the constant β."""
        return np.array([int(np.sum(np.abs(g) < threshold)) for g in self.gamma], dtype=np.int64)

    def off_dead(self, threshold: float) -> np.ndarray:
        """Of those, channels with β <= 0: a ReLU right after outputs (almost) 0 for every input."""
        return np.array(
            [int(np.sum((np.abs(g) < threshold) & (b <= 0))) for g, b in zip(self.gamma, self.beta)], dtype=np.int64
        )


def bn_statistics(model: nn.Module) -> BNStats:
    stats_only = [(name, m.num_features) for name, m in bn_layers(model) if not m.affine]
    return BNStats.from_tensors([(name, (bn.weight, bn.bias, bn.running_mean, bn.running_var))
                                 for name, bn in bn_layers(model, with_gamma=True)], stats_only)


def layer_mean(values: np.ndarray) -> float:
    """The mean of one layer's values; NaN (shown as -) for a layer of no channels, which numpy warns about."""
    return float(values.mean()) if values.size else float("nan")


def histograms(arrays: Sequence[np.ndarray], edges: np.ndarray) -> np.ndarray:
    return np.stack([np.histogram(a, bins=edges)[0] for a in arrays]).astype(np.int64) if arrays else np.zeros(
        (0, len(edges) - 1), dtype=np.int64
    )


# ---- ReLU sparsity -----------------------------------------------------------------------------------


@dataclass
class ReluSite:
    name: str  # "layer1.0.relu#2", or the module name when it runs once per forward
    module: str
    call: int  # 1-based invocation within one forward pass
    input: str  # what feeds it, from torch.fx ("layer1.0.bn1", "add(layer1.0.bn2, layer1.0.downsample.1)"), or ""
    channels: int
    zeros: int  # zero outputs over every probed image, channel and position
    total: int
    dead: int  # channels that were zero for every probed image at every position

    @property
    def zero_fraction(self) -> float:
        return self.zeros / self.total if self.total else float("nan")


def _describe(arg: Any) -> str:
    if not isinstance(arg, torch.fx.Node):
        return repr(arg)
    if arg.op == "call_module":
        return str(arg.target)
    if arg.op == "placeholder":
        return "input"
    return arg.name


def relu_inputs(model: nn.Module) -> dict[str, list[str]]:
    """For each nn.ReLU, what feeds each of its calls in one forward pass, in order (empty if fx fails)."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - untraceable models still get sparsity, only without input names
        return {}
    modules = dict(model.named_modules())
    inputs: dict[str, list[str]] = defaultdict(list)
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.ReLU) and node.args:
            source = node.args[0]
            if isinstance(source, torch.fx.Node) and source.op in ("call_function", "call_method"):
                fn = source.target
                name = {operator.add: "add", operator.iadd: "add", torch.add: "add"}.get(fn, getattr(fn, "__name__", str(fn)))
                text = f"{name}({', '.join(_describe(a) for a in source.args)})"
            else:
                text = _describe(source)
            inputs[str(node.target)].append(text)
    return dict(inputs)


class ReluRecorder:
    """Forward hooks on every nn.ReLU; counts zeros per (module, invocation within the forward pass)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.relus = {m: name for name, m in model.named_modules() if isinstance(m, nn.ReLU)}
        self.calls: dict[nn.Module, int] = {}
        self.zeros: dict[tuple[str, int], torch.Tensor] = {}
        self.total: dict[tuple[str, int], int] = defaultdict(int)
        self.alive: dict[tuple[str, int], torch.Tensor] = {}
        self.order: list[tuple[str, int]] = []
        self.handles: list[Any] = []

    def __enter__(self) -> "ReluRecorder":
        self.handles.append(self.model.register_forward_pre_hook(self._reset))
        self.handles += [m.register_forward_hook(self._record) for m in self.relus]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _reset(self, module: nn.Module, args: Any) -> None:
        self.calls.clear()  # a new forward pass: invocation counts start again

    def _record(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        call = self.calls.get(module, 0) + 1
        self.calls[module] = call
        key = (self.relus[module], call)
        out = output.detach()
        zero = out == 0
        if out.dim() >= 2:
            alive = (~zero).transpose(0, 1).reshape(out.shape[1], -1).any(dim=1)
        else:
            alive = (~zero).any().reshape(1)
        if key not in self.zeros:
            self.order.append(key)
            self.zeros[key] = torch.zeros((), dtype=torch.int64, device=out.device)
            self.alive[key] = torch.zeros_like(alive)
        self.zeros[key] += zero.sum()
        self.total[key] += out.numel()
        self.alive[key] |= alive

    def sites(self, inputs: Optional[dict[str, list[str]]] = None) -> list[ReluSite]:
        inputs = inputs or {}
        calls_per_module: dict[str, int] = defaultdict(int)
        for module, call in self.order:
            calls_per_module[module] = max(calls_per_module[module], call)
        sites = []
        for module, call in self.order:
            many = calls_per_module[module] > 1
            feeds = inputs.get(module, [])
            alive = self.alive[(module, call)]
            sites.append(ReluSite(
                name=f"{module}#{call}" if many else module, module=module, call=call,
                input=feeds[call - 1] if call <= len(feeds) else "",
                channels=int(alive.numel()), zeros=int(self.zeros[(module, call)].item()),
                total=int(self.total[(module, call)]), dead=int((~alive).sum().item()),
            ))
        return sites


def relu_sparsity(model: nn.Module, loader: DeviceLoader) -> tuple[list[ReluSite], float, float, int]:
    """(sites, loss, accuracy, images) over `loader` in eval mode: the one evaluation loop, recorded."""
    with ReluRecorder(model) as recorder:
        loss, accuracy = evaluate(model, loader)
    return recorder.sites(relu_inputs(model)), loss, accuracy, len(loader.labels)


# ---- one checkpoint's probe ------------------------------------------------------------------------


@dataclass
class ProbeResult:
    label: str
    path: str
    attrs: dict[str, Any]  # source, model, freeze, dataset, normalisation, ...
    bn: BNStats
    sites: list[ReluSite]
    loss: float
    accuracy: float
    images: int
    extra: dict[str, Any] = field(default_factory=dict)
    forward_pass: bool = True  # False: probed from the file alone; accuracy, loss and ReLU sparsity absent

    def summary(self, taus: Sequence[float], off_threshold: float) -> dict[str, Any]:
        gamma = np.abs(np.concatenate(self.bn.gamma)) if self.bn.gamma else np.zeros(0)
        zeros = sum(s.zeros for s in self.sites)
        total = sum(s.total for s in self.sites)
        return {
            "bn_layers": len(self.bn.names),
            "bn_channels": int(gamma.size),
            "mean_abs_gamma": layer_mean(gamma),
            "median_abs_gamma": float(np.median(gamma)) if gamma.size else float("nan"),
            "frac_below": self.bn.frac_below_all(taus),
            "off": int(self.bn.off(off_threshold).sum()),
            "off_dead": int(self.bn.off_dead(off_threshold).sum()),
            "relu_sites": len(self.sites),
            "zero_fraction": zeros / total if total else float("nan"),
            "dead_channels": sum(s.dead for s in self.sites),
            "relu_channels": sum(s.channels for s in self.sites),
        }


def probe_model(model: nn.Module, loader: DeviceLoader, label: str, path: str, attrs: dict[str, Any]) -> ProbeResult:
    sites, loss, accuracy, images = relu_sparsity(model, loader)
    return ProbeResult(label, path, attrs, bn_statistics(model), sites, loss, accuracy, images)


# ---- probe.h5 ----------------------------------------------------------------------------------------


def write_probe_h5(
    path: Path, results: Sequence[ProbeResult], taus: Sequence[float], off_threshold: float, bins: int,
    attrs: Optional[dict[str, Any]] = None,
) -> None:
    """probe.h5 (schema: docs/probe-schema.md), written to a temporary file and renamed into place."""
    import h5py

    strings = lambda items: np.array(list(items), dtype=h5py.string_dtype())  # noqa: E731
    taus = np.asarray(taus, dtype=np.float64)
    gamma_edges = histogram_edges([g for r in results for g in r.bn.gamma], bins)
    beta_edges = histogram_edges([b for r in results for b in r.bn.beta], bins)
    with atomic_h5(path) as f:
        set_attrs(f, {"format": PROBE_FORMAT, "version": PROBE_VERSION, "checkpoints": len(results),
                      "off_threshold": off_threshold, "bins": bins, **(attrs or {})})
        write_array(f, "taus", taus, description="thresholds τ of the frac_below columns")
        write_array(f, "gamma_edges", gamma_edges, description="bin edges of every gamma_hist")
        write_array(f, "beta_edges", beta_edges, description="bin edges of every beta_hist")
        write_array(f, "labels", strings(r.label for r in results))
        group = f.create_group("checkpoints")
        for index, result in enumerate(results):
            g = group.create_group(f"{index:03d}")
            summary = result.summary(taus, off_threshold)
            attrs = {"label": result.label, "path": result.path, "forward_pass": result.forward_pass,
                     "accuracy": result.accuracy, "loss": result.loss, "images": result.images,
                     "layer_order": "module", "bn_stats_only_layers": len(result.bn.stats_only),
                     **{k: v for k, v in summary.items() if k != "frac_below"}, **result.attrs}
            # What was not measured is absent, not a made-up 0 (forward_pass = False says why).
            set_attrs(g, {k: v for k, v in attrs.items() if result.forward_pass or k not in FORWARD_ATTRS})
            write_array(g, "frac_below_all", summary["frac_below"], description="(T,) whole network")
            bn = g.create_group("bn")
            write_array(bn, "names", strings(result.bn.names))
            write_array(bn, "depth", np.arange(len(result.bn.names), dtype=np.int64))
            write_array(bn, "channels", result.bn.channels)
            write_array(bn, "offsets", np.concatenate([[0], np.cumsum(result.bn.channels)]).astype(np.int64),
                        description="layer l's channels are [offsets[l], offsets[l+1]) of gamma, beta, ...")
            for name in ("gamma", "beta", "running_mean", "running_var"):
                arrays = getattr(result.bn, name)
                write_array(bn, name, np.concatenate(arrays) if arrays else np.zeros(0))
            write_array(bn, "frac_below", result.bn.frac_below(taus), description="(L, T): fraction |γ| < τ")
            write_array(bn, "off", result.bn.off(off_threshold), description="channels with |γ| < off_threshold")
            write_array(bn, "off_dead", result.bn.off_dead(off_threshold), description="of those, β <= 0")
            write_array(bn, "mean_abs_gamma", np.array([layer_mean(np.abs(x)) for x in result.bn.gamma]))
            write_array(bn, "gamma_hist", histograms(result.bn.gamma, gamma_edges), description="(L, bins)")
            write_array(bn, "beta_hist", histograms(result.bn.beta, beta_edges), description="(L, bins)")
            write_array(bn, "stats_only_names", strings(name for name, _ in result.bn.stats_only),
                        description="BN layers without affine (running statistics only, no γ/β)")
            write_array(bn, "stats_only_channels", np.array([c for _, c in result.bn.stats_only], dtype=np.int64))
            if not result.forward_pass:
                continue  # no forward pass: no relu/ group (forward_pass = False says why)
            relu = g.create_group("relu")
            sites = result.sites
            write_array(relu, "sites", strings(s.name for s in sites))
            write_array(relu, "module", strings(s.module for s in sites))
            write_array(relu, "call", np.array([s.call for s in sites], dtype=np.int64))
            write_array(relu, "input", strings(s.input for s in sites))
            write_array(relu, "channels", np.array([s.channels for s in sites], dtype=np.int64))
            write_array(relu, "zeros", np.array([s.zeros for s in sites], dtype=np.int64))
            write_array(relu, "total", np.array([s.total for s in sites], dtype=np.int64))
            write_array(relu, "zero_fraction", np.array([s.zero_fraction for s in sites], dtype=np.float64))
            write_array(relu, "dead_channels", np.array([s.dead for s in sites], dtype=np.int64))


def sparkline(counts: np.ndarray) -> str:
    """A histogram as one line of block characters, for the terminal table."""
    blocks = " ▁▂▃▄▅▆▇█"
    top = counts.max() if counts.size else 0
    if not top:
        return " " * len(counts)
    return "".join(blocks[int(np.ceil(c / top * (len(blocks) - 1)))] for c in counts)


# ---- the command: load, probe, write, show ---------------------------------------------------------


def default_output(paths: Sequence[Path], name: str) -> Path:
    """<run dir>/<name> for one run directory's checkpoint, else ./<name>."""
    from bnprobe import runs
    from bnprobe.loading import checkpoint_file

    if len(paths) == 1:
        file = checkpoint_file(paths[0])
        if file.name == CHECKPOINT_FILE and runs.config_path(file.parent).exists():
            return file.parent / name
    return Path(name)


def unique_labels(labels: Sequence[str]) -> list[str]:
    seen: dict[str, int] = defaultdict(int)
    for label in labels:
        seen[label] += 1
    counter: dict[str, int] = defaultdict(int)
    out = []
    for label in labels:
        counter[label] += 1
        out.append(f"{label} ({counter[label]})" if seen[label] > 1 else label)
    return out


def run_probe(
    paths: Sequence[Path],
    options: "LoadOptions",
    settings: Optional[ProbeOptions] = None,
    *,
    out: Optional[Path] = None,
    brief: bool = False,
    console: Optional[Any] = None,
) -> tuple[list[ProbeResult], Path]:
    """Probe every checkpoint in `paths`, write probe.h5 and print the tables; the CLI is a shell over this.

    With neither --model nor --dataset, a checkpoint bnprobe did not train is probed from its file alone
    (bnprobe.static): everything that needs no forward pass. A bnprobe run is probed with its data as always."""
    from rich.console import Console
    from rich.markup import escape

    from bnprobe.errors import BnprobeError
    from bnprobe.loading import check_forward, check_options, load_eval_data, load_model
    from bnprobe.static import ORDER_NOTES, static_probe

    console = console or Console()
    settings = settings or ProbeOptions()
    taus, off_threshold, bins = settings.taus, settings.off_threshold, settings.bins
    images, batch_size = settings.images, settings.batch_size
    if off_threshold < 0 or any(t < 0 for t in taus):
        raise BnprobeError("thresholds τ must be >= 0")
    if not 1 <= bins <= MAX_BINS:
        raise BnprobeError(f"--bins must be in [1, {MAX_BINS:,}], got {bins:,}")
    if images < 0 or batch_size < 1:
        raise BnprobeError("--batch-size must be >= 1 and --images >= 0")
    device: Optional[torch.device] = None  # resolved for the first forward pass (that import takes seconds)
    out = out if out is not None else default_output(paths, PROBE_FILE)
    check_replaceable(out, PROBE_FORMAT)
    check_options(options)
    static = options.model is None and options.dataset is None
    cache: dict = {}
    results = []
    for path in paths:
        result = static_probe(path) if static else None
        if result is not None:
            results.append(result)
            continue
        device = device or resolve_device(options.device)
        loaded = load_model(path, options, device)
        data = load_eval_data(loaded, device, test_subset=images, cache=cache)
        channels_last = device.type == "cuda"
        if channels_last:
            loaded.model.to(memory_format=torch.channels_last)
        loader = DeviceLoader(data.test_x, data.test_y, data.mean, data.std, batch_size, channels_last=channels_last)
        check_forward(loaded.model, next(iter(loader))[0], loaded.label, loaded.dataset)
        attrs = {"source": loaded.source, "dataset": loaded.dataset, "normalization": loaded.norm_source,
                 **{k: v for k, v in loaded.meta.items() if v is not None}}
        result = probe_model(loaded.model, loader, loaded.label, str(loaded.path), attrs)
        if not result.bn.names:
            console.print(f"[yellow]{_shown(loaded.label)}: no BatchNorm layer with a γ; only ReLU sparsity is "
                          f"reported")
        results.append(result)
        del loaded
    for result, label in zip(results, unique_labels([r.label for r in results])):
        result.label = label
    # --images applies to forward passes only: without one, the file does not claim a count.
    write_probe_h5(out, results, taus, off_threshold, bins,
                   {"device": str(device or "none"), **({"images": images} if device is not None else {}),
                    **provenance(load=options, probe=settings)})

    for table in probe_tables(results, taus, off_threshold, brief, width=console.width):
        console.print(table)
    measured = [r for r in results if r.forward_pass]
    console.print(
        f"off: |γ| < {off_threshold:g}, so the BN output is ≈ its constant β; off, β≤0: a ReLU right after it "
        f"outputs ≈ 0." + (f" Sparsity: zero outputs of each ReLU call on {measured[0].images} test images (eval "
                            f"mode); dead: channels zero on every image and position." if measured else ""),
        soft_wrap=True,
    )
    for r in results:
        if not r.forward_pass:
            prefixes = r.attrs["stripped_prefixes"]
            stripped = "" if prefixes == "none" else f", prefix {prefixes} stripped"
            console.print(escape(printable(
                f"{r.label}: read from the file alone ({r.attrs['file_format']}, state dict at "
                f"{r.attrs['state_dict_key']}{stripped}); no forward pass, so accuracy and ReLU sparsity are absent "
                f"(--dataset, plus --model for a checkpoint bnprobe did not train, measures them). Depth = "
                f"{ORDER_NOTES[r.attrs['layer_order']]}.")), soft_wrap=True, highlight=False)
        infinite = sum(int(np.count_nonzero(~np.isfinite(x))) for x in (*r.bn.gamma, *r.bn.beta))
        if infinite:
            console.print(f"{_shown(r.label)}: {infinite:,} non-finite γ or β value(s) (inf or nan), left out of the "
                          f"histograms", soft_wrap=True, highlight=False)
        if r.bn.stats_only:
            names = ", ".join(name for name, _ in r.bn.stats_only)
            console.print(_shown(f"{r.label}: {len(r.bn.stats_only)} BN layer(s) without affine (running statistics "
                                 f"only, no γ/β, not in the tables): {names}"), soft_wrap=True, highlight=False)
    console.print(f"Wrote [bold]{out}[/]")
    return results, out


def _shown(text: str) -> str:
    """A name from a file (a layer, a tensor, a checkpoint's label) as rich prints it: control characters
    escaped (bnprobe.errors.printable), and brackets too, so none is taken for markup."""
    from rich.markup import escape

    return escape(printable(text))


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f}%"


def _num(x: float, spec: str = ".3f") -> str:
    return "-" if x != x else format(x, spec)


def _pct_short(x: float) -> str:
    """A fraction as a whole percentage, at most 4 characters; never rounds a non-zero fraction to 0% or a
    fraction short of 1 to 100%."""
    if x != x:
        return "-"
    if 0 < x < 0.005:
        return "<1%"
    if 0.995 <= x < 1:
        return ">99%"
    return f"{100 * x:.0f}%"


def _table_width(table: Any) -> int:
    """Columns `table` takes when nothing has to be wrapped or cut."""
    from io import StringIO

    from rich.console import Console

    return Console(file=StringIO(), width=100_000).measure(table).maximum


def layer_tables(r: ProbeResult, taus: Sequence[float], off_threshold: float, edges: np.ndarray,
                 width: Optional[int] = None) -> list:
    """One checkpoint's per-layer tables: "γ and β by depth", with a column per τ when that fits in `width`
    columns (None: no limit), else the τ columns in tables of their own ("|γ| < τ by depth"), as many as it
    takes. Numbers are never wrapped; only the layer names fold, and only when a name alone is too wide."""
    from rich import box
    from rich.table import Table

    below, off, dead = r.bn.frac_below(taus), r.bn.off(off_threshold), r.bn.off_dead(off_threshold)
    hists = histograms(r.bn.gamma, edges)
    caption = (f"|γ|, β: means over the layer's channels; γ histogram: 12 bins over [{edges[0]:.2f}, {edges[-1]:.2f}], shared by all layers; "
               f"<τ: fraction |γ| < τ; off: |γ| < {off_threshold:g}; β≤0: off with β ≤ 0")

    def table(title: str, tau_columns: Sequence[int], main: bool) -> Table:
        t = Table(title=title, box=box.SIMPLE_HEAD, caption=caption if main else None, collapse_padding=True,
                  show_edge=False, pad_edge=False)
        t.add_column("#", justify="right", no_wrap=True)
        t.add_column("BN layer", justify="left", overflow="fold")
        if main:
            for column in ("C", "|γ|", "γ histogram"):
                t.add_column(column, justify="left" if column == "γ histogram" else "right", no_wrap=True)
        for k in tau_columns:
            t.add_column(f"<{taus[k]:g}", justify="right", no_wrap=True)
        if main:
            for column in ("off", "β≤0", "β"):
                t.add_column(column, justify="right", no_wrap=True)
        for i, name in enumerate(r.bn.names):
            g, b = r.bn.gamma[i], r.bn.beta[i]
            taus_cells = [_pct_short(below[i][k]) for k in tau_columns]
            if main:
                t.add_row(str(i), _shown(name), str(g.size), _num(layer_mean(np.abs(g))), sparkline(hists[i]),
                          *taus_cells, str(off[i]), str(dead[i]), _num(layer_mean(b), "+.3f"))
            else:
                t.add_row(str(i), _shown(name), *taus_cells)
        return t

    title = f"γ and β by depth — {_shown(r.label)}"
    every = table(title, range(len(taus)), main=True)
    if width is None or _table_width(every) <= width or not taus:
        return [every]
    tables = [table(title, [], main=True)]
    chunk: list[int] = []
    for k in range(len(taus)):
        # Greedy: as many τ columns per table as fit (at least one, however narrow the console).
        if chunk and _table_width(table("", chunk + [k], main=False)) > width:
            tables.append(chunk)
            chunk = []
        chunk.append(k)
    tables.append(chunk)
    return [tables[0]] + [table(f"|γ| < τ by depth — {_shown(r.label)}", c, main=False) for c in tables[1:]]


def probe_tables(results: Sequence[ProbeResult], taus: Sequence[float], off_threshold: float, brief: bool,
                 width: Optional[int] = None) -> list:
    """The terminal tables; per-layer ones are laid out to fit `width` columns (None: no limit)."""
    from rich import box
    from rich.table import Table

    tables = []
    # Summary: one column per checkpoint, so BN-only and full models sit side by side.
    summary = Table(title="BatchNorm probe" + (" — comparison" if len(results) > 1 else ""), box=box.SIMPLE_HEAD)
    summary.add_column("", style="bold", no_wrap=True)
    for r in results:
        summary.add_column(_shown(r.label), justify="right", overflow="fold")
    stats = [r.summary(taus, off_threshold) for r in results]
    measured = [r for r in results if r.forward_pass]  # a file probed alone has no ReLU sparsity
    images = measured[0].images if measured else 0
    rows = [
        ("model", [_shown(str(r.attrs.get("model", "" if r.forward_pass else "(file only)"))) for r in results]),
        ("freeze", [_shown(str(r.attrs.get("freeze", "-"))) for r in results]),
        (f"accuracy ({images} test images)" if measured else "accuracy (no forward pass)",
         [_pct(r.accuracy) for r in results]),
        ("BN layers / channels", [f"{s['bn_layers']} / {s['bn_channels']:,}" for s in stats]),
        ("mean |γ|  (median)", [f"{_num(s['mean_abs_gamma'])}  ({_num(s['median_abs_gamma'])})" for s in stats]),
        *((f"|γ| < {t:g}", [_pct(s["frac_below"][k]) for s in stats]) for k, t in enumerate(taus)),
        (f"off: |γ| < {off_threshold:g}", [f"{s['off']:,}" for s in stats]),
        ("off and β ≤ 0", [f"{s['off_dead']:,}" for s in stats]),
        ("ReLU outputs = 0", [_pct(s["zero_fraction"]) for s in stats]),
        ("dead ReLU channels", [f"{s['dead_channels']:,} of {s['relu_channels']:,}" if r.forward_pass else "-"
                                for r, s in zip(results, stats)]),
    ]
    for name, cells in rows:
        summary.add_row(name, *cells)
    tables.append(summary)
    if brief or not results:
        return tables

    same_layers = all(r.bn.names == results[0].bn.names for r in results)
    same_sites = all([s.name for s in r.sites] == [s.name for s in measured[0].sites] for r in measured)
    edges = histogram_edges([g for r in results for g in r.bn.gamma], 12)
    if len(results) == 1 or not same_layers:
        for r in (r for r in results if r.bn.names):
            tables.extend(layer_tables(r, taus, off_threshold, edges, width))
    else:
        table = Table(title=f"γ by depth: mean |γ| / channels off (|γ| < {off_threshold:g})", box=box.SIMPLE_HEAD)
        table.add_column("#", justify="right")
        table.add_column("BN layer", no_wrap=True)
        table.add_column("C", justify="right")
        for r in results:
            table.add_column(_shown(r.label), justify="right", overflow="fold")
        offs = [r.bn.off(off_threshold) for r in results]
        for i, name in enumerate(results[0].bn.names):
            cells = [f"{_num(layer_mean(np.abs(r.bn.gamma[i])))} / {off[i]}" for r, off in zip(results, offs)]
            table.add_row(str(i), _shown(name), str(results[0].bn.gamma[i].size), *cells)
        tables.append(table)

    if len(measured) == 1 or (measured and not same_sites):
        for r in measured:
            table = Table(title=f"ReLU output sparsity — {_shown(r.label)} ({r.images} test images)",
                          box=box.SIMPLE_HEAD)
            for column in ("ReLU call", "input", "C", "zeros", "dead"):
                table.add_column(column, justify="left" if column in ("ReLU call", "input") else "right",
                                 no_wrap=column != "input")
            for s in r.sites:
                table.add_row(_shown(s.name), _shown(s.input), str(s.channels), _pct(s.zero_fraction), str(s.dead))
            tables.append(table)
    elif measured:
        table = Table(title=f"ReLU output sparsity per call ({images} test images): zeros / dead channels",
                      box=box.SIMPLE_HEAD)
        table.add_column("ReLU call", no_wrap=True)
        table.add_column("input")
        for r in measured:
            table.add_column(_shown(r.label), justify="right", overflow="fold")
        for i, site in enumerate(measured[0].sites):
            table.add_row(_shown(site.name), _shown(site.input),
                          *(f"{_pct(r.sites[i].zero_fraction)} / {r.sites[i].dead}" for r in measured))
        tables.append(table)
    return tables
