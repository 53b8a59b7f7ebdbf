"""Names too long for any file system (issue 30, item 5): a path argument or a shard named by an index with a
part over 255 bytes is one line, never an OSError traceback, and a long name is shortened when printed."""

from __future__ import annotations

import json

import pytest
from cli_helpers import assert_one_line_error, run_cli

from bnprobe.core.errors import printable

LONG = "x" * 300


@pytest.mark.parametrize("argv", [
    ["probe", "{long}.pt"], ["inspect", "{long}.pt"], ["inspect", "{long}"], ["ablate", "{long}.pt", "--clamp-gamma", "0.1"],
    ["export", "{long}", "-o", "y.safetensors"], ["report", "{long}"], ["findings", "{long}"], ["sweep", "{long}.toml"],
    ["probe", "x.pt", "--out", "{long}.h5"], ["export", "r", "-o", "{long}/a.safetensors"],
])
def test_a_path_argument_with_a_name_over_255_bytes_is_one_line(tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, *[a.format(long=LONG) for a in argv])
    assert_one_line_error(code, err, "bytes, longer than the 255 bytes a file name can have")
    assert len(err) < 400  # the name shortened
    assert list(tmp_path.iterdir()) == []


def test_a_run_name_over_the_limit_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "resnet8", "--name", LONG, "--runs-dir", tmp_path / "r")
    assert_one_line_error(code, err, "--name must be at most 240 bytes")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("shard", [LONG + ".safetensors", "a/" * 3000 + "m.safetensors", "y" * 5_000_000])
def test_an_index_naming_a_shard_too_long_for_a_file_system_is_one_line(tmp_path, capsys, shard):
    # A 300-byte shard name was an OSError traceback; a 60 MB one was printed whole (60,003,144 bytes).
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": shard}}))
    code, _, err = run_cli(capsys, "probe", index, "--out", tmp_path / "p.h5")
    assert_one_line_error(code, err, "is longer than a file system allows (255 bytes a name, 4,096 a path)")
    assert len(err) < 600
    assert sorted(p.name for p in tmp_path.iterdir()) == [index.name]


def test_printable_shortens_a_long_name_and_says_its_length():
    assert printable("y" * 5_000_000, limit=100) == "y" * 60 + "... (5,000,000 characters)"
    assert printable("short\n") == "short\\n"
