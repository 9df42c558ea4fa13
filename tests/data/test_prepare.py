"""`d2c prepare`: accepted and rejected files, the shard format, resume, refusal, determinism."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from conftest import REPO, image_bytes, run_d2c
from d2ctool.data.prepare import STATE_DIR, prepare
from d2ctool.data.verify import load_file
from d2ctool.errors import UserError
from d2ctool.recipe import load_recipe, recipe_yaml


def run_prepare(src, out, *overrides):
    recipe = load_recipe(None, list(overrides), "prepare")
    return prepare(str(src), out, recipe.prepare, recipe_yaml(recipe))


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def all_samples(out: Path) -> dict[str, dict[str, bytes]]:
    manifest = json.loads((out / "manifest.json").read_text())
    merged = {}
    for shard in manifest["shards"]:
        merged.update(tar_samples(out / shard["file"]))
    return merged


def test_messy_tree_accepts_good_files_and_lists_every_bad_one(messy_tree, tmp_path):
    root, expect = messy_tree
    out = tmp_path / "out"
    result = run_prepare(root, out, "shard_size=7", "workers=2")

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == expect["classes"]
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert sorted(r["path"] for r in rejected) == sorted(expect["bad"])
    reasons = {r["path"]: r["reason"] for r in rejected}
    assert "truncated" in reasons["cat/truncated.JPEG"] or "corrupt" in reasons["cat/truncated.JPEG"]
    assert "corrupt" in reasons["cat/corrupt.JPEG"] or "not an image" in reasons["cat/corrupt.JPEG"]
    assert reasons["dog/empty.JPEG"] == "empty file (0 bytes)"
    assert reasons["dog/notes.txt"].startswith("not an image")
    assert reasons["eel/fake.JPEG"].startswith("not an image")
    assert "GIF" in reasons["eel/anim.gif"]
    assert reasons["eel/dangling.jpg"] == "broken symbolic link"
    assert reasons["stray.jpg"] == "file outside any class folder"
    assert result.num_rejected == len(expect["bad"])

    # every good file is stored once, bytes untouched, with its class and metadata
    samples = all_samples(out)
    assert result.num_samples == manifest["num_samples"] == len(samples) == len(expect["good"])
    by_source = {json.loads(s["json"])["source"]: s for s in samples.values()}
    assert set(by_source) == set(expect["good"])
    for rel, data in expect["good"].items():
        sample = by_source[rel]
        (image_ext,) = set(sample) - {"cls", "json"}
        assert sample[image_ext] == data
        cls_name = rel.split("/")[0]
        assert int(sample["cls"]) == expect["classes"].index(cls_name)
        meta = json.loads(sample["json"])
        with Image.open(root / rel) as img:
            assert (meta["width"], meta["height"]) == img.size
        assert meta["class"] == cls_name
    assert by_source["dog/png_named.JPEG"].keys() >= {"png"}  # stored by content, not by extension
    assert all("." not in key for key in samples)
    assert manifest["class_counts"] == [sum(1 for r in expect["good"] if r.startswith(c + "/")) for c in expect["classes"]]

    # manifest shard records are true
    for shard in manifest["shards"]:
        path = out / shard["file"]
        assert len(tar_samples(path)) == shard["samples"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
    assert not (out / STATE_DIR).exists()
    assert "shard_size: 7" in (out / "config.yaml").read_text()


def test_shards_read_with_webdataset(messy_tree, tmp_path):
    root, expect = messy_tree
    out = tmp_path / "out"
    run_prepare(root, out, "shard_size=5", "workers=1")
    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / s["file"]) for s in manifest["shards"]]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil")
    seen = 0
    for sample in dataset:
        image = sample.get("jpg") or sample.get("png")
        assert image.size[0] > 0
        meta = sample["json"]
        assert sample["cls"] == expect["classes"].index(meta["class"])
        seen += 1
    assert seen == len(expect["good"])


def test_shuffle_is_seeded_and_global(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    common = ["synthetic.images_per_class=12", "synthetic.resolution=16", "shard_size=30", "workers=1"]
    run_prepare("synthetic", a, *common)
    run_prepare("synthetic", b, *common)
    run_prepare("synthetic", c, *common, "seed=1")
    ma, mb, mc = (json.loads((d / "manifest.json").read_text()) for d in (a, b, c))
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]
    assert [s["sha256"] for s in ma["shards"]] != [s["sha256"] for s in mc["shards"]]
    first = [int(s["cls"]) for s in tar_samples(a / ma["shards"][0]["file"]).values()]
    assert len(set(first)) > 5  # classes are mixed, not in source order


def test_parallel_workers_give_identical_output(messy_tree, tmp_path):
    root, _ = messy_tree
    run_prepare(root, tmp_path / "w1", "shard_size=4", "workers=1")
    run_prepare(root, tmp_path / "w2", "shard_size=4", "workers=2")
    assert (tmp_path / "w1" / "manifest.json").read_text() == (tmp_path / "w2" / "manifest.json").read_text()
    assert (tmp_path / "w1" / "rejected.jsonl").read_text() == (tmp_path / "w2" / "rejected.jsonl").read_text()


def test_rerun_is_a_noop_and_different_arguments_are_refused(tmp_path):
    out = tmp_path / "out"
    args = ["synthetic.images_per_class=3", "synthetic.resolution=16", "shard_size=8", "workers=1"]
    first = run_prepare("synthetic", out, *args)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run_prepare("synthetic", out, *args)
    assert again.already_complete and again.num_samples == first.num_samples
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    assert run_prepare("synthetic", out, *args, "workers=2").already_complete  # workers do not change output
    with pytest.raises(UserError, match=r"different arguments \(prepare.shard_size: 8 there, 9 now\)"):
        run_prepare("synthetic", out, *args, "shard_size=9")
    with pytest.raises(UserError, match="synthetic.resolution"):
        run_prepare("synthetic", out, *args, "synthetic.resolution=20")


def test_changed_source_listing_is_refused(messy_tree, tmp_path):
    root, _ = messy_tree
    out = tmp_path / "out"
    run_prepare(root, out, "workers=1")
    (root / "cat" / "new.jpg").write_bytes(image_bytes(seed=99))
    with pytest.raises(UserError, match="listing_sha256"):
        run_prepare(root, out, "workers=1")


def test_foreign_output_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and was not made by `d2c prepare`"):
        run_prepare("synthetic", out, "synthetic.images_per_class=1")
    assert (out / "precious.txt").read_text() == "mine"


_CRASH = """
import os, sys
import d2ctool.data.prepare as prep
from d2ctool.recipe import load_recipe, recipe_yaml
real_write_tar, calls = prep.write_tar, []
def dying_write_tar(path, samples):
    calls.append(path)
    if len(calls) == {crash_at}:
        real_write_tar(path, samples[: len(samples) // 2])  # a half-written temporary, then death
        os._exit(9)
    real_write_tar(path, samples)
prep.write_tar = dying_write_tar
recipe = load_recipe(None, {overrides!r}, "prepare")
prep.prepare("synthetic", sys.argv[1], recipe.prepare, recipe_yaml(recipe))
"""


@pytest.mark.slow
@pytest.mark.parametrize("crash_at", [1, 3])
def test_resume_after_kill_mid_shard_gives_identical_shards(tmp_path, crash_at):
    overrides = ["synthetic.images_per_class=10", "synthetic.resolution=16", "shard_size=20", "workers=1"]
    whole = tmp_path / "whole"
    run_prepare("synthetic", whole, *overrides)

    killed = tmp_path / "killed"
    code = _CRASH.format(crash_at=crash_at, overrides=overrides)
    proc = subprocess.run([sys.executable, "-c", code, str(killed)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert not (killed / "manifest.json").exists()
    assert list(killed.glob(".*.tmp")), "the kill should leave a partial temporary behind"
    finished = sorted(p.name for p in killed.glob("*.tar"))
    assert len(finished) == crash_at - 1  # no partial tar under a final name

    result = run_prepare("synthetic", killed, *overrides)
    assert result.shards_written == result.num_shards - (crash_at - 1)
    assert not list(killed.glob(".*.tmp"))
    assert (killed / "manifest.json").read_text() == (whole / "manifest.json").read_text()
    for tar in whole.glob("*.tar"):
        assert (killed / tar.name).read_bytes() == tar.read_bytes()


@pytest.mark.slow
def test_cli_run_killed_with_sigkill_resumes(tmp_path):
    out = tmp_path / "out"
    args = ["prepare", "synthetic", out, "--set", "synthetic.images_per_class=150", "--set", "synthetic.resolution=96",
            "--set", "shard_size=100", "--workers", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "d2ctool", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(out.glob("*.tar")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    done_before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    assert done_before

    resumed = run_d2c(*args, check=True)
    assert "resuming" in resumed.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 1500 and len(manifest["shards"]) == 15
    for name, data in done_before.items():  # finished shards are kept, not redone
        assert (out / name).read_bytes() == data
    reference = tmp_path / "reference"
    run_prepare("synthetic", reference, "synthetic.images_per_class=150", "synthetic.resolution=96",
                "shard_size=100", "workers=2")
    assert (reference / "manifest.json").read_text().replace(str(reference), str(out)) == \
        (out / "manifest.json").read_text()


def test_flat_folder_with_labels_file(tmp_path):
    val = tmp_path / "val"
    val.mkdir()
    lines, truth = [], {}
    for i in range(9):
        name = f"ILSVRC2012_val_{i:08d}.JPEG"
        (val / name).write_bytes(image_bytes(seed=i))
        wnid = ["n01440764", "n01443537", "n01484850"][i % 3]
        truth[name] = wnid
        lines.append(f"{name} {wnid}")
    (val / "unlabelled.JPEG").write_bytes(image_bytes(seed=50))
    lines.append("ILSVRC2012_val_00000099.JPEG n01440764")  # listed but missing
    labels = tmp_path / "labels.txt"
    labels.write_text("# file class\n" + "\n".join(lines) + "\n")
    out = tmp_path / "out"
    run_prepare(val, out, f"labels={labels}", "workers=1")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == ["n01440764", "n01443537", "n01484850"]
    samples = all_samples(out)
    assert len(samples) == 9
    for sample in samples.values():
        meta = json.loads(sample["json"])
        assert meta["class"] == truth[meta["source"]]
        assert manifest["classes"][int(sample["cls"])] == truth[meta["source"]]
    reasons = {json.loads(l)["path"]: json.loads(l)["reason"] for l in (out / "rejected.jsonl").read_text().splitlines()}
    assert reasons == {"unlabelled.JPEG": f"no label in {labels}",
                       "ILSVRC2012_val_00000099.JPEG": f"listed in {labels} but not found"}

    # Kaggle's LOC_val_solution.csv, with the class order taken from a training manifest
    train = tmp_path / "train"
    for wnid in ["n01440764", "n01443537", "n01484850", "n09999999"]:
        (train / wnid).mkdir(parents=True)
        (train / wnid / "a.JPEG").write_bytes(image_bytes(seed=1))
    run_prepare(train, tmp_path / "train_shards", "workers=1")
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n" + "".join(
        f"{name.rsplit('.', 1)[0]},{wnid} 1 2 3 4 {wnid} 5 6 7 8\n" for name, wnid in truth.items()))
    out2 = tmp_path / "out2"
    run_prepare(val, out2, f"labels={csv}", f"classes={tmp_path / 'train_shards' / 'manifest.json'}", "workers=1")
    manifest2 = json.loads((out2 / "manifest.json").read_text())
    assert manifest2["classes"] == ["n01440764", "n01443537", "n01484850", "n09999999"]
    assert manifest2["class_counts"] == [3, 3, 3, 0]


def test_bad_sources_give_clear_errors(tmp_path):
    with pytest.raises(UserError, match="source not found"):
        run_prepare(tmp_path / "nope", tmp_path / "out")
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.jpg").write_bytes(image_bytes())
    with pytest.raises(UserError, match="no class folders.*prepare.labels"):
        run_prepare(flat, tmp_path / "out")
    root = tmp_path / "imagenet"
    (root / "train" / "n01").mkdir(parents=True)
    (root / "val").mkdir()
    with pytest.raises(UserError, match="pass .*train instead"):
        run_prepare(root, tmp_path / "out")
    with pytest.raises(UserError, match="labels file not found"):
        run_prepare(flat, tmp_path / "out", f"labels={tmp_path / 'missing.txt'}")
    bad_labels = tmp_path / "bad.txt"
    bad_labels.write_text("a.jpg\n")
    with pytest.raises(UserError, match=r"bad.txt:1: expected '<file name> <class name>'"):
        run_prepare(flat, tmp_path / "out", f"labels={bad_labels}")
    classes = tmp_path / "classes.txt"
    classes.write_text("x\n")
    (tmp_path / "tree" / "y").mkdir(parents=True)
    (tmp_path / "tree" / "y" / "a.jpg").write_bytes(image_bytes())
    with pytest.raises(UserError, match="not in .*classes.txt: y"):
        run_prepare(tmp_path / "tree", tmp_path / "out", f"classes={classes}")
    with pytest.raises(UserError, match="at most 200"):
        run_prepare("synthetic", tmp_path / "out", "synthetic.num_classes=201")
    assert not (tmp_path / "out").exists()  # nothing written by a refused run


def test_unreadable_file_is_reported(tmp_path):
    (tmp_path / "adir.jpg").mkdir()
    assert load_file(str(tmp_path), "adir.jpg")["reason"].startswith("unreadable")
    assert load_file(str(tmp_path), "vanished.jpg")["reason"].startswith("unreadable")
    if os.geteuid() != 0:  # root reads through permissions; the two cases above cover root
        locked = tmp_path / "locked.jpg"
        locked.write_bytes(image_bytes())
        locked.chmod(0)
        assert load_file(str(tmp_path), "locked.jpg")["reason"].startswith("unreadable")


@pytest.mark.slow
def test_cli_prepare_end_to_end(tmp_path):
    out = tmp_path / "shards"
    proc = run_d2c("prepare", "synthetic", out, "--recipe", REPO / "recipes" / "tiny.yaml",
                   "--set", "synthetic.images_per_class=4", "--workers", "1", check=True)
    assert "40 images in 1 shards" in proc.stdout
    again = run_d2c("prepare", "synthetic", out, "--recipe", REPO / "recipes" / "tiny.yaml",
                    "--set", "synthetic.images_per_class=4", check=True)
    assert "already complete" in again.stdout and "nothing to do" in again.stdout
    refused = run_d2c("prepare", "synthetic", out, "--recipe", REPO / "recipes" / "tiny.yaml")
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: output") and "Traceback" not in refused.stderr
    assert "images_per_class: 4 there, 100 now" in refused.stderr
    config = (out / "config.yaml").read_text()
    assert "images_per_class: 4" in config and "name: synthetic" in config
    first = next(iter(all_samples(out).values()))
    assert Image.open(io.BytesIO(first["png"])).size == (64, 64)
