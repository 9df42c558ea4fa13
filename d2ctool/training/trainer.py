"""The shared training loop: one implementation for tokenizers, stage 1 and stage 2.

A stage supplies a `TrainingTask` (model, data, loss, grid, export); the trainer owns everything
else: AdamW with decay on weight matrices only, lr = base_lr * global_batch / 256 with linear
warmup then constant or cosine, gradient accumulation and clipping, EMA, bf16 autocast on GPU, DDP
under torchrun, `metrics.jsonl`, atomic checkpoints every N steps plus `last.pt`, and exact resume:
model, EMA, optimizer, step, data position and every rank's RNG states come back from the newest
checkpoint. A checkpoint is written as `step_N.pt` first, then `last.pt` (a hard link to it where the
file system allows), each through a temporary name: a kill at any instant leaves either the old or the
new checkpoint complete, resume takes whichever is newest and removes the killed run's temporaries.

Run folder: config.yaml, metrics.jsonl, checkpoints/{last.pt, step_0001000.pt, ...}, grids/, and
summary.json once the run is complete (re-running a complete run is then a no-op; more steps resume it).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from d2ctool import distributed
from d2ctool.checkpoints import CHECKPOINT_FORMAT, load_file
from d2ctool.data.reader import ShardReader
from d2ctool.data.torch_dataset import ShardDataset
from d2ctool.errors import UserError
from d2ctool.identity import check_same_inputs
from d2ctool.io import atomic_path, json_text, read_json_object, write_event, write_json, write_text
from d2ctool.progress import Progress, info
from d2ctool.runstate import clean_temporaries, lock_output
from d2ctool.stopping import Stopped, StopSignals
from d2ctool.training.config import TrainConfig, micro_batch
from d2ctool.training.tracking import Trackers, end_session, run_summary, start_session, write_loss_curve

SUMMARY = "summary.json"  # written after the final export: its presence means the run is complete
# train.* fields that may differ when a run is resumed (they do not change what is learned)
RESUMABLE_CHANGES = {"steps", "log_every", "ckpt_every", "sample_every", "num_workers", "device", "compile",
                     "grad_checkpointing", "keep_last", "keep_every", "wandb"}
# sections of a stage's config that may differ too: the periodic grids' sampling settings
RESUMABLE_SECTIONS = {"sampling"}


class TrainingTask(Protocol):
    name: str  # e.g. "train-discrete"

    def build_model(self) -> nn.Module: ...

    def reader(self, epoch: int, rank: int, world: int, seed: int, shuffle_buffer: int) -> ShardReader: ...

    def decode(self, members: dict, rng: np.random.Generator) -> Any: ...

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]: ...

    def after_step(self, model: nn.Module, step: int) -> None: ...

    # optional: before_step(model, step) runs before optimizer step `step` (0-based), also after a resume

    def write_grid(self, model: nn.Module, path: Path, device: torch.device) -> None: ...

    def finish(self, model: nn.Module, run_dir: Path, device: torch.device) -> dict: ...


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    resumed_from: int  # 0 for a fresh run
    summary: dict


class TrainingDiverged(UserError):
    pass


def peak_lr(cfg: TrainConfig) -> float:
    return cfg.base_lr * cfg.global_batch_size / 256


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then constant or cosine."""
    peak = peak_lr(cfg)
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return peak
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    low = peak * cfg.min_lr_ratio
    return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on tensors of 2 or more dimensions (weight matrices, embeddings) only, and not
    on the parameters under a model's `no_weight_decay_prefixes` (MAR: its diffusion head)."""
    skip = tuple(getattr(model, "no_weight_decay_prefixes", ()))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decayed = [p.dim() >= 2 and not n.startswith(skip) for n, p in named]
    groups = [{"params": [p for (_, p), d in zip(named, decayed) if d], "weight_decay": cfg.weight_decay},
              {"params": [p for (_, p), d in zip(named, decayed) if not d], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=peak_lr(cfg), betas=tuple(cfg.betas))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def load_checkpoint(path: Path) -> dict:
    from d2ctool.checkpoints import mapping_entry, state_dict_entry

    ckpt = load_file(path)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a d2c training checkpoint")
    state_dict_entry(ckpt, "model", path, finite=True)
    if ckpt.get("ema") is not None:
        state_dict_entry(ckpt, "ema", path, finite=True)
    mapping_entry(ckpt, "optimizer", path)
    bad = [k for k in ("step", "epoch", "batch_in_epoch") if isinstance(ckpt.get(k), bool) or not isinstance(ckpt.get(k), int)]
    if bad or not isinstance(ckpt.get("rng"), list):
        raise UserError(f"{path}: a damaged training checkpoint ({', '.join(bad) or 'rng'} missing or of the wrong "
                        "type); remove it to resume from the one before, or start a new run folder")
    return ckpt


class Trainer:
    def __init__(self, task: TrainingTask, cfg: TrainConfig, run_dir: str | Path, resolved_config: dict,
                 resolved_yaml: str, inputs: dict | None = None, steps_given: bool = True):
        """`inputs`: the content identity of the training data ({name: {"path", "sha256"}}, see d2ctool.identity),
        saved in every checkpoint; a resume on data whose digest changed is refused. `steps_given`: train.steps
        was given explicitly (a `--set`), which alone may move a run's target steps."""
        self.task, self.cfg, self.run_dir = task, cfg, Path(run_dir)
        self.inputs, self.steps_given = inputs or {}, steps_given
        self.resolved_config, self.resolved_yaml = resolved_config, resolved_yaml
        self.ckpt_dir = self.run_dir / "checkpoints"

    # ---- checkpoints ---------------------------------------------------------------------------
    def _save(self, step: int, state: dict) -> None:
        """step_N.pt, then last.pt pointing at the same bytes: whatever a kill leaves is a complete checkpoint."""
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        step_file = self.ckpt_dir / f"step_{step:07d}.pt"
        with atomic_path(step_file) as tmp:
            torch.save(state, tmp)
        self._point_last_at(step_file)
        self._prune()

    def _prune(self) -> None:
        """Delete step checkpoints beyond train.keep_last newest, sparing train.keep_every multiples."""
        keep_last, keep_every = self.cfg.keep_last, self.cfg.keep_every
        if not keep_last:
            return
        steps = sorted((int(m.group(1)), p) for p in self.ckpt_dir.glob("step_*.pt")
                       if (m := re.fullmatch(r"step_(\d+)\.pt", p.name)))
        for number, path in steps[:-keep_last]:
            if not (keep_every and number % keep_every == 0):
                path.unlink(missing_ok=True)

    def _point_last_at(self, step_file: Path) -> None:
        with atomic_path(self.ckpt_dir / "last.pt") as tmp:
            try:
                os.link(step_file, tmp)  # no second copy of the bytes
            except OSError:
                shutil.copyfile(step_file, tmp)

    def _newest_checkpoint(self) -> Path | None:
        """last.pt, or a newer step_N.pt (a run killed between writing the two)."""
        steps = sorted((int(m.group(1)), p) for p in self.ckpt_dir.glob("step_*.pt")
                       if (m := re.fullmatch(r"step_(\d+)\.pt", p.name)))
        last = self.ckpt_dir / "last.pt"
        if not last.is_file():
            return steps[-1][1] if steps else None
        if steps and not os.path.samefile(steps[-1][1], last):
            # last.pt is always written after its step file, so a step file modified later is newer
            if steps[-1][1].stat().st_mtime_ns > last.stat().st_mtime_ns:
                return steps[-1][1]
        return last

    def _checkpoint_state(self, model, ema, optimizer, step, epoch, batch_in_epoch, rng_states) -> dict:
        return {"format": CHECKPOINT_FORMAT, "task": self.task.name, "model": model.state_dict(),
                "ema": ema.state_dict() if ema is not None else None, "optimizer": optimizer.state_dict(),
                "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "rng": rng_states,
                "config": self.resolved_config, "model_config": getattr(self.task, "model_config", None),
                "inputs": self.inputs, "target_steps": self.cfg.steps}

    def _check_resume(self, ckpt: dict) -> None:
        if ckpt.get("task") != self.task.name:
            raise UserError(f"{self.ckpt_dir} holds a checkpoint of `d2c {ckpt.get('task')}`, not `d2c {self.task.name}`; "
                            "use another run folder")
        if "inputs" in ckpt:  # before the settings and weights: changed data is named as such
            check_same_inputs(ckpt["inputs"], self.inputs, self.run_dir, f"d2c {self.task.name}",
                              restart="delete its checkpoints/ folder")
        old, new = copy.deepcopy(ckpt.get("config") or {}), copy.deepcopy(self.resolved_config)
        for settings in (old, new):  # steps may grow, logistics and grid sampling may change; nothing else may
            settings["train"] = {k: v for k, v in settings.get("train", {}).items() if k not in RESUMABLE_CHANGES}
            for section in RESUMABLE_SECTIONS:
                settings.pop(section, None)
        if old != new:
            from d2ctool.runstate import differences

            diff = "; ".join(differences(old, new)[:5])
            raise UserError(f"{self.run_dir} was started with different settings ({diff}); resume with the same "
                            "recipe (only train.steps may change) or use a new run folder")

    def _check_target(self, ckpt: dict, rank: int) -> None:
        """A run trains to the steps it was started with; only an explicit train.steps moves the target."""
        target, step, wanted = ckpt.get("target_steps"), ckpt["step"], self.cfg.steps
        if target is None or target == wanted:
            return
        if not self.steps_given:
            raise UserError(f"{self.run_dir} was started for {target} steps and is at step {step}, but the recipe "
                            f"says {wanted}: give --set train.steps={wanted} to train it to {wanted} steps, or "
                            f"--set train.steps={target} to finish it as started")
        if wanted < step:
            raise UserError(f"{self.run_dir} is already at step {step}, past train.steps={wanted}; use a new run "
                            "folder for a shorter run")
        if rank == 0:
            info(f"{self.task.name}: {self.run_dir} was started for {target} steps; now training it to {wanted} "
                 f"(from step {step})")

    def _trim_metrics(self, step: int) -> None:
        """Drop metric lines past the checkpoint we resume from (they will be logged again)."""
        path = self.run_dir / "metrics.jsonl"
        if path.is_file():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= step:
                        keep.append(line)
                except (ValueError, KeyError, TypeError):  # a line cut short by a kill
                    continue
            write_text(path, "".join(line + "\n" for line in keep))

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, task = self.cfg, self.task
        try:
            lock_output(self.run_dir)  # one writer per run folder; also proves it is writable before any work
            unwritable = None
        except UserError as e:
            if not (self.run_dir / SUMMARY).is_file():
                raise
            unwritable = e  # a finished run on a read-only mount is still "nothing to do"; anything else fails
        rank, world, device = distributed.init(cfg.device)
        local_batch = micro_batch(cfg, world)
        autocast = device.type == "cuda" and cfg.precision == "bf16"

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model = task.build_model().to(device)
        if cfg.grad_checkpointing:  # one switch: every module that can recompute its blocks in backward has it
            for module in model.modules():
                if hasattr(module, "gradient_checkpointing"):
                    module.gradient_checkpointing = True
        ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay > 0 else None
        optimizer = make_optimizer(model, cfg)
        step = epoch = batch_in_epoch = resumed_from = 0
        torch.manual_seed(cfg.seed * 1000 + rank + 1)  # dropout etc. differ per rank

        if rank == 0 and unwritable is None:
            clean_temporaries(self.run_dir)
            clean_temporaries(self.ckpt_dir)
        distributed.barrier()
        last = self._newest_checkpoint()
        if last is not None:
            ckpt = load_checkpoint(last)
            self._check_resume(ckpt)
            self._check_target(ckpt, rank)
            model.load_state_dict(ckpt["model"])
            if ema is not None:
                ema.load_state_dict(ckpt["ema"])
            optimizer.load_state_dict(ckpt["optimizer"])
            step, epoch, batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
            if len(ckpt["rng"]) != world:
                info(f"{task.name}: resuming with {world} ranks, saved with {len(ckpt['rng'])}: RNG streams restart")
            else:
                _set_rng_state(ckpt["rng"][rank], device)
            resumed_from = step
            finished = self.run_dir / SUMMARY
            if step >= cfg.steps and finished.is_file():
                record = read_json_object(finished, f"remove it to redo the run's final export")
                if record.get("step") == step and isinstance(record.get("summary"), dict):
                    if rank == 0:
                        info(f"{task.name}: {self.run_dir} already finished at step {step}; nothing to do")
                    return TrainResult(self.run_dir, step, step, record["summary"])
            if unwritable is not None:
                raise unwritable
            if rank == 0 and last.name != "last.pt":  # killed between the step file and last.pt: finish that write
                self._point_last_at(last)
            if rank == 0:
                info(f"{task.name}: resuming from step {step} ({last})")
                self._trim_metrics(step)
        elif unwritable is not None:
            raise unwritable
        elif rank == 0:
            self._trim_metrics(0)  # lines of a run killed before its first checkpoint: logged again
        if rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text(self.run_dir / "config.yaml", self.resolved_yaml)

        train_model = torch.compile(model) if cfg.compile else model
        if world > 1:
            train_model = nn.parallel.DistributedDataParallel(
                train_model, device_ids=[device.index] if device.type == "cuda" else None)
        model.train()

        def batches() -> Iterator[tuple[int, int, Any]]:
            nonlocal epoch, batch_in_epoch
            while True:
                reader = task.reader(epoch, rank, world, cfg.seed, cfg.shuffle_buffer)
                dataset = ShardDataset(reader, task.decode, local_batch, seed=cfg.seed, skip_batches=batch_in_epoch)
                micro_batch(cfg, world, len(reader), who=task.name)
                loader = DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers,
                                    generator=torch.Generator().manual_seed(cfg.seed),
                                    persistent_workers=False, pin_memory=device.type == "cuda")
                for batch in loader:
                    batch_in_epoch += 1
                    yield batch
                epoch, batch_in_epoch = epoch + 1, 0

        tokens_per_sample = getattr(task, "tokens_per_sample", None)
        session = trackers = None
        if rank == 0:
            session = start_session(self.run_dir, device, world, resumed_from)
            trackers = Trackers(self.run_dir, cfg.wandb, self.resolved_config, resumed_from)
        ended = "error"
        try:
            stream = batches()
            metrics_path = self.run_dir / "metrics.jsonl"
            last_good = resumed_from
            window_start, window_samples = time.perf_counter(), 0
            with StopSignals() as stop, \
                    Progress(cfg.steps, task.name, unit="step", start=step, enabled=None if rank == 0 else False) as bar:
                while step < cfg.steps:
                    for group in optimizer.param_groups:
                        group["lr"] = lr_at(step, cfg)
                    if hasattr(task, "before_step"):  # optional: per-step schedules on the model (RAR's permutation)
                        task.before_step(model, step)
                    totals: dict[str, float] = {}
                    for micro in range(cfg.grad_accum):
                        batch = next(stream)
                        sync = micro == cfg.grad_accum - 1 or world == 1
                        context = train_model.no_sync() if not sync else nullcontext()
                        with context, torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                            loss, parts = task.loss(train_model, batch, device)
                        (loss / cfg.grad_accum).backward()
                        for key, value in {"loss": loss.item(), **parts}.items():
                            totals[key] = totals.get(key, 0.0) + value / cfg.grad_accum
                    losses = torch.tensor([totals["loss"]], device=device)
                    if world > 1:
                        torch.distributed.all_reduce(losses)
                        losses /= world
                    if not torch.isfinite(losses).all():
                        raise TrainingDiverged(
                            f"{task.name}: the loss became {losses.item()} at step {step + 1}; stopped. The last good "
                            f"checkpoint (step {last_good}) is kept in {self.ckpt_dir}; lower train.base_lr or check "
                            "the data, then re-run to resume from it" if last_good else
                            f"{task.name}: the loss became {losses.item()} at step {step + 1} before any checkpoint; "
                            "lower train.base_lr or check the data")
                    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if ema is not None:
                        update_ema(ema, model, cfg.ema_decay)
                    task.after_step(model, step)
                    step += 1
                    window_samples += cfg.global_batch_size
                    totals["loss"] = losses.item()
                    bar.advance(1, note=f"loss {totals['loss']:.4f}")

                    if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
                        elapsed = time.perf_counter() - window_start
                        record = {"step": step, "epoch": epoch, **{k: round(v, 6) for k, v in totals.items()},
                                  "lr": lr_at(step - 1, cfg), "grad_norm": round(float(grad_norm), 6),
                                  "samples_per_s": round(window_samples / elapsed, 2), "seconds": round(elapsed, 3),
                                  "ema_decay": cfg.ema_decay}
                        if tokens_per_sample:
                            record["tokens_per_s"] = round(window_samples * tokens_per_sample / elapsed, 1)
                        with open(metrics_path, "a") as f:
                            f.write(json_text(record, metrics_path, indent=None) + "\n")
                        write_event(metrics_path, "appended")
                        trackers.log(step, record)
                        window_start, window_samples = time.perf_counter(), 0
                    stopping = stop.requested(world, device)  # every rank asks at the same step
                    if step % cfg.ckpt_every == 0 or step == cfg.steps or stopping:
                        rngs = _gather(_rng_state(device), world)
                        if rank == 0:
                            state = self._checkpoint_state(model, ema, optimizer, step, epoch, batch_in_epoch, rngs)
                            self._save(step, state)
                        last_good = step
                        distributed.barrier()
                    if stopping:
                        raise stop.stop(f"{task.name} saved step {step} of {cfg.steps} to "
                                        f"{self.ckpt_dir / f'step_{step:07d}.pt'}; run the same command again to resume")
                    if rank == 0 and ((cfg.sample_every and step % cfg.sample_every == 0) or step == cfg.steps):
                        sampler = ema if (ema is not None and cfg.sample_with_ema) else model
                        info(f"{task.name}: step {step}: writing the sample grid (grids/step_{step:07d}.png)")
                        task.write_grid(sampler.eval(), self.run_dir / "grids" / f"step_{step:07d}.png", device)
                        model.train()
            distributed.barrier()
            summary = {}
            if rank == 0:
                final = ema if (ema is not None and cfg.sample_with_ema) else model
                info(f"{task.name}: finishing the run (exports, final grid, loss.png)")
                summary = task.finish(final.eval(), self.run_dir, device)
                write_loss_curve(self.run_dir, task.name)
                write_json(self.run_dir / SUMMARY, {"step": step, "summary": summary,  # written last: the run is done
                                                    **run_summary(self.run_dir, step, world, session)})
            distributed.barrier()
            ended = "finished"
        except Stopped as e:
            ended = str(e).split(":")[0]  # "stopped by SIGTERM"
            raise
        finally:
            if rank == 0:
                trackers.close()
                end_session(self.run_dir, session, ended)
        return TrainResult(self.run_dir, step, resumed_from, summary)
