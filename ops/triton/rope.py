"""Rotary embedding in one launch: the first 2n channels of each (token, head) row turned by the
token's angles (cos / sin [T, n]), the remaining channels copied. Two pairings: interleaved
(x_2i, x_2i+1) as MLA's q_pe / k_pe, half-split (x_i, x_i+n) as the indexer's q / k. The torch
form (dsa_ascend/model/rope.py) is ~10 launches and a cat: 6% of a 128K prefill's GPU time
(H200, BENCHMARKS.md session 9). The same float32 operations in the same order, with FMA
contraction off, so the result is bit-identical to the reference backend's.
"""

from __future__ import annotations

import torch

import triton
import triton.language as tl

_TILE = 4096  # elements a program holds (heads x row width)


@triton.jit
def _rope_kernel(X, COS, SIN, Y, n_heads, sx_t, sx_h, sc_t, ss_t, sy_t, sy_h,
                 HALF: tl.constexpr, REST: tl.constexpr, REST_P2: tl.constexpr,
                 INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr):
    """One contiguous load and store of each row's 2n rotated channels, the pairs split in
    registers. (Two strided loads of every other channel, the first form, ran the interleaved
    pairing of MLA's q_pe [4096, 128, 64] at 0.568 ms = 236 GB/s; this one takes 0.041 ms,
    3.3 TB/s, and the half-split form is as fast either way: H200, BENCHMARKS.md session 10.)"""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = (h < n_heads)[:, None]
    i = tl.arange(0, HALF)
    xr = X + t * sx_t + h.to(tl.int64)[:, None] * sx_h
    yr = Y + t * sy_t + h.to(tl.int64)[:, None] * sy_h
    c = tl.load(COS + t * sc_t + i)[None, :]
    s = tl.load(SIN + t * ss_t + i)[None, :]
    cols = tl.arange(0, 2 * HALF)
    x = tl.load(xr + cols[None, :], mask=hm, other=0.0).to(tl.float32)
    if INTERLEAVED:  # (x_2i, x_2i+1)
        a, b = tl.split(tl.reshape(x, (BLOCK_H, HALF, 2)))
    else:  # (x_i, x_i+n)
        a, b = tl.split(tl.permute(tl.reshape(x, (BLOCK_H, 2, HALF)), (0, 2, 1)))
    turned = tl.join(a * c - b * s, a * s + b * c)  # [BLOCK_H, HALF, 2]
    if not INTERLEAVED:
        turned = tl.permute(turned, (0, 2, 1))
    tl.store(yr + cols[None, :],
             tl.reshape(turned, (BLOCK_H, 2 * HALF)).to(Y.dtype.element_ty), mask=hm)
    if REST > 0:  # channels past the rotated ones: copied
        j = 2 * HALF + tl.arange(0, REST_P2)
        m = hm & (j < 2 * HALF + REST)[None, :]
        tl.store(yr + j[None, :], tl.load(xr + j[None, :], mask=m), mask=m)


def supports(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Shapes this kernel takes (the others stay in torch): a power-of-two n, unit-stride rows."""
    n = cos.shape[-1]
    return (n & (n - 1) == 0 and x.stride(-1) == 1 and cos.stride(-1) == 1
            and sin.stride(-1) == 1 and x.shape[-1] <= _TILE)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x [T, d] or [T, H, d] (any strides but the last), cos / sin float32 [T, n], 2n <= d ->
    a new contiguous tensor of x's shape and dtype (see the module docstring)."""
    t, d, n = x.shape[0], x.shape[-1], cos.shape[-1]
    heads = x.shape[1] if x.dim() == 3 else 1
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    sx_h, sy_h = (x.stride(1), y.stride(1)) if x.dim() == 3 else (0, 0)
    rest = d - 2 * n
    rest_p2 = triton.next_power_of_2(rest) if rest else 1
    per_head = 2 * n + (rest_p2 if rest else 0)  # elements a head's row holds in the program
    block_h = min(triton.next_power_of_2(heads), 1 << max(0, (_TILE // per_head).bit_length() - 1))
    _rope_kernel[(t, triton.cdiv(heads, block_h))](
        x, cos, sin, y, heads, x.stride(0), sx_h, cos.stride(0), sin.stride(0), y.stride(0), sy_h,
        HALF=n, REST=rest, REST_P2=rest_p2, INTERLEAVED=interleaved, BLOCK_H=block_h,
        num_warps=4, enable_fp_fusion=False)
    return y
