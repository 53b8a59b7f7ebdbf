"""The `bnprobe` command: a thin shell over the library. Bad input ends in one line on stderr, exit 2."""

from __future__ import annotations

import functools
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

try:  # typer >= 0.23 vendors click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover
    import click.exceptions

    ClickException = click.exceptions.ClickException
    # click < 8.2 prints the help itself when no command is given
    NoArgsIsHelpError = getattr(click.exceptions, "NoArgsIsHelpError", type("NoArgsIsHelpError", (Exception,), {}))

from bnprobe.core.config import TrainConfig
from bnprobe.core.errors import BnprobeError, check_int, check_path_length, printable
from bnprobe.core.options import (
    OFF_THRESHOLD,
    REPORT_TAUS,
    SWEEP_SYNTAX,
    AblateOptions,
    LoadOptions,
    ProbeOptions,
    parse_sweep,
)  # no torch: --help stays fast
from bnprobe.flags import command_with_config

app = typer.Typer(
    help="Study what BatchNorm's gamma and beta can do on their own: train, probe, ablate, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: "[default: ...]" and TOML's "[[grid]]" print as written
)
console = Console()


def _print_version(value: bool) -> None:
    if value:
        from bnprobe import __version__

        print(f"bnprobe {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version."),
) -> None:
    """Study what BatchNorm's gamma and beta can do on their own: train, probe, ablate, report."""


def command(*args: Any, **kwargs: Any) -> Callable[[Callable], Callable]:
    """app.command, with every path argument's length checked first: a name over 255 bytes is one line, where
    any call on it would raise OSError (File name too long)."""

    def wrap(func: Callable) -> Callable:
        @functools.wraps(func)
        def checked(*call_args: Any, **call_kwargs: Any) -> Any:
            for value in [*call_args, *call_kwargs.values()]:
                for path in value if isinstance(value, list) else [value]:
                    if isinstance(path, Path):
                        check_path_length(path)
            return func(*call_args, **call_kwargs)

        return app.command(*args, **kwargs)(checked)

    return wrap


@command()
@command_with_config(TrainConfig, positional=("model",))
def train(
    config: TrainConfig,
    name: Optional[str] = typer.Option(None, "--name", help="Run directory name [default: model-data-freeze-seed-hash]."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run directories live."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run from its last checkpoint (or start it)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory."),
) -> None:
    """Train MODEL (or only some of its tensors, see --freeze) and checkpoint it every epoch."""
    if resume and overwrite:
        raise BnprobeError("--resume and --overwrite contradict each other; pass one")
    config = config.resolved()
    if config.norm != "group" and config.norm_groups != TrainConfig.norm_groups:
        import warnings

        warnings.warn(f"--norm-groups {config.norm_groups} has no effect with --norm {config.norm} (only GroupNorm, "
                      f"--norm group, has groups)", stacklevel=2)
    from bnprobe.files.runs import check_run_name
    from bnprobe.training.train import train as run_training

    run_dir = runs_dir / (check_run_name(name) if name is not None else config.run_name())
    run_training(config, run_dir, resume=resume, overwrite=overwrite, console=console)


def _check_number(flag: str, value: float, wanted: str, holds: bool) -> None:
    """A float option: finite (typer takes nan and inf) and `holds`, its range, described by `wanted`."""
    if not (math.isfinite(value) and holds):
        raise BnprobeError(f"{flag} must be {wanted} (a finite number), got {value:g}")


