"""The generation chain of each sampling mode, its compatibility checks, and one batch of images.

two-stage        labels -> stage-1 codes (KV-cache GPT or RAR) -> stage-2 latents conditioned on them -> KL decode
discrete-only    labels -> stage-1 codes -> VQ decode                       (the LlamaGen baseline)
continuous-only  labels -> stage-2 latents, fusion none -> KL decode        (the MAR baseline)
oracle-codes     real images' codes and labels -> stage-2 latents -> KL decode  (stage 2's upper bound)
vq-reconstruction  real images' codes -> VQ decode                           (the VQ tokenizer's ceiling)
kl-reconstruction  real images' posterior means -> KL decode                 (the KL tokenizer's ceiling)

The last three read the real images (codes, labels, moments) from encoded shards (`sample.oracle_data`).

Stage-2 latents are mapped back to the KL tokenizer's by the `LatentNorm` stage 2 was trained with.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from d2ctool.checkpoints import CHECKPOINT_FORMAT, LoadedWeights, load_file, run_checkpoint
from d2ctool.continuous.load import load_mar
from d2ctool.continuous.sample import check_settings, sample_latents
from d2ctool.data.encoded import EncodedManifest, first_samples, read_manifest
from d2ctool.discrete.config import preset as stage1_preset
from d2ctool.discrete.generate import generate
from d2ctool.discrete.load import data_config, family, load_stage1
from d2ctool.errors import UserError
from d2ctool.identity import shard_input
from d2ctool.sampling.config import MODES, OFFICIAL_IMAGE_SIZE, SampleConfig
from d2ctool.tokenizers.config import TokenizersConfig
from d2ctool.tokenizers.kl import posterior_latents
from d2ctool.tokenizers.latent_norm import LatentNorm
from d2ctool.tokenizers.load import load_tokenizer
from d2ctool.visual import to_uint8


@dataclass
class Chain:
    cfg: SampleConfig
    device: torch.device
    num_classes: int
    gpt: torch.nn.Module | None = None  # the stage-1 model: LlamaGen's GPT or RAR (the name is historical)
    mar: torch.nn.Module | None = None
    vq: torch.nn.Module | None = None
    kl: torch.nn.Module | None = None
    oracle: tuple[torch.Tensor, torch.Tensor] | None = None  # (codes [N, L], labels [N]) of real images
    latent_norm: LatentNorm | None = None  # stage 2's latents -> the KL tokenizer's
    real_latents: torch.Tensor | None = None  # kl-reconstruction: posterior means [N, C, h, w], unnormalised
    loaded: dict = field(default_factory=dict)  # what was loaded, for the manifest

    @property
    def uses_stage1(self) -> bool:
        return MODES[self.cfg.mode].stage1

    @property
    def uses_stage2(self) -> bool:
        return MODES[self.cfg.mode].stage2


POSTERIOR_MEANS = LatentNorm.scalar(1.0, "none: the tokenizer's own posterior means")


def _require(value, what: str, mode: str):
    if value is None:
        raise UserError(f"sample mode {mode} needs {what}")
    return value


def _is_our_run(path: str) -> bool:
    return load_file(run_checkpoint(path)).get("format") == CHECKPOINT_FORMAT


def _source(record: dict) -> str | None:
    return record.get("checkpoint") if isinstance(record, dict) else None


def _side(record: dict) -> str:
    return f"{record.get('name')} ({record.get('checkpoint')}, sha256 {str(record.get('sha256'))[:12]})"


def stage2_latent_norm(stage2: LoadedWeights, kl, kl_info: LoadedWeights, vq_info: LoadedWeights | None) -> LatentNorm:
    """The normalisation stage 2 was trained with, once its KL (and VQ) tokenizers are checked to be these.

    Our runs record their data's tokenizers (sha256) and normalisation; an official MAR file records
    nothing and is taken as trained on its tokenizer's latents times the tokenizer's scale factor.
    """
    data = stage2.trained_on
    if data is None:
        if kl.cfg.latent_norm != "scale":
            raise UserError(f"the stage-2 file {stage2.checkpoint} records no training data, so it is read as MAR's "
                            f"release (scale-factor latents), but the KL tokenizer {kl_info.name} normalises its "
                            "latents per channel: give a stage 2 trained with `d2c train-continuous` on its latents")
        return kl.scale_norm()
    for kind, info, what in (("kl", kl_info, "latents"), ("vq", vq_info, "codes")):
        if info is not None and data[kind]["sha256"] != info.sha256:
            raise UserError(f"stage 2 ({stage2.checkpoint}) was trained on the {what} of the {kind} tokenizer "
                            f"{_side(data[kind])}, but tokenizers.{kind} is {_side(info.record())}: give the "
                            "tokenizer it was trained with")
    return LatentNorm.from_record(data.get("latent_norm"), f"{stage2.checkpoint}: trained_on.latent_norm")


def _check_stage1_fits_vq(stage1, path: str, vq, vq_path: str | None, grid: int | None) -> None:
    """The stage-1 model's codes must be the VQ tokenizer's: the same codebook size (and, for an official
    file, the token grid that sample.image_size gives with the tokenizer's stride)."""
    if stage1.vocab_size != vq.cfg.codebook_size or (grid is not None and stage1.grid != grid):
        where = f" and a {grid}x{grid} grid" if grid is not None else ""
        raise UserError(f"the stage-1 {family(stage1).upper()} model {path} makes {stage1.grid}x{stage1.grid} codes "
                        f"from a vocabulary of {stage1.vocab_size}, but the VQ tokenizer {vq_path or '(preset)'} has a "
                        f"codebook of {vq.cfg.codebook_size}{where}: give the tokenizer the stage-1 model was "
                        "trained with")


def build_chain(cfg: SampleConfig, tokenizers: TokenizersConfig, device: torch.device) -> Chain:
    """Load what the mode needs and check that the pieces fit together, before any sampling."""
    mode, needs = cfg.mode, MODES[cfg.mode]
    if needs.stage1:
        cfg.stage1.resolved()  # the stage-1 settings can be honoured: checked before any model is loaded
    vq = kl = gpt = mar = vq_info = kl_info = norm = None
    loaded = {}
    if needs.uses_vq:
        vq, vq_info = load_tokenizer("vq", tokenizers.vq.preset, tokenizers.vq.checkpoint)
        loaded["vq"] = vq_info.record()
    if needs.uses_kl:
        kl, kl_info = load_tokenizer("kl", tokenizers.kl.preset, tokenizers.kl.checkpoint)
        loaded["kl"] = kl_info.record()
    if needs.stage1:
        path = _require(cfg.discrete, "sample.discrete (a train-discrete run, LlamaGen's c2i_*.pt or RAR's rar_*.bin)",
                        mode)
        official = grid = None
        if not _is_our_run(path):
            grid = (cfg.image_size or OFFICIAL_IMAGE_SIZE) // vq.stride
            official = data_config(stage1_preset(cfg.discrete_preset), vq.cfg.codebook_size, grid,
                                   num_classes=1000)  # the released c2i models are ImageNet-1k
        gpt, info = load_stage1(path, official, use_ema=cfg.use_ema)
        loaded["stage1"] = {**info, "family": family(gpt.cfg), "config": dataclasses.asdict(gpt.cfg),
                            "sampling": dataclasses.asdict(cfg.stage1.resolved())}
        _check_stage1_fits_vq(gpt.cfg, path, vq, tokenizers.vq.checkpoint, grid)
        if cfg.image_size is not None and gpt.cfg.grid * vq.stride != cfg.image_size:
            makes = gpt.cfg.grid * vq.stride
            raise UserError(f"sample.image_size is {cfg.image_size}, but the stage-1 run {path} makes "
                            f"{gpt.cfg.grid}x{gpt.cfg.grid} codes, which the VQ tokenizer (stride {vq.stride}) decodes "
                            f"to {makes}x{makes} px: set sample.image_size={makes}, or leave it unset for a run of ours")
    if needs.stage2:
        path = _require(cfg.continuous, "sample.continuous (a train-continuous run or MAR's mar_*.pth)", mode)
        mar, stage2_info = load_mar(cfg.continuous_preset, path, use_ema=cfg.use_ema)
        check_settings(cfg.stage2, mar)
        loaded["stage2"] = stage2_info.record()
        fused = mar.cfg.fusion != "none"
        if needs.fused is False and fused:
            raise UserError(f"mode continuous-only needs a stage-2 model with fusion none (the MAR baseline); this one "
                            f"uses fusion {mar.cfg.fusion} and needs codes: use mode two-stage or oracle-codes")
        if needs.fused and not fused:
            raise UserError(f"mode {mode} conditions stage 2 on discrete codes, but this stage-2 model has fusion "
                            "none: use mode continuous-only for it, or a model trained with a fusion")
        if mar.cfg.latent_channels != kl.cfg.embed_dim:
            raise UserError(f"the stage-2 model makes {mar.cfg.latent_channels}-channel latents but the KL tokenizer "
                            f"decodes {kl.cfg.embed_dim}: give the tokenizer it was trained with")
    if needs.stage1 and needs.stage2:
        if (gpt.cfg.vocab_size, gpt.cfg.grid) != (mar.cfg.code_vocab, mar.cfg.code_size):
            raise UserError(f"stage 1 ({cfg.discrete}) makes {gpt.cfg.grid}x{gpt.cfg.grid} codes of "
                            f"{gpt.cfg.vocab_size}, but stage 2 ({cfg.continuous}) was trained on "
                            f"{mar.cfg.code_size}x{mar.cfg.code_size} codes of {mar.cfg.code_vocab}")
        if gpt.cfg.num_classes != mar.cfg.num_classes:
            raise UserError(f"stage 1 knows {gpt.cfg.num_classes} classes, stage 2 {mar.cfg.num_classes}")
        if vq.stride != kl.stride:
            raise UserError(f"the tokenizers' grids differ: VQ stride {vq.stride}, KL stride {kl.stride}")
    if mar is not None:  # after the checks of shapes, which say more than a differing checksum
        norm = stage2_latent_norm(stage2_info, kl, kl_info, vq_info if mar.cfg.fusion != "none" else None)
        loaded["latent_norm"] = norm.record()
    oracle = real_latents = None
    if needs.real_images and needs.stage2:
        data = _require(cfg.oracle_data, "sample.oracle_data (encoded shards)", mode)
        oracle = _oracle_codes(data, mar, cfg.num_images, stage2_info.trained_on)
    elif needs.real_images:
        data = _require(cfg.oracle_data, "sample.oracle_data (encoded shards of real images)", mode)
        oracle, real_latents = _real_images(data, cfg.num_images, vq_info if vq is not None else kl_info)
    if oracle is not None:
        loaded["real_images"] = {**shard_input(cfg.oracle_data), "data": str(cfg.oracle_data), "count": len(oracle[1])}
    if gpt is not None or mar is not None:
        num_classes = gpt.cfg.num_classes if gpt is not None else mar.cfg.num_classes
    else:  # reconstructions: the classes of the real images
        num_classes = int(oracle[1].max()) + 1
    for key, model in (("stage1", gpt), ("stage2", mar), ("vq", vq), ("kl", kl)):
        if model is not None:
            model.to(device).eval()
            loaded[key]["parameters"] = sum(p.numel() for p in model.parameters())
    return Chain(cfg, device, num_classes, gpt, mar, vq, kl, oracle, latent_norm=norm, loaded=loaded,
                 real_latents=real_latents)


def _oracle_codes(data: str, mar, count: int, trained_on: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    manifest = read_manifest(data)
    vq = manifest.vq
    if trained_on is not None and vq["sha256"] != trained_on["vq"]["sha256"]:
        raise UserError(f"{data} holds the codes of the vq tokenizer {_side(vq)}, but stage 2 was trained on those "
                        f"of {_side(trained_on['vq'])}: give encoded shards of the tokenizer it was trained with")
    if (manifest.codebook_size, manifest.grid) != (mar.cfg.code_vocab, mar.cfg.code_size):
        raise UserError(f"{data} holds {manifest.grid}x{manifest.grid} codes of "
                        f"{manifest.codebook_size}, but stage 2 was trained on {mar.cfg.code_size}x{mar.cfg.code_size} "
                        f"codes of {mar.cfg.code_vocab}")
    (codes, labels), _ = _first_images(manifest, count, with_means=False, what="oracle-codes: ")
    return codes, labels


def _real_images(data: str, count: int, tokenizer: LoadedWeights):
    """((codes [N, L], labels [N]), posterior means [N, C, h, w] or None) of the first `count` images of
    encoded shards (original view), which must come from `tokenizer` (the one that decodes them)."""
    manifest = read_manifest(data)
    theirs = manifest.tokenizer(tokenizer.kind)
    if theirs.get("sha256") != tokenizer.sha256:
        raise UserError(f"{data} was encoded with the {tokenizer.kind} tokenizer {_side(theirs)}, but "
                        f"tokenizers.{tokenizer.kind} is {_side(tokenizer.record())}: give the tokenizer it was "
                        "encoded with")
    return _first_images(manifest, count, with_means=tokenizer.kind == "kl")


def _first_images(manifest: EncodedManifest, count: int, with_means: bool, what: str = ""):
    """((codes [N, L], labels [N]), posterior means [N, C, h, w] or None) of the first `count` images of
    encoded shards, original view."""
    if manifest.num_samples < count:
        raise UserError(f"{what}{manifest.root} holds {manifest.num_samples} images, fewer than sample.num_images "
                        f"{count}")
    codes, labels, moments = first_samples(manifest.root, count, with_moments=with_means)
    means = posterior_latents(torch.from_numpy(moments), None) if with_means else None
    return (torch.from_numpy(codes), torch.from_numpy(labels)), means


def make_labels(cfg: SampleConfig, num_classes: int, chain: Chain | None = None) -> np.ndarray:
    """Class-balanced labels (image i gets class i mod C), an explicit class list cycled, or the oracle's."""
    if chain is not None and chain.oracle is not None:
        if cfg.classes:  # the real images bring their own labels: a class list cannot be honoured
            raise UserError(f"sample.classes is set, but mode {cfg.mode} takes its labels from the real images in "
                            "sample.oracle_data; unset sample.classes (or use mode two-stage, discrete-only or "
                            "continuous-only to choose classes)")
        return chain.oracle[1].numpy()
    if cfg.classes:
        bad = [c for c in cfg.classes if not 0 <= c < num_classes]
        if bad:
            raise UserError(f"sample.classes: {bad} outside the model's {num_classes} classes")
        return np.resize(np.asarray(cfg.classes, dtype=np.int64), cfg.num_images)
    if cfg.num_images % num_classes:
        low = cfg.num_images // num_classes * num_classes
        options = [n for n in (low, low + num_classes) if n > 0]
        raise UserError(f"sample.num_images {cfg.num_images} is not a multiple of the {num_classes} classes, so the "
                        f"labels cannot be class-balanced; use {' or '.join(map(str, options))} (or sample.classes)")
    return np.arange(cfg.num_images, dtype=np.int64) % num_classes


def batch_seed(seed: int, start: int) -> int:
    """The seed of the batch that starts at global image index `start`."""
    return int(np.random.SeedSequence([seed, start]).generate_state(1)[0])


def _synced(device: torch.device) -> float:
    """The time once the device's queued work is done (so that each stage's seconds are its own)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def generate_batch(chain: Chain, labels: np.ndarray, start: int, timings: dict) -> np.ndarray:
    """uint8 images [B, H, W, 3] for the images start .. start+len(labels)-1."""
    cfg, device = chain.cfg, chain.device
    generator = torch.Generator(device).manual_seed(batch_seed(cfg.seed, start))
    y = torch.from_numpy(labels).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" and cfg.precision == "bf16" \
        else nullcontext()
    with autocast:
        t0 = time.perf_counter()
        codes = None
        if chain.uses_stage1:
            codes = generate(chain.gpt, y, cfg.stage1, generator)
        elif chain.oracle is not None:
            codes = chain.oracle[0][start:start + len(labels)].to(device)
        if chain.real_latents is not None:
            latents = chain.real_latents[start:start + len(labels)].to(device)
        t1 = _synced(device)
        if chain.uses_stage2:
            latents = sample_latents(chain.mar, y, codes if chain.mar.cfg.fusion != "none" else None, cfg.stage2,
                                     generator=generator)
        t2 = _synced(device)
        if chain.uses_stage2:
            images = chain.kl.decode_latents(latents, chain.latent_norm)
        elif chain.real_latents is not None:
            images = chain.kl.decode_latents(latents, POSTERIOR_MEANS)
        else:
            g = int(round(codes.shape[1] ** 0.5))
            images = chain.vq.decode_codes(codes.view(-1, g, g))
        pixels = to_uint8(images.float(), f"sample: the images {start}..{start + len(labels) - 1} (mode {cfg.mode}, "
                                          f"from {', '.join(_source(v) for v in chain.loaded.values() if _source(v))})")
        t3 = time.perf_counter()
    for key, seconds in (("stage1", t1 - t0), ("stage2", t2 - t1), ("decode", t3 - t2)):
        timings[key] = timings.get(key, 0.0) + seconds
    return pixels
