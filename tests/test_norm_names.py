"""How a --norm is shown (bnprobe.core.norm_names): BN, GN<groups>, LN, and nothing after a BatchNorm model's name,
in run names, tables and findings alike."""

from bnprobe.core.config import TrainConfig
from bnprobe.core.formats import NORMS
from bnprobe.core.norm_names import norm_family, norm_name, norm_suffix


def test_a_norm_is_shown_one_way_everywhere():
    """BN, GN<groups>, LN, and nothing after a BatchNorm model's name: in run names, tables and findings alike."""
    for norm in NORMS:
        for groups in (1, 4, 16):
            config = TrainConfig(model="resnet8", dataset="digits", norm=norm, norm_groups=groups).resolved()
            assert config.run_name().startswith(f"resnet8{norm_suffix(norm, groups, '-{}').lower()}-digits-")
    assert [norm_name(norm, 16) for norm in NORMS] == ["BN", "GN16", "LN"]
    assert [norm_family(norm) for norm in NORMS] == ["BN", "GN", "LN"]
    assert [norm_suffix(norm, 8, " ({})") for norm in NORMS] == ["", " (GN8)", " (LN)"]
