"""Class 5: one writer per output folder; a killed writer's lock does not block the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from d2ctool.errors import UserError
from d2ctool.runstate import LOCK_FILE, lock_output, release_output

from faults import assert_one_line_error, run_cli

REPO = Path(__file__).resolve().parents[2]
HOLD = "import sys, time; from d2ctool.runstate import lock_output; lock_output(sys.argv[1]); print('locked', flush=True); time.sleep(120)"


def hold_lock(folder):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


PREPARE = ["--set", "synthetic.images_per_class=2", "--set", "synthetic.num_classes=2", "--set",
           "synthetic.resolution=16", "--workers", "1"]


@pytest.mark.slow
def test_a_second_writer_fails_at_once_naming_the_first(tiny_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    first = hold_lock(out)
    try:
        code, err = run_cli(monkeypatch, capsys, "prepare", "synthetic", out, *PREPARE)
        assert_one_line_error(code, err, f"{out} is being written by process {first.pid} since 20")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing of the first run was touched
        code, err = run_cli(monkeypatch, capsys, "train-discrete", "--set", f"discrete.out={out}",
                            "--set", f"discrete.data={tiny_data / 'encoded'}", "--set", "discrete.model=gpt-tiny")
        assert_one_line_error(code, err, f"is being written by process {first.pid}")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
def test_a_killed_writers_lock_does_not_block(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    first = hold_lock(out)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (out / LOCK_FILE).is_file()  # the file stays; the kernel dropped the lock with the process
    code, err = run_cli(monkeypatch, capsys, "prepare", "synthetic", out, *PREPARE)
    assert code == 0, err
    release_output(out)


@pytest.mark.slow
def test_the_lock_is_held_for_the_process_and_reentrant(tmp_path):
    lock_output(tmp_path / "a")
    lock_output(tmp_path / "a")  # the same process again: fine
    probe = subprocess.run([sys.executable, "-c", HOLD, str(tmp_path / "a")], cwd=REPO, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert probe.returncode != 0 and "is being written by process" in probe.stderr
    release_output(tmp_path / "a")
    other = hold_lock(tmp_path / "a")  # released: another process may take it
    other.kill()
    other.wait()
    with pytest.raises(UserError, match="not a folder|cannot write"):
        (tmp_path / "file").write_text("x")
        lock_output(tmp_path / "file")


def test_another_ranks_write_probe_does_not_make_a_new_folder_look_used(tmp_path, monkeypatch):
    """Under torchrun every rank checks OUT while rank 0 may be probing it: a temporary file is not output."""
    from d2ctool.io import TMP_SUFFIX
    from d2ctool.runstate import OutputFolder

    out = tmp_path / "out"
    out.mkdir()
    (out / f".d2c-write-probe.4242{TMP_SUFFIX}").write_bytes(b"d2c")  # rank 0's probe, mid-write
    monkeypatch.setenv("RANK", "1")  # rank 1 takes no lock
    assert OutputFolder(out, "sample", {"a": 1}).check() is False
    (out / "stray.png").write_bytes(b"x")
    with pytest.raises(UserError, match="not empty and was not made by `d2c sample`"):
        OutputFolder(out, "sample", {"a": 1}).check()
