"""bench/gpu.py runs end to end at tiny sizes on the CPU (so the GPU benchmark cannot rot)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import REPO
from d2ctool.continuous.config import FUSIONS


@pytest.mark.slow
def test_gpu_bench_runs_tiny_on_the_cpu(tmp_path, one_thread):
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gpu.json"
    summary = bench.main(["--size", "tiny", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(summary))
    results = summary["results"]
    assert not [r for r in results if "skipped" in r]
    checks = {r["item"]: r for r in results if r["item"].startswith("check")}
    assert checks["check bf16 vs fp32 loss"]["ok"] and checks["check SDPA vs math attention"]["ok"]
    # the checks compare real numbers: random weights, not zero-initialised outputs
    assert checks["check bf16 vs fp32 loss"]["gpt"]["relative_difference"] > 0
    trained = [r for r in results if r["item"].startswith("train")]
    assert sorted(r.get("fusion", "-") for r in trained) == sorted(["-", *FUSIONS])
    assert all(r["images_per_s"] > 0 and r["train_gflop_per_image"] > 0 and r["mfu"] is None for r in trained)
    items = {r["item"] for r in results}
    assert {"sample continuous-only", "sample two-stage", "encode"} <= items
