"""Mixture of experts with group-limited sigmoid routing and score-correction bias (DSA_SPEC §6)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import MLP, Context, _param


class Gate(nn.Module):
    def __init__(self, ctx: Context):
        super().__init__()
        c = ctx.config
        self.top_k, self.n_groups, self.topk_groups = c.n_activated_experts, c.n_expert_groups, c.n_limited_groups
        self.route_scale = c.route_scale
        self.weight = _param(c.n_routed_experts, c.dim, dtype=torch.float32)
        self.e_score_correction_bias = _param(c.n_routed_experts, dtype=torch.float32)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, dim] -> (weights float32 [T, k], expert ids int64 [T, k])."""
        scores = torch.sigmoid(x.float() @ self.weight.t())
        biased = scores + self.e_score_correction_bias  # used for selection only
        if self.n_groups > 1:
            grouped = biased.view(x.shape[0], self.n_groups, -1)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            keep = group_scores.topk(self.topk_groups, dim=-1).indices
            drop = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            biased = grouped.masked_fill(drop[..., None], float("-inf")).flatten(1)
        experts = biased.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, experts)
        weights = weights / weights.sum(dim=-1, keepdim=True) * self.route_scale
        return weights, experts


class MoE(nn.Module):
    def __init__(self, ctx: Context):
        super().__init__()
        c = ctx.config
        self.n_experts = c.n_routed_experts
        self.gate = Gate(ctx)
        self.experts = nn.ModuleList(MLP(ctx, c.dim, c.moe_inter_dim) for _ in range(c.n_routed_experts))
        self.shared_experts = (MLP(ctx, c.dim, c.n_shared_experts * c.moe_inter_dim)
                               if c.n_shared_experts else None)

    def forward(self, x: Tensor) -> Tensor:
        weights, experts = self.gate(x)
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        counts = torch.bincount(experts.flatten(), minlength=self.n_experts).tolist()
        for e, n in enumerate(counts):
            if n:
                token, slot = torch.where(experts == e)
                y.index_add_(0, token, self.experts[e](x[token]).float() * weights[token, slot, None])
        if self.shared_experts is not None:
            y += self.shared_experts(x).float()
        return y.to(x.dtype)
