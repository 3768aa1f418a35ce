"""Shared fixtures: tiny params so every test runs offline on CPU in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep tests from fighting over the two cores and from touching any hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> Path:
    return REPO
