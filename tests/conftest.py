"""Shared fixtures: the two real models, fetched through lmap's own registry (cached after the first run)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from lmap.registry import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    from lmap.registry import resolve_model

    return resolve_model("gemma3-270m")
