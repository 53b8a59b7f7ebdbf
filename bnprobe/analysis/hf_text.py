"""`bnprobe ablate MODEL_FOLDER --text FILE`: the built-in evaluation of a Hugging Face language model, the mean
token loss (natural log) and perplexity on the user's text, tokenised by the folder's own tokenizer and bounded
by --tokens.

Causal LMs predict every token from the ones before it, in windows of --context tokens (no overlap). Masked LMs
predict 15% of the tokens of each window, masked with the tokenizer's mask token; the positions are drawn once
(seed 0), so every row of an ablation masks the same tokens and rows differ only by what was clamped.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from bnprobe.core.errors import BnprobeError, first_line
from bnprobe.core.options import AblateOptions
from bnprobe.files.schema import regular_file

try:
    import transformers
except ImportError:  # hf_models says what to install before anything here runs
    transformers = None

MASK_RATE = 0.15  # BERT's
MAX_TOKENS = 2_000_000  # x BYTES_PER_TOKEN: at most 32 MB of text read and tokenised
BYTES_PER_TOKEN = 16  # read at most this many bytes per wanted token: 3-4x what tokenizers average
BATCH = 8  # windows per forward pass


def load_tokenizer(folder: Path) -> Any:
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - no tokenizer, or one transformers cannot read: one line
        raise BnprobeError(f"--text needs the model's tokenizer in {folder} (tokenizer.json and its config); "
                           f"transformers could not load it: {first_line(exc, typed=True)}")


def read_text(path: Path, tokens: int) -> str:
    """The start of the text file, enough bytes for `tokens` tokens; invalid UTF-8 replaced, never fatal."""
    regular_file(path)
    try:
        with open(path, "rb") as f:
            data = f.read(max(1 << 16, BYTES_PER_TOKEN * tokens))
    except OSError as exc:
        raise BnprobeError(f"cannot read --text {path} ({exc.strerror or exc})") from None
    return data.decode("utf-8", errors="replace")


def text_ids(tokenizer: Any, path: Path, tokens: int) -> torch.Tensor:
    if not 2 <= tokens <= MAX_TOKENS:
        raise BnprobeError(f"--tokens must be in [2, {MAX_TOKENS:,}], got {tokens}")
    ids = tokenizer(read_text(path, tokens), add_special_tokens=False)["input_ids"][:tokens]
    if len(ids) < 2:
        raise BnprobeError(f"--text {path} gives {len(ids)} token(s); at least 2 are needed")
    return torch.tensor(ids, dtype=torch.long)


def windows(ids: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Consecutive windows of `size` tokens (the last one shorter), each with at least 2 tokens."""
    return [w for w in torch.split(ids, size) if w.numel() >= 2]


def causal_measure(model: nn.Module, ids: torch.Tensor, context: int, device: torch.device) -> Callable:
    chunks = windows(ids, context)

    @torch.no_grad()
    def measure() -> dict[str, float]:
        total, count = 0.0, 0
        for start in range(0, len(chunks), BATCH):
            for batch in _same_length(chunks[start:start + BATCH]):
                x = batch.to(device)
                logits = model(input_ids=x).logits.float()
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                       reduction="sum")
                total, count = total + float(loss), count + x[:, 1:].numel()
        return _metrics(total, count)
    return measure


def masked_measure(model: nn.Module, ids: torch.Tensor, context: int, tokenizer: Any,
                   device: torch.device) -> Callable:
    mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise BnprobeError("--text on a masked language model needs a tokenizer with a mask token")
    ends = (tokenizer.cls_token_id, tokenizer.sep_token_id)  # [CLS] ... [SEP], as BERT saw its text
    inner = context - sum(t is not None for t in ends)
    if inner < 2:
        raise BnprobeError(f"--context {context} leaves no room for tokens between [CLS] and [SEP]; pass at least 4")
    generator = torch.Generator().manual_seed(0)
    prepared = []
    for chunk in windows(ids, inner):
        chosen = torch.rand(chunk.numel(), generator=generator) < MASK_RATE
        if not chosen.any():
            chosen[torch.randint(chunk.numel(), (1,), generator=generator)] = True
        x = chunk.masked_fill(chosen, mask_id)
        labels = chunk.masked_fill(~chosen, -100)
        specials = tuple(-100 if t is not None else None for t in ends)  # [CLS]/[SEP] predict nothing
        prepared.append((_wrap(x, ends), _wrap(labels, specials)))

    inputs, targets = [], []  # BATCH windows of one length per forward pass
    for start in range(0, len(prepared), BATCH):
        group = prepared[start:start + BATCH]
        inputs += _same_length([x for x, _ in group])
        targets += _same_length([labels for _, labels in group])

    @torch.no_grad()
    def measure() -> dict[str, float]:
        total, count = 0.0, 0
        for x, labels in zip(inputs, targets):
            logits = model(input_ids=x.to(device)).logits.float()
            target = labels.to(device)
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                           ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
        return _metrics(total, count)
    return measure


def _wrap(t: torch.Tensor, ends: tuple) -> torch.Tensor:
    first, last = ends
    parts = ([t.new_tensor([first])] if first is not None else []) + [t] + (
        [t.new_tensor([last])] if last is not None else [])
    return torch.cat(parts)


def _same_length(chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Stacks of equal-length windows (the last, shorter window goes alone)."""
    groups: dict[int, list[torch.Tensor]] = {}
    for chunk in chunks:
        groups.setdefault(chunk.numel(), []).append(chunk)
    return [torch.stack(group) for group in groups.values()]


def _metrics(total: float, count: int) -> dict[str, float]:
    loss = total / max(1, count)
    if not math.isfinite(loss):
        raise BnprobeError("the model's token loss on --text is not a finite number (its outputs hold NaN or inf)")
    return {"text_loss": loss, "text_perplexity": math.exp(min(loss, 700.0))}


def model_positions(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 30


def text_measure(model: nn.Module, kind: str, folder: Path, settings: AblateOptions,
                 device: torch.device) -> tuple[Callable[[], dict[str, float]], dict[str, Any]]:
    """The --text measurement of `model` and what ablation.h5 records of it."""
    if kind not in ("causal", "masked"):
        raise BnprobeError(f"--text measures causal and masked language models; {type(model).__name__} is "
                           f"neither: pass --eval file.py:evaluate")
    if settings.context < 2:
        raise BnprobeError(f"--context must be >= 2, got {settings.context}")
    context = min(settings.context, model_positions(model))
    tokenizer = load_tokenizer(folder)
    ids = text_ids(tokenizer, Path(settings.text), settings.tokens)
    vocab = model.get_input_embeddings().weight.shape[0] if hasattr(model, "get_input_embeddings") else None
    if vocab is not None and int(ids.max()) >= vocab:
        raise BnprobeError(f"the tokenizer in {folder} gives token id {int(ids.max())}, beyond the model's "
                           f"{vocab} embeddings: tokenizer and model do not belong together")
    if kind == "causal":
        measure = causal_measure(model, ids, context, device)
    else:
        measure = masked_measure(model, ids, context, tokenizer, device)
    return measure, {"text": str(Path(settings.text).resolve()), "text_tokens": int(ids.numel()),
                     "text_context": context, "text_task": kind}
