"""A plan's [ablate] as each of its runs carries it: the file its clamp sweep writes into the run directory, and
its options as the plain dict a job is given (JSON on a local worker's command line, pickled by submitit), read
back on the other side."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

from bnprobe.core.formats import ABLATION_FILES
from bnprobe.core.options import AblateOptions


def ablation_file(run_dir: Path, options: Optional[AblateOptions]) -> Optional[Path]:
    """Where a run's ablation goes (ablation.h5, ablation-fraction.h5, ... by mode); None without [ablate]."""
    return run_dir / ABLATION_FILES[options.mode] if options else None


def ablation_to_job(options: Optional[AblateOptions]) -> Optional[dict[str, Any]]:
    """The options as a job's argument: a dict of plain values, None without [ablate]."""
    return dataclasses.asdict(options) if options else None


def ablation_from_job(data: Optional[dict[str, Any]]) -> Optional[AblateOptions]:
    """ablation_to_job's dict back as the options."""
    return AblateOptions(**data) if data else None
