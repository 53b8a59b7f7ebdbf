"""Run files read back as a hostile user leaves them (issue 11): named pipes, HDF5 bombs, wrong layouts, bad
settings, odd names, and a report killed with TERM. In `report` each costs one run a skipped line, never the
whole report; in `inspect` each is one line; nothing hangs, nothing fills memory, nothing is left behind."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli
from probe_helpers import single_thread, tiny_config  # noqa: F401 - autouse: one thread for tiny models
from rich.console import Console

from bnprobe.core import formats
from bnprobe.core.config import TrainConfig
from bnprobe.core.errors import BnprobeError
from bnprobe.files import checkpoints, headers
from bnprobe.reporting.collect import collect
from bnprobe.reporting.render import write_report

REPO = Path(__file__).resolve().parents[1]
# tiny_config, one short epoch, telemetry every epoch
TINY = dict(epochs=1, subset=200, test_subset=100, train_eval_subset=100, lr=0.1, telemetry_every=1)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    from bnprobe.training.train import train

    run_dir = tmp_path_factory.mktemp("runs") / "good"
    train(tiny_config(**TINY), run_dir, console=Console(file=io.StringIO()))
    return run_dir


def copy_run(good_run: Path, where: Path) -> Path:
    return Path(shutil.copytree(good_run, where))


def bnprobe(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """`bnprobe ARGS` in its own process: one that would hang (HDF5 waits on a FIFO in C, beyond any signal
    handler) is killed at `timeout` and fails the test instead of stalling the suite."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "bnprobe", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def skipped(collection) -> dict[str, str]:
    return {s.name: s.reason for s in collection.skipped}


