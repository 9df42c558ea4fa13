"""The frontier's arithmetic on hand-made points: seeds grouped, Pareto marks, and who reaches whose best FID."""

from __future__ import annotations

import pytest

from d2ctool.evaluation.frontier import frontier, frontier_markdown


def row(system: str, fid: float, speed: float, seed: int = 0, **settings) -> dict:
    return {"system": system, "mode": "two-stage", "settings": {**settings, "seed": seed}, "seed": seed,
            "folder": f"/sweep/{system}/{settings}/{seed}", "fid": fid, "num_samples": 200, "images_per_second": speed,
            "seconds_per_image": {"stage2": 1 / speed}, "threads": 1, "device": "cpu", "reference": "abc",
            "reference_path": "ref.npz", "extractor": {"name": "inception"}, "extractor_summary": "inception"}


# slow-and-good MAR-like baseline, a faster two-stage system, and a fast but poor discrete-only one
ROWS = [row("continuous", 200.0, 10.0, num_iter=8), row("continuous", 210.0, 30.0, num_iter=2),
        row("two-stage", 190.0, 8.0, num_iter=8), row("two-stage", 199.0, 40.0, num_iter=2),
        row("two-stage", 205.0, 60.0, num_iter=1),
        row("two-stage", 197.0, 40.0, seed=1, num_iter=2),  # seeds 0 and 1 of it2: mean FID 198
        row("discrete", 230.0, 100.0, cfg=1.0)]


def test_who_reaches_whose_best_fid_and_how_fast():
    result = frontier(ROWS)
    pairs = {(r["system"], r["target"]): r for r in result["reaches"]}
    # two-stage reaches continuous-only's best (200) fastest with it2 (mean FID 198 of two seeds) at 40/s: 4x
    hit = pairs[("two-stage", "continuous")]
    assert (hit["label"], hit["fid"], hit["images_per_second"]) == ("num_iter=2", 198.0, 40.0)
    assert hit["target_fid"] == 200.0 and hit["speedup"] == pytest.approx(4.0)
    # continuous-only never reaches two-stage's best (190); discrete-only reaches nobody's but its own
    assert pairs[("continuous", "two-stage")]["label"] is None
    assert all(pairs[("discrete", b)]["label"] is None for b in ("continuous", "two-stage"))
    assert pairs[("discrete", "discrete")]["speedup"] == pytest.approx(1.0)
    # two-stage reaches discrete-only's best (230) with its fastest setting
    assert pairs[("two-stage", "discrete")]["label"] == "num_iter=1"
    assert pairs[("two-stage", "discrete")]["speedup"] == pytest.approx(0.6)
    assert len(result["reaches"]) == 9

    text = frontier_markdown(result, "t")
    assert "| system | continuous best: 200.0 (num_iter=8, 10.0/s) | two-stage best: 190.0 (num_iter=8, 8.0/s) |" in text
    assert "| two-stage | 40.0/s (4.00×), num_iter=2, FID 198.0 | 8.0/s (1.00×), num_iter=8, FID 190.0 |" in text


def test_pareto_marks_and_seed_spread():
    result = frontier(ROWS)
    by = {(s["system"], s["label"]): s for s in result["settings"]}
    assert by[("two-stage", "num_iter=2")]["fid_per_seed"] == [199.0, 197.0]
    assert by[("continuous", "num_iter=8")]["pareto"] and not by[("continuous", "num_iter=8")]["pareto_all"]
    assert by[("two-stage", "num_iter=8")]["pareto_all"] and by[("discrete", "cfg=1.0")]["pareto_all"]
    (spread,) = result["seed_spread"]
    assert spread["range"] == pytest.approx(2.0) and spread["std"] == pytest.approx(2 ** 0.5)
