"""A bnprobe run's normalisation layers as training started them: the model rebuilt from the run's config and
seed (bnprobe.files.compact.regenerate, the draw a compact export relies on), for `bnprobe diff --from-init RUN`:
what training changed. Kept apart from diff.py because it builds a model, so it needs torch; diff of two files
does not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bnprobe.analysis.static import norms_from_tensors
from bnprobe.core.errors import BnprobeError
from bnprobe.files.checkpoints import check_checkpoint, read_weights
from bnprobe.files.file_tensors import FileTensors, checkpoint_file, checkpoint_label, is_bnprobe_checkpoint
from bnprobe.files.compact import regenerate


def initial_norms(path: Path) -> tuple[Any, str, Path]:
    """(NormStats at initialisation, label, file) of a bnprobe run (its directory, checkpoint or export)."""
    file = checkpoint_file(path)
    state = read_weights(file)
    if not is_bnprobe_checkpoint(state):
        raise BnprobeError(f"{file}: --from-init needs a bnprobe run (its config and seed rebuild the initial "
                           f"state); this checkpoint has neither")
    config = check_checkpoint(state, file)
    initial, _, _ = regenerate(config)
    bn = norms_from_tensors(FileTensors(initial, "bnprobe", "model", [], "file"), file, "all")
    label = checkpoint_label(file, path)
    return bn, f"{label} at init", file.resolve()
