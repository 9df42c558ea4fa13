"""`d2c sweep` and the frontier: grid points as ordinary resumable sample folders, skipped when done, timing
split by stage, Pareto marks, seed spread, refusal of non-comparable FIDs, and the help examples run literally."""

from __future__ import annotations

import json
import os
import shlex
import shutil

import pytest
import yaml

from conftest import REPO, run_d2c
from d2ctool.errors import UserError
from d2ctool.evaluation.frontier import frontier, write_frontier
from d2ctool.sweep import parse_axis, parse_system, run_sweep

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ref(tiny_models, tmp_path_factory):
    """A `d2c fid-ref` reference of the tiny shards (random-weight Inception, a test-only extractor)."""
    out = tmp_path_factory.mktemp("ref") / "ref.npz"
    run_d2c("fid-ref", tiny_models / "shards", out, "--features", "inception-random", "--resolution", "32",
            "--num-images", "20", "--device", "cpu", check=True)
    return out


def base(root, *extra):
    return [f"tokenizers.vq.checkpoint={root / 'vq-tiny-s4.pt'}", f"tokenizers.kl.checkpoint={root / 'kl-tiny-s4.pt'}",
            f"sample.discrete={root / 'gpt'}", "sample.num_images=10", "sample.batch_size=5", "sample.stage1.top_k=0",
            "sample.stage2.clip_x0=3.0", "sample.grid_classes=2", "sample.grid_per_class=1",
            "fid.features=inception-random", "fid.device=cpu", "fid.batch_size=10", "sweep.timing_batches=1", *extra]


def systems(root):
    return ["discrete-only=discrete-only", f"two-stage-add=two-stage:{root / 'add'}",
            f"continuous-only=continuous-only:{root / 'none'}"]


def test_grid_and_system_syntax_errors_are_one_clear_line():
    assert parse_axis("stage2.num_iter=1,2,4").values == (("1",), ("2",), ("4",))
    tied = parse_axis("stage2.sampler:stage2.num_sampling_steps=ddpm:25,dpm-solver++:10")
    assert tied.keys == ("stage2.sampler", "stage2.num_sampling_steps") and tied.values[1] == ("dpm-solver++", "10")
    for bad, match in [("stage2.num_iter", "expected KEY=V1,V2"), ("a:b=1:2,3", "2 part"), ("a=1,1", "repeated")]:
        with pytest.raises(UserError, match=match):
            parse_axis(bad)
    assert parse_system("x=two-stage:runs/add").stage2 == "runs/add"
    for bad in ("two-stage", "x=nonsense", "a b=two-stage"):
        with pytest.raises(UserError, match="NAME=MODE"):
            parse_system(bad)