@command()
def sweep(
    plan: Path = typer.Argument(..., help="A plan file (TOML): [defaults] and [[grid]] tables of train settings."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run directories live."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the grid with cost estimates and status; train nothing."),
    devices: str = typer.Option(
        "", "--devices", help="Comma-separated devices to run on in parallel, one run each (e.g. cuda:0,cuda:1)."
    ),
    per_device: int = typer.Option(
        1, "--per-device", help="Runs at once on each device (separate processes), so small nets fill a big GPU."),
    tflops: float = typer.Option(50.0, "--tflops", help="Sustained TFLOP/s assumed for the cost estimate."),
    calibrate: bool = typer.Option(
        False, "--calibrate", help="Time a few real training steps of each distinct model here instead of --tflops."),
    max_runs: Optional[int] = typer.Option(
        None, "--max-runs",
        help="Allow a plan of up to N runs, at most 100,000 [default: 10,000; a grid is a product, it grows fast]."),
    time_budget: Optional[float] = typer.Option(
        None, "--time-budget", help="Seconds from now: start runs, in plan order, only while each is expected to "
        "end within them (the time column, rescaled by what finished runs took); the rest wait for a later sweep."),
    launcher: str = typer.Option("local", "--launcher", help="local (this machine) or slurm (a submitit job array)."),
    slurm_partition: Optional[str] = typer.Option(None, "--slurm-partition", help="Slurm partition."),
    slurm_hours: float = typer.Option(24.0, "--slurm-hours", help="Time limit of each job, in hours."),
    slurm_gpus: int = typer.Option(1, "--slurm-gpus", help="GPUs per job."),
    slurm_parallel: int = typer.Option(32, "--slurm-parallel", help="At most this many jobs of the array run at once."),
) -> None:
    """Train a grid of runs from PLAN; finished runs are skipped, interrupted ones resumed."""
    started = time.monotonic()  # --time-budget counts from here: the plan's calibration is part of it
    from bnprobe.sweep.budget import NOT_STARTED, TimeBudget, check_budget, fitting_prefix
    from bnprobe.sweep.cost import estimated_seconds, plan_table
    from bnprobe.sweep.launch import check_per_device, run_sweep, submit_sweep
    from bnprobe.sweep.plan import read_plan

    for flag, value in (("--tflops", tflops), ("--slurm-hours", slurm_hours)):
        _check_number(flag, value, "> 0", value > 0)
    if launcher not in ("local", "slurm"):
        raise BnprobeError(f"--launcher must be local or slurm, got {launcher!r}")
    from bnprobe.sweep.plan import MAX_RUNS_LIMIT

    if max_runs is not None:
        check_int("--max-runs", max_runs, 1, MAX_RUNS_LIMIT)
    check_int("--slurm-gpus", slurm_gpus, 1, 1024)
    check_int("--slurm-parallel", slurm_parallel, 1, MAX_RUNS_LIMIT)
    check_per_device(per_device)
    if per_device != 1 and launcher == "slurm":
        raise BnprobeError("--per-device is for --launcher local (a Slurm job runs one run)")
    if time_budget is not None:
        check_budget(time_budget)
        if launcher == "slurm":
            raise BnprobeError("--time-budget is for --launcher local (Slurm's own limit is --slurm-hours)")
    planned = read_plan(plan, runs_dir, **({"max_runs": max_runs} if max_runs else {}))
    device_list = [d.strip() for d in devices.split(",") if d.strip()]
    device = device_list[0] if device_list else None
    console.print(plan_table(planned, tflops, calibrate, device))
    budget, estimates = None, {}
    if time_budget is not None:
        todo = [(run, run.epochs_done()) for run in planned if run.todo()]
        estimates = {run.run_dir: estimated_seconds(run.config, tflops, calibrate, device)  # timed once per model
                     * max(run.config.epochs - (done or 0), 0) / run.config.epochs for run, done in todo}
        budget = TimeBudget(time_budget, started, prior=per_device)
        fit = fitting_prefix(list(estimates.values()), budget.left())
        console.print(f"--time-budget {time_budget:g} s ({max(budget.left(), 0):.0f} s left): by the time column, the "
                      f"first {fit} of the {len(todo)} runs to do fit (evaluation, checkpoints and clamp sweeps not "
                      f"counted; the sweep rescales each estimate by what its finished runs took)", soft_wrap=True)
    if dry_run:
        return
    if launcher == "slurm":
        jobs = submit_sweep(
            planned, runs_dir / "slurm", "slurm", timeout_min=int(slurm_hours * 60), gpus_per_node=slurm_gpus,
            slurm_partition=slurm_partition, slurm_array_parallelism=slurm_parallel,
        )
        console.print(f"submitted {len(jobs)} jobs" + (f" (array {jobs[0].job_id.split('_')[0]})" if jobs else ""))
        return
    outcome = run_sweep(planned, console, device_list or None, per_device, budget, estimates)
    waiting = [name for name, why in outcome.items() if why == NOT_STARTED]
    if waiting:
        console.print(f"stopped by --time-budget: {len(outcome) - len(waiting)} of {len(outcome)} runs done or tried, "
                      f"{len(waiting)} not started (the same command starts them later)", soft_wrap=True)
    failed = {name: why for name, why in outcome.items() if why not in ("done", NOT_STARTED)}
    if failed:
        raise BnprobeError(f"{len(failed)} of {len(outcome)} runs failed: {', '.join(failed)}")


