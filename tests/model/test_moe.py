"""The MoE router and layer of the tiny checkpoint against float64 code written here from
DSA_SPEC §6 (sigmoid scores, correction bias for selection only, group-limited top-k, weights
from the unbiased scores normalised and scaled)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import EXACT, assert_close_to_ref, seeded

F32_EPS = 2.0 ** -24
TOKENS = 96


def _route64(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, cfg, groups: bool = True,
             use_bias: bool = True):
    """Float64 routing of x [T, dim]: (expert sets, {expert: weight} per token, and per token the
    smallest margin of a discrete choice: group boundary and expert boundary)."""
    s = torch.sigmoid(x.double() @ weight.double().T)  # [T, E]
    biased = s + bias.double() if use_bias else s.clone()
    n_groups, per = cfg.n_expert_groups, cfg.n_routed_experts // cfg.n_expert_groups
    sets, weights, margins = [], [], []
    for t in range(x.shape[0]):
        b = biased[t]
        margin = float("inf")
        allowed = list(range(cfg.n_routed_experts))
        if groups:
            gscore = [sum(sorted(b[g * per:(g + 1) * per].tolist(), reverse=True)[:2])
                      for g in range(n_groups)]
            order = sorted(range(n_groups), key=lambda g: -gscore[g])
            keep = order[: cfg.n_limited_groups]
            if cfg.n_limited_groups < n_groups:
                margin = gscore[order[cfg.n_limited_groups - 1]] - gscore[order[cfg.n_limited_groups]]
            allowed = [e for g in keep for e in range(g * per, (g + 1) * per)]
        ranked = sorted(allowed, key=lambda e: -b[e].item())
        chosen = ranked[: cfg.n_activated_experts]
        if len(ranked) > cfg.n_activated_experts:
            margin = min(margin, (b[chosen[-1]] - b[ranked[cfg.n_activated_experts]]).item())
        total = sum(s[t, e].item() for e in chosen)
        sets.append(set(chosen))
        weights.append({e: s[t, e].item() / total * cfg.route_scale for e in chosen})
        margins.append(margin)
    return sets, weights, margins


def _margin_bound(x: torch.Tensor, weight: torch.Tensor) -> float:
    """Bound on float32's error in a sigmoid score: the logit is a float32 dot of length dim
    (<= (dim + 2) 2^-24 sum|x w|), sigmoid is 1/4-Lipschitz, plus an ulp or two of sigmoid.
    A group score sums two scores, so a choice with a margin above 4x this cannot flip."""
    absdot = x.double().abs() @ weight.double().abs().T
    return ((x.shape[-1] + 2) * F32_EPS * absdot.max().item() / 4 + 4 * F32_EPS)


def _inputs(cfg, seed: int) -> torch.Tensor:
    return torch.randn(TOKENS, cfg.dim, generator=seeded(seed))


def test_gate_selects_and_weights_like_the_spec(load_tiny):
    m = load_tiny(**EXACT)
    cfg = m.config
    gate = m.model.layers[1].mlp.gate  # layer 1: the first MoE layer of the tiny preset
    assert cfg.n_dense_layers == 1 and cfg.n_expert_groups > cfg.n_limited_groups > 0
    x = _inputs(cfg, 0)
    with torch.no_grad():
        w, experts = (a.cpu() for a in gate(x.to(m.device)))
    assert w.dtype == torch.float32 and w.shape == (TOKENS, cfg.n_activated_experts)
    assert experts.dtype == torch.int64 and experts.shape == (TOKENS, cfg.n_activated_experts)

    weight, bias = gate.weight.cpu(), gate.e_score_correction_bias.cpu()
    sets, ref_w, margins = _route64(x, weight, bias, cfg)
    eps = _margin_bound(x, weight)
    checked = 0
    got64, ref64, ref32 = [], [], []
    s32 = torch.sigmoid(x @ weight.T)  # the test's own float32 scores, for the tolerance
    for t in range(TOKENS):
        got = experts[t].tolist()
        assert len(set(got)) == len(got)
        if margins[t] <= 4 * eps:
            continue  # a near-tie: either choice is within float32 rounding
        checked += 1
        assert set(got) == sets[t], t
        for j, e in enumerate(got):
            got64.append(w[t, j].item())
            ref64.append(ref_w[t][e])
        sel = s32[t, got]
        ref32 += (sel / sel.sum() * cfg.route_scale).tolist()
    assert checked >= TOKENS - 2, f"only {checked} of {TOKENS} tokens had a clear routing"
    # weights: a handful of float32 roundings of the unbiased scores.
    assert_close_to_ref(torch.tensor(got64), torch.tensor(ref64, dtype=torch.float64),
                        torch.tensor(ref32), factor=4.0, floor=16 * F32_EPS * cfg.route_scale)
    # Each token's weights sum to routed_scaling_factor.
    assert ((w.double().sum(-1) - cfg.route_scale).abs() <= 16 * F32_EPS * cfg.route_scale).all()


def test_the_gate_test_can_tell_the_variants_apart(load_tiny):
    """The inputs above really exercise the bias and the group limit: float64 routing without
    the bias, or without groups, picks other experts for some tokens; and weights from the
    biased scores would differ."""
    m = load_tiny(**EXACT)
    cfg, gate = m.config, m.model.layers[1].mlp.gate
    x = _inputs(cfg, 0)
    weight, bias = gate.weight.cpu(), gate.e_score_correction_bias.cpu()
    sets, ref_w, _ = _route64(x, weight, bias, cfg)
    no_bias, _, _ = _route64(x, weight, bias, cfg, use_bias=False)
    no_groups, _, _ = _route64(x, weight, bias, cfg, groups=False)
    assert sum(a != b for a, b in zip(sets, no_bias)) >= 3
    assert sum(a != b for a, b in zip(sets, no_groups)) >= 3
    assert bias.abs().max().item() > 0.01


def _swiglu(mlp, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """down(silu(gate x) * up x) with the dequantized weights, in ``dtype``."""
    gate, up, down = (lin.dense_weight().cpu().to(dtype) for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def _moe_ref(moe, x, sets, weights, dtype):
    """sum_e weight_e expert_e(x) + shared(x), token by token."""
    xd = x.to(dtype)
    y = torch.zeros(x.shape, dtype=dtype)
    for t in range(x.shape[0]):
        for e in sets[t]:
            y[t] += weights[t][e] * _swiglu(moe.experts[e], xd[t], dtype)
    return y + _swiglu(moe.shared_experts, xd, dtype)


def test_moe_layer_output_matches_float64(load_tiny):
    m = load_tiny(**EXACT)
    cfg = m.config
    moe = m.model.layers[1].mlp
    assert moe.shared_experts is not None
    x = _inputs(cfg, 1)[:48]
    with torch.no_grad():
        got = moe(x.to(m.device)).cpu()
    assert got.dtype == torch.float32 and got.shape == x.shape
    weight, bias = moe.gate.weight.cpu(), moe.gate.e_score_correction_bias.cpu()
    sets, weights, margins = _route64(x, weight, bias, cfg)
    clear = torch.tensor([mg > 4 * _margin_bound(x, weight) for mg in margins])
    assert clear.sum() >= x.shape[0] - 2
    ref64 = _moe_ref(moe, x.double(), sets, weights, torch.float64)
    ref32 = _moe_ref(moe, x, sets, weights, torch.float32)
    assert_close_to_ref(got[clear], ref64[clear], ref32[clear], factor=4.0,
                        floor=16 * F32_EPS * ref64.abs().max().item())
