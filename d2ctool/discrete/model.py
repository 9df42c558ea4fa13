"""Stage 1: LlamaGen's class-conditional GPT over VQ codes.

Decoder-only transformer (RMSNorm, SwiGLU, 2-D RoPE over the token grid, no biases). The sequence
is [class token, code_0, ..., code_{N-2}] and position i predicts code_i. The class table has
num_classes + 1 rows; the last is the null class for classifier-free guidance, used for
`class_dropout` of the labels in training. Parameter names match LlamaGen's checkpoints.

Attention runs with PyTorch SDPA. For generation each block owns a static KV cache
(`setup_cache`); `forward_cached` then processes a slice of positions, reading and writing it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from d2ctool.discrete.blocks import KVCache, causal_attention, code_loss, code_step_cost, drop_labels
from d2ctool.discrete.config import GPTConfig
from d2ctool.training.cost import StepCost


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_table_2d(grid: int, head_dim: int, base: float, num_prefix: int = 1) -> torch.Tensor:
    """cos/sin table [num_prefix + grid*grid, head_dim/2, 2] for LlamaGen's 2-D RoPE.

    Of the head_dim/2 rotated pairs, the first half rotate with the row index and the second
    half with the column index, at frequencies 1 / base^(2k / (head_dim/2)). The prefix (class
    token) rows are all zeros, so its queries and keys vanish, as in the released models.
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    angles_1d = torch.outer(torch.arange(grid).float(), freqs)  # [grid, half/2]
    angles = torch.cat([angles_1d[:, None, :].expand(grid, grid, -1),  # row
                        angles_1d[None, :, :].expand(grid, grid, -1)], dim=-1)  # column
    table = torch.stack([angles.cos(), angles.sin()], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(num_prefix, half, 2), table])


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2k], x[2k+1]) of x [B, T, H, D] by table [T, D/2, 2]."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    rotated = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin,
                           pairs[..., 1] * cos + pairs[..., 0] * sin], dim=-1)
    return rotated.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.dim // cfg.n_head
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.attn_dropout = cfg.attn_dropout
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)
        self.kv_cache: KVCache | None = None  # during generation

    def forward(self, x: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.wqkv(x).view(b, t, 3, self.n_head, self.head_dim).unbind(2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        y = causal_attention(q, k, v, self.kv_cache, positions, self.attn_dropout if self.training else 0.0)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(b, t, d)))


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope, positions)
        return x + self.feed_forward(self.ffn_norm(x))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)  # last row: the CFG null class


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("rope", rope_table_2d(cfg.grid, cfg.dim // cfg.n_head, cfg.rope_base), persistent=False)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        nn.init.zeros_(self.output.weight)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.init_std)

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def _run(self, h: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        rope = self.rope[: h.shape[1]] if positions is None else self.rope[positions]
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, rope, positions, use_reentrant=False)
            else:
                h = layer(h, rope, positions)
        return self.output(self.norm(h)).float()

    def forward(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits [B, N, vocab] for codes [B, N] given labels [B]: position i predicts codes[:, i].

        In training mode the labels are dropped to the null class with probability `class_dropout`.
        """
        if self.training and self.cfg.class_dropout > 0:
            labels = drop_labels(labels, self.cfg.class_dropout, self.null_class)
        h = torch.cat([self.cls_embedding.embedding_table(labels)[:, None], self.tok_embeddings(codes[:, :-1])], 1)
        return self._run(self.tok_dropout(h), None)

    def loss(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return code_loss(self(codes, labels), codes)

    def step_cost(self, batch: int = 2) -> StepCost:
        """FLOPs and saved activations of one training step (`loss`) per image, on this model's device."""
        return code_step_cost(self, batch)

    # ---- generation with a static KV cache -------------------------------------------------------
    def setup_cache(self, batch_size: int, dtype: torch.dtype | None = None) -> None:
        weight = self.tok_embeddings.weight
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch_size, self.cfg.n_head, 1 + self.cfg.grid**2,
                                               self.cfg.dim // self.cfg.n_head, dtype or weight.dtype, weight.device)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None

    def forward_cached(self, tokens: torch.Tensor | None, labels: torch.Tensor | None,
                       positions: torch.Tensor) -> torch.Tensor:
        """Logits at `positions` (sequence positions; 0 is the class token), filling the KV cache.

        Prefill with labels [B] at positions [0]; then one code per step with tokens [B, 1].
        """
        h = self.cls_embedding.embedding_table(labels)[:, None] if labels is not None else self.tok_embeddings(tokens)
        return self._run(self.tok_dropout(h), positions)

    def prefill(self, labels: torch.Tensor) -> torch.Tensor:
        """Start generation (cache set up) for labels [B]: the logits [B, vocab] of code 0."""
        return self.forward_cached(None, labels, torch.tensor([0], device=labels.device))[:, -1]

    def step(self, codes: torch.Tensor, i: int) -> torch.Tensor:
        """Feed code i [B] (row-major index); the logits [B, vocab] of code i + 1."""
        return self.forward_cached(codes[:, None], None, torch.tensor([i + 1], device=codes.device))[:, -1]