@command()
def inspect(
    run_dir: Path = typer.Argument(..., help="A run directory (runs/<name>), or a run's `bnprobe export` file."),
    top: int = typer.Option(5, "--top", help="How many of the largest/smallest gradients to list (all, once each, when 2N covers them)."),
) -> None:
    """Summarise a run: config, final accuracies, generalisation gap, gradient magnitudes."""
    from bnprobe.analysis.run_summary import summarize_export, summarize_run
    from bnprobe.analysis.run_summary_tables import export_table, run_tables

    if run_dir.is_file() and run_dir.suffix == ".safetensors":
        console.print(export_table(summarize_export(run_dir)))
        return
    console.print(run_tables(summarize_run(run_dir, top)))


@command()
def models() -> None:
    """List the registered models with their parameter counts (CIFAR-10 shape)."""
    import torch

    from bnprobe.nets.freeze import norm_parameter_names
    from bnprobe.nets.registry import create_model, describe_model, list_models, model_name_patterns_note

    table = Table(title="Registered models")
    for column in ("name", "parameters", "BN parameters", "description"):
        table.add_column(column, justify="right" if "param" in column else "left")
    with torch.device("meta"):  # count without allocating: resnet200 alone is 62M parameters
        for model_name in list_models():
            model = create_model(model_name)
            bn = norm_parameter_names(model)
            params = dict(model.named_parameters())
            table.add_row(
                model_name,
                f"{sum(p.numel() for p in params.values()):,}",
                f"{sum(params[n].numel() for n in bn):,}",
                describe_model(model_name),
            )
    console.print(table)
    console.print(model_name_patterns_note(), soft_wrap=True, markup=False)


# ---- probe / ablate ----


@command()
@command_with_config(LoadOptions, ProbeOptions)
def probe(
    config: LoadOptions,
    settings: ProbeOptions,
    checkpoints: list[Path] = typer.Argument(
        ..., help="Checkpoint files (.pt .pth .th .bin .ckpt .safetensors .gguf), run directories, or Hugging "
                  "Face model folders (or their .index.json files) with their shards; give several to compare them, "
                  "e.g. BN-only vs full.",
        show_default=False),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Where to write probe.h5 [default: the run directory for one run, else ./probe.h5]."),
    brief: bool = typer.Option(False, "--brief", help="Print only the summary table, not the per-layer ones."),
) -> None:
    """Probe BN's γ and β per layer (histograms, fraction |γ| < τ, channels turned off) and ReLU output sparsity.

    A checkpoint bnprobe did not train needs no other argument: without --model and --dataset, γ and β are read
    from the file alone (no forward pass: no accuracy or ReLU sparsity), of LayerNorm, GroupNorm and RMSNorm
    layers too (--norms), with their outlier dimensions."""
    from bnprobe.analysis.probe import run_probe
    from bnprobe.core.formats import PROBE_FILE
    from bnprobe.files.lock import locked
    from bnprobe.files.runs import default_output

    settings.check()
    out = out if out is not None else default_output(checkpoints, PROBE_FILE)
    with locked(out, str(out)):
        run_probe(checkpoints, config, settings, out=out, brief=brief, console=console)


