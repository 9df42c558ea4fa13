"""`d2c plan`: check a recipe and estimate what it costs, before any data is read or any GPU is used.

Every model the recipe names is built on the meta device (shapes only, no memory), through the same
preset factories and data-shape rules the training commands use, with the data's shape taken from the
tokenizer presets and `plan.num_classes` instead of an encode manifest. Per training stage it reports:

- parameters (total, trainable);
- FLOPs per image of one training step (forward, and forward + backward), as each model states it
  (`step_cost`: its real training loss traced on the meta device; MAR's at the mean mask ratio);
- steps per epoch and total steps at the recipe's global batch over `plan.gpus` ranks;
- memory per GPU at the per-rank micro-batch: fp32 weights, gradients, AdamW moments, EMA, and the
  activations autograd saves for backward (measured on the meta device in fp32, halved for bf16
  autocast), without and with gradient checkpointing (then only each block's input is kept, plus one
  block recomputed at a time);
- wall time and GPU-hours at the assumed MFU (`plan.mfu`) of the named GPU (`plan.gpu`).

It fails (UserError) on what cannot work: tokenizer grids that differ or do not divide the resolution,
an official `init` checkpoint whose vocabulary or grid differs from the tokenizers', a global batch that
does not divide over ranks × accumulation, unset data/checkpoint paths, and (with `check_paths`) input
files that do not exist, are empty, or do not load as their setting needs (an init checkpoint: into the
model this recipe builds for its data).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from d2ctool.continuous.config import PRESETS as MAR_PRESETS
from d2ctool.continuous.load import init_from_checkpoint
from d2ctool.continuous.model import MAR
from d2ctool.continuous.train import model_config_for_data
from d2ctool.data.encoded import EncodedManifest
from d2ctool.discrete.config import preset as gpt_preset
from d2ctool.discrete.load import build_model, load_stage1
from d2ctool.discrete.train import model_config_for_data as discrete_config_for_data
from d2ctool.errors import UserError
from d2ctool.recipe import Recipe
from d2ctool.sampling.config import MODES
from d2ctool.tokenizers.encode import check_grids
from d2ctool.tokenizers.load import build_tokenizer, load_tokenizer, preset_config as tokenizer_preset
from d2ctool.training.config import TrainConfig, micro_batch
from d2ctool.training.cost import StepCost


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_flops: float  # dense peak, FLOP/s
    memory: float  # bytes


GPUS = {
    "a100": GPU("NVIDIA A100 SXM 80GB", 312e12, 80e9),
    "h100": GPU("NVIDIA H100 SXM 80GB", 989e12, 80e9),
    "h200": GPU("NVIDIA H200 141GB", 989e12, 141e9),
}
TRACE_BATCH = 2  # images per meta-device trace (costs are linear in the batch)
ADAMW_BYTES = 8  # two fp32 moments per trainable parameter


@dataclass
class StagePlan:
    name: str  # train-discrete, train-continuous, encode
    model: str
    params: int
    trainable: int
    forward_flops: float  # per image
    train_flops: float = 0.0  # per image, forward + backward (0 for encode)
    images: int = 0  # images processed by the stage
    steps_per_epoch: int = 0
    steps: int = 0
    epochs: float = 0.0
    per_rank_batch: int = 0
    memory: dict[str, float] = field(default_factory=dict)  # bytes per GPU
    hours: float = 0.0  # wall time on plan.gpus GPUs
    gpu_hours: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class Plan:
    recipe: str
    gpu: GPU
    gpus: int
    mfu: float
    stages: list[StagePlan]
    inputs: dict[str, str]  # input files the run needs: key -> path
    missing: list[str]  # those that do not exist (reported, or an error with check_paths)
    notes: list[str]

    @property
    def total_gpu_hours(self) -> float:
        return sum(s.gpu_hours for s in self.stages)


def tokenizer_forward_flops(kind: str, model: nn.Module, resolution: int) -> float:
    """FLOPs to encode one image: the encoder network, plus for VQ the nearest-code search (2 N K D)."""
    images = torch.zeros(1, 3, resolution, resolution, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        out = (model.encode_latent if kind == "vq" else model.encode_moments)(images)
    search = 0
    if kind == "vq":  # counted by hand: the search runs outside autocast, which the meta device lacks
        search = 2 * out.shape[-2] * out.shape[-1] * model.cfg.codebook_size * model.cfg.codebook_dim
    return counter.get_total_flops() + search


# ----- the plan -------------------------------------------------------------------------------------

def _count(model: nn.Module) -> tuple[int, int]:
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


def _memory(params: int, trainable: int, cost: StepCost, train: TrainConfig, per_rank: int) -> dict[str, float]:
    act_scale = 0.5 if train.precision == "bf16" else 1.0  # autocast stores most saved tensors in bf16
    memory = {"weights": 4.0 * params, "gradients": 4.0 * trainable, "optimizer": ADAMW_BYTES * trainable,
              "ema": 4.0 * params if train.ema_decay > 0 else 0.0,
              "activations": act_scale * cost.activations * per_rank,
              "activations_checkpointed": act_scale * cost.activations_checkpointed * per_rank}
    states = memory["weights"] + memory["gradients"] + memory["optimizer"] + memory["ema"]
    memory["total"] = states + memory["activations"]
    memory["total_checkpointed"] = states + memory["activations_checkpointed"]
    return memory


def _check_batch(train: TrainConfig, recipe: Recipe, section: str) -> int:
    """The per-rank micro-batch, checked as the trainer checks it: every rank reads train_images // gpus."""
    plan = recipe.plan
    return micro_batch(train, plan.gpus, plan.train_images // plan.gpus, section=section, ranks_name="plan.gpus")


def _schedule(stage: StagePlan, train: TrainConfig, recipe: Recipe, section: str) -> None:
    per_rank = _check_batch(train, recipe, section)
    stage.per_rank_batch = per_rank
    stage.steps_per_epoch = recipe.plan.train_images // recipe.plan.gpus // per_rank // train.grad_accum
    stage.steps = train.steps
    stage.epochs = train.steps / stage.steps_per_epoch
    stage.images = train.steps * train.global_batch_size
    if train.warmup_steps > train.steps:
        stage.notes.append(f"warmup_steps {train.warmup_steps} exceeds steps {train.steps}")


def _time(stage: StagePlan, flops_per_image: float, recipe: Recipe) -> None:
    plan, gpu = recipe.plan, GPUS[recipe.plan.gpu]
    seconds = stage.images * flops_per_image / (plan.gpus * gpu.bf16_flops * plan.mfu)
    stage.hours = seconds / 3600
    stage.gpu_hours = stage.hours * plan.gpus


def _need(value: str | None, key: str, why: str) -> str:
    if not value:
        raise UserError(f"{key} is not set: {why}")
    return value


def _empty(path: str) -> bool:
    return Path(path).is_file() and Path(path).stat().st_size == 0


def _unusable(key: str, path: str, load: Callable[[str], object]) -> str | None:
    """Why the file a setting names cannot be used (missing, empty, not loadable as that setting needs), or None."""
    if not Path(path).is_file():
        return f"{key}: {path} not found"
    if _empty(path):
        return f"{key}: {path} is empty (0 bytes)"
    try:
        load(path)
    except UserError as e:
        return f"{key}: {e}"
    return None


def plan_recipe(recipe: Recipe, name: str = "recipe", check_paths: bool = False) -> Plan:
    """Validate `recipe` and estimate every stage it runs; see the module docstring."""
    mode = recipe.sample.mode
    stages_run = MODES[mode].stages  # encode always runs: it writes both codes and latents
    for section in stages_run:  # the cheap checks first
        _check_batch(getattr(recipe, section).train, recipe, section)
    for section in stages_run:
        _need(getattr(recipe.sample, section), f"sample.{section}",
              f"sample.mode {mode} samples from the {section} stage's run folder (its {section}.out)")
    if MODES[mode].real_images:
        _need(recipe.sample.oracle_data, "sample.oracle_data",
              f"{mode} reads the real images' codes and latents from encoded shards")
    tok = recipe.tokenizers
    res = recipe.encode.resolution
    inputs = {"tokenizers.vq.checkpoint": _need(tok.vq.checkpoint, "tokenizers.vq.checkpoint",
                                                 "encode needs the VQ tokenizer (e.g. LlamaGen's vq_ds16_c2i.pt)"),
              "tokenizers.kl.checkpoint": _need(tok.kl.checkpoint, "tokenizers.kl.checkpoint",
                                                 "encode needs the KL tokenizer (e.g. MAR's kl16.ckpt)")}
    vq_cfg, kl_cfg = tokenizer_preset("vq", tok.vq.preset), tokenizer_preset("kl", tok.kl.preset)
    with torch.device("meta"):
        vq, kl = build_tokenizer("vq", vq_cfg).eval(), build_tokenizer("kl", kl_cfg).eval()
    grid = check_grids(res, vq, kl, tok.vq.preset, tok.kl.preset)
    num_classes = recipe.plan.num_classes
    manifest = EncodedManifest.planned(grid, num_classes, vq_cfg.codebook_size, kl_cfg.embed_dim, recipe.encode.views)
    stages: list[StagePlan] = []
    notes: list[str] = []

    views = manifest.num_views
    every_view = views * (tokenizer_forward_flops("vq", vq, res) + tokenizer_forward_flops("kl", kl, res))
    encode = StagePlan("encode", f"{tok.vq.preset} + {tok.kl.preset}", *map(sum, zip(_count(vq), _count(kl))),
                       forward_flops=every_view)
    encode.images = recipe.plan.train_images
    encode.notes.append(f"each image is encoded in {views} views (encode.views={recipe.encode.views}): "
                        "FLOPs per image count every view")
    _time(encode, encode.forward_flops, recipe)
    stages.append(encode)

    if "discrete" in stages_run:
        cfg = recipe.discrete
        _need(cfg.data, "discrete.data", "train-discrete reads the encoded shards")
        _need(cfg.out, "discrete.out", "train-discrete writes its run folder")
        native = gpt_preset(cfg.model)
        if cfg.init:
            inputs["discrete.init"] = cfg.init
            if native.vocab_size != vq_cfg.codebook_size:
                raise UserError(f"discrete.init loads {cfg.model} weights with a vocabulary of {native.vocab_size} "
                                f"codes, but tokenizer {tok.vq.preset} has {vq_cfg.codebook_size}: pair the "
                                "checkpoint with the tokenizer it was trained on")
        model_cfg = discrete_config_for_data(cfg, manifest)
        with torch.device("meta"):
            model = build_model(model_cfg).train()
        stage = StagePlan("train-discrete", cfg.model, *_count(model), 0.0)
        cost = model.step_cost(TRACE_BATCH)
        _add_training(stage, cost, cfg.train, recipe, "discrete")
        stages.append(stage)

    if "continuous" in stages_run:
        cfg = recipe.continuous
        _need(cfg.data, "continuous.data", "train-continuous reads the encoded shards")
        _need(cfg.out, "continuous.out", "train-continuous writes its run folder")
        if MODES[mode].fused is False and cfg.fusion != "none":
            raise UserError(f"sample.mode continuous-only is the MAR baseline: it needs continuous.fusion none, "
                            f"got {cfg.fusion}")
        if MODES[mode].fused and cfg.fusion == "none":
            raise UserError(f"sample.mode {mode} conditions stage 2 on discrete codes: continuous.fusion must not "
                            "be none")
        # traced without checkpointing: the checkpointed memory is derived from the per-block measurements
        model_cfg = dataclasses.replace(model_config_for_data(cfg, manifest), grad_checkpointing=False)
        if cfg.init:
            inputs["continuous.init"] = cfg.init
            native = MAR_PRESETS[cfg.model]
            for key in ("latent_channels", "latent_size"):
                if getattr(native, key) != getattr(model_cfg, key):
                    raise UserError(f"continuous.init loads {cfg.model} weights made for {key} {getattr(native, key)},"
                                    f" but tokenizer {tok.kl.preset} at {res} px gives {getattr(model_cfg, key)}")
        with torch.device("meta"):
            model = MAR(model_cfg).train()
        stage = StagePlan("train-continuous", f"{cfg.model} (fusion {cfg.fusion})", *_count(model), 0.0)
        cost = model.step_cost(TRACE_BATCH)
        _add_training(stage, cost, cfg.train, recipe, "continuous")
        stages.append(stage)

    s = recipe.sample
    if s.classes is None and s.num_images % num_classes:
        notes.append(f"sample.num_images {s.num_images} is not a multiple of {num_classes} classes: the evaluation "
                     "set is not exactly class-balanced")
    if "discrete" in stages_run and s.image_size is not None and s.image_size != res:
        notes.append(f"sample.image_size {s.image_size} differs from encode.resolution {res}: the stage-1 "
                     "model trained on these codes would be refused (an official file would get the wrong grid)")
    notes.append(f"evaluation: {s.num_images} samples ({mode}), then `d2c fid --ref` (ImageNet 256: ADM's "
                 "VIRTUAL_imagenet256_labeled.npz); sampling cost is measured by bench/gpu.py, not estimated here")
    missing = [f"{key}: {path}" for key, path in inputs.items() if not Path(path).is_file() or _empty(path)]
    if check_paths:
        loaders = {"tokenizers.vq.checkpoint": lambda p: load_tokenizer("vq", tok.vq.preset, p),
                   "tokenizers.kl.checkpoint": lambda p: load_tokenizer("kl", tok.kl.preset, p),
                   # the init checkpoints must fit the model this recipe builds on its data's grid
                   "discrete.init": lambda p: load_stage1(p, discrete_config_for_data(recipe.discrete, manifest)),
                   "continuous.init": lambda p: init_from_checkpoint(
                       MAR(model_config_for_data(recipe.continuous, manifest)), p)}
        problems = [problem for key, path in inputs.items() if (problem := _unusable(key, path, loaders[key]))]
        if problems:
            raise UserError(f"{name}: input file(s) unusable: {'; '.join(problems)}")
    return Plan(name, GPUS[recipe.plan.gpu], recipe.plan.gpus, recipe.plan.mfu, stages, inputs, missing, notes)


def _add_training(stage: StagePlan, cost: StepCost, train: TrainConfig, recipe: Recipe, section: str) -> None:
    stage.forward_flops, stage.train_flops = cost.forward_flops, cost.train_flops
    _schedule(stage, train, recipe, section)
    stage.memory = _memory(stage.params, stage.trainable, cost, train, stage.per_rank_batch)
    _time(stage, cost.train_flops, recipe)
    gpu = GPUS[recipe.plan.gpu]
    if stage.memory["total_checkpointed"] > gpu.memory:
        stage.notes.append(f"does not fit in {gpu.name} memory even with gradient checkpointing: raise "
                           f"{section}.train.grad_accum")
    elif stage.memory["total"] > gpu.memory and not train.grad_checkpointing:
        stage.notes.append(f"needs {section}.train.grad_checkpointing: true (or more grad_accum) on {gpu.name}")


# ----- text ---------------------------------------------------------------------------------------------

def _si(x: float, unit: str = "") -> str:
    for div, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}".rstrip()