def write_ablation(path: Path, values: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        f.attrs.update({"format": "bnprobe-ablation", "version": 1, "mode": "threshold", "total_channels": 10})
        f["values"] = values
        f["clamped_fraction"] = np.linspace(0, 1, 4)
        f["test_acc"] = np.linspace(0.9, 0.1, 4)


# ---- 5: named pipes are never opened ---------------------------------------------------------------------


def test_report_skips_named_pipes_instead_of_waiting_on_them(good_run, tmp_path):
    root = tmp_path / "runs"
    copy_run(good_run, root / "good")
    for name in ("config.json", "metrics.json", "telemetry.h5", "checkpoint.pt"):
        path = copy_run(good_run, root / f"fifo-{name}") / name
        path.unlink()
        os.mkfifo(path)
    os.mkfifo(root / "x.h5")
    done = bnprobe("report", root, "-o", tmp_path / "report.html", "--jobs", "1", timeout=60)
    assert done.returncode == 0, done.stderr
    assert "(1 run, 5 skipped," in " ".join(done.stdout.split())
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    for name in ("config.json", "metrics.json", "telemetry.h5", "checkpoint.pt"):
        assert f"{name} is not a regular file (it is a named pipe)" in html, name
    assert "x.h5 is not a regular file (it is a named pipe)" in html


def test_a_telemetry_file_that_is_a_symlink_loop_is_named_not_taken_for_an_old_run(good_run, tmp_path, capsys):
    # issue 21 (12): the report said "no telemetry.h5 (the run predates telemetry)"
    run_dir = copy_run(good_run, tmp_path / "run")
    (run_dir / "telemetry.h5").unlink()
    os.symlink("telemetry.h5", run_dir / "telemetry.h5")
    message = "cannot read telemetry.h5 (Too many levels of symbolic links)"
    assert skipped(collect([run_dir], include_unfinished=True)) == {"run": message}
    code, _, err = run_cli(capsys, "inspect", run_dir)
    assert_one_line_error(code, err, f"cannot read {run_dir / 'telemetry.h5'} (Too many levels of symbolic links)")


def test_an_empty_telemetry_journal_says_how_to_read_the_run_again(good_run, tmp_path, capsys):
    # issue 21 (15): a 0-byte telemetry.h5.journal made a finished run unreadable everywhere, with no hint
    run_dir = copy_run(good_run, tmp_path / "run")
    journal = run_dir / "telemetry.h5.journal"
    journal.write_bytes(b"")
    advice = f"move it aside (mv {journal} {journal}.damaged) to read telemetry.h5 as it was before that update"
    code, _, err = run_cli(capsys, "inspect", run_dir)
    assert_one_line_error(code, err, f"{journal} is damaged (it is empty)")
    assert advice in err
    # issue 30 (13): it promised that --resume trains the epoch again, though this run is finished
    assert "an unfinished run's train --resume trains its epoch again; a finished run keeps its checkpoint" in err
    assert "mv telemetry.h5.journal telemetry.h5.journal.damaged" in skipped(collect([run_dir]))["run"]
    journal.rename(f"{journal}.damaged")
    code, out, _ = run_cli(capsys, "inspect", run_dir)
    assert code == 0 and "After 1 of 1 epochs" in out


@pytest.mark.parametrize("name", ["config.json", "telemetry.h5"])
def test_inspect_refuses_a_named_pipe(good_run, tmp_path, name):
    path = copy_run(good_run, tmp_path / "run") / name
    path.unlink()
    os.mkfifo(path)
    done = bnprobe("inspect", tmp_path / "run", timeout=60)
    assert_one_line_error(done.returncode, done.stderr, f"{name} is not a regular file (it is a named pipe)")


# ---- 7: HDF5 bombs are refused from their declared shapes ---------------------------------------------------


def declare_rows(path: Path, dataset: str, rows: int, dtype="i8") -> None:
    """Replace `dataset` by one that declares `rows` rows and stores none: a few KB on disk."""
    with h5py.File(path, "a") as f:
        del f[dataset]
        f.create_dataset(dataset, shape=(rows,), dtype=dtype, chunks=(1 << 16,), compression="gzip")


def test_report_refuses_a_telemetry_bomb_at_once(good_run, tmp_path):
    root = tmp_path / "runs"
    for dataset in ("steps/step", "epochs/test_acc", "bn/epoch"):
        run_dir = copy_run(good_run, root / dataset.replace("/", "-"))
        declare_rows(run_dir / "telemetry.h5", dataset, 300_000_000)
        assert (run_dir / "telemetry.h5").stat().st_size < 1 << 20
    with h5py.File(copy_run(good_run, root / "wide-gamma") / "telemetry.h5", "a") as f:
        del f["bn/bn1/gamma"]
        f.create_dataset("bn/bn1/gamma", shape=(2, 100_000_000), dtype="f4", chunks=(1, 1 << 16), compression="gzip")
    started = time.perf_counter()
    collection = collect([root])
    assert time.perf_counter() - started < 45  # it used to take 22 s and 6 GB per run (four here; a bound, not a speed test)
    assert not collection.runs
    assert skipped(collection) == {  # each checked against what the file's own sizes allow, or the hard cap
        "steps-step": "telemetry.h5: /steps/step has 300,000,000 rows, more than 1 epoch(s) of its batches allow (5)",
        "epochs-test_acc": "telemetry.h5: /epochs/test_acc has 300,000,000 rows, more than the run's epochs allow (1)",
        "bn-epoch": "telemetry.h5: /bn/epoch has 300,000,000 rows, more than 1 epoch(s) and the initial state allow (2)",
        "wide-gamma": "telemetry.h5: /bn/bn1/gamma declares 200,000,000 values, more than bnprobe ever writes "
                      "(67,108,864)",
    }


def test_inspect_refuses_a_telemetry_bomb(good_run, tmp_path, capsys):
    run_dir = copy_run(good_run, tmp_path / "run")
    declare_rows(run_dir / "telemetry.h5", "steps/epoch", 2_000_000_000, dtype="i4")
    code, _, err = run_cli(capsys, "inspect", run_dir)  # it used to die with MemoryError
    assert_one_line_error(code, err, "/steps/epoch has shape (2000000000,), expected (4,)")


def test_report_and_findings_refuse_an_ablation_bomb_at_once(tmp_path, capsys):
    # 17 KB declaring 60 million rows (under the element cap): report ran past 300 s at 20 GB, findings took 2.4 GB.
    root = tmp_path / "runs"
    root.mkdir()
    for name in ("rows", "masks"):
        write_ablation(root / f"{name}.h5", np.linspace(0, 0.2, 4))
    for column in ("values", "clamped_fraction", "test_acc"):
        declare_rows(root / "rows.h5", column, 60_000_000, dtype="f8")
    with h5py.File(root / "masks.h5", "a") as f:  # 4 thresholds of a net with 10 channels, masks of 5e9 columns
        f.create_dataset("masks", shape=(4, 5_000_000_000), dtype=bool, chunks=(1, 1 << 16), compression="gzip")
    with h5py.File(root / "taus.h5", "w") as f:  # a probe file bombed the same way
        f.attrs["format"] = "bnprobe-probe"
        f.create_group("checkpoints")
        f["taus"] = [0.01]
    declare_rows(root / "taus.h5", "taus", 60_000_000, dtype="f8")
    assert all(path.stat().st_size < 1 << 20 for path in root.iterdir())
    started = time.perf_counter()
    assert skipped(collect([root])) == {
        "rows.h5": "rows.h5: /values has 60,000,000 rows, more than bnprobe's sweeps allow (10,000)",
        "masks.h5": "masks.h5: /masks has shape (4, 5000000000), expected (4, 10)",
        "taus.h5": "taus.h5: /taus has 60,000,000 rows, more than bnprobe's sweeps allow (10,000)",
    }
    code, out, err = run_cli(capsys, "findings", root)
    assert code == 0, err
    assert "skipped rows.h5: rows.h5: /values has 60,000,000 rows" in " ".join(out.split())
    assert time.perf_counter() - started < 30  # refused from the declared shapes (a bound, not a speed test)


def test_rows_are_bounded_by_the_files_own_sizes(good_run, tmp_path):
    """Under the hard cap too: more rows than the run's epochs (or its batches) can have written."""
    from bnprobe.files import schema

    path = copy_run(good_run, tmp_path / "run") / "telemetry.h5"
    with h5py.File(path, "a") as f:
        rows = f["epochs/epoch"].shape[0]
        for name in list(f["epochs"]):
            data = f[f"epochs/{name}"][:]
            del f[f"epochs/{name}"]
            f[f"epochs/{name}"] = np.resize(data, rows + 1)  # 2 epochs in a run of 1
    with schema.open_h5(path, formats.TELEMETRY_FORMAT) as f, pytest.raises(BnprobeError, match="more than the run's"):
        schema.check_telemetry(f)


# ---- 10: one bad run costs that run, never the report -------------------------------------------------------


def with_config(run_dir: Path, **changes) -> Path:
    path = run_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return run_dir


def with_run_config(run_dir: Path, **changes) -> Path:
    """The run's settings changed in both copies, config.json and checkpoint.pt (one edited alone is a run whose
    copies disagree, which every reader refuses)."""
    import torch

    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    state["config"].update(changes)
    torch.save(state, run_dir / "checkpoint.pt")
    return with_config(run_dir, **changes)


def test_one_bad_run_never_aborts_the_report(good_run, tmp_path):
    root = tmp_path / "runs"
    copy_run(good_run, root / "good")
    with_config(copy_run(good_run, root / "bad-width"), width="x")
    with_config(copy_run(good_run, root / "bad-seed"), seed="one")
    with_config(copy_run(good_run, root / "bad-epochs"), epochs=None)
    copy_run(good_run, root / os.fsdecode(b"caf\xe9"))  # Latin-1 bytes: not UTF-8
    os.symlink("loop.h5", root / "loop.h5")
    write_ablation(root / "flat.h5", np.zeros((4, 2)))
    summary = write_report(root, tmp_path / "report.html", jobs=1)
    assert summary.runs == 1 and summary.ablations == 0
    reasons = {s.name: s.reason for s in summary.skipped}
    assert reasons == {
        "bad-width": "config.json: setting 'width' must be an integer, not \"x\"",
        "bad-seed": "config.json: setting 'seed' must be an integer, not \"one\"",
        "bad-epochs": "config.json: setting 'epochs' must be an integer, not null",
        "caf\\xe9": "its name is not valid UTF-8 (rename it to include it)",
        "loop.h5": "cannot read loop.h5 (Too many levels of symbolic links)",
        "flat.h5": "flat.h5: /values has shape (4, 2), expected (n,)",
    }
    assert "caf\\xe9" in (tmp_path / "report.html").read_text(encoding="utf-8")


# ---- 11: inspect answers every broken config.json and telemetry.h5 in one line ------------------------------


def _loop(path: Path) -> None:
    path.unlink()
    os.symlink(path.name, path)


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize("spoil,pattern", [
    (lambda p: p.write_text("[]"), "does not hold the run's settings (a JSON object), but a list"),
    (lambda p: p.write_text("5"), "but a number"),
    (lambda p: p.write_text("null"), "but null"),
    (lambda p: p.write_bytes(b'{"model": "r\xe9snet"}'), "is not readable JSON (not UTF-8 text: byte 12)"),
    (_directory, "is not a regular file (it is a directory)"),
    (_loop, "(Too many levels of symbolic links)"),
    (lambda p: p.write_text('{"width": "x"}'), "setting 'width' must be an integer"),
    (lambda p: p.write_text('{"lr": true}'), "setting 'lr' must be a number"),
])
def test_inspect_broken_config(good_run, tmp_path, capsys, spoil, pattern):
    run_dir = copy_run(good_run, tmp_path / "run")
    spoil(run_dir / "config.json")
    code, _, err = run_cli(capsys, "inspect", run_dir)
    assert_one_line_error(code, err, pattern)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_inspect_unreadable_config(good_run, tmp_path, capsys):
    run_dir = copy_run(good_run, tmp_path / "run")
    (run_dir / "config.json").chmod(0)
    code, _, err = run_cli(capsys, "inspect", run_dir)
    assert_one_line_error(code, err, "(Permission denied)")


def _replace(name: str, make):
    def spoil(f):
        del f[name]
        make(f, name)
    return spoil


WRONG_TELEMETRY = {  # what was done to the file -> what inspect says
    "epochs-a-dataset": (_replace("epochs", lambda f, n: f.create_dataset(n, data=[1.0])), "/epochs is not a group"),
    "test-acc-2d": (_replace("epochs/test_acc", lambda f, n: f.create_dataset(n, data=np.zeros((1, 3)))),
                    "/epochs/test_acc has shape (1, 3), expected (n,)"),
    "epoch-text": (_replace("epochs/epoch", lambda f, n: f.create_dataset(n, data=["one"], dtype=h5py.string_dtype())),
                   "/epochs/epoch holds text, expected numbers"),
    "epoch-nan": (_replace("epochs/epoch", lambda f, n: f.create_dataset(n, data=[np.nan])),
                  "/epochs/epoch holds a value that is not a number"),
    "no-params": (lambda f: f.__delitem__("params"), "/params/name is missing"),
    "names-numbers": (_replace("params/name", lambda f, n: f.create_dataset(n, data=np.arange(len(f["params/numel"])))),
                      "/params/name holds int64, expected text"),
    "grads-wrong-width": (_replace("steps/grad_abs_mean", lambda f, n: f.create_dataset(n, data=np.zeros((4, 2)))),
                          "/steps/grad_abs_mean has shape (4, 2), expected (4, 29)"),
    "group-without-attrs": (lambda f: f["steps/groups/bn_gamma"].attrs.clear(), "lacks the integer attribute 'frozen'"),
    "soft-link": (_replace("epochs/gap", lambda f, n: f.__setitem__(n, h5py.SoftLink("/epochs/gap"))),
                  "/epochs/gap is a link, not stored in the file"),
    "gamma-external-link": (_replace("bn/bn1/gamma", lambda f, n: f.__setitem__(n, h5py.ExternalLink("/etc/x.h5", "/g"))),
                            "/bn/bn1/gamma is a link, not stored in the file"),
    "gamma-virtual": (_replace("bn/bn1/gamma", lambda f, n: f.create_virtual_dataset(
        n, h5py.VirtualLayout((2, 4), np.float32), fillvalue=0)), "/bn/bn1/gamma keeps its data in other files"),
    "gamma-wrong-rows": (_replace("bn/bn1/gamma", lambda f, n: f.create_dataset(n, data=np.zeros((9, 4), np.float32))),
                         "/bn/bn1/gamma has shape (9, 4), expected"),
}


@pytest.mark.parametrize("case", WRONG_TELEMETRY)
def test_inspect_wrong_schema_telemetry(good_run, tmp_path, capsys, case):
    spoil, pattern = WRONG_TELEMETRY[case]
    run_dir = copy_run(good_run, tmp_path / "run")
    with h5py.File(run_dir / "telemetry.h5", "a") as f:
        spoil(f)
    code, _, err = run_cli(capsys, "inspect", run_dir)
    assert_one_line_error(code, err, pattern)
    [report_skip] = collect([run_dir]).skipped  # and the report leaves the run out with the same reason
    assert pattern in report_skip.reason


# ---- 16: hidden and unreadable run folders are named, not dropped ------------------------------------------


def test_hidden_and_unreadable_run_folders_are_listed_as_skipped(good_run, tmp_path, monkeypatch):
    root = tmp_path / "runs"
    copy_run(good_run, root / "good")
    copy_run(good_run, root / ".hidden")
    copy_run(good_run, root / "group" / "locked")
    (root / ".cache").mkdir()  # a hidden folder without a run is nobody's business
    scandir = os.scandir

    def refuse_locked(path="."):
        if Path(path).name == "locked":  # what chmod 000 does to anyone but root
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse_locked)
    collection = collect([root])
    assert [run.name for run in collection.runs] == ["good"]
    assert skipped(collection) == {
        ".hidden": "hidden: its name starts with '.' (rename it to include it)",
        "group/locked": "cannot be read (Permission denied)",
    }


