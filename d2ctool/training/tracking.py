"""Where a training run's numbers go besides metrics.jsonl: TensorBoard event files, Weights & Biases, the run
record, loss.png.

- TensorBoard: RUN/tensorboard/ (`tensorboard --logdir RUN`), every logged number as a scalar; a resumed run
  purges the events past its checkpoint, as metrics.jsonl is trimmed.
- W&B (optional, `pip install "d2ctool[wandb]"`): with `train.wandb: PROJECT` the same numbers go to that
  project, one W&B run per d2c run folder (its id is kept in RUN/wandb-id, so a resume continues it). W&B's own
  settings apply (WANDB_MODE=offline, WANDB_DIR, ...).
- RUN/run.json: how the run was made: for each session (a start or a resume), the command line, the git commit
  of the source (when it is a git checkout), the versions of d2c, torch, CUDA and Python, the devices, and the
  start and end times.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from d2ctool.errors import UserError
from d2ctool.io import write_json, write_text
from d2ctool.provenance import devices, now, provenance

RUN_RECORD = "run.json"


def start_session(run_dir: Path, device, world: int, resumed_from: int) -> dict:
    """Append this session to RUN/run.json (rank 0 only) and return the record."""
    path = run_dir / RUN_RECORD
    record = json.loads(path.read_text()) if path.is_file() else {"sessions": []}
    record["sessions"].append({**provenance(), "devices": devices(device), "world_size": world,
                               "resumed_from_step": resumed_from, "started": now(), "ended": None})
    write_json(path, record)
    return record


def end_session(run_dir: Path, record: dict, how: str) -> None:
    record["sessions"][-1].update(ended=now(), end=how)
    write_json(run_dir / RUN_RECORD, record)


class Trackers:
    """TensorBoard (always) and W&B (when `project` is set); `log(step, numbers)` feeds both."""

    def __init__(self, run_dir: Path, project: str | None, config: dict, resumed_from: int):
        from torch.utils.tensorboard import SummaryWriter

        self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"),
                                         purge_step=resumed_from + 1 if resumed_from else None)
        self.wandb = None
        if project:
            try:
                import wandb
            except ImportError:
                raise UserError(f"train.wandb is set ({project!r}) but wandb is not installed: "
                                "pip install \"d2ctool[wandb]\", or unset train.wandb") from None
            id_file = run_dir / "wandb-id"
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
            write_text(id_file, run_id + "\n")
            self.wandb = wandb.init(project=project, id=run_id, resume="allow", dir=str(run_dir), config=config,
                                    name=run_dir.name)

    def log(self, step: int, numbers: dict) -> None:
        for key, value in numbers.items():
            if isinstance(value, (int, float)) and key != "step":
                self.tensorboard.add_scalar(key, value, step)
        self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in numbers.items() if k != "step"}, step=step)

    def close(self) -> None:
        self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def logged_records(run_dir: Path) -> list[dict]:
    """The lines of RUN/metrics.jsonl (a line a kill cut short is skipped)."""
    path, out = run_dir / "metrics.jsonl", []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def run_summary(run_dir: Path, step: int, world: int, session: dict) -> dict:
    """summary.json's record of the run: final loss, wall time, throughput, world size and devices."""
    records = logged_records(run_dir)
    seconds = sum(r.get("seconds", 0.0) for r in records)
    images = sum(r.get("samples_per_s", 0.0) * r.get("seconds", 0.0) for r in records)
    final = records[-1] if records else {}
    return {"final_loss": final.get("loss"), "train_seconds": round(seconds, 1),
            "images_per_s": round(images / seconds, 2) if seconds else None,
            "tokens_per_s": final.get("tokens_per_s"), "world_size": world,
            "devices": session["sessions"][-1]["devices"], "finished": now()}


def write_loss_curve(run_dir: Path, title: str) -> None:
    from d2ctool.visual import save_loss_curve

    records = [r for r in logged_records(run_dir) if isinstance(r.get("loss"), (int, float))]
    save_loss_curve(run_dir / "loss.png", [r["step"] for r in records], [r["loss"] for r in records],
                    f"{title}: loss (light) and its moving average (dark)")
