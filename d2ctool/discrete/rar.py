"""Stage 1: RAR, randomized autoregressive generation over VQ codes (bytedance/1d-tokenizer, modeling/rar.py).

A decoder-only transformer of DiT-style adaLN-Zero blocks (LayerNorm, QK-norm attention, GELU MLP).
One embedding table holds every id: image codes 0..K-1, an (unused) mask token K, class c at K+1+c
and the null class (for classifier-free guidance) at K+1+C. The sequence is

    [cls, class, t_0, ..., t_{N-2}]        sequence position p = 0, 1, 2, ..., N

where t_j is the code at raster index orders[j]; position p >= 1 predicts t_{p-1}. Each input gets
`pos_embed` at its own raster position (rows 0, 1 for cls and class, 2 + raster index for a code) plus
`target_aware_pos_embed` at the raster position of the code it predicts (none for cls), so a randomly
permuted sequence still tells every position which code comes next. The adaLN condition of position p
is the class embedding plus `timesteps_embeddings[p]`. Training permutes each sample with probability
`random_ratio` (annealed to 0 by the training task); generation always runs in raster order with a
static KV cache. Parameter names match the released rar_*.bin files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from d2ctool.discrete.blocks import KVCache, causal_attention, code_loss, code_step_cost, drop_labels
from d2ctool.discrete.config import RARConfig
from d2ctool.training.cost import StepCost

# The released tables have spare rows: position tables N + 1024, the adaLN step table N + 100.
POSITION_ROWS_EXTRA = 1024
STEP_ROWS_EXTRA = 100


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class Attention(nn.Module):
    def __init__(self, cfg: RARConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.dim // cfg.n_head
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=cfg.norm_eps)  # QK-norm, shared by all heads
        self.k_norm = nn.LayerNorm(self.head_dim, eps=cfg.norm_eps)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.attn_dropout = cfg.attn_dropout
        self.proj_drop = nn.Dropout(cfg.resid_dropout)
        self.kv_cache: KVCache | None = None  # during generation

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        y = causal_attention(q, k, v, self.kv_cache, positions, self.attn_dropout if self.training else 0.0)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(b, t, d)))


class Mlp(nn.Module):
    def __init__(self, cfg: RARConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)
        self.drop = nn.Dropout(cfg.ffn_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, cfg: RARConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), positions)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, cfg: RARConfig):
        super().__init__()
        self.norm_final = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 2 * cfg.dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.adaLN_modulation(c).chunk(2, dim=-1)  # (scale, shift): the reverse of the blocks
        return modulate(self.norm_final(x), shift, scale)


class RAR(nn.Module):
    def __init__(self, cfg: RARConfig):
        super().__init__()
        self.cfg = cfg
        n, d = cfg.grid**2, cfg.dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.embeddings = nn.Embedding(cfg.vocab_size + 1 + cfg.num_classes + 1, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, n + POSITION_ROWS_EXTRA, d))
        self.target_aware_pos_embed = nn.Parameter(torch.zeros(1, n + POSITION_ROWS_EXTRA, d))
        self.timesteps_embeddings = nn.Parameter(torch.zeros(1, n + STEP_ROWS_EXTRA, d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.adaln_before_head = FinalLayer(cfg)
        self.lm_head = nn.Linear(d, cfg.vocab_size)
        # probability that a training sample is in a random order: a tensor, so that changing it every step
        # does not recompile a torch.compile'd model; not persistent, so the state dict stays the released one
        self.register_buffer("random_ratio", torch.zeros(()), persistent=False)
        self.gradient_checkpointing = False
        self._cond: torch.Tensor | None = None  # class embeddings [B, D] during cached generation
        self._init_weights()

    def _init_weights(self) -> None:
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for table in (self.pos_embed, self.target_aware_pos_embed, self.timesteps_embeddings):
            nn.init.trunc_normal_(table, std=std)
        for modulation in [b.adaLN_modulation[1] for b in self.blocks] + [self.adaln_before_head.adaLN_modulation[1]]:
            nn.init.zeros_(modulation.weight)  # adaLN-Zero
            nn.init.zeros_(modulation.bias)

    @property
    def null_class(self) -> int:
        """The null-class label (labels are 0..num_classes-1; this one is the CFG / dropped condition)."""
        return self.cfg.num_classes

    def class_ids(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels (0..C, C = null) -> rows of the shared embedding table."""
        return labels + self.cfg.vocab_size + 1

    def sample_orders(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """orders [B, N]: each row a random permutation with probability `random_ratio`, else raster order."""
        n = self.cfg.grid**2
        raster = torch.arange(n, device=device).expand(batch_size, n)
        permute = torch.rand(batch_size, device=device) < self.random_ratio
        return torch.where(permute[:, None], torch.rand(batch_size, n, device=device).argsort(-1), raster)

    def _blocks(self, x: torch.Tensor, c: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, c, positions, use_reentrant=False)
            else:
                x = block(x, c, positions)
        return x

    def _logits(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.adaln_before_head(h, c)).float()

    def forward(self, codes: torch.Tensor, labels: torch.Tensor, orders: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, N, vocab] for codes [B, N] (raster order) given labels [B]; row j predicts codes[:, j].

        The sequence visits the codes in `orders` (default: raster order; in training mode a sampled order,
        see `sample_orders`); the logits come back in raster order either way. In training mode the labels
        are dropped to the null class with probability `class_dropout`.
        """
        b, n = codes.shape
        if self.training:
            if self.cfg.class_dropout > 0:
                labels = drop_labels(labels, self.cfg.class_dropout, self.null_class)
            if orders is None:
                orders = self.sample_orders(b, codes.device)
        if orders is None:
            orders = torch.arange(n, device=codes.device).expand(b, n)
        cond = self.class_ids(labels)
        inputs = torch.cat([cond[:, None], codes.gather(1, orders[:, :-1])], 1)  # at sequence positions 1..N
        own = torch.cat([torch.ones_like(orders[:, :1]), 2 + orders[:, :-1]], 1)  # each input's position row
        # rows of the position tables by F.embedding: its CPU backward is deterministic for any thread count,
        # where advanced indexing's (an accumulating index_put) is not, and exact resume depends on it
        x = (self.embeddings(inputs) + F.embedding(own, self.pos_embed[0])
             + F.embedding(2 + orders, self.target_aware_pos_embed[0]))
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1), x], 1)
        c = self.embeddings(cond)[:, None] + self.timesteps_embeddings[:, : n + 1]
        logits = self._logits(self._blocks(x, c, None)[:, 1:], c[:, 1:])
        return logits.gather(1, orders.argsort(-1)[..., None].expand_as(logits))  # sequence -> raster order

    def loss(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return code_loss(self(codes, labels), codes)

    def step_cost(self, batch: int = 2) -> StepCost:
        """FLOPs and saved activations of one training step (`loss`) per image, on this model's device."""
        return code_step_cost(self, batch)

    # ---- generation in raster order with a static KV cache --------------------------------------
    def setup_cache(self, batch_size: int, dtype: torch.dtype | None = None) -> None:
        for block in self.blocks:
            block.attn.kv_cache = KVCache(batch_size, self.cfg.n_head, 1 + self.cfg.grid**2,
                                          self.cfg.dim // self.cfg.n_head, dtype or self.cls_token.dtype,
                                          self.cls_token.device)

    def clear_cache(self) -> None:
        self._cond = None
        for block in self.blocks:
            block.attn.kv_cache = None

    def _cached(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        c = self._cond[:, None] + self.timesteps_embeddings[0, positions]
        h = self._blocks(x, c, positions)
        return self._logits(h[:, -1], c[:, -1])

    def prefill(self, labels: torch.Tensor) -> torch.Tensor:
        """Start generation (cache set up) for labels [B]: run cls and class, return the logits [B, vocab] of code 0."""
        self._cond = self.embeddings(self.class_ids(labels))
        cls = (self.cls_token[0] + self.pos_embed[0, :1]).expand(len(labels), -1)
        cond = self._cond + self.pos_embed[0, 1] + self.target_aware_pos_embed[0, 2]
        return self._cached(torch.stack([cls, cond], 1), torch.tensor([0, 1], device=labels.device))

    def step(self, codes: torch.Tensor, i: int) -> torch.Tensor:
        """Feed code i [B] (raster index i, sequence position i + 2); the logits [B, vocab] of code i + 1."""
        p = i + 2
        x = self.embeddings(codes) + self.pos_embed[0, p]
        if i + 1 < self.cfg.grid**2:  # the last code predicts nothing and has no target position
            x = x + self.target_aware_pos_embed[0, p + 1]
        return self._cached(x[:, None], torch.tensor([p], device=codes.device))