# ---- 8: TERM stops the report, its workers and its temporary file ------------------------------------------


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found.update(int(c) for c in (task / "children").read_text().split())
        except OSError:
            pass
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except (OSError, UnicodeDecodeError):
        return []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended, waiting only for whoever adopted it to reap it


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads child processes from Linux's /proc")
def test_term_stops_the_report_and_its_workers(good_run, tmp_path):
    root = tmp_path / "runs"
    for i in range(16):
        copy_run(good_run, root / f"run{i:02}")
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "bnprobe", "report", str(root), "-o", str(out / "report.html"), "--jobs", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    workers: set[int] = set()
    started = time.time()
    while len(workers) < 2 and process.poll() is None and time.time() - started < 120:
        # Both of the pool's workers: forks with the report's command line. Other children come and go while it
        # imports, before TERM is its to handle (`uname -p`, seen under load, has that command line too, from
        # its fork to its exec).
        workers = {c for c in _children(process.pid) if _cmdline(c) == command}
        time.sleep(0.01)
    assert workers, "the report never started its workers"
    time.sleep(0.2)  # past the fork
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 130, process.stderr.read().decode()[-2000:]
    assert "interrupted" in process.stderr.read().decode()
    ends = time.time() + 10
    while any(_alive(w) for w in workers) and time.time() < ends:
        time.sleep(0.05)
    assert not [w for w in workers if _alive(w)], "workers outlived the report"
    assert list(out.iterdir()) == []


