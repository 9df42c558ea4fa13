"""The whole experiment at the smallest sizes, through the Makefile's own chain (`make experiment`): every
command's output is the next one's input, and the results table is built from the real metrics files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import REPO

SYSTEMS = ["vq-reconstruction", "kl-reconstruction", "discrete-only", "continuous-only",
           *[f"{kind}-{f}" for kind in ("two-stage", "oracle-codes") for f in ("add", "prefix", "qformer", "crossattn")]]


@pytest.mark.slow
def test_make_experiment_runs_every_stage_into_the_next_and_builds_the_table(tmp_path):
    """`make smoke-chain` (what `make smoke` runs: recipes/smoke.yaml, two frontier points per system), with every
    fusion instead of the smoke test's one."""
    run = tmp_path / "run"
    env = {**os.environ, "D2C_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    make = ["make", "--no-print-directory", "-C", str(REPO), "-j2", "smoke-chain", f"SMOKE_RUN={run}",
            "SMOKE_FUSIONS=add prefix qformer crossattn", f"D2C={sys.executable} -m d2ctool"]
    proc = subprocess.run(make, capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = json.loads((run / "results.json").read_text())
    assert [r["system"] for r in results["rows"]] == SYSTEMS
    for row in results["rows"]:
        metrics = json.loads((run / "samples" / row["system"] / "metrics.json").read_text())
        assert row["fid"] == metrics["fid"] and row["precision"] == metrics["precision"]
        assert row["num_samples"] == 8 and row["extractor"]["name"] == "inception-random"
    by_name = {r["system"]: r for r in results["rows"]}
    assert by_name["two-stage-add"]["training"]["stage2"]["steps"] == 2
    assert by_name["two-stage-add"]["training"]["stage1"]["steps"] == 2
    assert by_name["two-stage-add"]["parameters"]["stage1"] > 0 and by_name["discrete-only"]["parameters"].get("stage2") is None
    table = (run / "results.md").read_text()
    assert "RANDOM weights, not comparable" in table and all(f"| {s} |" in table for s in SYSTEMS)
    assert table in proc.stdout  # printed at the end
    picture = Image.open(run / "results.png")
    assert picture.size[1] > len(SYSTEMS) * 96
    # the frontier of every system's sweep, with the seed spread, printed after the table
    frontier = json.loads((run / "frontier.json").read_text())
    assert {s["system"] for s in frontier["settings"]} == {"discrete-only", "continuous-only",
                                                           *[f"two-stage-{f}" for f in ("add", "prefix", "qformer", "crossattn")]}
    assert len(frontier["settings"]) == 2 + 5 * 2 and frontier["seed_spread"][0]["seeds"] == [0, 1]
    assert "## Speed-quality frontier" in table and "Seed-to-seed spread of FID at two-stage-add" in table
    assert (run / "frontier.png").is_file()

    # a finished experiment is a no-op: make finds every step done and runs no command
    again = subprocess.run(make, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and "d2ctool" not in again.stdout
