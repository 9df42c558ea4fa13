"""The command line: help, fast start-up, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, run_d2c


@pytest.mark.slow
def test_help_lists_commands_and_examples():
    top = run_d2c("--help", check=True)
    assert "prepare" in top.stdout
    sub = run_d2c("prepare", "--help", check=True)
    assert "Example" in sub.stdout and "d2c prepare synthetic" in sub.stdout
    assert run_d2c("--version", check=True).stdout.startswith("d2c ")


@pytest.mark.slow
def test_console_script_is_installed():
    d2c = REPO / ".venv" / "bin" / "d2c"
    exe = d2c if d2c.exists() else "d2c"
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "prepare" in proc.stdout


@pytest.mark.slow
def test_startup_does_not_import_heavy_modules():
    code = "import sys, d2ctool.cli; print(sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


@pytest.mark.slow
def test_user_errors_are_one_line_without_traceback(tmp_path):
    cases = [
        (["prepare", tmp_path / "missing", tmp_path / "out"], "error: source not found"),
        (["prepare", "synthetic", tmp_path / "out", "--set", "shard_size=abc"],
         "error: prepare.shard_size: expected an integer, got 'abc'"),
        (["prepare", "synthetic", tmp_path / "out", "--recipe", tmp_path / "nope.yaml"], "error: recipe not found"),
        (["prepare", "synthetic", tmp_path / "out", "--set", "prepare.sede=1"], "did you mean prepare.seed"),
    ]
    for args, message in cases:
        proc = run_d2c(*args)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
