"""BatchNorm folded into the conv before it, with per-channel clamping of γ on the folded weights.

In eval mode a BN after a conv is an affine map per channel, so the pair is one conv:
    s  = γ / sqrt(var + eps)
    W' = W * s            (per output channel)
    b' = β + (b - μ) * s  (b: the conv's bias, 0 if it has none)
Clamping γ_c to 0 makes channel c of the BN output the constant β_c whatever the input, i.e. the folded
conv's output channel c gets zero weights and bias β_c (0 with --zero-beta). `ClampableModel` folds once
and then applies any clamp mask with a multiply and a select on the stored folded tensors, no re-fold.

conv -> BN pairs are found by tracing the model with torch.fx (a BN whose only input is a conv called
once, whose output only that BN reads); models fx cannot trace fall back to module structure
(adjacent conv, BN in an nn.Sequential; conv1/bn1, conv2/bn2, conv3/bn3 in torchvision's and bnprobe's
blocks and stems). BNs that cannot be folded keep their module and get γ masked directly, and so do GroupNorm
and LayerNorm layers: their statistics are those of each sample, not constants a conv could absorb.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnprobe.core.errors import BnprobeError
from bnprobe.nets.norms import norm_layers

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Classes whose forward is known to run convN then bnN back to back, with the conv output read only by the BN.
NAMED_PAIRS = {
    "BasicBlock": (("conv1", "bn1"), ("conv2", "bn2")),
    "Bottleneck": (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    "ResNet": (("conv1", "bn1"),),  # torchvision's stem
    "CifarResNet": (("conv1", "bn1"),),
    "ResidualPair": (("conv1", "bn1"), ("conv2", "bn2")),
}


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        isinstance(conv, CONVS)
        and isinstance(bn, _BatchNorm)
        and bn.affine
        and bn.track_running_stats
        and bn.running_mean is not None
        and conv.out_channels == bn.num_features
        and type(conv).__name__[-2:] == type(bn).__name__[-2:]  # Conv2d with BatchNorm2d, ...
    )


def find_conv_bn_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], str]:
    """(conv name, BN name) pairs that fold exactly, and how they were found ("fx" or "structure")."""
    modules = dict(model.named_modules())
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - data-dependent control flow and the like: use the structure instead
        return _pairs_by_structure(model), "structure"
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BatchNorm):
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        if not isinstance(source, torch.fx.Node) or source.op != "call_module":
            continue
        # A module called twice (weight sharing) or a conv output read elsewhere cannot be replaced by the fold.
        if calls[node.target] != 1 or calls[source.target] != 1 or len(source.users) != 1:
            continue
        if _foldable(modules[source.target], modules[node.target]):
            pairs.append((source.target, node.target))
    return pairs, "fx"


def _pairs_by_structure(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for parent_name, parent in model.named_modules():
        prefix = f"{parent_name}." if parent_name else ""
        if isinstance(parent, nn.Sequential):
            children = list(parent.named_children())
            for (a_name, a), (b_name, b) in zip(children, children[1:]):
                if _foldable(a, b):
                    pairs.append((prefix + a_name, prefix + b_name))
        for conv_name, bn_name in NAMED_PAIRS.get(type(parent).__name__, ()):
            conv, bn = getattr(parent, conv_name, None), getattr(parent, bn_name, None)
            if conv is not None and bn is not None and _foldable(conv, bn):
                pairs.append((prefix + conv_name, prefix + bn_name))
    return pairs


def fold_conv_bn(conv: nn.Module, bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') of the conv that equals conv -> bn in eval mode. Computed in float64, returned in W's dtype."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    shape = (-1,) + (1,) * (conv.weight.dim() - 1)
    weight = conv.weight.double() * scale.reshape(shape)
    folded_bias = bn.bias.double() + (bias - bn.running_mean.double()) * scale
    return weight.to(conv.weight.dtype), folded_bias.to(conv.weight.dtype)


class FoldedConvBN(nn.Module):
    """A conv with BN folded in; `clamp(mask)` sets output channels to their constant β (or 0)."""

    def __init__(self, conv: nn.Module, bn: _BatchNorm):
        super().__init__()
        weight, bias = fold_conv_bn(conv, bn)
        self.conv = copy.deepcopy(conv)
        self.conv.bias = nn.Parameter(bias.clone(), requires_grad=False)
        self.conv.weight = nn.Parameter(weight.clone(), requires_grad=False)
        self.register_buffer("folded_weight", weight)
        self.register_buffer("folded_bias", bias)
        self.register_buffer("beta", bn.bias.detach().clone())
        self.register_buffer("gamma", bn.weight.detach().clone())  # what masks are computed from; not used in forward

    @torch.no_grad()
    def clamp(self, clamped: Optional[torch.Tensor], zero_beta: bool = False) -> None:
        """Clamp γ of the channels where `clamped` is True (None: none); their output becomes β_c or 0."""
        if clamped is None or not bool(clamped.any()):
            self.conv.weight.copy_(self.folded_weight)
            self.conv.bias.copy_(self.folded_bias)
            return
        shape = (-1,) + (1,) * (self.folded_weight.dim() - 1)
        keep = (~clamped).to(self.folded_weight.dtype)
        self.conv.weight.copy_(self.folded_weight * keep.reshape(shape))
        constant = torch.zeros_like(self.beta) if zero_beta else self.beta
        self.conv.bias.copy_(torch.where(clamped, constant, self.folded_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class MaskedNorm(nn.Module):
    """A norm layer that is not folded (a BN without a conv before it, every GroupNorm and LayerNorm): γ (and with
    --zero-beta β) masked directly on a copy. γ is seen flat, one entry per channel (a LayerNorm's per element)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = copy.deepcopy(norm)
        self.register_buffer("base_gamma", norm.weight.detach().clone())
        self.register_buffer("base_beta", norm.bias.detach().clone() if norm.bias is not None else None)

    @property
    def gamma(self) -> torch.Tensor:
        return self.base_gamma.reshape(-1)

    @torch.no_grad()
    def clamp(self, clamped: Optional[torch.Tensor], zero_beta: bool = False) -> None:
        clamped = (torch.zeros_like(self.base_gamma, dtype=torch.bool) if clamped is None
                   else clamped.reshape(self.base_gamma.shape))
        self.norm.weight.copy_(self.base_gamma.masked_fill(clamped, 0))
        if self.base_beta is not None:  # LayerNorm(bias=False): no β, a clamped channel outputs 0
            self.norm.bias.copy_(self.base_beta.masked_fill(clamped, 0) if zero_beta else self.base_beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


@dataclass
class ClampLayer:
    name: str  # the norm layer's name in the original model
    module: nn.Module  # FoldedConvBN or MaskedNorm inside the clampable copy
    folded: bool
    conv: Optional[str]  # the conv it was folded into

    @property
    def gamma(self) -> torch.Tensor:
        return self.module.gamma

    @property
    def channels(self) -> int:
        return self.module.gamma.numel()


class ClampableModel(nn.Module):
    """A copy of `model` in eval mode with every norm layer's γ clampable; BNs after convs folded into them once."""

    def __init__(self, model: nn.Module, fold: bool = True):
        super().__init__()
        self.net = copy.deepcopy(model).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        pairs, self.pairing = find_conv_bn_pairs(self.net) if fold else ([], "off")
        by_bn = {bn: conv for conv, bn in pairs}
        self.layers: list[ClampLayer] = []
        for name, norm in norm_layers(self.net, with_gamma=True):
            if name in by_bn:
                conv_name = by_bn[name]
                folded = FoldedConvBN(self.net.get_submodule(conv_name), norm)
                _set_submodule(self.net, conv_name, folded)
                _set_submodule(self.net, name, nn.Identity())
                self.layers.append(ClampLayer(name, folded, True, conv_name))
            else:
                masked = MaskedNorm(norm)
                _set_submodule(self.net, name, masked)
                self.layers.append(ClampLayer(name, masked, False, None))
        self.eval()

    def train(self, mode: bool = True) -> "ClampableModel":
        # Folding is exact in eval mode only (running statistics): this model never leaves it.
        return super().train(False)

    @property
    def gammas(self) -> list[torch.Tensor]:
        return [layer.gamma for layer in self.layers]

    def clamp(self, masks: Optional[Sequence[torch.Tensor]], zero_beta: bool = False) -> None:
        """Apply one clamp mask per layer (True = clamp γ to 0); None restores every channel."""
        if masks is not None and len(masks) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} masks, got {len(masks)}")
        for i, layer in enumerate(self.layers):
            layer.module.clamp(None if masks is None else masks[i], zero_beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@torch.no_grad()
def check_fold(original: nn.Module, clampable: ClampableModel, x: torch.Tensor, rtol: float = 1e-3) -> float:
    """Largest |difference| of the logits, relative to their scale; raises when folding changed the model."""
    was = original.training
    original.eval()
    clampable.clamp(None)
    # TF32 convolutions (the default on Ampere and later) round differently for the folded weights; the
    # check is about the folding, so it runs in full fp32.
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        reference, folded = original(x).float(), clampable(x).float()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        original.train(was)
    if not torch.isfinite(reference).all():  # not the folding's fault: --no-fold would not help
        raise BnprobeError("the model's own output holds NaN or inf on the first test images (its weights or BN "
                           "statistics are not finite numbers): there is nothing to ablate")
    error = ((reference - folded).abs().max() / reference.abs().max().clamp_min(1e-6)).item()
    if not error <= rtol:  # NaN included
        raise BnprobeError(
            f"folding BN into the convs changed the model's output (relative error {error:.2e}); "
            f"pass --no-fold to mask γ on the BN modules instead"
        )
    return error
