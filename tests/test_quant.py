"""FP8 e4m3 block quantization (DSA_SPEC §2) against hand-computed values and float64 math.

e4m3fn facts used for the bounds: 3 mantissa bits, so a normal value's spacing is 2^-3 of its
binade and round-to-nearest errs by at most 2^-4 of the value's magnitude; below the smallest
normal 2^-6 the spacing is the subnormal step 2^-9, so the error is at most 2^-10 (in units of
the block scale). The largest finite value is 448.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import seeded

from dsa_ascend.quant import (
    FP8_DTYPE,
    dequantize_fp8_blocks,
    dequantize_weight,
    quantize_fp8_blocks,
    quantize_weight,
    round_scale_ue8m0,
)

F32_EPS = 2.0 ** -24  # unit roundoff of float32


def _fp8_rounding_bound(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Largest |dequant(quant(x)) - x| that round-to-nearest e4m3 allows, elementwise (float64):
    half a normal ulp (2^-4 |x|) or half a subnormal step (2^-10 scale), whichever is larger, plus
    the float32 roundings of x / scale and q * scale (2^-24 relative each)."""
    x, scale = x.double(), scale.double()
    return torch.maximum(2.0 ** -4 * x.abs(), 2.0 ** -10 * scale) + 4 * F32_EPS * x.abs()


# ------------------------------------------------------------------------- dequantize_weight
def test_dequantize_weight_picks_each_elements_block_scale_by_hand():
    """130 x 260: blocks are rows [0,128) [128,130) x cols [0,128) [128,256) [256,260)."""
    scale = torch.tensor([[0.5, 3.0, 2.0 ** -7],
                          [0.3, 8.0, 1.25]], dtype=torch.float32)
    g = seeded(0)
    # Any FP8 values (drawn as floats, rounded to e4m3) fill the tensor; the hand-checked
    # elements are then set to known e4m3 values.
    w = (torch.randn(130, 260, generator=g) * 20).to(FP8_DTYPE)
    hand = {  # (row, col): (fp8 value, expected dequantized value)
        (0, 0): (1.5, 0.75),            # scale[0, 0] = 0.5
        (127, 127): (-2.0, -1.0),       # last element of block (0, 0)
        (0, 128): (1.75, 5.25),         # first column of block (0, 1): 3.0
        (127, 255): (-0.5, -1.5),       # last element of block (0, 1)
        (5, 256): (448.0, 3.5),         # block (0, 2): 448 * 2^-7
        (127, 259): (-96.0, -0.75),     # partial block (0, 2)
        (128, 0): (3.0, 0.9),           # first row of the partial row-block: scale[1, 0] = 0.3
        (129, 127): (-10.0, -3.0),      # 0.3
        (128, 128): (0.125, 1.0),       # scale[1, 1] = 8.0
        (129, 255): (-26.0, -208.0),
        (128, 256): (6.0, 7.5),         # scale[1, 2] = 1.25
        (129, 259): (-0.875, -1.09375),  # the very last element: scale[1, 2]
    }
    for (i, j), (v, _) in hand.items():
        w[i, j] = torch.tensor(v).to(FP8_DTYPE)
    out = dequantize_weight(w, scale)
    assert out.dtype == torch.float32 and out.shape == (130, 260)
    for (i, j), (_, want) in hand.items():
        # fp8 value x float32 scale: one float32 rounding (only 0.3 is inexact: 2^-23 relative).
        assert out[i, j].item() == pytest.approx(want, rel=2 * F32_EPS, abs=0), (i, j)

    # Every element: block by block, sliced by hand.
    wf = w.double()
    for bi, (r0, r1) in enumerate([(0, 128), (128, 130)]):
        for bj, (c0, c1) in enumerate([(0, 128), (128, 256), (256, 260)]):
            want = wf[r0:r1, c0:c1] * scale[bi, bj].double()
            err = (out[r0:r1, c0:c1].double() - want).abs()
            assert (err <= F32_EPS * want.abs()).all(), (bi, bj)


# ------------------------------------------------------------------------- round_scale_ue8m0
@pytest.mark.parametrize("value, want", [
    (0.3, 0.5), (0.25, 0.25), (1e-3, 2.0 ** -9), (3.0, 4.0), (1.0, 1.0), (448.0, 512.0),
    (0.5000001, 1.0), (2.0 ** -20, 2.0 ** -20), (1e-4 / 448, 2.0 ** -22),
])
def test_round_scale_ue8m0_hand_values(value, want):
    got = round_scale_ue8m0(torch.tensor([value], dtype=torch.float32))
    assert got.dtype == torch.float32
    assert got.item() == want


def test_round_scale_ue8m0_is_the_smallest_power_of_two_above():
    g = seeded(1)
    s = torch.exp(torch.empty(2000).uniform_(-30, 10, generator=g)).float()
    got = round_scale_ue8m0(s).double()
    s64 = s.double()
    # Exactly a power of two, not below s, and half of it is below s.
    assert torch.equal(torch.exp2(torch.log2(got).round()), got)
    assert (got >= s64).all() and (got / 2 < s64).all()


