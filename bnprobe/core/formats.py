"""The vocabulary of bnprobe's files, in one place: the names of a run's files, the format names and versions
that bnprobe writes into them, and the choices their settings take. Writers (runs, telemetry, probe, ablate),
readers (bnprobe.files.schema, report, inspect) and bench/ all take them from here.

No imports at all, so config.py (which validates the choices) and schema.py (which reads the files back, and
re-exports these names) can both depend on it without a cycle. The layouts themselves are documented in
docs/hdf5-schema.md and docs/probe-schema.md.
"""

# ---- a run directory: runs/<name>/ ----------------------------------------------------------------------------
CONFIG_FILE = "config.json"  # the TrainConfig, enough to rebuild the model
CHECKPOINT_FILE = "checkpoint.pt"  # latest state (model, optimizer, data RNG, history), rewritten each epoch
METRICS_FILE = "metrics.json"  # per-epoch history, for humans and reports
TELEMETRY_FILE = "telemetry.h5"  # gradient magnitudes and BN snapshots (docs/hdf5-schema.md)
RUN_FILES = (CONFIG_FILE, CHECKPOINT_FILE, METRICS_FILE, TELEMETRY_FILE)
PROBE_FILE = "probe.h5"  # `bnprobe probe`'s default output, beside the checkpoint (docs/probe-schema.md)
# Written into a run that `train --overwrite` sets aside as .NAME.replaced: what bnprobe may move back or delete.
SET_ASIDE_MARKER, SET_ASIDE_FORMAT = ".bnprobe-set-aside", "bnprobe-set-aside"
# `bnprobe ablate`, per mode (--clamp-gamma, --clamp-fraction, --clamp-dims)
ABLATION_FILES = {"threshold": "ablation.h5", "fraction": "ablation-fraction.h5", "dims": "ablation-dims.h5"}

# ---- format names and versions (the `format`/`version` attributes or keys of each file) --------------------------
# Readers accept every earlier version: a version only adds what its comment says.
CHECKPOINT_FORMAT = "bnprobe-checkpoint"
CHECKPOINT_VERSION = 2  # 2: bnprobe_version, the bnprobe that wrote it
TELEMETRY_FORMAT, TELEMETRY_VERSION = "bnprobe-telemetry", 1
# telemetry.h5's parameter groups: a norm layer's γ and β named for its kind (bn_gamma, gn_beta, ...: BatchNorm,
# GroupNorm, LayerNorm or GroupNorm of one group, bnprobe.nets.norms.norm_kind), then the rest.
TELEMETRY_NORM_KINDS = ("bn", "gn", "ln")
NORM_GROUPS = tuple(f"{kind}_{param}" for kind in TELEMETRY_NORM_KINDS for param in ("gamma", "beta"))
PARAMETER_GROUPS = (*NORM_GROUPS, "conv_weight", "linear_weight", "bias")
PROBE_FORMAT = "bnprobe-probe"
# 2: static probes (no forward pass, no relu/ group), layers without affine, layer_order;
# 3: provenance attributes (bnprobe_version, torch_version, options_json);
# 4: every normalisation layer (bn/kind), |γ| quantiles, outlier and recurring dimensions, sharded checkpoints;
# 5: dimensions off in several layers of one width (recurring_off/)
PROBE_VERSION = 5
# probe.h5's bn/kind: what a normalisation layer is as far as its tensors tell (bnprobe.analysis.probe_results)
PROBE_NORM_KINDS = BATCHNORM, SCALE_SHIFT, SCALE_ONLY = ("BatchNorm", "LayerNorm/GroupNorm-like", "RMSNorm-like")
# `bnprobe check --format json` and `bnprobe diff --format json` (docs/check-schema.md)
CHECK_FORMAT, CHECK_VERSION = "bnprobe-check", 1
DIFF_FORMAT, DIFF_VERSION = "bnprobe-diff", 1
ABLATION_FORMAT = "bnprobe-ablation"
# 2: provenance attributes (bnprobe_version, torch_version, options_json);
# 3: mode "dims" (--clamp-dims), labels, evaluation ("images" or "eval": --eval's and --text's metrics in eval/)
ABLATION_VERSION = 3
# `bnprobe export`'s safetensors files (metadata values are text): every tensor, or the seed and what trained
# 2: a compact file's tensors packed one flat tensor per dtype (1 was never released);
# 3: stored_sha256, a hash of the tensors the file stores (version 2 files load, their tensors unverified)
FULL_FORMAT, COMPACT_FORMAT, EXPORT_VERSION = "bnprobe-export", "bnprobe-compact", "3"
EXPORT_VERSIONS = ("2", EXPORT_VERSION)  # what readers accept
EXPORT_FORMATS = (FULL_FORMAT, COMPACT_FORMAT)  # how a safetensors file is known as bnprobe's

# ---- the choices of TrainConfig's settings --------------------------------------------------------------------
# Freeze modes name what stays at init. BN's spelling (non-bn, ...) and the general one (non-norm, ...: whatever
# the --norm layers are) mean the same tensors; a config stores one spelling per norm (core.config.freeze_spelling).
BN_FREEZE_MODES = {"non-norm": "non-bn", "non-norm-output": "non-bn-output", "norm": "bn"}  # general -> BN
FREEZE_MODES = ("none", "non-bn", "non-bn-output", "all-but-output", "bn",
                *BN_FREEZE_MODES)  # also the report's column order
NORMS = ("batch", "group", "layer")  # --norm: BatchNorm2d, GroupNorm, GroupNorm of one group (LayerNorm of conv nets)
BN_PLACEMENTS = ("full", "none", "every-k")
GAMMA_INITS = ("uniform", "ones", "normal")
NORMALIZATIONS = ("per-pixel", "per-channel")
SHORTCUTS = ("A", "B")
DEVICES = ("auto", "cpu", "cuda")
