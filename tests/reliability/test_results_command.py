"""Class 6: `d2c results` keeps the guarantees of every other command: it checks every input (manifests, metrics,
training logs, samples.npz, images) before writing, takes the output lock, writes results.json/.md/.png as one set
(a failure or a full disk leaves the previous complete set), and a finished set on a read-only mount is a no-op."""

from __future__ import annotations

import errno
import json
import os

import hashlib

import numpy as np
import pytest
from PIL import Image

from faults import assert_one_line_error, run_cli

RESULTS = ("results.json", "results.md", "results.png")


def scored_folder(root, name="two-stage", n=6, classes=3, budget_lines=None):
    """A finished, scored `d2c sample` folder as the real commands lay it out, with a training run behind stage 1."""
    run = root / f"run-{name}"
    (run / "checkpoints").mkdir(parents=True)
    lines = budget_lines if budget_lines is not None else [
        json.dumps({"step": 10, "loss": 2.0, "seconds": 30.0}), json.dumps({"step": 20, "loss": 1.5, "seconds": 30.0})]
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    folder = root / name
    (folder / "images").mkdir(parents=True)
    labels = np.arange(n) % classes
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(folder / "images" / f"{i:06d}.png")
    np.savez(folder / "samples.npz", arr_0=np.zeros((n, 8, 8, 3), np.uint8), labels=labels)
    (folder / "manifest.json").write_text(json.dumps({
        "format": "d2c-samples", "version": 1, "mode": "two-stage", "num_images": n, "images_per_second": 12.5,
        "loaded": {"stage1": {"checkpoint": str(run / "checkpoints" / "last.pt"), "parameters": 1_000_000},
                   "stage2": {"checkpoint": "/official/mar_base.pth", "parameters": 2_000_000}}}))
    (folder / "metrics.json").write_text(json.dumps({
        "fid": 12.3, "sfid": 4.5, "precision": 0.5, "recall": 0.4, "inception_score": 7.0, "num_samples": n,
        "extractor": {"name": "inception-random", "mode": "clean"}, "reference": {"path": "/ref.npz"},
        "samples": scored_samples(folder)}))
    return folder


def scored_samples(folder):
    """The record `d2c fid` leaves of the samples it scored (`results` refuses a row whose samples changed)."""
    npz = folder / "samples.npz"
    return {"kind": "npz", "path": str(npz), "content_sha256": hashlib.sha256(npz.read_bytes()).hexdigest()}


def results(monkeypatch, capsys, out, *folders, title="Results"):
    return run_cli(monkeypatch, capsys, "results", out, *[f"{f.name}={f}" for f in folders], "--title", title)


def snapshot(out):
    return {name: (out / name).read_bytes() for name in RESULTS}


def test_a_good_set_is_written_and_a_rerun_gives_the_same_set(tmp_path, monkeypatch, capsys):
    folder = scored_folder(tmp_path)
    code, err = results(monkeypatch, capsys, tmp_path / "out", folder)
    assert code == 0, err
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert rows[0]["fid"] == 12.3 and rows[0]["training"]["stage1"] == {
        "run": str(tmp_path / "run-two-stage"), "steps": 20, "minutes": 1.0}
    assert rows[0]["training"]["stage2"] is None  # an official file: no budget
    first = snapshot(tmp_path / "out")
    assert results(monkeypatch, capsys, tmp_path / "out", folder)[0] == 0
    assert snapshot(tmp_path / "out") == first


