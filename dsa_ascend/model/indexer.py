"""Lightning indexer (DSA_SPEC §5): which cached tokens each query attends to.

I(t, s) = sum_j w(t, j) * ReLU(q(t, j) . k(s)), computed as the official reference does: RoPE
on the first 64 channels ([pe | nope], half-split pairs), a scaled Walsh-Hadamard rotation, FP8
quantization with one scale per token per head, and the scales folded into the head weights.
The "bf16" mode keeps q/k in the model dtype with neither rotation (orthogonal, so q.k is
unchanged up to rounding) nor quantization, as Ascend ports without FP8 do; the "int8" mode
rotates and quantizes to symmetric int8 instead of FP8 (the Ascend 910B/C "C8" indexer).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..cache import PagedCache, Step
from .layers import Context, LayerNorm, Linear


class Indexer(nn.Module):
    def __init__(self, ctx: Context, layer_id: int):
        super().__init__()
        c = ctx.config
        self.ctx, self.layer_id = ctx, layer_id
        self.n_heads, self.head_dim, self.rope_dim = c.index_n_heads, c.index_head_dim, c.qk_rope_head_dim
        self.wq_b = Linear(ctx, c.q_lora_rank, self.n_heads * self.head_dim)
        self.wk = Linear(ctx, c.dim, self.head_dim)
        self.k_norm = LayerNorm(self.head_dim)
        # Stored bf16 in the release; the official reference computes it in float32.
        self.weights_proj = Linear(ctx, c.dim, self.n_heads, quantizable=False, dtype=torch.float32)
        self.rope_interleave = c.indexer_rope_interleave

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """RoPE on the first rope_dim channels of x [T, d] or [T, H, d] (cos / sin [T, rope_dim / 2])."""
        return self.ctx.ops.rope(x, cos, sin, interleaved=self.rope_interleave)

    def forward(self, x: Tensor, qr: Tensor, step: Step, cache: PagedCache, cos: Tensor,
                sin: Tensor) -> Tensor:
        """x [T, dim], qr [T, q_lora_rank] -> top-k positions int32 [T, K] (-1 padded)."""
        ops, t, d = self.ctx.ops, x.shape[0], self.head_dim
        q = self._rotate(self.wq_b(qr).view(t, self.n_heads, d), cos, sin)
        k = self._rotate(self.k_norm(self.wk(x)), cos, sin)
        weights = self.weights_proj(x.float()) * self.n_heads ** -0.5
        if self.ctx.run.indexer_dtype == "fp8":
            ue8m0 = self.ctx.config.ue8m0
            q, q_scale = ops.quantize_fp8(ops.hadamard_rotate(q), d, ue8m0)
            k, k_scale = ops.quantize_fp8(ops.hadamard_rotate(k), d, ue8m0)
            weights = weights * q_scale.squeeze(-1) * d ** -0.5
            cache.store_index(self.layer_id, step, k, k_scale.squeeze(-1))
        elif self.ctx.run.indexer_dtype == "int8":
            # Symmetric int8 after the same rotation (it spreads outliers over the 128
            # channels): q per (token, head), k per token, scale = amax / 127.
            q, q_scale = ops.quantize_int8(ops.hadamard_rotate(q))
            k, k_scale = ops.quantize_int8(ops.hadamard_rotate(k))
            weights = weights * q_scale * d ** -0.5
            cache.store_index(self.layer_id, step, k, k_scale)
        else:
            weights = weights * d ** -0.5
            cache.store_index(self.layer_id, step, k, None)
        layer = cache.layers[self.layer_id]
        topk = min(self.ctx.config.index_topk, step.max_seqlen_k)
        indices, _ = ops.indexer_topk(q, weights, layer.index_k, layer.index_scale,
                                      step.block_table, step.cu_seqlens_q, step.seqlens_k, topk,
                                      step.max_seqlen_k)
        # Replicated on every rank, so the same by construction; debug mode verifies the sets.
        self.ctx.parallel.check_replicated(indices, f"layer {self.layer_id}: indexer top-k",
                                           as_set=True)
        return indices
