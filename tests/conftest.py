"""Shared fixtures. Tests run on CPU and never touch the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BNPROBE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _offline_and_deterministic(monkeypatch):
    # A test that forgets --no-download must fail instead of reaching the network.
    monkeypatch.setattr("bnprobe.data.sources._download", _no_network)
    monkeypatch.setattr("bnprobe.data.sources._warned", set())  # each test sees the data warnings it causes
    torch.manual_seed(0)


def _no_network(what, fetch, where, also=()):
    from bnprobe.core.errors import BnprobeError

    raise BnprobeError(f"{what} is not in {where} (tests never download)")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (set BNPROBE_SHARED_DATA)")
    return SHARED_DATA
