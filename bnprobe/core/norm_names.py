"""How names, tables and findings show a `--norm`: BN, GN<groups>, LN; and, after a model's name, nothing for
BatchNorm (every run made before `--norm` had it) or the norm's name. Torch-free, for the report and the findings."""

from __future__ import annotations

# --norm's choices (bnprobe.core.formats.NORMS) by their short names; a GroupNorm's name adds its groups.
NORM_SHORT_NAMES = {"batch": "BN", "group": "GN", "layer": "LN"}


def norm_family(norm: str) -> str:
    """BN, GN or LN, without GroupNorm's groups (findings compare GN with BN whatever the groups)."""
    return NORM_SHORT_NAMES.get(norm, str(norm))


def norm_name(norm: str, groups: int) -> str:
    """How names and tables show a --norm: BN, GN<groups>, LN."""
    return f"GN{groups}" if norm == "group" else norm_family(norm)


def norm_suffix(norm: str, groups: int, template: str = " {}") -> str:
    """What follows a model's name: nothing for BatchNorm, else `template` around the norm's name
    (" {}": `resnet20 GN16`, " ({})": `resnet20 (LN)`)."""
    return "" if norm == "batch" else template.format(norm_name(norm, groups))
