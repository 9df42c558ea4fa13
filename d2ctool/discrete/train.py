"""`d2c train-discrete`: the stage-1 model (LlamaGen's GPT or RAR) on encoded shards, with the shared
trainer.

Each sample's codes are those of one of its stored views (the original or its h-flip, or one of ten
crops) drawn at random (seeded per sample), as LlamaGen draws them. RAR trains on randomly permuted sequences with a probability annealed from 1 to 0 over
`discrete.permutation` (set on the model before every optimizer step, so a resumed run continues it).
vocab_size, grid and classes come from the encode manifest; the periodic grid decodes generated codes
with the VQ tokenizer the data was encoded with.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from d2ctool.data.encoded import EncodedManifest, sample_codes
from d2ctool.discrete.config import DiscreteConfig, preset
from d2ctool.discrete.generate import generate
from d2ctool.discrete.load import build_model, check_compatible, data_config, family, load_stage1, model_record
from d2ctool.discrete.blocks import code_loss
from d2ctool.discrete.rar import RAR
from d2ctool.errors import UserError
from d2ctool.identity import shard_input
from d2ctool.tokenizers.load import load_tokenizer
from d2ctool.training.stage import EncodedShardsTask
from d2ctool.training.trainer import Trainer, TrainResult
from d2ctool.visual import save_grid, to_uint8

def model_config_for_data(cfg: DiscreteConfig, manifest: EncodedManifest):
    """The preset (GPT or RAR) with the data's vocabulary (the VQ codebook), token grid and classes, and the
    recipe's dropouts."""
    model_cfg = data_config(preset(cfg.model), manifest.codebook_size, manifest.grid, manifest.num_classes)
    dropouts = {"class_dropout": cfg.class_dropout, "resid_dropout": cfg.resid_dropout, "ffn_dropout": cfg.ffn_dropout}
    if family(model_cfg) == "rar":
        dropouts["attn_dropout"] = cfg.attn_dropout
        if cfg.permutation.anneal_end < cfg.permutation.anneal_start:
            raise UserError(f"discrete.permutation: anneal_end {cfg.permutation.anneal_end} comes before "
                            f"anneal_start {cfg.permutation.anneal_start}")
    else:
        dropouts["token_dropout"] = cfg.token_dropout
    model_cfg = dataclasses.replace(model_cfg, **dropouts)
    model_cfg.check()
    return model_cfg


class DiscreteTask(EncodedShardsTask):
    name = "train-discrete"

    def __init__(self, cfg: DiscreteConfig):
        super().__init__(cfg, "discrete")
        self.classes = self.manifest.classes
        model_cfg = model_config_for_data(cfg, self.manifest)
        cfg.sampling.resolved()  # an unknown sampling preset fails now, not at the first grid
        self.model_config = model_record(model_cfg)
        self.tokens_per_sample = model_cfg.grid ** 2
        self._model_cfg = model_cfg
        self._vq_record = self.manifest.vq
        self._vq = None

    def build_model(self) -> nn.Module:
        if self.cfg.init:
            model, _ = load_stage1(self.cfg.init, self._model_cfg, use_ema=True)
            check_compatible(model.cfg, self._model_cfg, self.cfg.init)
            return model.train()
        return build_model(self._model_cfg)

    def before_step(self, model: nn.Module, step: int) -> None:
        if isinstance(model, RAR):  # RAR's permutation anneal, at the 0-based optimizer step about to run
            model.random_ratio.fill_(self.cfg.permutation.probability(step))

    def decode(self, members: dict, rng: np.random.Generator):
        codes = sample_codes(members, int(rng.integers(self.manifest.num_views)))  # one view at random (LlamaGen)
        return torch.from_numpy(codes), int(members["cls"])

    def loss(self, model, batch, device):
        codes, labels = (t.to(device, non_blocking=True) for t in batch)
        logits = model(codes, labels)
        return code_loss(logits, codes), {"token_accuracy": (logits.argmax(-1) == codes).float().mean().item()}

    def vq(self, device: torch.device):
        if self._vq is None:
            self._vq, _ = load_tokenizer("vq", self._vq_record["name"], self._vq_record["checkpoint"])
        return self._vq.to(device)

    @torch.no_grad()
    def write_grid(self, model: nn.Module, path: Path, device: torch.device) -> None:
        """A grid of generated samples: `grid_classes` classes (rows) × 4 samples, decoded by the VQ."""
        classes = np.linspace(0, len(self.classes) - 1, min(self.cfg.grid_classes, len(self.classes))).round()
        labels = torch.tensor(np.repeat(classes.astype(np.int64), 4), device=device)
        codes = generate(model, labels, self.cfg.sampling, torch.Generator(device).manual_seed(0))
        g = model.cfg.grid
        images = self.vq(device).decode_codes(codes.view(-1, g, g))
        save_grid(path, to_uint8(images), 4, [self.classes[int(c)][:12] for c in classes])


def check_vq_available(task: DiscreteTask) -> None:
    """Fail before training when the grids' VQ tokenizer cannot be loaded."""
    record = task._vq_record
    if not Path(record["checkpoint"]).is_file():
        raise UserError(f"the VQ tokenizer the data was encoded with is missing: {record['checkpoint']} "
                        "(restore it: it decodes the periodic sample grids)")


def train_discrete(cfg: DiscreteConfig, resolved_config: dict, resolved_yaml: str,
                   steps_given: bool = True) -> TrainResult:
    if not cfg.out:
        raise UserError("discrete.out is not set: give the run folder")
    task = DiscreteTask(cfg)
    check_vq_available(task)
    return Trainer(task, cfg.train, cfg.out, resolved_config, resolved_yaml, {"data": shard_input(cfg.data)},
                   steps_given).run()
