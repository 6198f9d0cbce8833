"""YaRN frequencies, the softmax scale, and the two RoPE pairings (DSA_SPEC §3), pinned by an
independent float64 formula and by hand-computed vectors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import seeded

from dsa_ascend.config import ModelConfig, RunConfig, preset
from dsa_ascend.model.indexer import Indexer
from dsa_ascend.model.layers import Context
from dsa_ascend.model.rope import apply_rope_half, apply_rope_interleaved, rope_tables, yarn_inv_freq
from dsa_ascend.ops import Ops

F32_EPS = 2.0 ** -24
# yarn_inv_freq works in float32: a pow (a few ulps), then a blend of two products (a few more).
# 16 ulps of relative error is a generous bound for that chain.
FREQ_REL = 16 * F32_EPS


def _inv_freq64(d: int, theta: float, yarn=None) -> torch.Tensor:
    """DSA_SPEC §3 in float64, written out from the text."""
    i = torch.arange(d // 2, dtype=torch.float64)
    inv = theta ** (-2.0 * i / d)
    if yarn is None:
        return inv

    def corr(r):
        return d * math.log(yarn.original_seq_len / (2 * math.pi * r)) / (2 * math.log(theta))

    low = min(max(math.floor(corr(yarn.beta_fast)), 0), d - 1)
    high = min(max(math.ceil(corr(yarn.beta_slow)), 0), d - 1)
    if low == high:
        high += 0.001
    ramp = ((i - low) / (high - low)).clamp(0.0, 1.0)
    smooth = 1.0 - ramp
    return inv / yarn.factor * (1.0 - smooth) + inv * smooth


def _assert_rel(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    err = ((got.double() - want) / want).abs().max().item()
    assert err <= rel, f"max relative error {err:.3e} > {rel:.3e}"


@pytest.mark.parametrize("name, low, high", [("tiny", 5, 18), ("671b", 10, 23)])
def test_yarn_inv_freq_matches_the_spec_formula(name, low, high):
    cfg = preset(name)
    d, theta, y = cfg.qk_rope_head_dim, cfg.rope_theta, cfg.yarn
    # The ramp's ends, worked out by hand for d = 64, theta = 1e4, beta 32 / 1:
    # corr(r) = 64 ln(L / (2 pi r)) / (2 ln 1e4): L=1024 -> 5.66, 17.70; L=4096 -> 10.47, 22.50.
    assert math.floor(64 * math.log(y.original_seq_len / (2 * math.pi * 32)) / (2 * math.log(1e4))) == low
    assert math.ceil(64 * math.log(y.original_seq_len / (2 * math.pi)) / (2 * math.log(1e4))) == high
    got = yarn_inv_freq(cfg)
    assert got.dtype == torch.float32 and got.shape == (d // 2,)
    want = _inv_freq64(d, theta, y)
    _assert_rel(got, want, FREQ_REL)
    plain = theta ** (-2.0 * torch.arange(d // 2, dtype=torch.float64) / d)
    # Below the ramp the frequencies are untouched; above it they are divided by the factor.
    _assert_rel(got[: low + 1], plain[: low + 1], FREQ_REL)
    _assert_rel(got[high:], plain[high:] / y.factor, FREQ_REL)
    # Inside the ramp: a strict blend.
    mid = got[low + 1: high].double()
    assert ((mid < plain[low + 1: high]) & (mid > plain[low + 1: high] / y.factor)).all()


def test_yarn_inv_freq_without_rope_scaling_is_plain_theta_power():
    cfg = dataclasses.replace(preset("671b"), yarn=None)
    got = yarn_inv_freq(cfg)
    i = torch.arange(32, dtype=torch.float64)
    _assert_rel(got, 10000.0 ** (-2 * i / 64), FREQ_REL)
    assert got[0].item() == 1.0


def test_rope_tables_apply_yarn_even_below_original_seq_len():
    """HF convention (DSA_SPEC §3): the tables use the YaRN-corrected frequencies whenever
    rope_scaling is present. DeepSeek's official reference would use the plain theta^(-2i/d)
    here, because this run's max_seq_len (256) does not exceed original_seq_len (1024); for
    every practical run (max_seq_len 4096+ on the release) the two agree."""
    cfg = preset("tiny")
    small = 256
    assert small <= cfg.yarn.original_seq_len
    cos, sin = rope_tables(cfg, small)
    assert cos.shape == sin.shape == (small, 32) and cos.dtype == torch.float32
    t = torch.arange(small, dtype=torch.float64)
    angle = torch.outer(t, _inv_freq64(64, cfg.rope_theta, cfg.yarn))
    # float32 angle t * f has relative error <= ~(FREQ_REL + 2^-24), so an absolute error of
    # max|angle| * 2 * FREQ_REL; cos/sin add about one float32 ulp of 1.
    bound = angle.abs().max().item() * 2 * FREQ_REL + 4 * F32_EPS
    assert (cos.double() - angle.cos()).abs().max().item() <= bound
    assert (sin.double() - angle.sin()).abs().max().item() <= bound
    # The official (uncorrected) tables are far away: this is a real difference, not rounding.
    plain = torch.outer(t, _inv_freq64(64, cfg.rope_theta, None))
    assert (cos.double() - plain.cos()).abs().max().item() > 0.5


def test_softmax_scale_of_the_release():
    cfg = preset("671b")
    want = 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2
    assert cfg.softmax_scale() == pytest.approx(want, rel=1e-14)
    assert want == pytest.approx(0.135234, rel=1e-5)  # the number itself, for the record
    assert dataclasses.replace(cfg, yarn=None).softmax_scale() == pytest.approx(192 ** -0.5, rel=1e-14)


# ------------------------------------------------------------------------------- the pairings
# Two frequencies at angles pi/2 and 0 (d = 4), and four at pi/2, 0, pi and atan2(0.8, 0.6)
# (d = 8), given directly as cos / sin.
COS4, SIN4 = [0.0, 1.0], [1.0, 0.0]
COS8, SIN8 = [0.0, 1.0, -1.0, 0.6], [1.0, 0.0, 0.0, 0.8]
# Values are small integers and 0.6 / 0.8 (float32 error 2^-24 relative): 1e-6 is ample.
HAND_ATOL = 1e-6


def _t(v):
    return torch.tensor(v, dtype=torch.float32)


def test_interleaved_rope_hand_values():
    # pairs (x0, x1), (x2, x3): (1, 2) turned by pi/2 -> (-2, 1); (3, 4) by 0 -> (3, 4).
    got = apply_rope_interleaved(_t([1.0, 2.0, 3.0, 4.0]), _t(COS4), _t(SIN4))
    torch.testing.assert_close(got, _t([-2.0, 1.0, 3.0, 4.0]), atol=HAND_ATOL, rtol=0)
    # (1,2) pi/2 -> (-2, 1); (3,4) 0 -> (3, 4); (5,6) pi -> (-5, -6);
    # (7,8) by (0.6, 0.8) -> (7*0.6 - 8*0.8, 7*0.8 + 8*0.6) = (-2.2, 10.4).
    got = apply_rope_interleaved(_t([1.0, 2, 3, 4, 5, 6, 7, 8]), _t(COS8), _t(SIN8))
    torch.testing.assert_close(got, _t([-2.0, 1, 3, 4, -5, -6, -2.2, 10.4]), atol=HAND_ATOL, rtol=0)


def test_half_split_rope_hand_values():
    # pairs (x0, x2), (x1, x3): (1, 3) turned by pi/2 -> (-3, 1); (2, 4) by 0 -> (2, 4);
    # laid out as [first halves | second halves].
    got = apply_rope_half(_t([1.0, 2.0, 3.0, 4.0]), _t(COS4), _t(SIN4))
    torch.testing.assert_close(got, _t([-3.0, 2.0, 1.0, 4.0]), atol=HAND_ATOL, rtol=0)
    # (1,5) pi/2 -> (-5, 1); (2,6) 0 -> (2, 6); (3,7) pi -> (-3, -7);
    # (4,8) by (0.6, 0.8) -> (4*0.6 - 8*0.8, 4*0.8 + 8*0.6) = (-4, 8).
    got = apply_rope_half(_t([1.0, 2, 3, 4, 5, 6, 7, 8]), _t(COS8), _t(SIN8))
    torch.testing.assert_close(got, _t([-5.0, 2, -3, -4, 1, 6, -7, 8]), atol=HAND_ATOL, rtol=0)


def test_the_two_pairings_differ_on_the_same_input():
    x = _t([1.0, 2.0, 3.0, 4.0])
    a = apply_rope_interleaved(x, _t(COS4), _t(SIN4))
    b = apply_rope_half(x, _t(COS4), _t(SIN4))
    assert (a - b).abs().max().item() > 1.0


def _rope64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Float64 RoPE over the last dim, either pairing (the spec's words, index by index)."""
    x = x.double()
    out = x.clone()
    n = x.shape[-1] // 2
    for i in range(n):
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + n)
        c, s = cos[..., i].double(), sin[..., i].double()
        out[..., a] = x[..., a] * c - x[..., b] * s
        out[..., b] = x[..., a] * s + x[..., b] * c
    return out


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_broadcasts_over_heads_like_the_model(interleaved):
    """The model calls rope with x [T, H, d] and cos / sin [T, 1, d/2] (queries) or x [T, d]
    with cos / sin [T, d/2] (keys): each token turns by its own angles, every head alike."""
    g = seeded(0)
    cfg = preset("tiny")
    cos, sin = rope_tables(cfg, 40)
    pos = torch.tensor([0, 3, 17, 39])
    x = torch.randn(4, 3, 64, generator=g)
    fn = apply_rope_interleaved if interleaved else apply_rope_half
    got = fn(x, cos[pos][:, None], sin[pos][:, None])
    want = _rope64(x, cos[pos][:, None], sin[pos][:, None], interleaved)
    # Two products and a sum of float32 values of magnitude <= |x|: 4 ulps of max|x|.
    assert (got.double() - want).abs().max().item() <= 4 * F32_EPS * x.abs().max().item()
    got_k = fn(x[:, 0], cos[pos], sin[pos])
    assert torch.equal(got_k, got[:, 0])


