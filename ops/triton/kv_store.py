"""The MLA cache write (``dsa.store_kv``) in one launch: a program per new token writes its
entry into its slot of the paged cache. For the FP8 latent cache (dsa_ascend/kv_fp8.py) it
quantizes the latent per 128-channel tile (scale = max(amax, 1e-4) / 448, ue8m0-rounded if
asked: ``quant.block_quant``) and writes the FP8 bytes, the float32 scales and the
bf16 rope key through three views of the byte row: bit-identical to ``kv_fp8.pack`` followed
by ``index_copy_``, which take about 15 launches a layer (the quantization's steps, the pack's
copies, the concatenation, the scatter). The e4m3 and bf16 roundings are written as integer
round-to-nearest-even on the float bits (torch's own formulas), so the Triton interpreter,
whose float32 -> e4m3 and -> bf16 conversions are wrong, checks every byte on a CPU too. A
float cache takes the same kernel without the quantization.
"""

from __future__ import annotations

import torch

import triton
import triton.language as tl
from dsa_ascend import kv_fp8

from .quant import block_quant

_TILE = kv_fp8.TILE  # channels a scale covers
TILE = tl.constexpr(_TILE)
# warps a program (a token): H200, FP8 cache, 16K tokens 18.3 us with 2 against 21.1 with 4 and
# 33.5 with 8; equal at 4K tokens and below (BENCHMARKS.md, session 14)
NUM_WARPS = 2


@triton.jit
def _e4m3_bits(q):
    """float32 q (|q| <= 448) -> its float8_e4m3fn bits (uint8), round to nearest even: below
    2^-6 the magic add of 2^14 rounds to the subnormal step 2^-9; above, the mantissa's low 20
    bits round away (c10's fp8e4m3fn_from_fp32_value)."""
    bits = q.to(tl.uint32, bitcast=True)
    a_bits = bits & 0x7FFFFFFF
    a = a_bits.to(tl.float32, bitcast=True)
    sub = (a + 16384.0).to(tl.uint32, bitcast=True) - 0x46800000  # 16384.0's bits
    nrm = ((a_bits + 0x7FFFF + ((a_bits >> 20) & 1)) >> 20) - ((127 - 7) << 3)
    return (tl.where(a < 0.015625, sub, nrm) | ((bits >> 24) & 0x80)).to(tl.uint8)


@triton.jit
def _bf16_bits(x):
    """float32 x -> its bfloat16 bits (int16), round to nearest even; NaN -> 0x7FC0 (c10)."""
    bits = x.to(tl.uint32, bitcast=True)
    b = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, b).to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _store_kv_kernel(LAT, ROPE, SLOT, C8, C32, C16, stride_lt, stride_rt, width,
                     D_V: tl.constexpr, D_ROPE: tl.constexpr, TILES_P2: tl.constexpr,
                     ROPE_P2: tl.constexpr, FP8: tl.constexpr, UE8M0: tl.constexpr):
    """Token t -> cache row SLOT[t]. FP8: C8 / C32 / C16 are the byte cache viewed as uint8 /
    float32 / int16 rows of ``width`` bytes; else C8 is the float cache (``width`` elements)."""
    t = tl.program_id(0)
    slot = tl.load(SLOT + t)
    tiles = tl.arange(0, TILES_P2)
    cols = tl.arange(0, TILE)
    tmask = tiles < D_V // TILE
    x = tl.load(LAT + t.to(tl.int64) * stride_lt + tiles[:, None] * TILE + cols[None, :],
                mask=tmask[:, None], other=0.0).to(tl.float32)
    r = tl.arange(0, ROPE_P2)
    rmask = r < D_ROPE
    k_pe = tl.load(ROPE + t.to(tl.int64) * stride_rt + r, mask=rmask, other=0.0)
    row = slot * width  # bytes (FP8) or elements
    if FP8:
        q, scale = block_quant(x, UE8M0)
        tl.store(C8 + row + tiles[:, None] * TILE + cols[None, :], _e4m3_bits(q),
                 mask=tmask[:, None])
        tl.store(C32 + (row + D_V) // 4 + tiles, scale, mask=tmask)
        tl.store(C16 + (row + width - 2 * D_ROPE) // 2 + r, _bf16_bits(k_pe.to(tl.float32)),
                 mask=rmask)
    else:
        dst = C8.dtype.element_ty
        tl.store(C8 + row + tiles[:, None] * TILE + cols[None, :], x.to(dst), mask=tmask[:, None])
        tl.store(C8 + row + D_V + r, k_pe.to(dst), mask=rmask)


def supports(kv_cache: torch.Tensor, latent: torch.Tensor, rope: torch.Tensor) -> bool:
    """Shapes this kernel writes (the rest go to the torch form): a latent of whole 128-channel
    tiles, and for the FP8 cache an even rope width (4-byte aligned scales and 2-byte rope)."""
    d_v, d_rope = latent.shape[-1], rope.shape[-1]
    if d_v % _TILE or d_v > 16 * _TILE or not 0 < d_rope <= 1024:
        return False
    return kv_cache.dtype != torch.uint8 or kv_cache.shape[-1] % 4 == 0


def store_kv(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, latent: torch.Tensor,
             rope: torch.Tensor, ue8m0: bool) -> None:
    """``dsa.store_kv`` (see dsa_ascend/ops.py), for inputs ``supports`` accepts."""
    t = latent.shape[0]
    if not t:
        return
    latent = latent if latent.stride(-1) == 1 else latent.contiguous()
    rope = rope if rope.stride(-1) == 1 else rope.contiguous()
    slot_mapping = slot_mapping.contiguous()  # read as SLOT + t
    d_v, d_rope = latent.shape[-1], rope.shape[-1]
    fp8 = kv_cache.dtype == torch.uint8
    flat = kv_cache.view(-1, kv_cache.shape[-1])
    if fp8:
        views = (flat, flat.view(torch.float32), flat.view(torch.int16))
    else:
        views = (flat, flat, flat)
    _store_kv_kernel[(t,)](latent, rope, slot_mapping, *views, latent.stride(0), rope.stride(0),
                           kv_cache.shape[-1], D_V=d_v, D_ROPE=d_rope,
                           TILES_P2=triton.next_power_of_2(d_v // _TILE),
                           ROPE_P2=triton.next_power_of_2(d_rope), FP8=fp8, UE8M0=ue8m0,
                           num_warps=NUM_WARPS)


__all__ = ["store_kv", "supports"]