# ------------------------------------------------------------------------- quantize_fp8_blocks
def _activation_blocks(seed: int) -> torch.Tensor:
    """[3, 2, 384] with blocks of very different magnitudes, one all-tiny block (|x| < 1e-4)."""
    g = seeded(seed)
    x = torch.randn(3, 2, 384, generator=g)
    mags = torch.tensor([1e-3, 1.0, 50.0, 3e2, 0.02, 7.0]).view(3, 2, 1, 1)
    x = (x.view(3, 2, 3, 128) * mags * torch.tensor([1.0, 0.1, 4.0]).view(1, 1, 3, 1)).view(3, 2, 384)
    x[1, 0, 256:384] = torch.rand(128, generator=g) * 8e-5 - 4e-5  # all-tiny block
    return x


@pytest.mark.parametrize("ue8m0", [False, True])
def test_quantize_fp8_blocks_scales_match_float64(ue8m0):
    x = _activation_blocks(2)
    q, scale = quantize_fp8_blocks(x, 128, ue8m0)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (3, 2, 3)
    amax = x.double().view(3, 2, 3, 128).abs().amax(-1)
    want = amax.clamp_min(1e-4) / 448.0
    if not ue8m0:
        # float32 amax is exact; the 1e-4 clamp constant, the 1/448 factor and the product
        # each cost at most one float32 rounding.
        assert ((scale.double() - want).abs() <= 4 * F32_EPS * want).all()
    else:
        pow2 = torch.exp2(torch.ceil(torch.log2(want)))
        assert torch.equal(scale.double(), pow2)
    # The all-tiny block uses the 1e-4 clamp.
    assert amax[1, 0, 2] < 1e-4
    tiny_want = 1e-4 / 448.0 if not ue8m0 else 2.0 ** math.ceil(math.log2(1e-4 / 448.0))
    assert scale[1, 0, 2].item() == pytest.approx(tiny_want, rel=4 * F32_EPS)


def test_quantize_fp8_blocks_max_element_maps_to_448():
    x = _activation_blocks(3)
    q, _ = quantize_fp8_blocks(x, 128, ue8m0=False)
    xb, qb = x.view(-1, 128), q.float().view(-1, 128)
    arg = xb.abs().argmax(-1)
    rows = torch.arange(xb.shape[0])
    big = xb.abs().amax(-1) >= 1e-4  # the clamped block's max maps below 448
    want = 448.0 * torch.sign(xb[rows, arg])
    assert torch.equal(qb[rows, arg][big], want[big])
    assert (qb.abs() <= 448).all()
    assert (qb[~big].abs().amax(-1) < 448).all()


@pytest.mark.parametrize("ue8m0", [False, True])
def test_quantize_fp8_blocks_round_trip_within_half_an_ulp(ue8m0):
    x = _activation_blocks(4)
    q, scale = quantize_fp8_blocks(x, 128, ue8m0)
    back = dequantize_fp8_blocks(q, scale, 128)
    assert back.dtype == torch.float32 and back.shape == x.shape
    err = (back.double() - x.double()).view(3, 2, 3, 128).abs()
    bound = _fp8_rounding_bound(x.view(3, 2, 3, 128), scale[..., None])
    assert (err <= bound).all(), (err - bound).max()
    # And the bound is not vacuous: the error is nonzero and within a factor of it somewhere.
    assert (err > 0.25 * bound).any()


def test_quantize_fp8_blocks_other_block_sizes_are_per_block():
    g = seeded(5)
    x = torch.randn(4, 64, generator=g) * torch.tensor([1.0, 100.0]).repeat_interleave(32)
    q, scale = quantize_fp8_blocks(x, 32)
    assert scale.shape == (4, 2)
    want = x.double().view(4, 2, 32).abs().amax(-1) / 448.0
    assert ((scale.double() - want).abs() <= 4 * F32_EPS * want).all()


# ------------------------------------------------------------------------- quantize_weight
@pytest.mark.parametrize("ue8m0", [False, True])
def test_quantize_weight_round_trip(ue8m0):
    g = seeded(6)
    w = torch.randn(200, 300, generator=g)
    w[:128, 128:256] *= 40.0
    w[128:, 256:] *= 1e-3  # a small partial corner block
    q, s = quantize_weight(w, ue8m0=ue8m0)
    assert q.dtype == FP8_DTYPE and q.shape == (200, 300)
    assert s.dtype == torch.float32 and s.shape == (2, 3)
    # One scale per 128x128 block (partial at the edges): amax / 448, or its power-of-two ceiling.
    for bi, (r0, r1) in enumerate([(0, 128), (128, 200)]):
        for bj, (c0, c1) in enumerate([(0, 128), (128, 256), (256, 300)]):
            want = w[r0:r1, c0:c1].double().abs().max().item() / 448.0
            got = s[bi, bj].item()
            if ue8m0:
                assert got == 2.0 ** math.ceil(math.log2(want))
            else:
                assert got == pytest.approx(want, rel=F32_EPS)
    back = dequantize_weight(q, s)
    scale_full = s.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    err = (back.double() - w.double()).abs()
    assert (err <= _fp8_rounding_bound(w, scale_full)).all()
    if not ue8m0:  # each block's largest element is exactly +-448 steps of its scale
        assert q.float().abs().amax().item() == 448.0