def test_term_while_writing_removes_the_temporary_file(good_run, tmp_path, monkeypatch):
    received = []

    def handler(signum, frame):
        received.append("TERM reached the caller's handler")

    previous = signal.signal(signal.SIGTERM, handler)
    fsync = os.fsync

    def terminated(fd):  # TERM arrives while the output is being written
        os.kill(os.getpid(), signal.SIGTERM)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", terminated)
    try:
        with pytest.raises(KeyboardInterrupt):
            write_report(good_run, tmp_path / "out" / "report.html", jobs=1)
        assert signal.getsignal(signal.SIGTERM) is handler and not received  # the caller's, restored afterwards
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert list((tmp_path / "out").iterdir()) == []


# ---- issue 13: one type check of stored settings, one sniff of torch files --------------------------------


@pytest.mark.parametrize("settings", [{"width": "x"}, {"lr": True}, {"flip": 1}, {"seed": None}, {"lr": float("inf")},
                                      {"milestones": {"a": 1}}])
def test_config_json_and_a_checkpoint_config_are_checked_alike(tmp_path, settings):
    from bnprobe.files import schema

    path = tmp_path / "config.json"
    path.write_text(json.dumps(settings))
    with pytest.raises(BnprobeError) as by_schema:
        schema.read_config(path)
    with pytest.raises(BnprobeError) as by_config:
        TrainConfig.from_dict(settings, str(path))
    assert str(by_schema.value) == str(by_config.value)
    assert str(by_schema.value).startswith(f"{path}: setting '{next(iter(settings))}' must be")


