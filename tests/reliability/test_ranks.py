"""Class 12: under torchrun, an error on one rank ends every rank with that one message: the other ranks, waiting
in a collective, do not print a gloo traceback through the barrier. Two CPU ranks over gloo."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from faults import copy_folder


def torchrun(port: int, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), "-m", "d2ctool", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def ranks_output(stderr: str) -> str:
    """What the ranks printed: torchrun's own launcher report (its ChildFailedError summary) cut away."""
    return stderr.split("Traceback (most recent call last):\n  File \"<frozen runpy>\"")[0]


def test_an_error_on_one_rank_ends_every_rank_with_that_message(tiny_data, tmp_path):
    shards = copy_folder(tiny_data / "shards", tmp_path / "shards")
    manifest = json.loads((shards / "manifest.json").read_text())
    damaged = shards / manifest["shards"][1]["file"]  # rank 1's shard (rank r encodes shards r, r+2, ...)
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only reading it (on rank 1) finds the damage
    damaged.write_bytes(bytes(data))
    out = tmp_path / "enc"
    proc = torchrun(29741, "encode", shards, out, "--set", f"tokenizers.vq.checkpoint={tiny_data / 'vq-tiny-s4.pt'}",
                    "--set", f"tokenizers.kl.checkpoint={tiny_data / 'kl-tiny-s4.pt'}", "--set", "encode.resolution=32")
    assert proc.returncode != 0
    printed = ranks_output(proc.stderr)
    errors = [line for line in printed.splitlines() if line.startswith("error:")]
    assert errors and all(line == errors[0] for line in errors), printed[-3000:]
    assert str(damaged) in errors[0] and "sha256" in errors[0]
    assert "[rank0]" not in printed and "[rank1]" not in printed, printed[-3000:]  # no per-rank traceback
    assert "gloo" not in printed.lower() and "Connection closed" not in printed, printed[-3000:]
    assert not (out / "manifest.json").exists()


def test_peer_failure_reads_the_reporting_ranks_message(monkeypatch):
    import d2ctool.distributed as distributed

    class Store:
        def __init__(self):
            self.values = {}

        def set(self, key, value):
            self.values[key] = value.encode() if isinstance(value, str) else value

        def check(self, keys):
            return all(k in self.values for k in keys)

        def get(self, key):
            return self.values[key]

    store = Store()
    monkeypatch.setattr(distributed, "_store", lambda: store)
    monkeypatch.setenv("WORLD_SIZE", "2")
    lost = RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:5")
    assert distributed.peer_failure(lost) == "another rank stopped on an error (its message is in that rank's log)"
    assert distributed.peer_failure(RuntimeError("shape mismatch in matmul")) is None  # a real bug stays a bug
    distributed.report_failure("shard x: its sha256 differs")
    assert distributed.peer_failure(lost) == "shard x: its sha256 differs"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.peer_failure(lost) is None


@pytest.mark.parametrize("world", ["1", "2"])
def test_report_failure_without_a_process_group_is_harmless(monkeypatch, world):
    import d2ctool.distributed as distributed

    monkeypatch.setenv("WORLD_SIZE", world)
    distributed.report_failure("anything")
