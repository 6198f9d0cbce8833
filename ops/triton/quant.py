"""Small fused ops of the indexer's prologue, one launch each (the decode profile showed the torch
versions as ~20 launches apiece): the scaled Walsh-Hadamard rotation and per-block FP8
quantization. Both compute exactly what the reference backend computes (same float32 operations
in the same order: bit-identical outputs), so this step adds no difference between the backends.
"""

from __future__ import annotations

import torch

import triton
import triton.language as tl

FP8_MAX = tl.constexpr(448.0)
_TILE = 4096  # elements a program holds (rows x row width)
_MAX_WIDTH = 16384  # wider rows (or blocks) go to the torch code


@triton.jit
def _hadamard_kernel(X, Y, n_rows, scale, N: tl.constexpr, LOG2N: tl.constexpr,
                     BLOCK_R: tl.constexpr):
    """Rows of Y = (rows of X) . H_N * scale: Sylvester butterflies in float32, stage h pairing
    element i with i + h inside blocks of 2h (a + b, a - b), as dsa_ascend/backends/reference.py."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, N)
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    mask = (rows < n_rows)[:, None]
    y = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    for s in tl.static_range(LOG2N):
        y = tl.permute(tl.reshape(y, (BLOCK_R, N >> (s + 1), 2, 1 << s)), (0, 1, 3, 2))
        a, b = tl.split(y)
        y = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (BLOCK_R, N))
    tl.store(Y + offs, (y * scale).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def block_quant(x, UE8M0: tl.constexpr):
    """float32 x [R, BLOCK] -> (q float32 [R, BLOCK], scale [R]): scale = max(amax, 1e-4) / 448
    (ue8m0: rounded up to a power of two from the float bits), q = clamp(x / scale, +-448),
    still to be rounded to e4m3; the reference's operations in its order."""
    amax = tl.maximum(tl.max(tl.abs(x), 1), 1e-4)
    scale = amax * (1.0 / FP8_MAX)
    if UE8M0:
        bits = scale.to(tl.int32, bitcast=True)
        exp = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        scale = (exp << 23).to(tl.float32, bitcast=True)
    q = tl.math.div_rn(x, scale[:, None])  # IEEE division, as torch's
    return tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX), scale


@triton.jit
def _quantize_fp8_kernel(X, Q, S, n_blocks, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
                         UE8M0: tl.constexpr):
    """Per block of BLOCK values: ``block_quant``, q rounded to e4m3 (nearest even)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK)
    offs = rows.to(tl.int64)[:, None] * BLOCK + cols[None, :]
    rmask = rows < n_blocks
    x = tl.load(X + offs, mask=rmask[:, None], other=0.0).to(tl.float32)
    q, scale = block_quant(x, UE8M0)
    tl.store(Q + offs, q.to(tl.float8e4nv), mask=rmask[:, None])
    tl.store(S + rows, scale, mask=rmask)


def supports(width: int) -> bool:
    """Rows (Hadamard) or blocks (quantization) of this width run here; others stay in torch."""
    return width & (width - 1) == 0 and 2 <= width <= _MAX_WIDTH


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    xc = x.contiguous()
    y = torch.empty_like(xc)
    rows = xc.numel() // n
    if rows:
        block_r = max(1, _TILE // n)
        _hadamard_kernel[(triton.cdiv(rows, block_r),)](xc, y, rows, n ** -0.5, N=n,
                                                         LOG2N=n.bit_length() - 1, BLOCK_R=block_r)
    return y


def quantize_fp8(x: torch.Tensor, block_size: int, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    xc = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((*x.shape[:-1], x.shape[-1] // block_size), dtype=torch.float32,
                        device=x.device)
    blocks = xc.numel() // block_size
    if blocks:
        block_r = max(1, _TILE // block_size)
        _quantize_fp8_kernel[(triton.cdiv(blocks, block_r),)](xc, q, scale, blocks,
                                                               BLOCK=block_size, BLOCK_R=block_r,
                                                               UE8M0=ue8m0)
    return q, scale


__all__ = ["hadamard_rotate", "quantize_fp8", "supports"]
