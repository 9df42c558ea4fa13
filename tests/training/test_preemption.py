"""Pre-emption as on a cluster: real signals sent to real `d2c` processes.

Training finishes its step, writes a checkpoint, prints one line and exits 128 + the signal; sample, encode and
fid stop at a batch boundary keeping finished batches; the same command then resumes. Also: keep_last /
keep_every, settings a resume may change, and the recorded target steps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, run_d2c

pytestmark = pytest.mark.slow  # trains, samples or runs the CLI in subprocesses

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "D2C_LOG_INTERVAL": "0", "PYTHONPATH": str(REPO)}


def start(args, tmp_path, env=None):
    log = open(tmp_path / "stderr.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "d2ctool", *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=log, text=True, env=env or ENV)
    return proc, tmp_path / "stderr.log"


def wait_for(condition, proc, timeout=120):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        assert proc.poll() is None, "the command ended before it could be signalled"
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out waiting for the command to get going")


def stop(proc, signum, log):
    proc.send_signal(signum)
    proc.wait(timeout=120)
    lines = log.read_text().strip().splitlines()
    assert proc.returncode == 128 + signum, log.read_text()[-2000:]
    assert "Traceback" not in log.read_text()
    return lines[-1]


def train_args(data, run, *extra):
    return ["train-discrete", *[f"--set=discrete.{s}" for s in
                                [f"data={data}", f"out={run}", "model=gpt-tiny", "grid_classes=1",
                                 "train.global_batch_size=8", "train.num_workers=0", "train.sample_every=0",
                                 "train.log_every=1", "train.ckpt_every=100000", *extra]]]


def metric_lines(run) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.mark.parametrize("signame,env", [("SIGTERM", {}), ("SIGINT", {}), ("SIGUSR1", {}),
                                         ("SIGUSR2", {"D2C_STOP_SIGNAL": "SIGUSR2"})])
def test_training_saves_a_checkpoint_and_says_how_to_resume(tiny_data, tmp_path, signame, env):
    run = tmp_path / "run"
    proc, log = start(train_args(tiny_data / "encoded", run, "train.steps=100000"), tmp_path, {**ENV, **env})
    wait_for(lambda: metric_lines(run) >= 2, proc)
    signum = getattr(signal, signame)
    line = stop(proc, signum, log)
    step = int(line.split("saved step ")[1].split()[0])
    assert line.startswith(f"stopped by {signame}: train-discrete saved step {step} of 100000")
    assert "run the same command again to resume" in line
    assert (run / "checkpoints" / f"step_{step:07d}.pt").is_file() and step >= 2
    # the resume: explicit steps (the run was started for 100000), compile/grad_checkpointing may change
    resumed = run_d2c(*train_args(tiny_data / "encoded", run, f"train.steps={step + 1}",
                                  "train.grad_checkpointing=true", "train.keep_last=1"), env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {step}" in resumed.stdout
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*.pt")) == [f"step_{step + 1:07d}.pt"]


def test_keep_last_and_keep_every_and_the_target_steps(tiny_data, tmp_path):
    run = tmp_path / "run"
    args = train_args(tiny_data / "encoded", run, "train.ckpt_every=1", "train.keep_last=2", "train.keep_every=3")
    proc = run_d2c(*args, "--set=discrete.train.steps=7", env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*.pt")) == \
        ["step_0000003.pt", "step_0000006.pt", "step_0000007.pt"]
    # re-run with the recipe's steps (100,000 by default), without --set train.steps: refused, both counts named
    again = run_d2c(*args, env=ENV)
    assert again.returncode == 2 and "started for 7 steps" in again.stderr and "100000" in again.stderr
    assert "--set train.steps=100000" in again.stderr
    same = run_d2c(*args, "--set=discrete.train.steps=7", env=ENV)
    assert same.returncode == 0 and "nothing to do" in same.stderr
    extended = run_d2c(*args, "--set=discrete.train.steps=8", env=ENV)
    assert extended.returncode == 0 and "started for 7 steps; now training it to 8" in extended.stderr


def test_sample_stops_at_a_batch_boundary_and_resumes(tiny_data, tmp_path):
    from d2ctool.config import to_dict
    from d2ctool.discrete.train import train_discrete
    from d2ctool.recipe import load_recipe, recipe_yaml

    gpt = tmp_path / "gpt"
    recipe = load_recipe(None, [f"discrete.data={tiny_data / 'encoded'}", f"discrete.out={gpt}", "discrete.model=gpt-tiny",
                                "discrete.grid_classes=1", "discrete.train.steps=1", "discrete.train.global_batch_size=8",
                                "discrete.train.num_workers=0", "discrete.train.sample_every=0"])
    train_discrete(recipe.discrete, to_dict(recipe.discrete), recipe_yaml(recipe))
    out = tmp_path / "samples"
    args = ["sample", out, *[a for s in [f"tokenizers.vq.checkpoint={tiny_data / 'vq-tiny-s4.pt'}",
                                         "sample.mode=discrete-only", f"sample.discrete={gpt}", "sample.num_images=400",
                                         "sample.batch_size=2", "sample.grid_classes=1", "sample.grid_per_class=1"]
                             for a in ("--set", s)]]
    proc, log = start(args, tmp_path)
    wait_for(lambda: len(list((out / "images").glob("*.png"))) >= 4 if (out / "images").is_dir() else False, proc)
    line = stop(proc, signal.SIGTERM, log)
    assert line.startswith("stopped by SIGTERM: sample kept ") and "run the same command again" in line
    kept = int(line.split("kept ")[1].split()[0])
    assert 2 <= kept < 200 and not (out / "manifest.json").exists()
    resumed = run_d2c(*args, env=ENV)
    assert resumed.returncode == 0 and f"{kept} of 200 batches done" in resumed.stderr, resumed.stderr
    assert np.load(out / "samples.npz")["arr_0"].shape[0] == 400


def test_encode_stops_at_a_shard_boundary_and_resumes(tiny_data, tmp_path):
    shards = tmp_path / "shards"
    assert run_d2c("prepare", "synthetic", shards, "--set", "prepare.shard_size=2", "--set",
                   "prepare.synthetic.images_per_class=60", "--set", "prepare.synthetic.resolution=32", "--set",
                   "prepare.synthetic.num_classes=4", "--set", "prepare.workers=1", env=ENV).returncode == 0
    out = tmp_path / "encoded"
    args = ["encode", shards, out, "--set", f"tokenizers.vq.checkpoint={tiny_data / 'vq-tiny-s4.pt'}", "--set",
            f"tokenizers.kl.checkpoint={tiny_data / 'kl-tiny-s4.pt'}", "--set", "encode.resolution=32"]
    proc, log = start(args, tmp_path)
    wait_for(lambda: len(list(out.glob("*.tar"))) >= 2, proc)
    line = stop(proc, signal.SIGTERM, log)
    assert line.startswith("stopped by SIGTERM: encode kept ") and "run the same command again" in line
    kept = int(line.split("kept ")[1].split()[0])
    resumed = run_d2c(*args, env=ENV)
    assert resumed.returncode == 0 and f"resuming, {kept} of 120 shards" in resumed.stderr, resumed.stderr


def test_fid_keeps_the_features_of_finished_batches(tiny_data, tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "samples.npz"
    np.savez(npz, arr_0=rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8))
    env = {**ENV, "D2C_CACHE_DIR": str(tmp_path / "cache")}
    args = ["fid", npz, "--ref", tiny_data / "shards", "--features", "inception-random", "--batch-size", "10",
            "--set", "fid.resolution=32"]
    proc, log = start(args, tmp_path, env)
    wait_for(lambda: "samples: " in log.read_text(), proc, timeout=300)
    line = stop(proc, signal.SIGINT, log)
    assert line.startswith("stopped by SIGINT: samples: features of ") and "kept in" in line
    done = int(line.split("features of ")[1].split()[0])
    assert done > 0 and done % 10 == 0
    resumed = run_d2c(*args, env=env)
    assert resumed.returncode == 0 and f"resuming after {done} of 200 images" in resumed.stderr
    assert not list((tmp_path / "cache" / "fid").glob("partial-*"))
    # the same numbers as an uninterrupted run
    shutil.rmtree(tmp_path / "cache")
    whole = run_d2c(*args, "--out", tmp_path / "whole.json", env=env)
    assert whole.returncode == 0
    assert json.loads((tmp_path / "whole.json").read_text())["fid"] == json.loads(
        (tmp_path / "metrics.json").read_text())["fid"]


def test_ctrl_c_outside_a_loop_says_that_finished_work_is_kept(tmp_path):
    """Typer turns a KeyboardInterrupt into a silent exit 130; the CLI's own handler must speak first."""
    code = ("import sys, time, d2ctool.cli as cli\n"
            "cli.app.command('nap')(lambda: (print('ready', flush=True), time.sleep(60)))\n"
            "sys.argv = ['d2c', 'nap']\ncli.main()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == ("interrupted: finished work is kept; run the same command "
                                                      "again to resume")


