"""Mixture of experts with group-limited sigmoid routing and score-correction bias (DSA_SPEC §6).

Expert parallelism: a rank holds the routed experts of its EP rank (the others stay as
parameterless placeholders, so ``experts.E`` is still the checkpoint key) and the router whole;
the shared expert is split like a dense MLP over the TP ranks (replicated when tp == 1). One
all-reduce over all ranks sums the routed and shared partial outputs.
"""

from __future__ import annotations

import itertools

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


class RemoteExpert(nn.Module):
    """A routed expert held by another expert-parallel rank (no parameters here)."""


class MoE(nn.Module):
    def __init__(self, ctx: Context):
        super().__init__()
        c = ctx.config
        self.parallel = ctx.parallel
        self.n_experts = c.n_routed_experts
        self.local_experts = ctx.parallel.local_experts(c.n_routed_experts)
        self.gate = Gate(ctx)
        self.experts = nn.ModuleList(MLP(ctx, c.dim, c.moe_inter_dim) if e in self.local_experts
                                     else RemoteExpert() for e in range(c.n_routed_experts))
        self.shared_experts = (MLP(ctx, c.dim, c.n_shared_experts * c.moe_inter_dim, tp_split=True,
                                   reduce=False, what="n_shared_experts * moe_intermediate_size")
                               if c.n_shared_experts else None)

    def forward(self, x: Tensor) -> Tensor:
        weights, experts = self.gate(x)
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        first, last = self.parallel.routed_tokens(x.shape[0])
        # One host sync per layer (the counts): (token, slot) pairs sorted by expert, stably, so
        # each expert's tokens come in ascending order, as torch.where(mine == e) gives them.
        flat = experts[first:last].flatten()
        order = flat.argsort(stable=True)
        token_of, slot_of = order // self.gate.top_k + first, order % self.gate.top_k
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        offsets = list(itertools.accumulate(counts, initial=0))
        for e in self.local_experts:
            if counts[e]:
                token, slot = token_of[offsets[e]:offsets[e + 1]], slot_of[offsets[e]:offsets[e + 1]]
                y.index_add_(0, token, self.experts[e](x[token]).float() * weights[token, slot, None])
        if self.shared_experts is not None and self.parallel.adds_shared:
            y += self.shared_experts(x).float()
        return self.parallel.all_reduce(y).to(x.dtype)