@pytest.mark.parametrize("settings, message", [
    ({"seed": 99999999999999999999999}, "--seed must be in [0, 2**32), got 99999999999999999999999"),
    ({"epochs": -1}, "--epochs must be >= 1, got -1"),
])
def test_settings_out_of_range_are_refused_by_every_reader(good_run, tmp_path, capsys, settings, message):
    # issue 21 (11): report and findings took these as a valid run (grouped with others) while inspect refused it
    run_dir = with_config(copy_run(good_run, tmp_path / "run"), **settings)
    code, _, err = run_cli(capsys, "inspect", run_dir)
    assert_one_line_error(code, err, f"{run_dir / 'config.json'}: {message}")
    collection = collect([run_dir])
    assert not collection.runs and skipped(collection) == {"run": f"config.json: {message}"}
    code, out, _ = run_cli(capsys, "findings", run_dir)
    assert code == 0 and f"skipped run: config.json: {message}" in " ".join(out.split())


def test_run_names_and_settings_reach_the_terminal_escaped(good_run, tmp_path, capsys):
    # issue 21 (13): a run folder or a config.json setting with an escape sequence and a newline was printed raw
    root = tmp_path / "runs"
    with_run_config(copy_run(good_run, root / "a\x1b[31m\nb"), epochs=2)  # unfinished: a skipped line names it
    with_run_config(copy_run(good_run, root / "c"), model="resnet8\x1b[2J")  # a group's label shows it
    code, out, _ = run_cli(capsys, "findings", root)
    assert code == 0 and "\x1b" not in out
    assert "skipped a\\x1b[31m\\nb: unfinished: 1 of 2 epochs" in out and "resnet8\\x1b[2J digits" in out
    code, out, _ = run_cli(capsys, "report", root, "-o", tmp_path / "report.html", "--jobs", "1")
    assert code == 0 and "\x1b" not in out and "skipped a\\x1b[31m\\nb: unfinished" in out


