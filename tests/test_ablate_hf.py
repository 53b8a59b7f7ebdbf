"""bnprobe ablate on Hugging Face transformers model folders (issue 34): a tiny causal LM (GPT-2 config) and a tiny
masked LM (BERT config), random initialisation trained a few hundred steps here on a short text so that the numbers
move, saved with save_pretrained(safe_serialization=True) beside a tokenizer trained on the same text. Each is
ablated by threshold and by --clamp-dims through the CLI, and every row is checked against the model loaded by
transformers itself, its LayerNorm weights edited by hand, and the loss computed here; Gemma's (1 + w) convention
is checked on its RMSNorm; broken folders are one line each."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import assert_one_line_error, run_cli

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402

from bnprobe.analysis.hf_models import expected_offset  # noqa: E402
from bnprobe.nets.clamp_inplace import norm_offset, scale_norms  # noqa: E402

TEXT = " ".join([
    "the cat sat on the mat and the dog sat on the rug .",
    "a bird sang in the tree while the cat slept on the mat .",
    "the dog ran to the park and the bird flew over the tree .",
] * 12)
SPECIALS = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tokenizer_in(folder):
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.WordLevelTrainer(special_tokens=SPECIALS))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(folder)
    return fast


def train_and_save(model, ids, folder, masked, steps):
    """A few hundred Adam steps on the text's windows (masked: 15% of tokens masked, a new draw each step)."""
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    size = 30 if masked else 32  # masked: [CLS] 30 tokens [SEP], as bnprobe's --context 32 feeds it
    x = ids[: (len(ids) // size) * size].reshape(-1, size)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        if masked:
            chosen = torch.rand(x.shape) < 0.15
            wrap = lambda t, first, last: torch.cat(  # noqa: E731
                [torch.full((len(t), 1), first), t, torch.full((len(t), 1), last)], 1)
            out = model(input_ids=wrap(x.masked_fill(chosen, 4), 2, 3),
                        labels=wrap(x.masked_fill(~chosen, -100), -100, -100))
        else:
            out = model(input_ids=x, labels=x)
        out.loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    (root / "text.txt").write_text(TEXT)
    made = {}
    for kind in ("causal", "masked"):
        folder = root / kind
        tokenizer = tokenizer_in(folder)
        vocab = len(tokenizer)
        ids = torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
        torch.manual_seed(1)
        if kind == "causal":
            config = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                             bos_token_id=0, eos_token_id=0)
            model = transformers.GPT2LMHeadModel(config)
        else:
            config = transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                             pad_token_id=1)
            model = transformers.BertForMaskedLM(config)
        train_and_save(model, ids, folder, kind == "masked", steps=200)
        made[kind] = folder
    return root, made


def reference_loss(folder, kind, root, edit, context=32, tokens=400):
    """The model as transformers loads it, weights edited by `edit(model)`, loss computed here on the same
    tokens: causal, every next token of consecutive windows; masked, the positions bnprobe masks (its seed-0
    draw of 15% per window, between [CLS] and [SEP])."""
    cls = transformers.GPT2LMHeadModel if kind == "causal" else transformers.BertForMaskedLM
    model = cls.from_pretrained(folder).float().eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor(tokenizer((root / "text.txt").read_text(), add_special_tokens=False)["input_ids"][:tokens])
    with torch.no_grad():
        edit(model)
        total, count = 0.0, 0
        if kind == "causal":
            for w in torch.split(ids, context):
                logits = model(input_ids=w[None]).logits[0]
                total += float(F.cross_entropy(logits[:-1], w[1:], reduction="sum"))
                count += w.numel() - 1
        else:
            generator = torch.Generator().manual_seed(0)
            for w in torch.split(ids, context - 2):
                chosen = torch.rand(w.numel(), generator=generator) < 0.15
                x = torch.cat([torch.tensor([2]), w.masked_fill(chosen, 4), torch.tensor([3])])
                logits = model(input_ids=x[None]).logits[0, 1:-1]
                total += float(F.cross_entropy(logits[chosen], w[chosen], reduction="sum"))
                count += int(chosen.sum())
    return total / count


