"""Experiment tracking: TensorBoard event files read back with TensorBoard's own reader, W&B offline, the run
record, summary.json and loss.png."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from conftest import REPO, run_d2c

pytestmark = pytest.mark.slow  # trains, samples or runs the CLI in subprocesses

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def train(command, data, run, *extra, env=ENV):
    section = command.split("-")[1]
    model = "gpt-tiny" if section == "discrete" else "mar-tiny"
    sets = [f"data={data}", f"out={run}", f"model={model}", "train.global_batch_size=8", "train.num_workers=0",
            "train.sample_every=0", "train.log_every=1", "train.steps=3", *extra]
    sets += ["grid_classes=1"] if section == "discrete" else ["grid_samples=1", "sampling.num_iter=2"]
    return run_d2c(command, *[f"--set={section}.{s}" for s in sets], env=env)


def test_training_writes_tensorboard_events_run_record_summary_and_loss_curve(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    proc = train("train-discrete", tiny_data / "encoded", run)
    assert proc.returncode == 0, proc.stderr
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "token_accuracy", "ema_decay"} <= tags
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in logged])
    assert all(0 <= r["token_accuracy"] <= 1 and r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * 64, rel=0.01)
               for r in logged)

    record = json.loads((run / "run.json").read_text())["sessions"][-1]
    assert record["command"][0] == "__main__.py" and "train-discrete" in record["command"]
    assert record["torch"] and record["d2ctool"] and record["started"] <= record["ended"]
    assert record["end"] == "finished" and len(record["git_commit"]) >= 40
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_loss"] == logged[-1]["loss"] and summary["world_size"] == 1 and summary["devices"]
    assert summary["images_per_s"] > 0 and summary["train_seconds"] > 0
    assert Image.open(run / "loss.png").size == (640, 400)
    assert "finishing the run" in proc.stderr and "writing the sample grid" in proc.stderr


def test_stage2_logs_its_loss_by_noise_level(tiny_data, tmp_path):
    run = tmp_path / "run"
    proc = train("train-continuous", tiny_data / "encoded", run, "fusion=add")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    buckets = [k for k in record if k.startswith("loss_t")]
    assert buckets == ["loss_t0-249", "loss_t250-499", "loss_t500-749", "loss_t750-999"]
    assert all(record[k] > 0 for k in buckets)


def test_wandb_offline_run(tiny_data, tmp_path):
    pytest.importorskip("wandb")  # the optional extra; installed with the test extra
    run = tmp_path / "run"
    env = {**ENV, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_SILENT": "true"}
    proc = train("train-discrete", tiny_data / "encoded", run, "train.wandb=d2c-test", env=env)
    assert proc.returncode == 0, proc.stderr
    run_id = (run / "wandb-id").read_text().strip()
    offline = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline and list(offline[0].glob("run-*.wandb"))


def test_sample_and_encode_folders_say_what_made_them(tiny_data):
    import json as _json

    made_by = _json.loads((tiny_data / "encoded" / "provenance.json").read_text())
    assert made_by["torch"] and made_by["d2ctool"] and made_by["started"] <= made_by["finished"]
    assert "git_commit" in made_by and isinstance(made_by["command"], list)