def _gib(x: float) -> str:
    return f"{x / 2**30:.1f} GiB"


def format_plan(plan: Plan) -> str:
    lines = [f"plan: {plan.recipe} on {plan.gpus} × {plan.gpu.name} at {plan.mfu:.0%} MFU "
             f"({_si(plan.gpu.bf16_flops, 'FLOP/s')} bf16 dense peak each)"]
    for s in plan.stages:
        lines.append(f"\n[{s.name}] {s.model}")
        lines.append(f"  parameters        {s.params / 1e6:.1f} M ({s.trainable / 1e6:.1f} M trainable)")
        lines.append(f"  FLOPs per image   {_si(s.forward_flops, 'FLOP')} forward"
                     + (f", {_si(s.train_flops, 'FLOP')} forward + backward" if s.train_flops else ""))
        if s.steps:
            lines.append(f"  schedule          {s.steps} steps = {s.epochs:.1f} epochs of {s.steps_per_epoch} steps; "
                         f"{s.per_rank_batch} images per rank per micro-batch")
            m = s.memory
            lines.append(f"  memory per GPU    weights {_gib(m['weights'])}, gradients {_gib(m['gradients'])}, "
                         f"AdamW {_gib(m['optimizer'])}, EMA {_gib(m['ema'])}")
            lines.append(f"                    activations {_gib(m['activations'])} -> total {_gib(m['total'])}; "
                         f"with grad checkpointing {_gib(m['activations_checkpointed'])} -> "
                         f"{_gib(m['total_checkpointed'])}")
        else:
            lines.append(f"  images            {s.images}")
        lines.append(f"  wall time         {s.hours:.1f} h on {plan.gpus} GPUs = {s.gpu_hours:.0f} GPU-hours")
        lines += [f"  note: {n}" for n in s.notes]
    lines.append(f"\ntotal: {plan.total_gpu_hours:.0f} GPU-hours ({plan.gpu.name}, {plan.mfu:.0%} MFU)")
    for key, path in plan.inputs.items():
        state = "to provide (not found)" if f"{key}: {path}" in plan.missing else "found"
        lines.append(f"input {key} = {path}: {state}")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def plan_dict(plan: Plan) -> dict:
    return {**dataclasses.asdict(plan), "total_gpu_hours": plan.total_gpu_hours}