def test_a_finished_set_on_a_read_only_mount_is_nothing_to_do(tmp_path, monkeypatch, capsys):
    import d2ctool.evaluation.results as results_module

    folder = scored_folder(tmp_path)
    assert results(monkeypatch, capsys, tmp_path / "out", folder)[0] == 0

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "out"))

    monkeypatch.setattr(results_module, "lock_output", read_only)
    monkeypatch.setattr(results_module, "write_files", read_only)
    from d2ctool.cli import main
    import sys

    monkeypatch.setattr(sys, "argv", ["d2c", "results", str(tmp_path / "out"), f"two-stage={folder}"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code in (0, None)
    assert "nothing to do" in capsys.readouterr().out


def test_the_last_line_of_a_killed_runs_log_is_tolerated(tmp_path, monkeypatch, capsys):
    cut = [json.dumps({"step": 10, "seconds": 60.0}), '{"step": 20, "seco']
    folder = scored_folder(tmp_path, budget_lines=cut)
    code, err = results(monkeypatch, capsys, tmp_path / "out", folder)
    assert code == 0, err
    row = json.loads((tmp_path / "out" / "results.json").read_text())["rows"][0]
    assert row["training"]["stage1"]["steps"] == 10 and row["training"]["stage1"]["minutes"] == 1.0


def _break(folder, what):
    manifest, metrics = folder / "manifest.json", folder / "metrics.json"
    m, s = json.loads(manifest.read_text()), json.loads(metrics.read_text())
    run_log = folder.parent / f"run-{folder.name}" / "metrics.jsonl"
    if what == "metrics not an object":
        metrics.write_text("[1, 2]")
    elif what == "metrics not json":
        metrics.write_text("{fid: 3")
    elif what == "metrics binary":
        metrics.write_bytes(b"\xff\xfe\x00garbage")
    elif what == "fid is text":
        metrics.write_text(json.dumps({**s, "fid": "12.3"}))
    elif what == "fid is NaN":
        metrics.write_text(json.dumps({**s, "fid": float("nan")}))
    elif what == "num_samples float":
        metrics.write_text(json.dumps({**s, "num_samples": 6.5}))
    elif what == "extractor not a mapping":
        metrics.write_text(json.dumps({**s, "extractor": "inception"}))
    elif what == "reference a list":
        metrics.write_text(json.dumps({**s, "reference": ["/ref.npz"]}))
    elif what == "manifest a list":
        manifest.write_text("[]")
    elif what == "manifest wrong format":
        manifest.write_text(json.dumps({**m, "format": "d2c-image-shards"}))
    elif what == "mode missing":
        manifest.write_text(json.dumps({k: v for k, v in m.items() if k != "mode"}))
    elif what == "loaded a list":
        manifest.write_text(json.dumps({**m, "loaded": []}))
    elif what == "stage record a string":
        manifest.write_text(json.dumps({**m, "loaded": {"stage1": "gpt"}}))
    elif what == "parameters text":
        manifest.write_text(json.dumps({**m, "loaded": {"stage1": {"parameters": "1M"}}}))
    elif what == "speed inf":
        manifest.write_text(json.dumps({**m, "images_per_second": float("inf")}))
    elif what == "log middle line cut":
        run_log.write_text('{"step": 1, "seconds": 1.0}\n{"step": 2, "sec\n{"step": 3, "seconds": 1.0}\n')
    elif what == "log step text":
        run_log.write_text('{"step": "ten", "seconds": 1.0}\n')
    elif what == "log line not an object":
        run_log.write_text('[1]\n{"step": 3, "seconds": 1.0}\n')
    elif what == "labels missing":
        np.savez(folder / "samples.npz", arr_0=np.zeros((6, 8, 8, 3), np.uint8))
    elif what == "labels float":
        np.savez(folder / "samples.npz", labels=np.zeros(6) + 0.5)
    elif what == "labels object":
        np.savez(folder / "samples.npz", labels=np.array([None] * 6, dtype=object))
    elif what == "npz garbage":
        (folder / "samples.npz").write_bytes(b"garbage")
    elif what == "image missing":
        (folder / "images" / "000001.png").unlink()
    elif what == "image garbage":
        (folder / "images" / "000001.png").write_bytes(b"\x89PNG garbage")
    else:
        raise AssertionError(what)
    if what.startswith(("labels", "npz")):  # scored as it is now: the npz reader, not the digest, must catch it
        metrics.write_text(json.dumps({**s, "samples": scored_samples(folder)}))


BREAKS = ["metrics not an object", "metrics not json", "metrics binary", "fid is text", "fid is NaN",
          "num_samples float", "extractor not a mapping", "reference a list", "manifest a list",
          "manifest wrong format", "mode missing", "loaded a list", "stage record a string", "parameters text",
          "speed inf", "log middle line cut", "log step text", "log line not an object", "labels missing",
          "labels float", "labels object", "npz garbage", "image missing", "image garbage"]


@pytest.mark.parametrize("what", BREAKS)
def test_every_input_is_checked_before_anything_is_written(tmp_path, monkeypatch, capsys, what):
    good, bad = scored_folder(tmp_path, "good"), scored_folder(tmp_path, "bad")
    out = tmp_path / "out"
    assert results(monkeypatch, capsys, out, good, title="before")[0] == 0
    before = snapshot(out)
    _break(bad, what)
    code, err = results(monkeypatch, capsys, out, good, bad, title="after")
    assert_one_line_error(code, err, str(bad.parent))
    assert code == 2
    assert snapshot(out) == before  # the previous complete set, untouched
    assert sorted(p.name for p in out.iterdir()) == sorted([*RESULTS, ".d2c-lock"])


def test_an_output_path_that_is_a_file_is_a_clean_error(tmp_path, monkeypatch, capsys):
    folder = scored_folder(tmp_path)
    (tmp_path / "out").write_text("a file")
    code, err = results(monkeypatch, capsys, tmp_path / "out", folder)
    assert_one_line_error(code, err, "out", "not a folder")
    assert code == 2 and (tmp_path / "out").read_text() == "a file"


@pytest.mark.parametrize("args, fragment", [(["two-stage=/no/such/folder"], "not a folder"),
                                             (["a=X", "a=Y"], "unique")])
def test_bad_system_arguments(tmp_path, monkeypatch, capsys, args, fragment):
    code, err = run_cli(monkeypatch, capsys, "results", tmp_path / "out", *args)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("failing", RESULTS)
def test_a_full_disk_leaves_the_previous_set_and_names_the_file(tmp_path, monkeypatch, capsys, failing):
    import d2ctool.io as io_module

    folder = scored_folder(tmp_path)
    out = tmp_path / "out"
    assert results(monkeypatch, capsys, out, folder, title="first")[0] == 0
    before = snapshot(out)
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith(f".{failing}."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(io_module.os, "fsync", fsync)
    code, err = results(monkeypatch, capsys, out, folder, title="second")
    line = assert_one_line_error(code, err, str(out / failing), "ENOSPC")
    assert "free space" in line
    monkeypatch.undo()
    assert snapshot(out) == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_results_waits_for_no_one_it_takes_the_lock(tmp_path, monkeypatch, capsys):
    import subprocess
    import sys

    folder = scored_folder(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242 0'); print('locked', flush=True); time.sleep(60)"),
        str(out / ".d2c-lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = results(monkeypatch, capsys, out, folder)
        assert_one_line_error(code, err, "is being written by process")
        assert not (out / "results.json").exists()
    finally:
        holder.kill()
        holder.wait()
