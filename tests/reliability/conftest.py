"""Fixtures for the planted-fault tests: each test damages its own copy of the session's tiny shard folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from faults import copy_folder


@pytest.fixture
def image_shards(tiny_data, tmp_path) -> Path:
    return copy_folder(tiny_data / "shards", tmp_path / "shards")


@pytest.fixture
def encoded_shards(tiny_data, tmp_path) -> Path:
    return copy_folder(tiny_data / "encoded", tmp_path / "encoded")
