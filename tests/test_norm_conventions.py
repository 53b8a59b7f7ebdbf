"""Norm layers the names alone missed and the scale convention (issue 32, points 1 and 4): a LayerNorm over
several dimensions and a GroupNorm inside nn.Sequential, and the Gemma family's 1 + w, each number checked
against a direct computation on the tensors written."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn
from cli_helpers import assert_one_line_error, run_cli
from safetensors.torch import save_file

from bnprobe.core.options import OFF_THRESHOLD

TAUS = (0.01, 0.05, 0.1)
LEVELS = (0.0, 0.01, 0.25, 0.5, 0.75, 0.99, 1.0)
FACTOR = 10.0  # --outlier-factor's default


def probe(capsys, tmp_path, *args):
    out = tmp_path / "probe.h5"
    code, stdout, err = run_cli(capsys, "probe", *args, "--taus", ",".join(map(str, TAUS)), "--out", out)
    assert code == 0, err
    return h5py.File(out), " ".join(stdout.split())


def check_layer(g, layer: int, gamma: np.ndarray, beta: np.ndarray | None) -> None:
    """Every per-layer number of probe.h5 against the same measure computed here on γ (flat)."""
    gamma = gamma.astype(np.float64).ravel()
    lo, hi = g["bn/offsets"][layer], g["bn/offsets"][layer + 1]
    np.testing.assert_array_equal(g["bn/gamma"][lo:hi], gamma)
    if beta is not None:
        np.testing.assert_array_equal(g["bn/beta"][lo:hi], beta.astype(np.float64).ravel())
    assert g["bn/channels"][layer] == gamma.size
    np.testing.assert_allclose(g["bn/abs_gamma_quantiles"][layer], np.quantile(np.abs(gamma), LEVELS))
    np.testing.assert_array_equal(g["bn/frac_below"][layer], [np.mean(np.abs(gamma) < t) for t in TAUS])
    assert g["bn/off"][layer] == np.sum(np.abs(gamma) < OFF_THRESHOLD)
    starts = g["bn/outlier_offsets"][:]
    outliers = np.flatnonzero(np.abs(gamma) > FACTOR * np.median(np.abs(gamma)))
    np.testing.assert_array_equal(g["bn/outlier_dims"][starts[layer]:starts[layer + 1]], outliers)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layernorm = nn.LayerNorm([1, 264])
        self.proj = nn.Linear(264, 8)


class Multi(nn.Module):
    """A GroupNorm(4, 512) in nn.Sequential (`input_stack.1`) and a LayerNorm([1, 264]) named encoder.layernorm."""

    def __init__(self):
        super().__init__()
        self.input_stack = nn.Sequential(nn.Conv2d(3, 512, 3), nn.GroupNorm(4, 512), nn.ReLU())
        self.encoder = Encoder()


def spread(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """γ with a few channels off (|γ| < 0.01) and a few outliers (50x the bulk)."""
    gamma = torch.rand(*shape, generator=generator) + 0.5
    flat = gamma.view(-1)
    flat[:5] = torch.tensor([0.0, 1e-4, -3e-3, 0.02, -0.2])
    flat[-3:] = torch.tensor([50.0, -60.0, 45.0])
    return gamma


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_a_multi_dimensional_layernorm_and_a_groupnorm_in_sequential(capsys, tmp_path, fmt):
    generator = torch.Generator().manual_seed(3)
    model = Multi()
    with torch.no_grad():
        model.input_stack[1].weight.copy_(spread(generator, 512))
        model.input_stack[1].bias.copy_(torch.randn(512, generator=generator))
        model.encoder.layernorm.weight.copy_(spread(generator, 1, 264))
        model.encoder.layernorm.bias.copy_(torch.randn(1, 264, generator=generator))
    state = model.state_dict()
    path = tmp_path / ("multi.pt" if fmt == "torch" else "multi.safetensors")
    torch.save(state, path) if fmt == "torch" else save_file(state, str(path))
    f, text = probe(capsys, tmp_path, path)
    with f:
        g = f["checkpoints/000"]
        layers = probed_layers(g)  # (a torch file in registration order, safetensors in the names' order)
        assert sorted(layers) == ["encoder.layernorm", "input_stack.1"]
        assert list(g["bn/kind"].asstr()[:]) == ["LayerNorm/GroupNorm-like"] * 2
        for prefix, layer in layers.items():
            check_layer(g, layer, state[f"{prefix}.weight"].numpy(), state[f"{prefix}.bias"].numpy())
        assert g["bn/channels"][layers["input_stack.1"]] == 512 and g["bn/channels"][layers["encoder.layernorm"]] == 264
        assert g.attrs["scale_offset"] == 0.0 and g.attrs["unnamed_scales"] == 0
    assert "norm layers / channels 2 / 776" in text


def gemma_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A 2-block Gemma-shaped state dict: RMSNorms (stored w, effective 1 + w: w = -1 is off, w near 0 is a full
    channel), projections, and a SigLIP-like vision LayerNorm with a bias (plain w in Gemma's family)."""
    width = 64
    state = {"model.embed_tokens.weight": torch.randn(100, width, generator=generator)}
    for block in range(2):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            w = torch.randn(width, generator=generator) * 0.1
            w[:3] = torch.tensor([-1.0, -1.0 + 1e-3, -0.995])  # effective 0, 1e-3, 5e-3: off
            state[f"model.layers.{block}.{norm}.weight"] = w
        state[f"model.layers.{block}.self_attn.q_proj.weight"] = torch.randn(width, width, generator=generator)
    state["model.norm.weight"] = torch.randn(width, generator=generator) * 0.1
    state["vision_tower.post_layernorm.weight"] = torch.rand(32, generator=generator) + 0.5
    state["vision_tower.post_layernorm.bias"] = torch.randn(32, generator=generator)
    return state


