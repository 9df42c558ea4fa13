"""`d2c plan`: check a recipe and estimate what it costs, before any data is read or any GPU is used.

Every model the recipe names is built on the meta device (shapes only, no memory), through the same
preset factories and data-shape rules the training commands use, with the data's shape taken from the
tokenizer presets and `plan.num_classes` instead of an encode manifest. Per training stage it reports:

- parameters (total, trainable);
- FLOPs per image, counted by `torch.utils.flop_counter.FlopCounterMode` on a meta-device training step
  (forward, and forward + backward); MAR's step runs its modules on the sequence lengths of the mean
  mask ratio (its boolean token selection has no meta-device form);
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
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from d2ctool.continuous.load import PRESETS as MAR_PRESETS, init_from_checkpoint
from d2ctool.continuous.model import MAR, MASK_RATIO_STD
from d2ctool.continuous.train import model_config_for_data
from d2ctool.discrete.train import model_config_for_data as discrete_config_for_data
from d2ctool.discrete.config import preset as gpt_preset
from d2ctool.discrete.load import build_model, load_stage1
from d2ctool.discrete.model import code_loss
from d2ctool.errors import UserError
from d2ctool.recipe import Recipe
from d2ctool.tokenizers.encode import check_grids
from d2ctool.tokenizers.load import build_tokenizer, load_tokenizer, preset_config as tokenizer_preset
from d2ctool.training.config import TrainConfig


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
# which training stages a sampling mode needs (encode always runs: it writes both codes and latents)
STAGES = {"two-stage": ("discrete", "continuous"), "discrete-only": ("discrete",),
          "continuous-only": ("continuous",), "oracle-codes": ("continuous",)}
TRACE_BATCH = 2  # images per meta-device trace (costs are linear in the batch)
ADAMW_BYTES = 8  # two fp32 moments per trainable parameter


@dataclass
class StepCost:
    """One training step, per image."""

    forward_flops: float
    train_flops: float  # forward + backward
    activations: float  # bytes autograd saves for backward, fp32
    activations_checkpointed: float  # with gradient checkpointing of every block


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


# ----- measuring a step on the meta device ---------------------------------------------------------------

def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (members of every ModuleList): the units gradient checkpointing wraps."""
    return [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def trace_step(model: nn.Module, step: Callable[[], torch.Tensor], batch: int) -> StepCost:
    """FLOPs and saved activations of `step()` (returns the loss) and its backward, per image."""
    params = {id(p) for p in model.parameters()}
    seen, keep = set(), []
    state = {"block": None, "total": 0, "inputs": 0}
    per_block: dict[int, int] = {}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(t) not in seen and id(base) not in params:
            seen.add(id(t))
            keep.append(t)  # ids stay unique while the tensor lives
            state["total"] += _nbytes(t)
            if state["block"] is not None:
                per_block[state["block"]] = per_block.get(state["block"], 0) + _nbytes(t)
        return t

    def enter(module, args):
        state["block"] = id(module)
        state["inputs"] += _nbytes(args[0])

    def leave(module, args, out):
        state["block"] = None

    hooks = [h for b in _blocks(model) for h in (b.register_forward_pre_hook(enter), b.register_forward_hook(leave))]
    try:
        with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = step()
            forward = counter.get_total_flops()
            loss.backward()
            total = counter.get_total_flops()
    finally:
        for h in hooks:
            h.remove()
    in_blocks = sum(per_block.values())
    checkpointed = state["total"] - in_blocks + state["inputs"] + max(per_block.values(), default=0)
    return StepCost(forward / batch, total / batch, state["total"] / batch, checkpointed / batch)


def stage1_step(model: torch.nn.Module, batch: int) -> Callable[[], torch.Tensor]:
    cfg = model.cfg
    codes = torch.zeros(batch, cfg.grid**2, dtype=torch.long, device="meta")
    labels = torch.zeros(batch, dtype=torch.long, device="meta")

    def step():
        return code_loss(model(codes, labels), codes)

    return step


def mean_mask_ratio(minimum: float) -> float:
    """Mean of N(1, std^2) truncated to [minimum, 1] (MAR's mask-ratio distribution)."""
    a = (minimum - 1.0) / MASK_RATIO_STD
    pdf = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    return 1.0 + MASK_RATIO_STD * (pdf(a) - pdf(0.0)) / (cdf(0.0) - cdf(a))


def mar_step(model: MAR, batch: int) -> Callable[[], torch.Tensor]:
    """MAR.forward's modules on the shapes of one step at the mean mask ratio: the encoder sees the buffer
    and the visible tokens, the decoder every position, the head every token `diffusion_batch_mul` times."""
    cfg = model.cfg
    meta = torch.device("meta")
    tokens = torch.zeros(batch, cfg.seq_len, cfg.token_dim, device=meta)
    labels = torch.zeros(batch, dtype=torch.long, device=meta)
    codes = None if cfg.fusion == "none" else torch.zeros(batch, cfg.code_len, dtype=torch.long, device=meta)
    visible = cfg.seq_len - math.ceil(cfg.seq_len * mean_mask_ratio(cfg.mask_ratio_min))
    buf = cfg.buffer_size

    def step():
        ctx = model.code_context(codes)
        x = model.z_proj(tokens)
        if ctx is not None and ctx.encoder_add is not None:
            x = x + ctx.encoder_add
        emb = model.class_embedding(labels, batch)
        x = torch.cat([emb[:, None].expand(batch, buf, -1), x], dim=1)
        x = model.z_proj_ln(x + model.encoder_pos_embed_learned)[:, :buf + visible]
        k = 0
        if ctx is not None and ctx.encoder_tokens is not None:
            k = ctx.encoder_tokens.shape[1]
            x = torch.cat([ctx.encoder_tokens, x], dim=1)
        x = model.encoder_norm(model._run(model.encoder_blocks, x, None if ctx is None else ctx.encoder_memory))
        x = model.decoder_embed(x)
        filled = model.mask_token.expand(batch, cfg.seq_len - visible, -1)
        x = torch.cat([x[:, k:], filled], dim=1) + model.decoder_pos_embed_learned
        if ctx is not None and ctx.decoder_add is not None:
            x = x + F.pad(ctx.decoder_add, (0, 0, buf, 0))
        if k:
            x = torch.cat([x[:, :k] if ctx.decoder_tokens_pos is None else x[:, :k] + ctx.decoder_tokens_pos, x], 1)
        x = model.decoder_norm(model._run(model.decoder_blocks, x, None if ctx is None else ctx.decoder_memory))
        z = x[:, k + buf:] + model.diffusion_pos_embed_learned
        m = cfg.diffusion_batch_mul
        mask = torch.ones(batch * cfg.seq_len * m, device=meta)
        return model.diffloss(tokens.reshape(-1, cfg.token_dim).repeat(m, 1), z.reshape(-1, z.shape[-1]).repeat(m, 1),
                              mask)

    return step


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
    """The per-rank micro-batch; fails when the global batch cannot be split or makes no step."""
    plan = recipe.plan
    ranks_accum = plan.gpus * train.grad_accum
    if train.global_batch_size % ranks_accum:
        raise UserError(f"{section}.train.global_batch_size {train.global_batch_size} does not divide over "
                        f"plan.gpus × {section}.train.grad_accum = {plan.gpus} × {train.grad_accum}; choose a "
                        f"multiple of {ranks_accum}")
    per_rank = train.global_batch_size // ranks_accum
    # the reader gives every rank train_images // gpus samples and drops the last partial batch
    if plan.train_images // plan.gpus // per_rank < train.grad_accum:
        raise UserError(f"{section}: {plan.train_images} images over {plan.gpus} GPUs make no full step of "
                        f"{per_rank} × {train.grad_accum} per rank; lower {section}.train.global_batch_size")
    return per_rank


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
    stages_run = STAGES[mode]
    for section in stages_run:  # the cheap checks first
        _check_batch(getattr(recipe, section).train, recipe, section)
    for section in stages_run:
        _need(getattr(recipe.sample, section), f"sample.{section}",
              f"sample.mode {mode} samples from the {section} stage's run folder (its {section}.out)")
    if mode == "oracle-codes":
        _need(recipe.sample.oracle_data, "sample.oracle_data",
              "oracle-codes conditions stage 2 on encoded shards' real codes")
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
    # what `d2c encode` would write into its manifest
    manifest = {"grid": [grid, grid], "classes": [str(i) for i in range(num_classes)],
                "tokenizers": {"vq": {"codebook_size": vq_cfg.codebook_size},
                               "kl": {"latent_channels": kl_cfg.embed_dim}}}
    stages: list[StagePlan] = []
    notes: list[str] = []

    both_views = 2 * (tokenizer_forward_flops("vq", vq, res) + tokenizer_forward_flops("kl", kl, res))
    encode = StagePlan("encode", f"{tok.vq.preset} + {tok.kl.preset}", *map(sum, zip(_count(vq), _count(kl))),
                       forward_flops=both_views)
    encode.images = recipe.plan.train_images
    encode.notes.append("each image is encoded with its h-flip: FLOPs per image count both views")
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
        cost = trace_step(model, stage1_step(model, TRACE_BATCH), TRACE_BATCH)
        _add_training(stage, cost, cfg.train, recipe, "discrete")
        stages.append(stage)

    if "continuous" in stages_run:
        cfg = recipe.continuous
        _need(cfg.data, "continuous.data", "train-continuous reads the encoded shards")
        _need(cfg.out, "continuous.out", "train-continuous writes its run folder")
        if mode == "continuous-only" and cfg.fusion != "none":
            raise UserError(f"sample.mode continuous-only is the MAR baseline: it needs continuous.fusion none, "
                            f"got {cfg.fusion}")
        if mode in ("two-stage", "oracle-codes") and cfg.fusion == "none":
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
        cost = trace_step(model, mar_step(model, TRACE_BATCH), TRACE_BATCH)
        _add_training(stage, cost, cfg.train, recipe, "continuous")
        stages.append(stage)

    s = recipe.sample
    if s.classes is None and s.num_images % num_classes:
        notes.append(f"sample.num_images {s.num_images} is not a multiple of {num_classes} classes: the evaluation "
                     "set is not exactly class-balanced")
    if "discrete" in stages_run and s.image_size != res:  # read only for official stage-1 files
        notes.append(f"sample.image_size {s.image_size} differs from encode.resolution {res}: an official stage-1 "
                     "file in sample.discrete would get the wrong token grid")
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
