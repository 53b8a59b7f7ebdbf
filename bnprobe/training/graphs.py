"""The training step, taken eagerly or replayed from a CUDA graph: the one place training and calibration take it.

A small CIFAR net on a GPU is bound by kernel launches (thousands per step for a deep thin ResNet), so on
CUDA the whole step (forward, loss, backward, the after_backward hooks, the SGD step, the running sums) is
captured once with `torch.cuda.graph` and replayed with each batch copied into static input tensors,
following PyTorch's "whole-network capture" recipe. Nothing of the experiment changes:

- Warm-up steps before a capture are real training steps on real batches (on a side stream, as the recipe
  asks); the batch a capture is taken on is then replayed, since a capture executes nothing.
- Only full batches replay; a batch of another shape (an epoch's partial last batch) runs eagerly on the
  same parameters, optimizer state and gradient tensors. Gradients are zeroed in place (never set to None),
  so a graph's `.grad` tensors stay the parameters' own: what telemetry reads after any step.
- A capture that raises prints one warning and the run continues eagerly, from that same step.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Callable, Iterator, Optional, Protocol, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.console import Console
from rich.markup import escape

from bnprobe.core.config import TrainConfig
from bnprobe.core.errors import first_line
from bnprobe.training.evaluate import autocast
from bnprobe.training.telemetry import GradientRecorder

WARMUP_STEPS = 3  # eager steps of each kind (recording or not) before it is captured, as PyTorch's recipe does


class Graphs(Protocol):
    """What TrainStep needs of CUDA graphs; a CPU test stands in a fake that replays the step closure."""

    def side_stream(self) -> AbstractContextManager[None]: ...

    def capture(self, step: Callable[[], None]) -> Callable[[], None]: ...

    def forget(self) -> None: ...


class CudaGraphs:
    """torch.cuda.graph on one device. The graphs of one lr share a memory pool: a captured step leaves
    nothing allocated behind (gradients, momentum and the sums exist before capture and are updated in
    place), so graphs replayed one at a time, in any order, never overwrite each other's live tensors."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)  # warm-up and every capture (a shared pool wants one stream)
        self.forget()

    def forget(self) -> None:
        """The graphs captured so far are dropped (a new lr): the next ones take a new pool, not the id of one
        whose last graph is gone."""
        self.pool = torch.cuda.graph_pool_handle()

    @contextmanager
    def side_stream(self) -> Iterator[None]:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            yield
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def capture(self, step: Callable[[], None]) -> Callable[[], None]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device), torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            step()
        return graph.replay


def uses_graphs(config: TrainConfig, device: torch.device, world: int = 1) -> bool:
    """Graphs on CUDA in one process, with --graphs and without --compile (whose reduce-overhead mode has its own);
    DDP's gradient all-reduce is left eager."""
    return config.graphs and device.type == "cuda" and world == 1 and not config.compile


def graph_backend(config: TrainConfig, device: torch.device, world: int = 1) -> Optional[Graphs]:
    return CudaGraphs(device) if uses_graphs(config, device, world) else None


class TrainStep:
    """One SGD step on a batch, with the epoch's running loss and correct counts kept on the device.

    `after_backward` hooks (pure tensor ops) run between backward() and the optimizer step, after the
    recorder has taken the loss gradient alone. With `graphs`, full batches replay captured graphs (see
    the module's docstring); without, every step is the plain eager one."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, amp: bool = False,
                 after_backward: Sequence[Callable[[], None]] = (), recorder: Optional[GradientRecorder] = None,
                 graphs: Optional[Graphs] = None, console: Optional[Console] = None):
        self.model, self.optimizer, self.amp = model, optimizer, amp
        self.after_backward, self.recorder, self.graphs = list(after_backward), recorder, graphs
        self.console = console or Console(stderr=True)
        self.device = next(p for g in optimizer.param_groups for p in g["params"]).device
        self.loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self.correct = torch.zeros((), device=self.device, dtype=torch.int64)
        # Eager alone lets backward allocate fresh gradients; with graphs they are zeroed in place, so the
        # eager steps among replays (warm-up, partial batches) write the same tensors the graphs read.
        self.set_to_none = graphs is None
        self.static: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # the captured batch's inputs
        self.scratch = recorder.buffer.new_zeros(recorder.buffer.shape[1:]) if recorder is not None else None
        self.replays: dict[bool, Callable[[], None]] = {}  # recording or not -> replay, captured at `lrs`
        self.lrs: tuple[float, ...] = ()
        self.warmed = {False: 0, True: 0}

    def start_epoch(self) -> None:
        self.loss_sum.zero_()
        self.correct.zero_()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        recorder = self.recorder
        recording = recorder is not None and recorder.due()
        row = recorder.buffer[len(recorder.steps)] if recording else None
        if self.graphs is None or (self.static is not None and x.shape != self.static[0].shape):
            self._step(x, y, row)
        else:
            self._graphed(x, y, recording, row)
        if recorder is not None:
            recorder.advance(recording)

    def _step(self, x: torch.Tensor, y: torch.Tensor, row: Optional[torch.Tensor], capturing: bool = False) -> None:
        """The step itself: tensor ops only (Python decides nothing from tensor values), so it can be captured."""
        with autocast(self.device, self.amp, cache=not capturing):  # a cached cast would outlive the capture
            logits = self.model(x)
            loss = F.cross_entropy(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=self.set_to_none)
        loss.backward()
        if row is not None:
            self.recorder.record(row)
        for hook in self.after_backward:
            hook()
        self.optimizer.step()
        self.loss_sum += loss.detach() * len(y)
        self.correct += (logits.detach().argmax(1) == y).sum()

    def _graphed(self, x: torch.Tensor, y: torch.Tensor, recording: bool, row: Optional[torch.Tensor]) -> None:
        if self.static is None:
            self.static = (torch.empty_like(x), torch.empty_like(y))
        # SGD's lr is a Python float, a constant inside a captured step: a new lr (a milestone) is captured
        # again, a few times per run, rather than made a tensor that SGD's foreach step would read on the host.
        lrs = tuple(group["lr"] for group in self.optimizer.param_groups)
        if lrs != self.lrs:
            self.replays.clear()
            self.graphs.forget()
            self.lrs = lrs
        replay = self.replays.get(recording)
        if replay is None and self.warmed[recording] < WARMUP_STEPS:
            self.warmed[recording] += 1
            with self.graphs.side_stream():
                self._step(x, y, row)
            return
        static_x, static_y = self.static
        static_x.copy_(x)
        static_y.copy_(y)
        if replay is None:
            scratch = self.scratch if recording else None  # a graph writes one fixed row; copied out below
            try:
                replay = self.graphs.capture(lambda: self._step(static_x, static_y, scratch, capturing=True))
            except Exception as exc:  # noqa: BLE001 - whatever the capture refused, eager takes this step on
                self.console.print(f"[yellow]warning: CUDA graph capture failed ({escape(first_line(exc))}); "
                                   f"training continues eagerly", soft_wrap=True)
                self.graphs = None
                self.replays.clear()
                self._step(x, y, row)
                return
            self.replays[recording] = replay
        replay()  # after a capture, its batch's one execution
        if row is not None:
            row.copy_(self.scratch)
