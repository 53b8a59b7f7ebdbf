"""Running the CLI in-process as a user would, and the one shape every bad-input answer must have."""

import pytest

from bnprobe.cli import main


def run_cli(capsys, *argv):
    """Run `bnprobe ARGV`; return (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_one_line_error(code, err, pattern):
    """Exit status 2, one line on stderr starting `bnprobe: error:` and containing `pattern`, no traceback."""
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("bnprobe: error: ") and pattern in lines[0], lines[0]
    assert "Traceback" not in err