@command()
@command_with_config(LoadOptions, AblateOptions)
def ablate(
    config: LoadOptions,
    settings: AblateOptions,
    checkpoint: Path = typer.Argument(
        ..., help="Checkpoint file, run directory, or Hugging Face model folder (config.json and its weights).",
        show_default=False),
    clamp_gamma: Optional[str] = typer.Option(
        None, "--clamp-gamma", metavar="TAUS",
        help=f"Set γ to 0 wherever |γ| < τ, and re-measure. {SWEEP_SYNTAX} Each τ must be >= 0."),
    clamp_fraction: Optional[str] = typer.Option(
        None, "--clamp-fraction", metavar="PS",
        help="Set γ to 0 for the globally smallest fraction p of |γ| (Network Slimming style); p in [0, 1], "
             "same list/range syntax as --clamp-gamma."),
    clamp_dims: Optional[list[str]] = typer.Option(
        None, "--clamp-dims", metavar="DIMS",
        help="Set γ of these dimensions to 0 in every norm layer of their width, one row per value (repeatable): "
             "308,381 (in the most common width that has them; 308,381@768 names the width), recurring (the "
             "recurring outlier dimensions the static probe finds), random:K (K random dimensions: the control; "
             "--seed, --repeats)."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Where to write the results [default: ablation.h5 (--clamp-gamma), ablation-fraction.h5 "
                            "(--clamp-fraction) or ablation-dims.h5 (--clamp-dims), in the run directory for a run, "
                            "else in ./]."),
) -> None:
    """Clamp small BN γ to zero (one value or a sweep) and re-measure test and train accuracy and loss.

    Any model with its own evaluation (--eval), and Hugging Face transformers model folders (CHECKPOINT a folder
    with config.json; --eval or --text), clamp their norm scales too; --clamp-dims clamps named dimensions."""
    from bnprobe.core.formats import ABLATION_FILES
    from bnprobe.files.hf_folder import hf_config
    from bnprobe.files.lock import locked
    from bnprobe.files.runs import default_output

    if sum(x is not None for x in (clamp_gamma, clamp_fraction, clamp_dims)) != 1:
        raise BnprobeError("pass exactly one of --clamp-gamma TAUS, --clamp-fraction PS and --clamp-dims DIMS")
    if clamp_gamma is not None:
        settings.mode, settings.values = "threshold", parse_sweep(clamp_gamma, "--clamp-gamma")
    elif clamp_fraction is not None:
        settings.mode, settings.values = "fraction", parse_sweep(clamp_fraction, "--clamp-fraction", upper=1.0)
    else:
        settings.mode, settings.dims = "dims", list(clamp_dims)
    settings.check()
    # A Hugging Face model folder (its config.json names a model_type) goes to the module that imports transformers.
    hf = None if config.model else hf_config(checkpoint)
    if hf is not None:
        from bnprobe.analysis.hf_models import run_hf_ablation as run
    else:
        from bnprobe.analysis.ablate import run_ablation as run
    out = out if out is not None else default_output([checkpoint], ABLATION_FILES[settings.mode])
    with locked(out, str(out)):
        run(checkpoint, config, settings, out=out, console=console)


@command()
def export(
    run: Path = typer.Argument(..., help="Run directory (or its checkpoint.pt).", show_default=False),
    output: Path = typer.Option(..., "-o", "--output", help="The .safetensors file to write.", show_default=False),
    compact: bool = typer.Option(
        False, "--compact", help="Only what training changed (trainable tensors, BN running statistics), plus the "
                                 "seed that regenerates the rest; every command reads it back bit-exactly."),
) -> None:
    """Export a run's model as .safetensors: the full state dict, or with --compact the seed plus what trained."""
    from rich.markup import escape

    from bnprobe.analysis.export import describe, export_run
    from bnprobe.files.lock import locked

    with locked(output, str(output)):
        size, full = export_run(run, output, compact)
    console.print(f"Wrote [bold]{escape(str(output))}[/]: {describe(size, full, compact)}", soft_wrap=True,
                  highlight=False)


# ---- report (issue 5) ----
@command()
def report(
    runs_dirs: list[Path] = typer.Argument(
        ..., metavar="RUNS_DIRS...", show_default=False,
        help="Directories of runs (searched recursively for runs and probe/ablation results), or run directories."),
    output: Path = typer.Option(
        Path("report.html"), "-o", "--output",
        help="Where to write the report: .html, or .pdf (rendered with WeasyPrint)."),
    taus: str = typer.Option(
        REPORT_TAUS, "--taus", help=f"Thresholds τ of the fraction |γ| < τ per BN layer. {SWEEP_SYNTAX}"),
    include_unfinished: bool = typer.Option(
        False, "--include-unfinished", help="Also show runs that stopped before their last epoch (else skipped)."),
    title: Optional[str] = typer.Option(None, "--title", help="Report title [default: bnprobe report: DIR name]."),
    templates: Optional[Path] = typer.Option(
        None, "--templates",
        help="Folder with report.html.j2 and report.css [default: the checkout's templates/, else the installed copy]."),
    jobs: int = typer.Option(0, "--jobs", help="Worker processes that read the runs and draw their figures "
                                               "(0 = one per CPU core)."),
) -> None:
    """Render every run under RUNS_DIRS (and their probe/ablation results) into one HTML or PDF report."""
    from rich.markup import escape

    from bnprobe.reporting.collect import parse_taus
    from bnprobe.reporting.render import write_report
    from bnprobe.reporting.workers import MAX_JOBS

    if not 0 <= jobs <= MAX_JOBS:
        raise BnprobeError(f"--jobs must be between 0 and {MAX_JOBS:,}, got {jobs:,}")
    summary = write_report(runs_dirs, output, taus=parse_taus(taus), include_unfinished=include_unfinished,
                           title=title, templates=templates, jobs=jobs or None)
    for item in summary.skipped:
        console.print(f"[yellow]skipped[/] {escape(printable(item.name))}: {escape(printable(item.reason))}",
                      soft_wrap=True, highlight=False)

    def count(n: int, what: str) -> str:
        return f"{n} {what}{'' if n == 1 else 's'}"

    pages = f", {count(summary.pages, 'page')}" if summary.pages else ""
    exports = f", {count(summary.exports, 'exported model')}" if summary.exports else ""
    console.print(f"Wrote [bold]{escape(str(output))}[/] ({count(summary.runs, 'run')}, {len(summary.skipped)} "
                  f"skipped, {count(summary.ablations, 'ablation')}, {count(summary.probes, 'probed checkpoint')}"
                  f"{exports}{pages}) in {summary.seconds:.1f} s", soft_wrap=True, highlight=False)
    if summary.findings is not None:
        console.print(f"Wrote [bold]{escape(str(summary.findings))}[/] (the findings, machine-readable)",
                      soft_wrap=True, highlight=False)


@command()
def findings(
    runs_dirs: list[Path] = typer.Argument(
        ..., metavar="RUNS_DIRS...", show_default=False, help="Directories of runs, or run directories."),
    json_out: Optional[Path] = typer.Option(
        None, "--json", help="Also write the findings to this JSON file (format bnprobe-findings)."),
    include_unfinished: bool = typer.Option(
        False, "--include-unfinished", help="Also use runs that stopped before their last epoch (else skipped)."),
) -> None:
    """Runs grouped by seed (mean, 95% interval, n) and every comparison whose runs exist, with its test."""
    from rich.markup import escape

    from bnprobe.analysis.findings import findings_of
    from bnprobe.analysis.findings_output import check_json_output, tables, write_json
    from bnprobe.reporting.collect import collect

    if json_out is not None:
        check_json_output(json_out)  # before reading every run
    collection = collect(runs_dirs, include_unfinished)
    for item in collection.skipped:
        console.print(f"[yellow]skipped[/] {escape(printable(item.name))}: {escape(printable(item.reason))}",
                      soft_wrap=True, highlight=False)
    result = findings_of(collection.runs, collection.ablations)
    for table in tables(result):
        console.print(table)
    if json_out is not None:
        write_json(result, json_out)
        console.print(f"Wrote [bold]{escape(str(json_out))}[/]", soft_wrap=True, highlight=False)


# check / rules / diff: torch-free until a checkpoint is read.
@command()
def check(
    paths: Optional[list[Path]] = typer.Argument(
        None, metavar="PATH...", show_default=False,
        help="Checkpoint files, run directories, Hugging Face model folders (or their index), or folders of them "
             "(searched recursively)."),
    select: Optional[str] = typer.Option(
        None, "--select", metavar="CODES", help="Run only these rules: codes or prefixes, comma-separated (BNP1,BNP301) "
                                                "[default: all, or the config file's select]."),
    ignore: Optional[str] = typer.Option(None, "--ignore", metavar="CODES", help="Skip these rules (codes or prefixes)."),
    config_file: Optional[Path] = typer.Option(
        None, "--config", metavar="FILE", help="A TOML file with a [tool.bnprobe.check] table [default: the nearest "
                                               "pyproject.toml upwards from here that has one]."),
    output_format: str = typer.Option("text", "--format", help="text, json (docs/check-schema.md) or sarif (2.1.0)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the report to this file instead of "
                                                                       "printing it (replaced atomically)."),
    fail_on: Optional[str] = typer.Option(
        None, "--fail-on", help="Exit 1 when a finding is this severe or more: error, warning, note, never "
                                "[default: error, or the config file's fail-on]."),
    sets: Optional[list[str]] = typer.Option(
        None, "--set", metavar="CODE.THRESHOLD=VALUE", help="Set one rule's threshold, e.g. BNP101.max_fraction=0.3 "
                                                            "(repeat for more)."),
    list_rules: bool = typer.Option(False, "--list-rules", help="Print every rule and exit."),
) -> None:
    """Check every normalisation layer of checkpoints against rules (channels off, outlier dimensions, non-finite
    values, statistics at init, ...), from the files alone. Exit 0: no finding reaches --fail-on; 1: one does;
    2: bad input. `bnprobe rules CODE` explains a rule."""
    from bnprobe.reporting.check_output import emit, rendered, rules_table, text_lines

    if list_rules:
        console.print(rules_table())
        return
    from bnprobe.analysis.check import FORMATS, check_output_path, resolve_config, run_check

    if output_format not in FORMATS:
        raise BnprobeError(f"--format must be one of {', '.join(FORMATS)}, got {output_format!r}")
    if not paths:
        raise BnprobeError("give at least one PATH to check (or --list-rules)")
    if output is not None:
        check_output_path(output, output_format)
    config = resolve_config(config_file=config_file, select=select, ignore=ignore, sets=sets or (), fail_on=fail_on)
    result = run_check(paths, config)
    if output_format == "text" and output is None:
        for line in text_lines(result):
            console.print(line, soft_wrap=True, highlight=False)
    else:
        emit(rendered(result, output_format), output)
    if result.failed():
        raise typer.Exit(1)


@command()
def rules(code: str = typer.Argument(..., metavar="CODE", help="A rule code, e.g. BNP101.")) -> None:
    """Explain one rule of `bnprobe check`: what it measures, why it matters, its thresholds and sources."""
    from bnprobe.analysis.rules import RULES
    from bnprobe.reporting.check_output import rule_text

    rule = RULES.get(code.strip().upper())
    if rule is None:
        raise BnprobeError(f"no rule {code!r}; the rules: {', '.join(RULES)} (bnprobe check --list-rules)")
    print(rule_text(rule))


@command()
def diff(
    a: Path = typer.Argument(..., metavar="A", show_default=False, help="The first checkpoint (before)."),
    b: Optional[Path] = typer.Argument(None, metavar="B", show_default=False,
                                       help="The second checkpoint (after), of the same architecture."),
    from_init: bool = typer.Option(
        False, "--from-init", help="Compare the bnprobe run A with its own initial state (rebuilt from its config "
                                   "and seed): what training changed. Takes A alone."),
    output_format: str = typer.Option("text", "--format", help="text or json (docs/check-schema.md)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the JSON (or text) to this file instead "
                                                                       "of printing it (replaced atomically)."),
    off_threshold: float = typer.Option(OFF_THRESHOLD, "--off-threshold",
                                        help="A channel is off when |γ| is below this."),
    outlier_factor: float = typer.Option(
        10.0, "--outlier-factor", help="An outlier dimension has |γ| above this many times its layer's median |γ|."),
) -> None:
    """What changed in every normalisation layer between two checkpoints of one architecture (any format `probe`
    reads), from the files alone: relative change of γ and β, the largest change and where, the correlation of γ,
    channels turned off or on, outlier dimensions that appeared or vanished, the layers that changed most."""
    from bnprobe.analysis.diff import check_diff_options, run_diff
    from bnprobe.reporting.check_output import emit
    from bnprobe.reporting.diff_output import diff_tables, rendered, summary_line

    check_diff_options(output_format, off_threshold, outlier_factor, output, from_init, b is not None)
    if from_init:
        from bnprobe.analysis.initial_state import initial_norms

        result = run_diff(a, a, off_threshold, outlier_factor, initial=initial_norms(a))
    else:
        result = run_diff(a, b, off_threshold, outlier_factor)
    if output_format == "text" and output is None:
        for table in diff_tables(result):
            console.print(table)
        console.print(summary_line(result), soft_wrap=True, highlight=False)
    else:
        emit(rendered(result, output_format), output)


INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings read like the errors: one line, no source location."""
    text = printable(" ".join(str(message).split()))
    print(f"bnprobe: warning: {text}", file=file or sys.stderr)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[list[str]] = None) -> None:
    import signal
    import threading
    import warnings

    # TERM (`kill`, a scheduler's time limit) ends every command as Ctrl-C does: by unwinding, so temporary files
    # are removed and the one "interrupted" line is printed, exit 130 (the default would end it silently, 143).
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        with warnings.catch_warnings():  # restores the default display after an in-process call (tests)
            warnings.showwarning = _one_line_warning
            _main(argv)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: Optional[list[str]]) -> None:
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="bnprobe", standalone_mode=False)
    except NoArgsIsHelpError as exc:  # `bnprobe` alone: the help is the answer, not an error line
        print(exc.format_message())
        sys.exit(exc.exit_code)
    except ClickException as exc:
        print(f"bnprobe: error: {printable(exc.format_message())}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except BnprobeError as exc:  # names from files in it (a tensor's, a layer's) are printed escaped
        print(f"bnprobe: error: {printable(str(exc), limit=2000)}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort as exc:
        if not isinstance(exc.__cause__, EOFError):
            code = INTERRUPTED
        else:  # click turns every EOFError into Abort; bnprobe reads no stdin, so a file ended early, not Ctrl-C
            print(f"bnprobe: error: a file ended early ({str(exc.__cause__).strip() or 'EOFError'})", file=sys.stderr)
            sys.exit(2)
    except KeyboardInterrupt:
        code = INTERRUPTED
    if code == INTERRUPTED:  # typer turns Ctrl-C into this exit code
        print("bnprobe: interrupted; every file written so far is complete (a training run continues with --resume)",
              file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)
