"""A wheel (a non-editable `pip install .`) carries the report templates where bnprobe.reporting.collect looks for them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bnprobe.reporting.render import INSTALLED_TEMPLATES, TEMPLATE_FILES

REPO = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_templates_under_the_data_prefix(tmp_path):
    pytest.importorskip("setuptools", reason="building the wheel without build isolation needs setuptools")
    pytest.importorskip("pip", reason="building the wheel needs pip")
    # Build from a copy of what the build reads: an in-tree build leaves build/ and *.egg-info in the checkout,
    # and a stale build/lib could slip removed files into the wheel.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    for name in ("bnprobe", "templates"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-q", "-w", str(tmp_path / "dist")],
        cwd=source, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [wheel] = (tmp_path / "dist").glob("bnprobe-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        # `<name>-<version>.data/data/X` installs to PREFIX/X: the folder find_templates checks under each prefix.
        distribution, version = wheel.name.split("-")[:2]
        data = f"{distribution}-{version}.data/data/{INSTALLED_TEMPLATES.as_posix()}"
        for name in TEMPLATE_FILES:
            assert archive.read(f"{data}/{name}") == (REPO / "templates" / name).read_bytes(), name
        assert "bnprobe/reporting/render.py" in names and "bnprobe/nets/registry.py" in names
    assert not any(n.startswith("templates/") for n in names)  # not a top-level `templates` package in site-packages
