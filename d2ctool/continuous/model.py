"""MAR: masked autoregressive modelling of continuous latent tokens, with a per-token diffusion head.

Latents [B, C, h, w] (already scaled) are cut row-major into L tokens. Training: every sample gets a
random order; one mask ratio per batch is drawn from a truncated Gaussian on [mask_ratio_min, 1]
(mean 1, std 0.25) and the first ceil(L * ratio) tokens of each order are masked. The MAE-style encoder
sees `buffer_size` copies of the class embedding (the learned `fake_latent` instead, with probability
`label_drop_prob`, for CFG) and the visible tokens; the decoder fills masked positions with
`mask_token`; its outputs z condition the diffusion head, whose loss counts on masked tokens only.
With fusion other than `none`, discrete codes condition the encoder and decoder (see fusion.py).

Fusion `none` has exactly the state dict of MAR's official models (`diffloss.net.*` included).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from einops import rearrange
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from d2ctool.continuous import rng
from d2ctool.continuous.blocks import LN_EPS, Block
from d2ctool.continuous.config import MARConfig
from d2ctool.continuous.diffusion import DiffusionHead
from d2ctool.continuous.fusion import CodeContext, CodeFusion
from d2ctool.errors import UserError
from d2ctool.training.cost import StepCost, trace_step

MASK_RATIO_STD = 0.25  # MAR: the truncated Gaussian of mask ratios is centred at 1.0 with this std


def truncated_normal_mask_ratio(minimum: float, generator: torch.Generator | None = None) -> float:
    """One draw from N(1, 0.25^2) truncated to [minimum, 1], by inverting the CDF."""
    lo = torch.special.ndtr(torch.tensor((minimum - 1.0) / MASK_RATIO_STD, dtype=torch.float64))
    hi = 0.5  # ndtr(0): the upper end is the mean
    u = rng.rand((), torch.device("cpu"), generator).double()
    ratio = 1.0 + MASK_RATIO_STD * torch.special.ndtri(lo + u * (hi - lo))
    return float(ratio.clamp(minimum, 1.0))


def mean_mask_ratio(minimum: float) -> float:
    """Mean of N(1, 0.25^2) truncated to [minimum, 1]: the ratio of an average training step."""
    a = (minimum - 1.0) / MASK_RATIO_STD
    pdf = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    return 1.0 + MASK_RATIO_STD * (pdf(a) - pdf(0.0)) / (cdf(0.0) - cdf(a))


class MAR(nn.Module):
    # MAR trains its diffusion head without weight decay (util/misc.py add_weight_decay); so does our trainer
    no_weight_decay_prefixes = ("diffloss.",)

    def __init__(self, cfg: MARConfig):
        super().__init__()
        self.cfg = cfg.validate()
        de, dd, seq, buf = cfg.encoder_dim, cfg.decoder_dim, cfg.seq_len, cfg.buffer_size
        cross = cfg.fusion == "crossattn"

        self.class_emb = nn.Embedding(cfg.num_classes, de)
        self.fake_latent = nn.Parameter(torch.zeros(1, de))  # the CFG null condition

        self.z_proj = nn.Linear(cfg.token_dim, de)
        self.z_proj_ln = nn.LayerNorm(de, eps=LN_EPS)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buf + seq, de))
        self.encoder_blocks = nn.ModuleList(
            Block(de, cfg.encoder_heads, cfg.mlp_ratio, cfg.attn_dropout, cfg.proj_dropout, cross)
            for _ in range(cfg.encoder_depth))
        self.encoder_norm = nn.LayerNorm(de, eps=LN_EPS)

        self.decoder_embed = nn.Linear(de, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buf + seq, dd))
        self.decoder_blocks = nn.ModuleList(
            Block(dd, cfg.decoder_heads, cfg.mlp_ratio, cfg.attn_dropout, cfg.proj_dropout, cross)
            for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dd, eps=LN_EPS)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, seq, dd))

        if cfg.fusion != "none":
            self.fusion = CodeFusion(cfg)
        self._init_weights()
        # created after the initialisation above: the head initialises itself
        self.diffloss = DiffusionHead(cfg.token_dim, dd, cfg.diffloss_width, cfg.diffloss_depth, cfg.diffusion_steps,
                                      cfg.grad_checkpointing)

    def _init_weights(self):
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if hasattr(self, "fusion"):
            self.fusion.init_weights()
            for block in [*self.encoder_blocks, *self.decoder_blocks]:
                if hasattr(block, "cross_attn"):  # start as MAR's block: cross-attention adds nothing yet
                    nn.init.zeros_(block.cross_attn.proj.weight)
                    nn.init.zeros_(block.cross_attn.proj.bias)

    @property
    def gradient_checkpointing(self) -> bool:
        """Recompute each block's activations in backward (the trainer sets it, as on GPT and RAR; the config's
        `grad_checkpointing` is its initial value). Covers the transformer and the diffusion head."""
        return self.diffloss.net.grad_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.diffloss.net.grad_checkpointing = on

    # ----- tokens -----------------------------------------------------------------------------------

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, L, C * p * p], tokens row-major, each token channel-major then (p, p)."""
        return rearrange(latents, "b c (h p) (w q) -> b (h w) (c p q)", p=self.cfg.patch_size, q=self.cfg.patch_size)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        p = self.cfg.patch_size
        return rearrange(tokens, "b (h w) (c p q) -> b c (h p) (w q)", h=self.cfg.seq_size, p=p, q=p)

    # ----- inputs -----------------------------------------------------------------------------------

    def check_labels(self, labels: torch.Tensor, batch: int) -> None:
        n = self.cfg.num_classes
        if labels.shape != (batch,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise UserError(f"labels: expected integer class indices of shape [{batch}], got "
                            f"{labels.dtype} {list(labels.shape)}")
        if labels.is_meta:  # shapes only (d2c plan): no values to check
            return
        lo, hi = torch.aminmax(labels)
        if int(lo) < 0 or int(hi) >= n:
            raise UserError(f"labels: class indices must lie in [0, {n - 1}] (num_classes {n}), got "
                            f"[{int(lo)}, {int(hi)}]")

    def check_codes(self, codes: torch.Tensor | None, batch: int) -> None:
        cfg = self.cfg
        if cfg.fusion == "none":
            if codes is not None:
                raise UserError("codes were given, but this model has fusion 'none' (continuous only) and takes "
                                "none; pass codes=None or use a model with fusion add, prefix, qformer or crossattn")
            return
        if codes is None:
            raise UserError(f"fusion '{cfg.fusion}' conditions on discrete codes, but none were given: pass the "
                            f"VQ codes of each image, shape [B, {cfg.code_len}]")
        if codes.ndim != 2 or codes.shape != (batch, cfg.code_len):
            raise UserError(f"codes: expected shape [{batch}, {cfg.code_len}] (a {cfg.code_size}x{cfg.code_size} "
                            f"grid flattened row-major, config code_size {cfg.code_size}), got "
                            f"{list(codes.shape)}: the VQ tokenizer's grid must match code_size")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise UserError(f"codes: expected integer codebook indices, got {codes.dtype}")
        if codes.is_meta:
            return
        lo, hi = torch.aminmax(codes)
        if int(lo) < 0 or int(hi) >= cfg.code_vocab:
            raise UserError(f"codes: indices must lie in [0, {cfg.code_vocab - 1}] (config code_vocab "
                            f"{cfg.code_vocab}), got [{int(lo)}, {int(hi)}]: is the VQ codebook the configured one?")

    def check_latents(self, latents: torch.Tensor) -> None:
        c, s = self.cfg.latent_channels, self.cfg.latent_size
        if latents.ndim != 4 or tuple(latents.shape[1:]) != (c, s, s):
            raise UserError(f"latents: expected shape [B, {c}, {s}, {s}] (config latent_channels {c}, latent_size "
                            f"{s}), got {list(latents.shape)}: the KL tokenizer and resolution must match the "
                            f"stage-2 config")

    # ----- conditions ---------------------------------------------------------------------------------

    def code_context(self, codes: torch.Tensor | None, generator: torch.Generator | None = None) -> CodeContext | None:
        """Embed the codes for the encoder and decoder (None for fusion `none`). In training, a fraction
        `code_corrupt_prob` of them is first replaced by random codes."""
        if codes is None:
            return None
        p = self.cfg.code_corrupt_prob
        if self.training and p > 0:
            swap = rng.rand(codes.shape, codes.device, generator) < p
            codes = torch.where(swap, rng.randint(self.cfg.code_vocab, codes.shape, codes.device, generator), codes)
        return self.fusion(codes.long())

    def class_embedding(self, labels: torch.Tensor | None, batch: int,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, De]: the class embedding; `fake_latent` for labels None, and (training) w.p. label_drop_prob."""
        if labels is None:
            return self.fake_latent.expand(batch, -1)
        emb = self.class_emb(labels)
        if self.training:  # also at probability 0: fake_latent stays in the graph, as DDP expects
            drop = rng.rand((batch,), labels.device, generator) < self.cfg.label_drop_prob
            emb = torch.where(drop[:, None], self.fake_latent, emb)
        return emb

    # ----- masking ------------------------------------------------------------------------------------

    def sample_orders(self, batch: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, L] long: a random permutation of the token positions per sample."""
        return rng.rand((batch, self.cfg.seq_len), device, generator).argsort(dim=1)

    def masked_count(self, generator: torch.Generator | None = None, ratio: float | None = None) -> int:
        """ceil(L * ratio) tokens to mask, one ratio for the batch (the encoder needs as many visible tokens
        in every sample); the ratio is drawn from the truncated Gaussian unless given."""
        if ratio is None:
            ratio = truncated_normal_mask_ratio(self.cfg.mask_ratio_min, generator)
        return math.ceil(self.cfg.seq_len * ratio)

    @staticmethod
    def first_of_orders(orders: torch.Tensor, n: int) -> torch.Tensor:
        """[B, L] bool: the first n positions of each order."""
        return torch.zeros(orders.shape, dtype=torch.bool, device=orders.device).scatter(1, orders[:, :n], True)

    def random_mask(self, orders: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, L] bool: the first `masked_count` positions of each order."""
        return self.first_of_orders(orders, self.masked_count(generator))

    # ----- transformer --------------------------------------------------------------------------------

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor, memory: torch.Tensor | list | None) -> torch.Tensor:
        """`memory`: the cross-attention memory, or a list of each block's precomputed (keys, values)."""
        for i, block in enumerate(blocks):
            m = memory[i] if isinstance(memory, list) else memory
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, m, use_reentrant=False)
            else:
                x = block(x, m)
        return x

    def memory_kv(self, ctx: CodeContext | None) -> CodeContext | None:
        """For sampling, where the codes stay fixed: every block's cross-attention keys and values of the code
        memory, computed once per run instead of at every step (fusion crossattn; other contexts unchanged)."""
        if ctx is None or ctx.encoder_memory is None:
            return ctx
        return replace(ctx, encoder_memory=None, decoder_memory=None,
                       encoder_kv=[b.cross_attn.memory_kv(ctx.encoder_memory) for b in self.encoder_blocks],
                       decoder_kv=[b.cross_attn.memory_kv(ctx.decoder_memory) for b in self.decoder_blocks])

    def _kept(self, mask: torch.Tensor, visible: int) -> torch.Tensor:
        """[B, buffer + visible] long: the positions the encoder sees, in order: the buffer, then each
        sample's unmasked tokens. Every sample has as many (one mask ratio per batch, one schedule in
        sampling), so they are gathered: unlike boolean indexing, a gather has a meta-device form."""
        buf = self.cfg.buffer_size
        unmasked = mask.to(torch.uint8).argsort(dim=1, stable=True)[:, :visible]  # ascending positions
        return torch.cat([torch.arange(buf, device=mask.device).expand(mask.shape[0], buf), buf + unmasked], 1)

    def encode(self, tokens: torch.Tensor, mask: torch.Tensor, class_emb: torch.Tensor,
               ctx: CodeContext | None = None, masked: int | None = None) -> torch.Tensor:
        """tokens [B, L, Ct], mask [B, L] bool, class_emb [B, De] -> [B, K + buffer + visible, De].
        `masked`: the number of masked tokens per sample (counted from `mask` when not given)."""
        x = self.z_proj(tokens)
        if ctx is not None and ctx.encoder_add is not None:
            x = x + ctx.encoder_add
        b, _, d = x.shape
        x = torch.cat([class_emb[:, None].expand(b, self.cfg.buffer_size, d), x], dim=1)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
        if masked is None:
            masked = int(mask[0].sum())
        kept = self._kept(mask, mask.shape[1] - masked)
        x = x.gather(1, kept[..., None].expand(-1, -1, d))
        if ctx is not None and ctx.encoder_tokens is not None:
            x = torch.cat([ctx.encoder_tokens.to(x.dtype), x], dim=1)
        x = self._run(self.encoder_blocks, x, None if ctx is None else ctx.encoder_kv or ctx.encoder_memory)
        return self.encoder_norm(x)

    def decode(self, x: torch.Tensor, mask: torch.Tensor, ctx: CodeContext | None = None) -> torch.Tensor:
        """Encoder output -> z [B, L, Dd] for every token position (masked ones from mask_token)."""
        x = self.decoder_embed(x)
        b, buf = x.shape[0], self.cfg.buffer_size
        k = 0 if ctx is None or ctx.encoder_tokens is None else ctx.encoder_tokens.shape[1]
        extra, x = x[:, :k], x[:, k:]
        kept = self._kept(mask, x.shape[1] - buf)[..., None].expand(-1, -1, x.shape[-1])
        padded = self.mask_token.to(x.dtype).expand(b, buf + mask.shape[1], -1)
        x = padded.scatter(1, kept, x) + self.decoder_pos_embed_learned
        if ctx is not None and ctx.decoder_add is not None:
            x = x + F.pad(ctx.decoder_add, (0, 0, buf, 0))
        if k:
            if ctx.decoder_tokens_pos is not None:
                extra = extra + ctx.decoder_tokens_pos
            x = torch.cat([extra.to(x.dtype), x], dim=1)
        x = self._run(self.decoder_blocks, x, None if ctx is None else ctx.decoder_kv or ctx.decoder_memory)
        x = self.decoder_norm(x)[:, k + buf:]
        return x + self.diffusion_pos_embed_learned

    # ----- training -----------------------------------------------------------------------------------

    def forward(self, latents: torch.Tensor, labels: torch.Tensor, codes: torch.Tensor | None = None,
                generator: torch.Generator | None = None, mask_ratio: float | None = None) -> torch.Tensor:
        """The training loss for scaled latents [B, C, h, w], class labels [B] and, with a fusion, the
        discrete codes [B, code_size**2]. `generator` (optional) drives every random choice; `mask_ratio`
        fixes the ratio instead of drawing it."""
        self.check_latents(latents)
        batch = latents.shape[0]
        self.check_labels(labels, batch)
        self.check_codes(codes, batch)
        tokens = self.patchify(latents.to(self.z_proj.weight.dtype))
        ctx = self.code_context(codes, generator)
        orders = self.sample_orders(batch, tokens.device, generator)
        masked = self.masked_count(generator, mask_ratio)
        mask = self.first_of_orders(orders, masked)
        class_emb = self.class_embedding(labels, batch, generator)
        z = self.decode(self.encode(tokens, mask, class_emb, ctx, masked), mask, ctx)
        m = self.cfg.diffusion_batch_mul
        return self.diffloss(tokens.reshape(-1, tokens.shape[-1]).repeat(m, 1), z.reshape(-1, z.shape[-1]).repeat(m, 1),
                             mask.reshape(-1).repeat(m), generator)

    def step_cost(self, batch: int = 2) -> StepCost:
        """FLOPs and saved activations of one training step per image, traced through `forward` at the
        mean mask ratio on this model's device (the meta device for `d2c plan`)."""
        cfg, device = self.cfg, self.z_proj.weight.device
        latents = torch.zeros(batch, cfg.latent_channels, cfg.latent_size, cfg.latent_size, device=device)
        labels = torch.zeros(batch, dtype=torch.long, device=device)
        codes = None if cfg.fusion == "none" else torch.zeros(batch, cfg.code_len, dtype=torch.long, device=device)
        ratio = mean_mask_ratio(cfg.mask_ratio_min)
        return trace_step(self, lambda: self(latents, labels, codes, mask_ratio=ratio), batch)
