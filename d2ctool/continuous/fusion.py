"""How the discrete VQ codes condition the continuous model (config field `fusion`).

Every mode turns codes [B, code_len] into a `CodeContext` once per batch (once per sampling run);
the MAR encoder and decoder read from it:

- `add`: a code embedding is added at each token position, at the encoder input (before the masked
  tokens are dropped) and at the decoder input (so masked positions see their code too). The two grids
  are the same h x w. Embeddings start at zero, so a model initialised from MAR starts out as MAR.
- `prefix` (DisCon): the embedded codes (+ learned positions) are a prefix sequence inside the encoder,
  next to the class buffer; the decoder keeps them (with its own position embedding) so that every
  continuous token attends to them in both stacks. Attention is bidirectional, as everywhere in MAR.
- `qformer` (D2C): N learned queries attend to the embedded codes through L blocks of self-attention,
  cross-attention and MLP; the N outputs are conditioning tokens in the encoder next to the class buffer,
  and carried through the decoder like the buffer.
- `crossattn`: every encoder and decoder block cross-attends to the embedded codes (one embedding per
  stack); the cross-attention output projection starts at zero, so blocks start out as MAR's.
Nothing of a fusion appears in the state dict of fusion `none`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from d2ctool.continuous.blocks import LN_EPS, Block
from d2ctool.continuous.config import MARConfig


@dataclass
class CodeContext:
    """What the encoder and decoder read; fields a fusion does not use stay None."""

    encoder_add: torch.Tensor | None = None  # [B, L, De] added to the token embeddings
    decoder_add: torch.Tensor | None = None  # [B, L, Dd]
    encoder_tokens: torch.Tensor | None = None  # [B, K, De] extra tokens in the encoder sequence
    decoder_tokens_pos: torch.Tensor | None = None  # [1, K, Dd] decoder position embedding of those tokens
    encoder_memory: torch.Tensor | None = None  # [B, Lc, De] for cross-attention
    decoder_memory: torch.Tensor | None = None  # [B, Lc, Dd]
    # sampling: each block's cross-attention (keys, values) of the memory, computed once (MAR.memory_kv)
    encoder_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    decoder_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def doubled(self) -> "CodeContext":
        """The context for a batch that is stacked twice (conditional and unconditional CFG halves)."""
        def double(v):
            return [(torch.cat([k, k]), torch.cat([w, w])) for k, w in v] if isinstance(v, list) else torch.cat([v, v])

        batched = {k: v for k, v in vars(self).items() if v is not None and k != "decoder_tokens_pos"}
        return replace(self, **{k: double(v) for k, v in batched.items()})


class CodeEmbedding(nn.Module):
    """codes [B, Lc] -> [B, Lc, D]: a codebook-index embedding plus a learned position, layer-normed."""

    def __init__(self, vocab: int, length: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, length, dim))
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.norm(self.embed(codes) + self.pos_embed)


class QFormer(nn.Module):
    """N learned queries reading the codes: blocks of self-attention, cross-attention to the codes, MLP."""

    def __init__(self, cfg: MARConfig):
        super().__init__()
        dim = cfg.encoder_dim
        self.codes = CodeEmbedding(cfg.code_vocab, cfg.code_len, dim)
        self.queries = nn.Parameter(torch.zeros(1, cfg.qformer_queries, dim))
        self.blocks = nn.ModuleList(Block(dim, cfg.encoder_heads, cfg.mlp_ratio, cfg.attn_dropout, cfg.proj_dropout,
                                          cross=True) for _ in range(cfg.qformer_depth))
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        nn.init.normal_(self.queries, std=0.02)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        memory = self.codes(codes)
        x = self.queries.expand(codes.shape[0], -1, -1)
        for block in self.blocks:
            x = block(x, memory)
        return self.norm(x)


class CodeFusion(nn.Module):
    """The parameters of one fusion mode (stored under `fusion.` in the state dict)."""

    def __init__(self, cfg: MARConfig):
        super().__init__()
        self.mode = cfg.fusion
        de, dd, vocab, length = cfg.encoder_dim, cfg.decoder_dim, cfg.code_vocab, cfg.code_len
        if self.mode == "add":
            self.encoder_embed = nn.Embedding(vocab, de)
            self.decoder_embed = nn.Embedding(vocab, dd)
        elif self.mode == "prefix":
            self.encoder_tokens = CodeEmbedding(vocab, length, de)
            self.decoder_pos_embed = nn.Parameter(torch.zeros(1, length, dd))
        elif self.mode == "qformer":
            self.qformer = QFormer(cfg)
        elif self.mode == "crossattn":
            self.encoder_memory = CodeEmbedding(vocab, length, de)
            self.decoder_memory = CodeEmbedding(vocab, length, dd)
        else:
            raise ValueError(f"no fusion parameters for mode {self.mode!r}")

    def init_weights(self):
        """Run after the model-wide initialisation (which sets every Linear and LayerNorm)."""
        if self.mode == "add":
            nn.init.zeros_(self.encoder_embed.weight)
            nn.init.zeros_(self.decoder_embed.weight)
        elif self.mode == "prefix":
            nn.init.normal_(self.decoder_pos_embed, std=0.02)

    def forward(self, codes: torch.Tensor) -> CodeContext:
        if self.mode == "add":
            return CodeContext(encoder_add=self.encoder_embed(codes), decoder_add=self.decoder_embed(codes))
        if self.mode == "prefix":
            return CodeContext(encoder_tokens=self.encoder_tokens(codes), decoder_tokens_pos=self.decoder_pos_embed)
        if self.mode == "qformer":
            return CodeContext(encoder_tokens=self.qformer(codes))
        return CodeContext(encoder_memory=self.encoder_memory(codes), decoder_memory=self.decoder_memory(codes))
