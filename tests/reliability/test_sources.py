"""Class 2 (sources): non-regular files are skipped and listed, never opened; a source without one usable image
does not produce a "complete" empty output."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import numpy as np
from PIL import Image

from faults import assert_one_line_error, run_cli

REPO = Path(__file__).resolve().parents[2]


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_fifos_and_sockets_are_listed_and_never_opened(tmp_path):
    src = tmp_path / "src"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        for i in range(2):
            (src / cls / f"{i}.png").write_bytes(png(i))
    os.mkfifo(src / "a" / "x.jpg")  # opening it for reading would block forever
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(src / "b" / "sock.png"))
    try:
        # a subprocess with a timeout: a regression hangs, and must fail instead of blocking the suite
        proc = subprocess.run([sys.executable, "-m", "d2ctool", "prepare", str(src), str(tmp_path / "out"),
                               "--workers", "1"], cwd=REPO, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr
    assert "rejected 2" in proc.stdout
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert {(r["path"], r["reason"]) for r in rejected} == {
        ("a/x.jpg", "not a regular file (a FIFO): not opened"),
        ("b/sock.png", "not a regular file (a socket): not opened")}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["num_samples"] == 4


@pytest.mark.slow
def test_a_source_of_only_unusable_files_fails_and_points_to_the_rejects(tmp_path, monkeypatch, capsys):
    src = tmp_path / "lfs"
    for cls in ("cat", "dog"):
        (src / cls).mkdir(parents=True)
        for i in range(3):  # what a clone without `git lfs pull` holds
            (src / cls / f"{i}.JPEG").write_text(f"version https://git-lfs.github.com/spec/v1\n"
                                                 f"oid sha256:{i:064d}\nsize 123456\n")
    out = tmp_path / "out"
    code, err = run_cli(monkeypatch, capsys, "prepare", src, out, "--workers", "1")
    assert_one_line_error(code, err, "every one of the 6 files was rejected", str(out / "rejected.jsonl"),
                          "not an image")
    assert not (out / "manifest.json").exists()  # never a "complete" empty output
    assert len((out / "rejected.jsonl").read_text().splitlines()) == 6
    code, err = run_cli(monkeypatch, capsys, "prepare", src, out, "--workers", "1")  # and it stays an error
    assert_one_line_error(code, err, "every one of the 6 files was rejected")
    for i, path in enumerate(sorted(src.rglob("*.JPEG"))):  # `git lfs pull`: same names, real images
        path.write_bytes(png(i))
    code, err = run_cli(monkeypatch, capsys, "prepare", src, out, "--workers", "1")
    assert code == 0, err
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 6
    assert (out / "rejected.jsonl").read_text() == ""
