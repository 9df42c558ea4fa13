"""Helpers for the planted-fault tests (tests/reliability/): run the CLI in-process (so faults can be injected
with monkeypatch), and copies of the session's tiny shard folders that a test may damage."""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

def run_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """`d2c ARGS` through the real entry point: (exit code, stderr). Never raises."""
    from d2ctool.cli import main

    monkeypatch.setattr(sys, "argv", ["d2c", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    assert code != 0, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def read_only(monkeypatch, folder, code=errno.EROFS):
    """Writes (and folder creation) under `folder` fail with `code`: EROFS as on a read-only mount, EACCES as
    without permission."""
    real_open, real_mkdir = builtins.open, os.mkdir
    folder = str(folder)

    def guarded_open(file, mode="r", *args, **kwargs):
        if str(file).startswith(folder) and any(c in mode for c in "wax+"):
            raise OSError(code, os.strerror(code), str(file))
        return real_open(file, mode, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if str(path).startswith(folder):
            raise OSError(code, os.strerror(code), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".d2c-lock"))
    return dst


def rewrite_manifest(folder: Path, change) -> dict:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    return manifest




# Fixtures (imported by the test modules that use them: a conftest.py here would shadow tests/conftest.py,
# which other test modules import by name).
@pytest.fixture
def image_shards(tiny_data, tmp_path) -> Path:
    return copy_folder(tiny_data / "shards", tmp_path / "shards")


@pytest.fixture
def encoded_shards(tiny_data, tmp_path) -> Path:
    return copy_folder(tiny_data / "encoded", tmp_path / "encoded")