def rank_pids(launcher: int) -> dict[int, int]:
    """RANK -> pid of the workers torchrun `launcher` started (read from /proc: no psutil needed)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            environ = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
        except OSError:  # the process ended meanwhile
            continue
        rank = [v.split(b"=", 1)[1] for v in environ if v.startswith(b"RANK=")]
        if ppid == launcher and rank:
            found[int(rank[0])] = int(entry)
    return found


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_boundary(tiny_data, tmp_path):
    """Under torchrun a signal may reach one rank only (e.g. `scancel --signal=USR1` of one task): the ranks agree
    at each shard boundary, so the other rank stops there too, by the same signal, instead of working on and then
    waiting at a barrier for a rank that has left."""
    shards = tmp_path / "shards"
    assert run_d2c("prepare", "synthetic", shards, "--set", "prepare.shard_size=2", "--set",
                   "prepare.synthetic.images_per_class=60", "--set", "prepare.synthetic.resolution=32", "--set",
                   "prepare.synthetic.num_classes=4", "--set", "prepare.workers=1", env=ENV).returncode == 0
    out = tmp_path / "encoded"
    args = ["encode", shards, out, "--set", f"tokenizers.vq.checkpoint={tiny_data / 'vq-tiny-s4.pt'}", "--set",
            f"tokenizers.kl.checkpoint={tiny_data / 'kl-tiny-s4.pt'}", "--set", "encode.resolution=32"]
    log = open(tmp_path / "stderr.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29757", "-m", "d2ctool", *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=log, text=True, env=ENV)
    wait_for(lambda: len(list(out.glob("*.tar"))) >= 4 and len(rank_pids(proc.pid)) == 2, proc)
    os.kill(rank_pids(proc.pid)[1], signal.SIGUSR1)
    proc.wait(timeout=120)
    printed = (tmp_path / "stderr.log").read_text()
    stopped = [line for line in printed.splitlines() if line.startswith("stopped by ")]
    assert proc.returncode != 0 and len(stopped) == 2, printed[-3000:]
    # rank 0 was never signalled: it stopped because rank 1 was, by the same signal
    assert all(line.startswith("stopped by SIGUSR1: encode kept ") for line in stopped), printed[-3000:]
    assert "gloo" not in printed.lower() and "[rank0]" not in printed, printed[-3000:]
    kept = sum(int(line.split("kept ")[1].split()[0]) for line in stopped)
    assert 4 <= kept < 120 and len(list(out.glob("*.tar"))) == kept and not (out / "manifest.json").exists()
    resumed = run_d2c(*args, env=ENV)
    assert resumed.returncode == 0 and f"resuming, {kept} of 120 shards" in resumed.stderr, resumed.stderr
