"""The measure of issue 32: every normalisation layer of real architectures (timm: one model of every family
it lists, and more; Hugging Face transformers: a suite of 55 families, every model type under BNPROBE_RECALL=all,
`make recall`) is found from its state dict's names and shapes alone, and nothing else is, against the truth of
the module types (tests/norm_truth.py). Built on the meta device: nothing downloaded, no weight allocated. A few
of them go end to end through `bnprobe probe` as sparse safetensors files, one of them sharded."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from cli_helpers import run_cli
from norm_truth import (
    architectures,
    build_timm,
    build_transformers,
    run_everything,
    truth,
    write_sparse_safetensors,
)

from bnprobe.analysis.norm_finder import candidate_names, find_norms
from bnprobe.core.formats import BATCHNORM

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("timm")
pytest.importorskip("transformers")

# timm models beside each family's smallest: the norm kinds a family's smallest does not show (ConvNeXt V2's
# GlobalResponseNorm, GroupNorm in a ResNet, EvoNorm B and S, an NFNet's absence of norms).
TIMM_EXTRA = ("convnextv2_atto", "resnet50_gn", "regnetz_b16_evos", "efficientnet_b0_g16_evos", "dm_nfnet_f0")
# Norm layers missed by design (docs/probes-and-ablations.md), in architectures of BNPROBE_RECALL=all only:
# (library, architecture) -> the module's own name (its last part) -> why the names and shapes cannot tell.
BY_DESIGN = {
    ("transformers", "ergo"): {"post_expert_norm": "ErgoExpertNorm: one RMSNorm per expert stacked in a 2-D weight "
                                                   "(experts, width), the shape of a projection"},
    ("transformers", "phi4_multimodal"): {
        "encoder_embedding": "Phi4MultimodalAudioMeanVarianceNormLayer: a fixed input standardisation "
                             "(global_mean, global_invstd), no scale"},
    ("transformers", "vibevoice"): {"act": "VibeVoiceRMSNorm registered as `act`: an activation's name"},
    ("transformers", "zaya"): {"qk_norm": "ZayaQKNorm: a QK-norm's learned temperature (2 values), no per-channel "
                                          "scale"},
}
ARCHITECTURES = [*architectures(run_everything()), *(("timm", name) for name in TIMM_EXTRA)]
MEASURED: dict[tuple[str, str], tuple[int, int, int]] = {}  # (library, name) -> (norm layers, found, by design)
UNBUILT: set[tuple[str, str]] = set()  # model types whose default config does not build here (BNPROBE_RECALL=all)


def build(library: str, name: str) -> torch.nn.Module:
    try:
        return build_timm(name) if library == "timm" else build_transformers(name)
    except Exception as exc:  # noqa: BLE001 - a model type that needs a library or settings this machine lacks
        if library == "transformers" and run_everything():
            UNBUILT.add((library, name))
            pytest.skip(f"{name} cannot be built from its default config here: {type(exc).__name__}")
        raise


@pytest.mark.parametrize("library,name", ARCHITECTURES, ids=[f"{lib}:{name}" for lib, name in ARCHITECTURES])
def test_every_norm_layer_is_found_and_nothing_else(library, name):
    model = build(library, name)
    norms, shapes = truth(model)
    modules = dict(model.named_modules())
    expected_missed = {module: kind for module, kind in norms.items()
                       if module.rpartition(".")[2] in BY_DESIGN.get((library, name), {})}
    # A file: its candidates picked by names alone, then decided by shapes; a sharded checkpoint picks its
    # candidates without the unnamed scales (they would open shards): both find the same layers.
    for unnamed in (True, False):
        chosen = candidate_names(list(shapes), unnamed=unnamed)
        found = find_norms({key: shape for key, shape in shapes.items() if key in chosen})
        got = {layer.name: layer for layer in found.layers}
        missed = {module: kind for module, kind in norms.items() if module not in got}
        assert missed == expected_missed, f"{name}: missed {missed}"
        assert set(got) <= set(norms), f"{name}: not norms: {sorted(set(got) - set(norms))}"
        assert not found.unnamed, f"{name}: unnamed scales {found.unnamed}"
        for module, layer in got.items():  # BatchNorm exactly where the module keeps running statistics
            assert (layer.kind == BATCHNORM) == (getattr(modules[module if module != "(top level)" else ""],
                                                         "running_mean", None) is not None), module
    MEASURED[(library, name)] = (len(norms), len(norms) - len(missed), len(expected_missed))


def test_the_recall_figure():
    """Over every architecture above: all found (but the ones missed by design), none too many; the figure the
    README states."""
    if len(MEASURED) + len(UNBUILT) < len(ARCHITECTURES):
        pytest.skip("needs every architecture of this module measured first")
    layers, found, by_design = (sum(column) for column in zip(*MEASURED.values()))
    print(f"\n{len(MEASURED)} architectures ({len(UNBUILT)} more not built here), {layers:,} norm layers, "
          f"{found:,} found, {by_design} missed by design")
    assert len(MEASURED) >= 60 and layers > 2_000 and found + by_design == layers
    if not run_everything():  # the figure the README and the docs state (timm and transformers are pinned)
        for page in ("README.md", "docs/probes-and-ablations.md"):
            text = " ".join((ROOT / page).read_text().split())
            assert re.search(rf"\b{len(MEASURED)} (real )?architectures", text), page
            assert f"all {layers:,} norm layers" in text, page


def _sparse_model_file(model: torch.nn.Module, path, shards: int = 1) -> dict[str, torch.Tensor]:
    """The model's state dict as sparse safetensors (one file, or `shards` files with their index): its norm
    tensors random (seeded), every other tensor a hole. Returns the norm tensors written."""
    norms, shapes = truth(model)
    state = model.state_dict()
    found = find_norms(shapes)
    generator = torch.Generator().manual_seed(0)
    values = {key: torch.randn(state[key].shape, generator=generator) for key in sorted(found.tensor_names)
              if state[key].is_floating_point()}
    names = list(state)
    if shards == 1:
        write_sparse_safetensors(path / "model.safetensors", state, values)
        return values
    where = {}
    for number in range(shards):
        part = names[number::shards]
        file = f"model-{number + 1:05d}-of-{shards:05d}.safetensors"
        write_sparse_safetensors(path / file, {k: state[k] for k in part},
                                 {k: v for k, v in values.items() if k in part})
        where.update(dict.fromkeys(part, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": where}))
    return values


@pytest.mark.parametrize("library,name,shards", [("timm", "convnextv2_atto", 1), ("timm", "resnet50_gn", 1),
                                                 ("transformers", "convnextv2", 3)])
def test_real_architectures_end_to_end_from_sparse_files(capsys, tmp_path, library, name, shards):
    model = build(library, name)
    norms, _ = truth(model)
    folder = tmp_path / name
    folder.mkdir()
    values = _sparse_model_file(model, folder, shards)
    code, _, err = run_cli(capsys, "probe", folder, "--out", tmp_path / "probe.h5")
    assert code == 0, err
    with h5py.File(tmp_path / "probe.h5") as f:
        g = f["checkpoints/000"]
        names = list(g["bn/names"].asstr()[:])
        assert sorted(names) == sorted(norms) and g.attrs["scale_offset"] == 0.0
        offsets, gamma = g["bn/offsets"][:], g["bn/gamma"][:]
        for layer, name_ in enumerate(names):  # each layer's γ, flat over its shape, as written
            scale = next(values[k] for k in (f"{name_}.weight", f"{name_}.gamma") if k in values)
            np.testing.assert_array_equal(gamma[offsets[layer]:offsets[layer + 1]], scale.double().numpy().ravel())
