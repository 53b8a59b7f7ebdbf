"""`bnprobe probe FILE.gguf`: files written by llama.cpp's own `gguf` writer (plain, quantized, big-endian, a
7B-shaped sparse one), every number checked against numpy on the arrays written; the reader checked against the
`gguf` package's reader; and hostile files, each one line."""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run_cli
from gguf import GGMLQuantizationType as Q
from gguf import GGUFEndian, GGUFReader, GGUFWriter
from gguf.quants import quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnprobe.analysis.probe_results import QUANTILE_LEVELS
from bnprobe.analysis.static import static_probe
from bnprobe.core.errors import BnprobeError
from bnprobe.files.gguf import GGUFTensor, read_gguf

TAUS = [0.001, 0.01, 0.05, 0.1]
OFF = 0.05
FACTOR = 10.0


def write_gguf(path: Path, arch: str, tensors: list[tuple[str, np.ndarray, Q | None]], meta: dict | None = None,
               endian: GGUFEndian = GGUFEndian.LITTLE) -> None:
    """A GGUF file by llama.cpp's writer: (name, array, raw type or None) in this order; metadata by its adders."""
    writer = GGUFWriter(path, arch, endianess=endian)
    for key, value in (meta or {}).items():
        if key == "general.alignment":  # (the writer pads to it only when told so)
            writer.add_custom_alignment(value)
            continue
        {str: writer.add_string, int: writer.add_uint32, float: writer.add_float32,
         list: writer.add_array}[type(value)](key, value)
    for name, array, raw in tensors:
        writer.add_tensor(name, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gammas(rng: np.random.Generator, width: int, blocks: int) -> np.ndarray:
    """(blocks, width) norm weights as trained ones look: a bulk near 0.3, a few channels near or exactly 0 (off),
    a negative one, and dimension 5 far above the rest in every block (a recurring outlier)."""
    g = rng.uniform(0.1, 0.6, (blocks, width)).astype(np.float32)
    g[:, 3] = 0.0
    g[:, 9] = rng.uniform(-0.04, 0.04, blocks)
    g[:, 11] = -0.3
    g[:, 5] = rng.uniform(20, 40, blocks)
    return g


def llama_tensors(rng: np.random.Generator, blocks: int, width: int, quant: Q | None) -> tuple[list, dict]:
    """A llama-like model's tensors in a converter's order: blocks in the order of their names as text (blk.10
    before blk.2, as a conversion from a lexicographic index writes them); big weights quantized when `quant`.
    Returns the tensors and the norms' weights in depth order."""
    attn, ffn, q_norm = gammas(rng, width, blocks), gammas(rng, width, blocks), gammas(rng, 16, blocks)
    final = gammas(rng, width, 1)[0]

    def big(rows: int, cols: int) -> tuple[np.ndarray, Q | None]:
        weight = rng.standard_normal((rows, cols)).astype(np.float32)
        return (quantize(weight, quant), quant) if quant is not None else (weight.astype(np.float16), None)

    tensors = [("token_embd.weight", *big(100, width))]
    for b in sorted(range(blocks), key=str):
        tensors += [(f"blk.{b}.attn_q.weight", *big(width, width)),
                    (f"blk.{b}.attn_norm.weight", attn[b], None),
                    (f"blk.{b}.attn_q_norm.weight", q_norm[b], None),
                    (f"blk.{b}.ffn_down.weight", *big(width, 2 * width)),
                    (f"blk.{b}.ffn_norm.weight", ffn[b], None)]
    tensors += [("output_norm.weight", final, None), ("output.weight", *big(100, width))]
    norms = {}
    for b in range(blocks):
        norms.update({f"blk.{b}.attn_norm": attn[b], f"blk.{b}.attn_q_norm": q_norm[b], f"blk.{b}.ffn_norm": ffn[b]})
    norms["output_norm"] = final
    return tensors, norms


def probe(capsys, tmp_path, *files):
    out = tmp_path / "probe.h5"
    code, stdout, err = run_cli(capsys, "probe", *files, "--taus", ",".join(map(str, TAUS)), "--off-threshold", OFF,
                                "--out", out)
    assert code == 0, err
    return out, " ".join(stdout.split())


def check_numbers(group: h5py.Group, f: h5py.File, layers: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Every number of one checkpoint's group against numpy on the arrays written (γ, β: NaN where none)."""
    assert list(group["bn/names"].asstr()[:]) == list(layers)
    gammas_ = [g for g, _ in layers.values()]
    offsets = group["bn/offsets"][:]
    np.testing.assert_array_equal(group["bn/channels"][:], [g.size for g in gammas_])
    outlier_dims = group["bn/outlier_dims"][:]
    outlier_offsets = group["bn/outlier_offsets"][:]
    for i, (gamma, beta) in enumerate(layers.values()):
        a = np.abs(gamma)
        np.testing.assert_array_equal(group["bn/gamma"][offsets[i]:offsets[i + 1]], gamma)
        np.testing.assert_array_equal(group["bn/beta"][offsets[i]:offsets[i + 1]], beta)
        np.testing.assert_array_equal(group["bn/frac_below"][i], [np.mean(a < t) for t in TAUS])
        assert group["bn/off"][i] == np.sum(a < OFF)
        assert group["bn/mean_abs_gamma"][i] == pytest.approx(a.mean(), rel=1e-12)
        np.testing.assert_allclose(group["bn/abs_gamma_quantiles"][i], np.quantile(a, QUANTILE_LEVELS), rtol=1e-12)
        np.testing.assert_array_equal(outlier_dims[outlier_offsets[i]:outlier_offsets[i + 1]],
                                      np.flatnonzero(a > FACTOR * np.median(a)))
        np.testing.assert_array_equal(group["bn/gamma_hist"][i], np.histogram(gamma, bins=f["gamma_edges"][:])[0])
    everything = np.abs(np.concatenate(gammas_))
    np.testing.assert_array_equal(group["frac_below_all"][:], [np.mean(everything < t) for t in TAUS])
    assert group.attrs["bn_layers"] == len(layers) and group.attrs["bn_channels"] == everything.size
    assert group.attrs["off"] == np.sum(everything < OFF)
    assert group.attrs["mean_abs_gamma"] == pytest.approx(everything.mean(), rel=1e-12)
    assert group.attrs["source"] == "file" and not group.attrs["forward_pass"] and "relu" not in group
    # A dimension is recurring where it is an outlier in 2 or more layers of one width: by the definition.
    found: dict[tuple[int, int], int] = {}
    for gamma in gammas_:
        a = np.abs(gamma)
        for dim in np.flatnonzero(a > FACTOR * np.median(a)):
            found[(a.size, int(dim))] = found.get((a.size, int(dim)), 0) + 1
    recurring = {key: n for key, n in found.items() if n >= 2}
    got = dict(zip(zip(group["recurring/width"][:].tolist(), group["recurring/dim"][:].tolist()),
                   group["recurring/layers"][:].tolist()))
    assert got == recurring and recurring


@pytest.mark.parametrize("quant", [None, Q.Q8_0, Q.Q4_0], ids=["f16 weights", "Q8_0", "Q4_0"])
def test_a_llama_like_gguf_is_probed_with_every_number_checked(capsys, tmp_path, monkeypatch, quant):
    tensors, norms = llama_tensors(np.random.default_rng(1), 12, 64, quant)
    meta = {"general.name": "tiny-llama", "llama.block_count": 12, "llama.embedding_length": 64,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "tokenizer.ggml.tokens": [f"t{i}" for i in range(300)],
            "tokenizer.ggml.scores": [float(i) for i in range(300)]}
    write_gguf(tmp_path / "tiny-llama.gguf", "llama", tensors, meta)
    read = []  # which tensors' bytes are read: the norms', never a quantized weight's
    real_read = GGUFTensor.read
    monkeypatch.setattr(GGUFTensor, "read", lambda self: read.append(self.name) or real_read(self))
    out, stdout = probe(capsys, tmp_path, tmp_path / "tiny-llama.gguf")
    assert sorted(read) == sorted(f"{name}.weight" for name in norms)
    nan = lambda g: np.full(g.size, np.nan)  # noqa: E731 - an RMSNorm has no β
    with h5py.File(out) as f:
        g = f["checkpoints/000"]
        check_numbers(g, f, {name: (gamma.astype(np.float64), nan(gamma)) for name, gamma in norms.items()})
        assert g.attrs["file_format"] == "gguf" and g.attrs["layer_order"] == "file blocks"
        assert g.attrs["gguf_architecture"] == "llama" and g.attrs["gguf_name"] == "tiny-llama"
        assert g.attrs["gguf_blocks"] == 12 and g.attrs["gguf_embedding_length"] == 64
        assert g.attrs["tensors"] == len(tensors) and set(g["bn/kind"].asstr()[:]) == {"RMSNorm-like"}
        types = {name: "F32" if raw is None and array.dtype == np.float32 else raw.name if raw else "F16"
                 for name, array, raw in tensors}
        counts = sorted(((list(types.values()).count(t), t) for t in set(types.values())), reverse=True)
        assert sorted(g.attrs["gguf_tensor_types"].split(", "), reverse=True) == [f"{n} {t}" for n, t in counts]
        assert g.attrs["gguf_quantized_tensors"] == (0 if quant is None else 2 + 2 * 12)
    assert "GGUF v3, architecture llama ('tiny-llama'), 12 blocks, embedding length 64, RMS ε 1e-05" in stdout
    assert ("quantized tensors' bytes are not read" in stdout) == (quant is not None)
    assert "blk.10.attn_norm" in stdout and "numeric order of N" in stdout


@pytest.mark.parametrize("storage", ["F32", "F16", "BF16", "F64"])
def test_a_layernorm_model_in_every_plain_storage_type(capsys, tmp_path, storage):
    """GPT-2-like names (attn_norm with a bias, token_embd_norm before the blocks as in BLOOM), big-endian too."""
    rng = np.random.default_rng(2)
    weights, biases = gammas(rng, 32, 4), rng.normal(0, 0.2, (4, 32)).astype(np.float32)
    embd, embd_bias = gammas(rng, 32, 1)[0], rng.normal(0, 0.2, 32).astype(np.float32)

    def stored(x: np.ndarray) -> tuple[np.ndarray, Q | None, np.ndarray]:
        """What is written, its raw type, and the numbers it holds (float64)."""
        if storage == "BF16":
            bits = (x.view(np.uint32) >> 16).astype(np.uint16)
            return bits, Q.BF16, (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        dtype = {"F32": np.float32, "F16": np.float16, "F64": np.float64}[storage]
        return x.astype(dtype), None, x.astype(dtype).astype(np.float64)

    tensors, layers = [], {}
    for b in range(4):
        w, b_ = stored(weights[b]), stored(biases[b])
        tensors += [(f"blk.{b}.attn_norm.weight", w[0], w[1]), (f"blk.{b}.attn_norm.bias", b_[0], b_[1]),
                    (f"blk.{b}.attn_qkv.weight", rng.standard_normal((96, 32)).astype(np.float32), None)]
        layers[f"blk.{b}.attn_norm"] = (w[2], b_[2])
    w, b_ = stored(embd), stored(embd_bias)
    tensors += [("token_embd_norm.weight", w[0], w[1]), ("token_embd_norm.bias", b_[0], b_[1])]  # last in the file
    layers = {"token_embd_norm": (w[2], b_[2]), **layers}  # first in depth
    for endian, name in ((GGUFEndian.LITTLE, "le.gguf"), (GGUFEndian.BIG, "be.gguf")):
        write_gguf(tmp_path / name, "gpt2", tensors, {"gpt2.attention.layer_norm_epsilon": 1e-5}, endian)
    out, stdout = probe(capsys, tmp_path, tmp_path / "le.gguf", tmp_path / "be.gguf")
    with h5py.File(out) as f:
        for index in ("000", "001"):
            check_numbers(f[f"checkpoints/{index}"], f, layers)
            assert set(f[f"checkpoints/{index}/bn/kind"].asstr()[:]) == {"LayerNorm/GroupNorm-like"}
            np.testing.assert_array_equal(f[f"checkpoints/{index}/bn/off_dead"][:],
                                          [np.sum((np.abs(g) < OFF) & (b <= 0)) for g, b in layers.values()])
    assert "architecture gpt2, LayerNorm ε 1e-05; tensors:" in stdout


def test_the_reader_agrees_with_llama_cpps_own(tmp_path):
    tensors, _ = llama_tensors(np.random.default_rng(3), 3, 64, Q.Q4_0)
    meta = {"general.name": "x", "general.alignment": 64, "llama.block_count": 3,
            "tokenizer.ggml.tokens": [f"tok{i}" for i in range(200)], "short": [1, 2, 3]}
    write_gguf(tmp_path / "m.gguf", "llama", tensors, meta)
    ours, theirs = read_gguf(tmp_path / "m.gguf"), GGUFReader(tmp_path / "m.gguf")
    # Every value type, as llama.cpp's writer writes each.
    writer = GGUFWriter(tmp_path / "types.gguf", "llama")
    values = {"u8": (writer.add_uint8, 200), "i8": (writer.add_int8, -5), "u16": (writer.add_uint16, 60000),
              "i16": (writer.add_int16, -30000), "u32": (writer.add_uint32, 4_000_000_000),
              "i32": (writer.add_int32, -2_000_000_000), "f32": (writer.add_float32, 0.5),
              "bool": (writer.add_bool, True), "u64": (writer.add_uint64, 1 << 60), "i64": (writer.add_int64, -(1 << 60)),
              "f64": (writer.add_float64, 1e-300), "text": (writer.add_string, "ünï\x1b"),
              "nested": (writer.add_array, [[1, 2], [3]]), "words": (writer.add_array, ["a", "bc"])}
    for key, (add, value) in values.items():
        add(key, value)
    writer.add_tensor("n.weight", np.ones(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    got = read_gguf(tmp_path / "types.gguf").metadata
    for key, (_, value) in values.items():
        if isinstance(value, list):
            items = [item.items if hasattr(item, "items") else item for item in got[key].items]
            assert items == value and got[key].count == len(value), key
        else:
            assert got[key] == value and type(got[key]) is type(value), key
    assert ours.alignment == 64 and ours.metadata["general.name"] == "x" and ours.metadata["llama.block_count"] == 3
    assert ours.metadata["tokenizer.ggml.tokens"].count == 200 and ours.metadata["short"].items == [1, 2, 3]
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert (mine.shape, mine.type, mine.start, mine.nbytes) == (
            tuple(reversed([int(n) for n in t.shape])), t.tensor_type.name, t.data_offset, t.n_bytes)
        if mine.quantized:
            with pytest.raises(BnprobeError, match="is quantized"):
                mine[:]
        else:
            np.testing.assert_array_equal(mine[:], t.data)


def test_a_folder_holding_one_gguf_file_is_probed_and_two_are_refused(capsys, tmp_path):
    tensors, norms = llama_tensors(np.random.default_rng(4), 2, 32, Q.Q8_0)
    folder = tmp_path / "TinyLlama-GGUF"
    folder.mkdir()
    write_gguf(folder / "model.Q8_0.gguf", "llama", tensors)
    (folder / "README.md").write_text("a model card")
    out, stdout = probe(capsys, tmp_path, folder)
    with h5py.File(out) as f:
        assert list(f["labels"].asstr()[:]) == ["TinyLlama-GGUF"]
        assert list(f["checkpoints/000/bn/names"].asstr()[:]) == list(norms)
    write_gguf(folder / "model.Q4_0.gguf", "llama", tensors)
    code, _, err = run_cli(capsys, "probe", folder, "--out", tmp_path / "two.h5")
    assert_one_line_error(code, err, "holds 2 GGUF files (model.Q4_0.gguf, model.Q8_0.gguf); pass the one")
    code, _, err = run_cli(capsys, "probe", folder / "model.Q4_0.gguf", "--model", "resnet8", "--dataset", "digits",
                           "--out", tmp_path / "m.h5", "--no-download")
    assert_one_line_error(code, err, "a GGUF file is probed from its files alone")


def test_a_split_model_is_read_whole_from_any_part_or_its_folder(capsys, tmp_path):
    """gguf-split's parts (PREFIX-0000i-of-0000N.gguf, the metadata in the first): every part's norms, in depth."""
    tensors, norms = llama_tensors(np.random.default_rng(7), 5, 32, Q.Q8_0)
    folder = tmp_path / "split"
    folder.mkdir()
    writer = GGUFWriter(folder / "m.gguf", "llama", split_max_tensors=8)
    writer.add_name("split")
    for name, array, raw in tensors:
        writer.add_tensor(name, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    parts = sorted(folder.iterdir())
    assert [p.name for p in parts] == [f"m-{i:05d}-of-00004.gguf" for i in range(1, 5)]
    out, stdout = probe(capsys, tmp_path, parts[0], parts[2], folder)
    nan = lambda g: np.full(g.size, np.nan)  # noqa: E731
    with h5py.File(out) as f:
        for index in ("000", "001", "002"):
            g = f[f"checkpoints/{index}"]
            check_numbers(g, f, {name: (gamma.astype(np.float64), nan(gamma)) for name, gamma in norms.items()})
            assert g.attrs["gguf_parts"] == 4 and g.attrs["gguf_name"] == "split" and g.attrs["tensors"] == len(tensors)
    assert "GGUF v3 (split in 4 parts), architecture llama ('split')" in stdout
    # A part missing, or renamed out of gguf-split's scheme: one line each.
    parts[3].rename(tmp_path / "away.gguf")
    code, _, err = run_cli(capsys, "probe", parts[1], "--out", tmp_path / "x.h5")
    assert_one_line_error(code, err, "part m-00004-of-00004.gguf of this split GGUF model is missing (1 of 4")
    (tmp_path / "away.gguf").rename(tmp_path / "m.gguf")
    code, _, err = run_cli(capsys, "probe", tmp_path / "m.gguf", "--out", tmp_path / "x.h5")
    assert_one_line_error(code, err, "a part of a split GGUF model (split.count 4), not named as gguf-split names")
    (tmp_path / "m.gguf").rename(folder / "m-00003-of-00004.gguf.bak")
    parts[2].rename(folder / "m-00004-of-00004.gguf")  # part 3 where part 4 should be: its split.no says 2
    (folder / "m-00003-of-00004.gguf.bak").rename(parts[2])
    code, _, err = run_cli(capsys, "probe", folder, "--out", tmp_path / "x.h5")
    assert_one_line_error(code, err, "its split.no and split.count do not say part")


# Architectures of transformers, tiny and randomly initialised, named as llama.cpp's converter names them (the
# gguf package's own tensor map): (model type, gguf architecture, config, the prefix the converter drops first).
ARCHITECTURES = {
    "llama": ("LLAMA", {}, ""),
    "gemma2": ("GEMMA2", {"head_dim": 8}, ""),  # four norms a block
    "gemma3_text": ("GEMMA3", {"head_dim": 8}, ""),  # and q/k norms
    "qwen3": ("QWEN3", {"head_dim": 8}, ""),  # q/k norms of the head's width
    "olmo2": ("OLMO2", {}, ""),  # post-norms only
    "gpt2": ("GPT2", {"n_embd": 32, "n_layer": 3, "n_head": 4, "n_positions": 64, "bos_token_id": 0,
                      "eos_token_id": 0}, ""),  # LayerNorm with bias
    "falcon": ("FALCON", {"new_decoder_architecture": True, "num_kv_heads": 2}, ""),  # two parallel LayerNorms
    "bloom": ("BLOOM", {"n_layer": 3, "n_head": 4}, "transformer."),  # a LayerNorm on the embeddings
}


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_every_norm_of_a_real_architecture_under_llama_cpps_names(capsys, tmp_path, model_type):
    """Ground truth from the module types (every module whose class is a norm and holds tensors), names from the
    gguf package's own map of Hugging Face names to GGUF names, values as the converter stores them (Gemma's
    norms with the 1 of `x * (1 + w)` added), big weights Q8_0: every norm found, nothing else, in depth order."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch, changes, dropped = ARCHITECTURES[model_type]
    config = AutoConfig.for_model(model_type, **{"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                                                 "num_hidden_layers": 3, "num_attention_heads": 4,
                                                 "max_position_embeddings": 64, **changes})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), 3)
    to_gguf = lambda name: names.get_name(name.removeprefix(dropped), try_suffixes=(".weight", ".bias"))  # noqa
    layers = {}  # GGUF layer -> (γ, β) as stored, in module order
    with torch.no_grad():
        for module_name, module in model.named_modules():
            tensors = dict(module.named_parameters(recurse=False))
            if "norm" in type(module).__name__.lower() and tensors:
                for tensor in tensors.values():
                    tensor.uniform_(-0.5, 1.5)
                weight = tensors["weight"].double().numpy() + (1.0 if arch.startswith("GEMMA") else 0.0)
                bias = tensors["bias"].double().numpy() if "bias" in tensors else np.full(weight.size, np.nan)
                layers[to_gguf(f"{module_name}.weight").removesuffix(".weight")] = (weight, bias)
    stored = []
    for name, tensor in model.state_dict().items():
        target = to_gguf(name)
        if target is None or target in {t[0] for t in stored}:
            continue  # (a tied output head, which the converter leaves out)
        array = tensor.float().numpy()
        if target.removesuffix(".weight") in layers and target.endswith(".weight") and arch.startswith("GEMMA"):
            array = array + 1  # what llama.cpp's Gemma converters do to every norm weight
        if array.ndim == 2 and array.shape[1] % 32 == 0:
            stored.append((target, quantize(array, Q.Q8_0), Q.Q8_0))
        else:
            stored.append((target, array.astype(np.float32), None))
    assert len(layers) >= 7 and all(name for name in layers)
    write_gguf(tmp_path / f"{model_type}.gguf", model_type.removesuffix("_text"), stored)
    out, _ = probe(capsys, tmp_path, tmp_path / f"{model_type}.gguf")
    with h5py.File(out) as f:
        check_numbers_plain(f["checkpoints/000"], layers)


def check_numbers_plain(group: h5py.Group, layers: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """γ, β, kinds and off counts per layer, in this order, against the arrays."""
    assert list(group["bn/names"].asstr()[:]) == list(layers)
    offsets = group["bn/offsets"][:]
    kinds = ["LayerNorm/GroupNorm-like" if np.isfinite(b).all() else "RMSNorm-like" for _, b in layers.values()]
    assert list(group["bn/kind"].asstr()[:]) == kinds
    for i, (gamma, beta) in enumerate(layers.values()):
        np.testing.assert_allclose(group["bn/gamma"][offsets[i]:offsets[i + 1]], gamma, rtol=1e-6)
        np.testing.assert_allclose(group["bn/beta"][offsets[i]:offsets[i + 1]], beta, rtol=1e-6)
        assert group["bn/off"][i] == np.sum(np.abs(gamma.astype(np.float32)) < OFF)


# ---- a 7B-shaped quantized file, sparse on disk -------------------------------------------------------------------

LLAMA_7B = (32, 4096, 11008, 32000)  # blocks, width, MLP, vocabulary


def write_sparse_7b(path: Path) -> dict[str, np.ndarray]:
    """Llama-2-7B's tensors as a Q4_0 conversion holds them (Q6_K output, F32 norms), by llama.cpp's writer: the
    header and metadata (a 32,000-token vocabulary) written, the norms' bytes written, the rest left as holes."""
    blocks, width, mlp, vocab = LLAMA_7B
    rng = np.random.default_rng(5)
    shapes = [("token_embd.weight", (vocab, width), Q.Q4_0)]
    for b in range(blocks):
        shapes += [(f"blk.{b}.attn_{p}.weight", (width, width), Q.Q4_0) for p in ("q", "k", "v", "output")]
        shapes += [(f"blk.{b}.ffn_gate.weight", (mlp, width), Q.Q4_0), (f"blk.{b}.ffn_up.weight", (mlp, width), Q.Q4_0),
                   (f"blk.{b}.ffn_down.weight", (width, mlp), Q.Q4_0), (f"blk.{b}.attn_norm.weight", (width,), Q.F32),
                   (f"blk.{b}.ffn_norm.weight", (width,), Q.F32)]
    shapes += [("output_norm.weight", (width,), Q.F32), ("output.weight", (vocab, width), Q.Q6_K)]
    writer = GGUFWriter(path, "llama")
    writer.add_name("Llama-2-7B-shaped")
    writer.add_block_count(blocks)
    writer.add_embedding_length(width)
    writer.add_array("tokenizer.ggml.tokens", [f"<tok{i}>" for i in range(vocab)])
    nbytes = {}
    for name, shape, kind in shapes:
        block, block_bytes = {Q.F32: (1, 4), Q.Q4_0: (32, 18), Q.Q6_K: (256, 210)}[kind]
        nbytes[name] = math.prod(shape) // block * block_bytes
        writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes[name], raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]
    start = GGUFWriter.ggml_pad(fout.tell(), 32)
    norms, offset = {}, 0
    for name, shape, kind in shapes:
        if kind == Q.F32:
            norms[name.removesuffix(".weight")] = gamma = gammas(rng, width, 1)[0]
            fout.seek(start + offset)
            fout.write(gamma.tobytes())
        offset += GGUFWriter.ggml_pad(nbytes[name], 32)
    fout.truncate(start + offset)
    writer.close()
    return norms


def test_a_7b_shaped_quantized_gguf_is_probed_in_well_under_a_second(capsys, tmp_path):
    norms = write_sparse_7b(tmp_path / "llama-2-7b.Q4_0.gguf")
    assert (tmp_path / "llama-2-7b.Q4_0.gguf").stat().st_size > 3.5e9  # 3.6 GiB, nearly all holes
    started = time.perf_counter()
    result = static_probe(tmp_path / "llama-2-7b.Q4_0.gguf")
    seconds = time.perf_counter() - started
    assert seconds < 1.0, seconds  # about 0.02 s on an idle core
    assert result.bn.names == list(norms) and len(norms) == 65
    for name, gamma in zip(result.bn.names, result.bn.gamma):
        np.testing.assert_array_equal(gamma, norms[name].astype(np.float64))
    assert result.attrs["gguf_quantized_tensors"] == 32 * 7 + 2 and result.attrs["gguf_tensor_types"] == (
        "225 Q4_0, 65 F32, 1 Q6_K")
    out, stdout = probe(capsys, tmp_path, tmp_path / "llama-2-7b.Q4_0.gguf")
    assert "32 blocks, embedding length 4,096" in stdout


# ---- hostile files -----------------------------------------------------------------------------------------------


def s(text: bytes | str) -> bytes:
    text = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(text)) + text


def kv(key: str, kind: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", kind) + payload


def info(name: str, dims: list[int], kind: int = 0, offset: int = 0) -> bytes:
    return s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack(
        "<IQ", kind, offset)


def hand_made(kvs: list[bytes] = (), infos: list[bytes] | None = None, data: bytes | None = None, version: int = 3,
              counts: tuple[int, int] | None = None, alignment: int = 32) -> bytes:
    """A GGUF file byte by byte: one F32 norm of 8 unless told otherwise."""
    infos = [info("blk.0.attn_norm.weight", [8])] if infos is None else infos
    data = np.linspace(0.1, 0.8, 8, dtype=np.float32).tobytes() if data is None else data
    counts = counts or (len(infos), len(kvs))
    head = b"GGUF" + struct.pack("<IQQ", version, *counts) + b"".join(kvs) + b"".join(infos)
    return head + b"\0" * (-len(head) % alignment) + data


HOSTILE = {
    "empty": (b"", "truncated: 0 bytes"),
    "not GGUF": (b"PK\x03\x04" + b"\0" * 40, "not a GGUF file: it starts with b'PK\\x03\\x04'"),
    "version 1": (hand_made(version=1), "GGUF version 1; bnprobe reads versions 2 and 3 (version 1 is from"),
    "version 99": (hand_made(version=99), "GGUF version 99"),
    "2^62 tensors": (hand_made(counts=(1 << 62, 0)), "its tensor count is 4,611,686,018,427,387,904, more than"),
    "a million tensors": (hand_made(counts=(1 << 19, 0)), "its tensor count is 524,288, more than the"),
    "2^40 metadata entries": (hand_made(counts=(1, 1 << 40)), "its metadata count is 1,099,511,627,776, more than"),
    "a key of 2^63 bytes": (hand_made([struct.pack("<Q", 1 << 63)]), "metadata key 0 (9,223,372,036,854,775,808 "
                                                                      "bytes) needs"),
    "a string of 2^50 bytes": (hand_made([kv("general.name", 8, struct.pack("<Q", 1 << 50))]),
                               "metadata 'general.name' (1,125,899,906,842,624 bytes) needs"),
    "2^60 strings": (hand_made([kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 1 << 60))]),
                     "the item count of metadata 'tokenizer.ggml.tokens' is 1,152,921,504,606,846,976, more than"),
    "a vocabulary cut short": (hand_made([kv("t", 9, struct.pack("<IQ", 8, 100) + s("a") * 99 + struct.pack(
        "<Q", 1 << 40))]), "metadata 't'[99] (a string) runs past the end of the file"),
    "an unknown value type": (hand_made([kv("x", 13, b"\0" * 8)]), "metadata 'x' has the unknown value type 13"),
    "an array of an unknown type": (hand_made([kv("x", 9, struct.pack("<IQ", 77, 1))]),
                                    "metadata 'x' is an array of the unknown value type 77"),
    "arrays nested 4 deep": (hand_made([kv("x", 9, struct.pack("<IQ", 9, 1) * 3 + struct.pack("<IQ", 9, 1) +
                                           struct.pack("<IQ", 4, 1) + b"\0" * 4)]),
                             "nests arrays more than 3 deep"),
    "a key twice": (hand_made([kv("x", 4, b"\0" * 4)] * 2), "metadata key 'x' appears twice"),
    "alignment 3": (hand_made([kv("general.alignment", 4, struct.pack("<I", 3))]),
                    "general.alignment must be a power of 2, not 3"),
    "alignment 0": (hand_made([kv("general.alignment", 4, struct.pack("<I", 0))]),
                    "general.alignment must be a power of 2, not 0"),
    "alignment as text": (hand_made([kv("general.alignment", 8, s("32"))]),
                          "general.alignment must be a power of 2, not '32'"),
    "an offset past the end": (hand_made(infos=[info("blk.0.attn_norm.weight", [8], 0, 1 << 40)]),
                               "tensor 'blk.0.attn_norm.weight' (32 bytes at offset 1,099,511,627,776 of the data"),
    "an unaligned offset": (hand_made(infos=[info("blk.0.attn_norm.weight", [8], 0, 4)], data=b"\0" * 64),
                            "the offset 4 of tensor 'blk.0.attn_norm.weight' is not a multiple of the alignment 32"),
    "an unknown ggml type": (hand_made(infos=[info("blk.0.attn_norm.weight", [8], 99)]),
                             "tensor 'blk.0.attn_norm.weight' has the unknown ggml type 99"),
    "5 dimensions": (hand_made(infos=[info("w", [1] * 5)]), "tensor 'w' has 5 dimensions (GGUF allows at most 4)"),
    "2^80 elements": (hand_made(infos=[info("w", [1 << 40, 1 << 40])]), "tensor 'w' claims "
                                                                         "1,208,925,819,614,629,174,706,176 elements"),
    "a partial quantized block": (hand_made(infos=[info("w", [33, 2], 8)]), "tensor 'w' (Q8_0, blocks of 32) has rows"),
    "a tensor twice": (hand_made(infos=[info("n.weight", [8])] * 2), "1 tensor name(s) appear twice"),
    "a data section cut short": (hand_made(data=b"\0" * 16), "ends past the end of the file"),
    "a name of 2^20 bytes": (hand_made(infos=[s("n" * (1 << 20)) + b"\0" * 24]),
                             "the name of tensor 0 is longer than 1,024 bytes"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_gguf_file_is_one_line_in_bounded_memory(capsys, tmp_path, case):
    content, pattern = HOSTILE[case]
    (tmp_path / "bad.gguf").write_bytes(content)
    run_cli(capsys, "probe", tmp_path / "bad.gguf", "--out", tmp_path / "warm.h5")  # imports made before measuring
    tracemalloc.start()
    try:
        code, _, err = run_cli(capsys, "probe", tmp_path / "bad.gguf", "--out", tmp_path / "bad.h5")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_one_line_error(code, err, pattern)
    assert "bad.gguf" in err and peak < 8 << 20, peak  # a count or a length is never allocated
    assert not (tmp_path / "bad.h5").exists()


def test_every_cut_of_a_real_file_is_one_line(capsys, tmp_path):
    tensors, _ = llama_tensors(np.random.default_rng(6), 2, 32, Q.Q8_0)
    write_gguf(tmp_path / "whole.gguf", "llama", tensors, {"general.name": "cut", "tokenizer.ggml.tokens": ["a"] * 80})
    whole = (tmp_path / "whole.gguf").read_bytes()
    stored = read_gguf(tmp_path / "whole.gguf").tensors.values()
    data_start, data_end = min(t.start for t in stored), max(t.start + t.nbytes for t in stored)
    for cut in sorted({1, 5, 12, 20, 30, 60, 200, 500, data_start - 1, data_end - 1}):
        (tmp_path / "cut.gguf").write_bytes(whole[:cut])
        code, _, err = run_cli(capsys, "probe", tmp_path / "cut.gguf", "--out", tmp_path / "cut.h5")
        assert_one_line_error(code, err, "truncated")


def test_a_tensor_quantized_or_cut_after_its_header_was_read(tmp_path):
    write_gguf(tmp_path / "m.gguf", "llama", [("a.weight", np.ones(64, np.float32), None),
                                               ("b.weight", quantize(np.ones((2, 32), np.float32), Q.Q8_0), Q.Q8_0)])
    file = read_gguf(tmp_path / "m.gguf")
    with pytest.raises(BnprobeError, match=r"b\.weight is quantized \(Q8_0\); bnprobe reads the F32"):
        file.tensors["b.weight"][:]
    with open(tmp_path / "m.gguf", "r+b") as f:
        f.truncate(file.tensors["a.weight"].start + 10)
    with pytest.raises(BnprobeError, match=r"a\.weight ends past the end of the file"):
        file.tensors["a.weight"][:]


def test_a_gguf_file_by_its_first_bytes_and_a_norm_of_integers(capsys, tmp_path):
    (tmp_path / "v2.gguf").write_bytes(hand_made(version=2))  # version 2: the layout of version 3
    out, _ = probe(capsys, tmp_path, tmp_path / "v2.gguf")
    with h5py.File(out) as f:
        assert f["checkpoints/000"].attrs["gguf_version"] == 2
        np.testing.assert_array_equal(f["checkpoints/000/bn/gamma"][:], np.linspace(0.1, 0.8, 8, dtype=np.float32))
    write_gguf(tmp_path / "m.gguf", "llama", [("blk.0.attn_norm.weight", np.linspace(0, 1, 32, dtype=np.float32), None),
                                               ("blk.0.ffn_norm.weight", np.arange(32, dtype=np.int32), None)])
    (tmp_path / "m.gguf").rename(tmp_path / "weights.bin")  # no .gguf: known by its first bytes, GGUF
    code, _, err = run_cli(capsys, "probe", tmp_path / "weights.bin", "--out", tmp_path / "p.h5")
    assert_one_line_error(code, err, "blk.0.ffn_norm.weight holds int32, not the floating-point numbers")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6))
def test_changed_bytes_are_read_or_refused_never_a_crash(tmp_path, changes):
    base = hand_made([kv("general.name", 8, s("fuzz")), kv("v", 9, struct.pack("<IQ", 8, 3) + s("ab") * 3),
                      kv("general.alignment", 4, struct.pack("<I", 32))],
                     [info("blk.0.attn_norm.weight", [8]), info("blk.0.ffn_norm.weight", [8], 0, 32)],
                     np.arange(16, dtype=np.float32).tobytes() + b"\0" * 32)
    content = bytearray(base)
    for position, byte in changes:
        content[position % len(content)] = byte
    (tmp_path / "fuzz.gguf").write_bytes(bytes(content))
    try:
        file = read_gguf(tmp_path / "fuzz.gguf")
        for tensor in file.tensors.values():
            if not tensor.quantized:
                assert tensor[:].size == math.prod(tensor.shape)
    except BnprobeError as exc:
        assert "\n" not in str(exc) and "fuzz.gguf" in str(exc)


def test_the_gguf_reader_needs_neither_torch_nor_the_gguf_package(tmp_path):
    write_gguf(tmp_path / "m.gguf", "llama", [("output_norm.weight", np.linspace(0, 1, 32, dtype=np.float32), None)])
    code = ("import sys; sys.modules['gguf'] = None; from pathlib import Path; from bnprobe.files.gguf import read_model; "
            f"print(read_model(Path({str(tmp_path / 'm.gguf')!r})).tensors['output_norm.weight'][:].sum(), "
            "'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.stdout.split() == ["16.0", "False"]