def layer_norms(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)]


def run_ablate(capsys, folder, root, out, *flags):
    code, stdout, err = run_cli(capsys, "ablate", folder, "--text", root / "text.txt", "--tokens", "400",
                                "--context", "32", "--device", "cpu", "--out", out, *flags)
    assert code == 0, err
    with h5py.File(out) as f:
        assert f.attrs["evaluation"] == "eval" and f.attrs["text_tokens"] == 400
        rows = {name: f["eval"][name][:] for name in f["eval"]}
        baseline = {name: float(f["eval"][name].attrs["baseline"]) for name in f["eval"]}
        masks, offsets = f["masks"][:], f["layers/offsets"][:]
        names = list(f["layers/names"].asstr()[:])
        labels = list(f["labels"].asstr()[:])
    return rows, baseline, masks, offsets, names, labels, stdout


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_threshold_and_dims_clamps_equal_the_hand_edit(capsys, folders, kind, tmp_path):
    root, made = folders
    folder = made[kind]
    untouched = reference_loss(folder, kind, root, lambda model: None)

    taus = [0.0, 0.9, 1.0]
    rows, baseline, masks, offsets, names, _, stdout = run_ablate(
        capsys, folder, root, tmp_path / "t.h5", "--clamp-gamma", ",".join(map(str, taus)))
    assert baseline["text_loss"] == pytest.approx(untouched, rel=1e-5)
    assert baseline["text_perplexity"] == pytest.approx(math.exp(untouched), rel=1e-5)
    assert rows["text_loss"][0] == baseline["text_loss"] and not masks[0].any()  # nothing clamped, nothing changed
    for i, tau in enumerate(taus):
        def edit(model, tau=tau):
            for _, ln in layer_norms(model):
                ln.weight[ln.weight.abs() < tau] = 0
        assert rows["text_loss"][i] == pytest.approx(reference_loss(folder, kind, root, edit), rel=1e-5)
    assert masks[-1].any() and rows["text_loss"][-1] != baseline["text_loss"]
    assert "text_loss (Δ)" in stdout and "scale w: clamped by w := 0" in stdout.replace("\n", " ")

    rows, baseline, masks, offsets, names, labels, stdout = run_ablate(
        capsys, folder, root, tmp_path / "d.h5", "--clamp-dims", "3,17", "--clamp-dims", "random:2",
        "--zero-beta", "--repeats", "2")
    assert labels[0] == "dims 3,17 @32" and len(labels) == 3
    assert all(offsets[i + 1] - offsets[i] == 32 for i in range(len(names)))  # every LayerNorm is 32 wide
    for row in range(3):
        chosen = np.flatnonzero(masks[row][:32])
        if row == 0:
            assert chosen.tolist() == [3, 17]

        def edit(model, chosen=chosen):
            for _, ln in layer_norms(model):
                ln.weight[chosen] = 0
                ln.bias[chosen] = 0
        assert rows["text_loss"][row] == pytest.approx(reference_loss(folder, kind, root, edit), rel=1e-5)
    assert rows["text_loss"][0] != baseline["text_loss"]


def test_user_eval_on_a_transformers_model_and_text_together(capsys, folders, tmp_path):
    root, made = folders
    (tmp_path / "lm_eval.py").write_text(
        "import torch\n"
        "def evaluate(model):\n"
        "    x = torch.arange(2, 12)[None]\n"
        "    return {'logit_norm': model(input_ids=x).logits.norm()}\n")
    rows, baseline, *_ = run_ablate(capsys, made["causal"], root, tmp_path / "e.h5", "--clamp-gamma", "0.95",
                                    "--eval", f"{tmp_path / 'lm_eval.py'}:evaluate")
    assert set(rows) == {"text_loss", "text_perplexity", "logit_norm"}
    model = transformers.GPT2LMHeadModel.from_pretrained(made["causal"]).eval()
    with torch.no_grad():
        assert baseline["logit_norm"] == pytest.approx(float(model(input_ids=torch.arange(2, 12)[None]).logits.norm()),
                                                       rel=1e-5)