NORMS = ["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm", "model.layers.1.input_layernorm",
         "model.layers.1.post_attention_layernorm", "model.norm", "vision_tower.post_layernorm"]


def gemma_folder(tmp_path, config: dict | None, name: str = "gemma") -> tuple:
    folder = tmp_path / name
    folder.mkdir()
    state = gemma_state(torch.Generator().manual_seed(7))
    save_file(state, str(folder / "model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder, state


def probed_layers(g) -> dict[str, int]:
    return {name: i for i, name in enumerate(g["bn/names"].asstr()[:])}


@pytest.mark.parametrize("config", [{"model_type": "gemma"}, {"model_type": "gemma2"},
                                    {"model_type": "paligemma", "text_config": {"model_type": "gemma2"}}])
def test_a_gemma_folder_is_measured_on_one_plus_w(capsys, tmp_path, config):
    folder, state = gemma_folder(tmp_path, config)
    f, text = probe(capsys, tmp_path, folder)
    with f:
        g = f["checkpoints/000"]
        layers = probed_layers(g)
        assert sorted(layers) == sorted(NORMS)
        for name in NORMS[:5]:  # the RMSNorms: 1 + w
            check_layer(g, layers[name], 1.0 + state[f"{name}.weight"].double().numpy(), None)
        vision = "vision_tower.post_layernorm"  # a LayerNorm with a bias: w as stored
        check_layer(g, layers[vision], state[f"{vision}.weight"].numpy(), state[f"{vision}.bias"].numpy())
        assert g.attrs["scale_offset"] == 1.0
        assert config["model_type"] in g.attrs["scale_convention"] and "1 + w" in g.attrs["scale_convention"]
        assert g.attrs["off"] == 4 * 3  # the three channels at w ≈ -1 of each block norm, nothing else
    assert "Scale: 1 + w: config.json: model_type" in text and "(5 layers shifted)" in text


def test_scale_offset_says_it_for_a_file_with_no_config(capsys, tmp_path):
    folder, state = gemma_folder(tmp_path, None)
    f, text = probe(capsys, tmp_path, folder / "model.safetensors", "--scale-offset", "1")
    with f:
        g = f["checkpoints/000"]
        layers = probed_layers(g)
        for name in NORMS:  # every norm but BatchNorm, the LayerNorm with a bias too (LayerNorm1P's convention)
            bias = state.get(f"{name}.bias")
            check_layer(g, layers[name], 1.0 + state[f"{name}.weight"].double().numpy(),
                        None if bias is None else bias.numpy())
        assert g.attrs["scale_offset"] == 1.0 and "--scale-offset 1" in g.attrs["scale_convention"]
    assert "Scale: 1 + w: --scale-offset 1" in text


@pytest.mark.parametrize("config, why", [
    ({"model_type": "llama"}, "model_type llama, not of the Gemma family"),
    ({"model_type": "gemma3n_text"}, "model_type gemma3n_text, not of the Gemma family"),  # Gemma 3n: plain w
    (None, "no config.json beside the weights"),
    ("{not json", "config.json unreadable (JSONDecodeError"),
])
def test_other_folders_are_measured_on_w_as_stored(capsys, tmp_path, config, why):
    folder, state = gemma_folder(tmp_path, None if isinstance(config, str) else config)
    if isinstance(config, str):
        (folder / "config.json").write_text(config)
    f, text = probe(capsys, tmp_path, folder)
    with f:
        g = f["checkpoints/000"]
        layers = probed_layers(g)
        for name in NORMS:
            check_layer(g, layers[name], state[f"{name}.weight"].numpy(), None)
        assert g.attrs["scale_offset"] == 0.0 and why in g.attrs["scale_convention"]
        # w = -1 is far from 0 as stored: off are the small w, counted here
        assert g.attrs["off"] == sum(int(np.sum(np.abs(state[f"{name}.weight"].numpy()) < OFF_THRESHOLD))
                                     for name in NORMS)
    assert "Scale: w as stored: " in text and why in text


def test_a_bad_scale_offset_is_one_line(capsys, tmp_path):
    folder, _ = gemma_folder(tmp_path, None)
    code, _, err = run_cli(capsys, "probe", folder, "--scale-offset", "0.5", "--out", tmp_path / "p.h5")
    assert_one_line_error(code, err, "--scale-offset must be 0 (the scale is w as stored) or 1")
    assert not (tmp_path / "p.h5").exists()


def test_a_lone_weight_in_sequential_is_an_unnamed_scale_and_an_nfnet_has_no_norm(capsys, tmp_path):
    """A weight alone in nn.Sequential (here a PReLU: an RMSNorm stores the same) is listed, not counted; a file
    with no norm at all says so first (an NFNet: weight-standardised convs' gains are not norms)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.PReLU(8), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
    torch.save(model.state_dict(), tmp_path / "prelu.pt")
    f, text = probe(capsys, tmp_path, tmp_path / "prelu.pt")
    with f:
        g = f["checkpoints/000"]
        assert list(g["bn/names"].asstr()[:]) == ["3"] and g.attrs["unnamed_scales"] == 1
        assert g.attrs["unnamed_scale_names"] == "1 (8,)"
    assert "1 unnamed scale(s), not counted as norms" in text
    torch.save({"stem.conv.weight": torch.ones(8, 3, 3, 3), "stem.conv.bias": torch.zeros(8),
                "stem.conv.gain": torch.ones(8, 1, 1, 1), "head.fc.weight": torch.ones(10, 8)}, tmp_path / "nf.pt")
    code, _, err = run_cli(capsys, "probe", tmp_path / "nf.pt", "--out", tmp_path / "nf.h5")
    assert_one_line_error(code, err, "nf.pt: no normalisation layer: 4 tensors")


@pytest.mark.parametrize("shapes, norms, unnamed", [
    # a weight and a bias of one shape, whatever the name; a Linear's and a conv's never share it
    ({"stem.0.weight": (8, 3, 4, 4), "stem.0.bias": (8,), "stem.1.weight": (8,), "stem.1.bias": (8,),
      "head.weight": (10, 8), "head.bias": (10,)}, ["stem.1"], []),
    ({"grn.weight": (1, 1, 1, 8), "grn.bias": (1, 1, 1, 8), "enc.ln.weight": (1, 264), "enc.ln.bias": (1, 264)},
     ["grn", "enc.ln"], []),
    ({"LayerNorm.gamma": (8,), "LayerNorm.beta": (8,), "blocks.0.gamma": (8,)}, ["LayerNorm"], []),  # TF-era names
    # EvoNorm B (running_var alone) and S (v); a BatchNorm-named RMSNorm; a list of norms; I-BERT's extra shift
    ({"e.weight": (8,), "e.bias": (8,), "e.running_var": (8,), "s.weight": (8,), "s.bias": (8,), "s.v": (8,),
      "conv_stem.bn.weight": (8,), "q_layernorm.norms.0.weight": (4,), "LayerNorm.weight": (8,),
      "LayerNorm.bias": (8,), "LayerNorm.shift": (1,)},
     ["e", "s", "conv_stem.bn", "q_layernorm.norms.0", "LayerNorm"], []),
    # a weight alone: a Linear without bias, a LayerScale, a PReLU named act: none; in nn.Sequential: unnamed
    ({"mlp.fc1.weight": (16, 8), "ls1.gamma": (8,), "mlp.act.weight": (8,), "net.2.weight": (8,),
      "net.3.weight": (8, 8), "acts.0.weight": (8,)}, [], ["net.2.weight"]),
    # an NFNet's conv: weight, bias and gain; weight standardisation is not a norm
    ({"stem.conv.weight": (8, 3, 3, 3), "stem.conv.bias": (8,), "stem.conv.gain": (8, 1, 1, 1)}, [], []),
])
def test_the_finder_rules_on_names_and_shapes(shapes, norms, unnamed):
    from bnprobe.analysis.norm_finder import candidate_names, find_norms

    found = find_norms(shapes)
    assert [layer.name for layer in found.layers] == norms
    assert [name for name, _ in found.unnamed] == unnamed
    # by names alone, a superset of what is found (a sharded checkpoint's selection: without unnamed scales)
    assert found.tensor_names <= candidate_names(list(shapes), unnamed=False)
    assert set(unnamed) <= candidate_names(list(shapes))


def test_the_finder_and_the_conventions_need_no_torch():
    code = ("import sys, bnprobe.analysis.norm_finder, bnprobe.analysis.conventions; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0  # (PYTHONPATH passed on: this worktree's)


def test_gguf_is_read_as_stored_whatever_config_sits_beside_it(tmp_path):
    """llama.cpp adds Gemma's 1 when it converts: a GGUF file's kind decides before any config.json."""
    from bnprobe.analysis.conventions import scale_convention

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma2"}))
    weights = tmp_path / "model.gguf"
    gguf = scale_convention(weights, "gguf")
    assert gguf.offset == 0.0 and "GGUF stores the effective scale" in gguf.why
    assert scale_convention(tmp_path / "model.safetensors", "safetensors").offset == 1.0
    assert scale_convention(weights, "gguf", 1.0).offset == 1.0  # the user's word wins
