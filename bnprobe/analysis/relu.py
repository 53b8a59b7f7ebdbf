"""The sparsity of every ReLU's output on real images, in eval mode.

Activation sparsity uses forward hooks on nn.ReLU modules. torchvision's BasicBlock/Bottleneck call ONE `relu`
module two or three times per block, so the hooks count invocations within each forward pass and every
invocation is its own "site": `layer1.0.relu#1` (after bn1), `layer1.0.relu#2` (after the residual add). Where
torch.fx can trace the model, each site also names what feeds it. ReLUs called as functions (F.relu) have no
module to hook and are not seen.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from typing import Any, Optional

import torch
import torch.nn as nn

from bnprobe.analysis.probe_results import ReluSite
from bnprobe.data.device import DeviceLoader
from bnprobe.training.evaluate import evaluate


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