def test_gemma_scale_is_one_plus_w_and_clamps_to_minus_one():
    config = transformers.GemmaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    model = transformers.GemmaForCausalLM(config)
    norms = scale_norms(model)
    assert norms and {offset for _, _, offset in norms} == {1.0} == {expected_offset("gemma")}
    _, module, _ = norms[0]
    with torch.no_grad():
        module.weight.fill_(0.5)
        module.weight[2] = -1.0  # effective scale 1 + w = 0: dimension 2 silenced
        out = module(torch.randn(3, 8))
    assert torch.all(out[:, 2] == 0) and torch.all(out[:, [0, 1, 3]] != 0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2))
    assert {offset for _, _, offset in scale_norms(llama)} == {0.0} == {expected_offset("llama")}
    assert norm_offset(torch.nn.LayerNorm(4)) == 0.0


def test_broken_folders_are_one_line(capsys, folders, tmp_path):
    root, made = folders
    import shutil

    remote = tmp_path / "remote"
    shutil.copytree(made["causal"], remote)
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling_x.X"}}))
    unknown = tmp_path / "unknown"
    shutil.copytree(made["causal"], unknown)
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model"}))
    mismatch = tmp_path / "mismatch"
    shutil.copytree(made["causal"], mismatch)
    (mismatch / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    text = root / "text.txt"
    for folder, flags, pattern in (
        (remote, ["--text", text], "never runs it (trust_remote_code)"),
        (unknown, ["--text", text], "does not know model_type 'no-such-model'"),
        (mismatch, ["--text", text], "the weights do not match the model config.json builds: missing transformer.h.2"),
        (made["causal"], [], "--text FILE"),
        (made["causal"], ["--text", text, "--dataset", "mnist"], "--dataset is for image models"),
        (made["causal"], ["--text", tmp_path / "nothing.txt"], "no such file"),
    ):
        code, _, err = run_cli(capsys, "ablate", folder, "--clamp-gamma", "0.5", "--device", "cpu",
                               "--out", tmp_path / "x.h5", *flags)
        assert_one_line_error(code, err, pattern)


def test_without_transformers_one_line_says_what_to_install(capsys, folders, monkeypatch, tmp_path):
    import bnprobe.analysis.hf_models as hf_models

    root, made = folders
    monkeypatch.setattr(hf_models, "transformers", None)
    code, _, err = run_cli(capsys, "ablate", made["masked"], "--text", root / "text.txt", "--clamp-gamma", "0.5",
                           "--device", "cpu", "--out", tmp_path / "x.h5")
    assert_one_line_error(code, err, "pip install 'bnprobe[hf]'")


def test_a_config_far_larger_than_its_weights_is_refused_before_it_is_built(capsys, folders, tmp_path, monkeypatch):
    """A config.json asking for 10^12 parameters: checked against the file on the meta device, never allocated."""
    import shutil

    import bnprobe.analysis.hf_models as hf_models

    root, made = folders
    huge = tmp_path / "huge"
    shutil.copytree(made["causal"], huge)
    config = json.loads((huge / "config.json").read_text())
    (huge / "config.json").write_text(json.dumps({**config, "n_embd": 1 << 16, "n_layer": 200}))
    built = []
    real_build = hf_models.build_model
    monkeypatch.setattr(hf_models, "build_model", lambda *a, **k: built.append(k.get("meta")) or real_build(*a, **k))
    code, _, err = run_cli(capsys, "ablate", huge, "--text", root / "text.txt", "--clamp-gamma", "0.5",
                           "--device", "cpu", "--out", tmp_path / "x.h5")
    assert_one_line_error(code, err, "the weights do not match the model config.json builds")
    assert built == [True]


def test_gemma_through_the_cli_clamps_the_effective_scale_as_a_hand_edit_of_w_to_minus_one(capsys, tmp_path):
    """A tiny Gemma (random init, its RMSNorm weights spread so that thresholds pick some), --eval, threshold and
    --clamp-dims rows against w := -1 by hand on the model transformers loads."""
    torch.manual_seed(0)
    config = transformers.GemmaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    model = transformers.GemmaForCausalLM(config)
    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module).__name__ == "GemmaRMSNorm":
                module.weight.copy_(torch.randn(module.weight.shape) * 0.6)  # effective scales 1 + w around 1
    model.save_pretrained(tmp_path / "gemma", safe_serialization=True)
    (tmp_path / "g_eval.py").write_text(
        "import torch\n"
        "def evaluate(model):\n"
        "    return {'logit_sum': model(input_ids=torch.arange(1, 9)[None]).logits.double().abs().sum()}\n")

    def reference(edit):
        loaded = transformers.GemmaForCausalLM.from_pretrained(tmp_path / "gemma").float().eval()
        with torch.no_grad():
            for name, module in loaded.named_modules():
                if type(module).__name__ == "GemmaRMSNorm":
                    edit(module)
            return float(loaded(input_ids=torch.arange(1, 9)[None]).logits.double().abs().sum())

    out = tmp_path / "g.h5"
    code, stdout, err = run_cli(capsys, "ablate", tmp_path / "gemma", "--eval", f"{tmp_path / 'g_eval.py'}:evaluate",
                                "--clamp-gamma", "0,0.5", "--device", "cpu", "--out", out)
    assert code == 0, err
    assert "effective scale 1 + w (Gemma style): clamped by w := -1" in stdout.replace("\n", " ")
    with h5py.File(out) as f:
        rows, masks = f["eval/logit_sum"][:], f["masks"][:]
        assert f.attrs["scale_offsets"] == "1"

    def below(module, tau=0.5):
        module.weight[(1 + module.weight).abs() < tau] = -1
    assert masks[1].any() and rows[0] == pytest.approx(reference(lambda m: None), rel=1e-5)
    assert rows[1] == pytest.approx(reference(below), rel=1e-5) and rows[1] != rows[0]
    code, _, err = run_cli(capsys, "ablate", tmp_path / "gemma", "--eval", f"{tmp_path / 'g_eval.py'}:evaluate",
                           "--clamp-dims", "2,5", "--device", "cpu", "--out", tmp_path / "d.h5")
    assert code == 0, err
    with h5py.File(tmp_path / "d.h5") as f:
        row = f["eval/logit_sum"][0]

    def dims(module):
        if module.weight.numel() == 8:  # the hidden-width norms; the 4-wide q/k norms (if any) keep theirs
            module.weight[[2, 5]] = -1
    assert row == pytest.approx(reference(dims), rel=1e-5)


def test_a_sharded_folder_reads_every_shard(capsys, folders, tmp_path):
    import shutil

    root, made = folders
    sharded = tmp_path / "sharded"
    model = transformers.GPT2LMHeadModel.from_pretrained(made["causal"])
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="40KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(made["causal"] / name, sharded / name)
    assert (sharded / "model.safetensors.index.json").exists() and len(list(sharded.glob("model-*.safetensors"))) > 1
    whole = run_ablate(capsys, made["causal"], root, tmp_path / "a.h5", "--clamp-dims", "3")
    parts = run_ablate(capsys, sharded, root, tmp_path / "b.h5", "--clamp-dims", "3")
    assert whole[0]["text_loss"].tolist() == parts[0]["text_loss"].tolist()
    assert whole[1] == parts[1]