def test_torch_file_kind_tells_archives_and_pickles_from_other_files(tmp_path):
    torch.save({"a": torch.zeros(2)}, tmp_path / "zip.pt")
    torch.save({"a": torch.zeros(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    (tmp_path / "future.pt").write_bytes(b"\x80\x3f rest")  # PROTO with a protocol no Python knows
    kinds = {p.name: headers.torch_file_kind(p) for p in sorted(tmp_path.iterdir())}
    assert kinds == {"empty.pt": "", "future.pt": "", "legacy.pt": "pickle", "text.pt": "", "zip.pt": "zip"}
    with pytest.raises(BnprobeError, match="cannot read"):
        headers.torch_file_kind(tmp_path)


def test_a_checkpoint_records_the_bnprobe_that_wrote_it_and_a_version_1_checkpoint_still_reads(good_run, tmp_path):
    import bnprobe

    state = checkpoints.load_checkpoint(good_run / "checkpoint.pt")
    assert state["version"] == 2 and state["bnprobe_version"] == bnprobe.__version__
    del state["bnprobe_version"]
    torch.save({**state, "version": 1}, tmp_path / "old.pt")
    old = checkpoints.load_checkpoint(tmp_path / "old.pt")
    assert checkpoints.check_checkpoint(old, tmp_path / "old.pt", resume=True) == TrainConfig.from_dict(state["config"])