def test_bad_settings_are_refused_before_any_point_runs(tiny_models, ref, tmp_path):
    with pytest.raises(UserError, match="stage2.nm_iter"):
        run_sweep(tmp_path / "s", None, base(tiny_models), systems(tiny_models)[1:2], ["stage2.nm_iter=1,2"], ref)
    with pytest.raises(UserError, match=r"sweep point two-stage-add stage2.sampler=dpm-solver\+\+: sample.stage2.temperature 0.5"):
        run_sweep(tmp_path / "s", None, base(tiny_models, "sample.stage2.temperature=0.5"), systems(tiny_models)[1:2],
                  ["stage2.sampler=ddpm,dpm-solver++"], ref)
    with pytest.raises(UserError, match="sampler: expected one of"):
        run_sweep(tmp_path / "s", None, base(tiny_models), systems(tiny_models)[1:2], ["stage2.sampler=euler"], ref)
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_sweep_runs_each_point_once_and_a_larger_grid_only_the_new_ones(tiny_models, ref, tmp_path):
    out = tmp_path / "sweep"
    grid = ["stage1.cfg_scale=1.0,2.0", "stage2.sampler:stage2.num_sampling_steps=ddpm:4,dpm-solver++:3"]
    rows = run_sweep(out, None, base(tiny_models, "sample.stage2.num_iter=2"), systems(tiny_models), grid, ref)
    # discrete-only takes only the stage-1 axis, continuous-only only the stage-2 one, two-stage both
    counts = {s: sum(r["system"] == s for r in rows) for s in ("discrete-only", "two-stage-add", "continuous-only")}
    assert counts == {"discrete-only": 2, "two-stage-add": 4, "continuous-only": 2}
    point = out / "two-stage-add" / "stage1.cfg_scale=2.0,stage2.sampler=dpm-solver++,stage2.num_sampling_steps=3"
    assert (point / "samples.npz").is_file() and (point / "metrics.json").is_file()
    manifest = json.loads((point / "manifest.json").read_text())
    assert manifest["mode"] == "two-stage"
    config = yaml.safe_load((point / "config.yaml").read_text())["sample"]
    assert (config["stage2"]["sampler"], config["stage2"]["num_sampling_steps"], config["stage1"]["cfg_scale"]) == \
        ("dpm-solver++", 3, 2.0)
    timing = json.loads((point / "timing.json").read_text())
    assert set(timing["seconds_per_image"]) == {"stage1", "stage2", "decode"} and timing["images"] == 5
    assert timing["threads"] == 1 and timing["warmup_batches"] == 1
    assert timing["images_per_second"] == pytest.approx(1 / sum(timing["seconds_per_image"].values()))

    result = json.loads((out / "frontier.json").read_text())
    assert len(result["settings"]) == 8 and (out / "frontier.png").stat().st_size > 1000
    for s in result["settings"]:  # Pareto marks, checked by brute force
        beaten = [o for o in result["settings"] if o is not s and o["fid"] <= s["fid"]
                  and o["images_per_second"] >= s["images_per_second"]
                  and (o["fid"], o["images_per_second"]) != (s["fid"], s["images_per_second"])]
        assert s["pareto_all"] == (not beaten)
        assert s["pareto"] == (not [o for o in beaten if o["system"] == s["system"]])
    assert "| two-stage-add | cfg1=2.0 dpm-solver++ n3 |" in (out / "frontier.md").read_text()

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.parent != out}
    again = run_sweep(out, None, base(tiny_models, "sample.stage2.num_iter=2"), systems(tiny_models), grid, ref)
    assert [r["fid"] for r in again] == [r["fid"] for r in rows]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing redone
    bigger = run_sweep(out, None, base(tiny_models, "sample.stage2.num_iter=2"), systems(tiny_models)[2:],
                       ["stage2.sampler:stage2.num_sampling_steps=ddpm:4,dpm-solver++:3,ddim:3"], ref)
    assert len(bigger) == 3 and {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (out / "continuous-only" / "stage2.sampler=ddim,stage2.num_sampling_steps=3" / "timing.json").is_file()


@pytest.mark.slow
def test_seed_spread_and_results_frontier(tiny_models, ref, tmp_path):
    out = tmp_path / "sweep"
    run_sweep(out, None, base(tiny_models), systems(tiny_models)[2:], ["seed=0,1,2", "stage2.num_iter=2"], ref)
    result = json.loads((out / "frontier.json").read_text())
    (spread,) = result["seed_spread"]
    assert spread["seeds"] == [0, 1, 2] and len(set(spread["fid_per_seed"])) == 3
    assert (result["settings"][0]["fid"]) == pytest.approx(sum(spread["fid_per_seed"]) / 3)
    assert "Seed-to-seed spread of FID at continuous-only it2: std" in (out / "frontier.md").read_text()
    # `d2c results --frontier` joins sweeps into one frontier beside the table
    folder = next((out / "continuous-only").iterdir())
    proc = run_d2c("results", tmp_path / "results", f"continuous-only={folder}", "--frontier", out, check=True)
    assert "## Speed-quality frontier" in proc.stdout and (tmp_path / "results" / "frontier.png").is_file()


def test_non_comparable_points_are_refused_naming_both(tiny_models, ref, tmp_path):
    out = tmp_path / "sweep"
    rows = run_sweep(out, None, base(tiny_models), systems(tiny_models)[:1], ["stage1.cfg_scale=1.0,2.0"], ref)
    other = dict(rows[1], num_samples=50_000)
    with pytest.raises(UserError, match=r"discrete-only cfg1=1.0 .*sample count 10.* and discrete-only cfg1=2.0 .*"
                                        r"sample count 50000.*not comparable"):
        frontier([rows[0], other])
    moved = dict(rows[1], reference="0" * 64, reference_path="/elsewhere/ref.npz")
    with pytest.raises(UserError, match="/elsewhere/ref.npz.*different reference"):
        write_frontier(tmp_path / "f", [rows[0], moved])


def _epilog_examples(command: str) -> list[list[str]]:
    from d2ctool.cli import app

    info = next(c for c in app.registered_commands if (c.name or c.callback.__name__) == command)
    return [shlex.split(line.strip())[1:] for line in info.epilog.split("\n") if line.strip().startswith("d2c ")]


@pytest.mark.slow
def test_help_examples_run_literally(tiny_models, ref, tmp_path):
    """The sweep examples, verbatim, in a folder laid out as the tiny recipe's commands leave runs/tiny (the tiny
    models; the recipe copied with fewer images and the test-only Inception); then results joins both sweeps."""
    recipe = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())
    recipe["sample"].update(num_images=10, batch_size=5)
    recipe["fid"].update(features="inception-random", batch_size=10)
    recipe["sweep"] = {"timing_batches": 1}
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    tiny = tmp_path / "runs" / "tiny"
    for name, target in (("vq/tokenizer.pt", "vq-tiny-s4.pt"), ("kl/tokenizer.pt", "kl-tiny-s4.pt"),
                         ("discrete", "gpt"), ("continuous", "add"), ("ref.npz", None)):
        (tiny / name).parent.mkdir(parents=True, exist_ok=True)
        (tiny / name).symlink_to(ref if target is None else tiny_models / target)
    shutil.copytree(tiny_models / "shards", tiny / "val")  # its manifest names the classes
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's d2ctool, from another folder
    examples = _epilog_examples("sweep")
    assert len(examples) == 2
    for args in examples:
        proc = run_d2c(*args, cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "| system | settings | FID | images/s" in proc.stdout
    proc = run_d2c("results", "runs/tiny", f"two-stage-add={next((tiny / 'sweep' / 'two-stage-add').iterdir())}",
                   "--frontier", "runs/tiny/sweep", "--frontier", "runs/tiny/sweep-discrete", cwd=tmp_path, env=env)
    assert proc.returncode == 0 and "## Speed-quality frontier" in proc.stdout, proc.stderr[-3000:]