def _indexer(interleave: bool) -> Indexer:
    cfg = dataclasses.replace(preset("tiny"), indexer_rope_interleave=interleave)
    ctx = Context(config=cfg, run=RunConfig(), ops=Ops("reference"), dtype=torch.float32)
    return Indexer(ctx, 0)  # parameters stay on the meta device: only the rotation is used


@pytest.mark.parametrize("interleave", [False, True])
def test_indexer_pairing_follows_indexer_rope_interleave(interleave):
    ix = _indexer(interleave)
    assert ix.rope_interleave is interleave
    # Behaviour, not just the attribute: the first 64 of 128 channels turn with that pairing,
    # the other 64 pass through untouched.
    g = seeded(1)
    cos, sin = rope_tables(ix.ctx.config, 32)
    x = torch.randn(5, 8, 128, generator=g)
    pos = torch.tensor([1, 2, 9, 20, 31])
    got = ix._rotate(x, cos[pos], sin[pos])
    want = _rope64(x[..., :64], cos[pos][:, None], sin[pos][:, None], interleave)
    assert (got[..., :64].double() - want).abs().max().item() <= 4 * F32_EPS * x.abs().max().item()
    assert torch.equal(got[..., 64:], x[..., 64:])


def test_indexer_rope_interleave_defaults_false_and_is_read_from_config_json():
    assert preset("671b").indexer_rope_interleave is False
    hf = preset("tiny").to_hf()
    hf["indexer_rope_interleave"] = True
    assert ModelConfig.from_hf(hf).indexer_rope_interleave is True
