"""FP8 e4m3 block quantization (DSA_SPEC §2) and symmetric int8 row quantization, plain torch.

Used by the checkpoint loader (weight dequantization), the tiny-checkpoint maker (weight
quantization), the converter (``dsa_ascend.convert``) and the reference backend (activation
quantization); device-neutral.
"""

from __future__ import annotations

import torch
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
WEIGHT_BLOCK = 128
INT8_MAX = 127.0


def round_scale_ue8m0(scale: Tensor) -> Tensor:
    """Round positive float32 scales up to the next power of two (the ue8m0 format), exactly:
    2^ceil(log2(s)) from the IEEE bits, as the official kernels do."""
    bits = scale.float().contiguous().view(torch.int32)
    exp = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return ((exp + 127) << 23).view(torch.float32)


def quantize_fp8_blocks(x: Tensor, block_size: int = 128, ue8m0: bool = False) -> tuple[Tensor, Tensor]:
    """Per-token quantization of the last dim in blocks: scale = max(amax, 1e-4) / 448
    (optionally ue8m0-rounded), q = clamp(x / scale). Returns (q fp8 [..., D], scale f32 [..., D/b])."""
    xf = x.float().reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)
    amax = xf.abs().amax(dim=-1).clamp_min(1e-4)
    scale = amax * (1.0 / FP8_MAX)
    if ue8m0:
        scale = round_scale_ue8m0(scale)
    q = (xf / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.reshape(x.shape), scale


def dequantize_fp8_blocks(q: Tensor, scale: Tensor, block_size: int = 128) -> Tensor:
    """Inverse of ``quantize_fp8_blocks``: float32 [..., D]."""
    qf = q.float().reshape(*q.shape[:-1], q.shape[-1] // block_size, block_size)
    return (qf * scale.float().unsqueeze(-1)).reshape(q.shape)


def dequantize_weight(weight: Tensor, scale_inv: Tensor, block: int = WEIGHT_BLOCK) -> Tensor:
    """FP8 weight [out, in] with ``weight_scale_inv`` [ceil(out/b), ceil(in/b)] -> float32:
    each 128x128 block (partial at the edges) times its scale."""
    out_f, in_f = weight.shape
    if out_f % block == 0 and in_f % block == 0:  # whole blocks: broadcast, no [out, in] scale map
        w = weight.float().view(out_f // block, block, in_f // block, block)
        return (w * scale_inv.float()[:, None, :, None]).view(out_f, in_f)
    s = scale_inv.float().repeat_interleave(block, 0)[:out_f].repeat_interleave(block, 1)[:, :in_f]
    return weight.float() * s


def quantize_weight(w: Tensor, block: int = WEIGHT_BLOCK, ue8m0: bool = True) -> tuple[Tensor, Tensor]:
    """Float weight -> (FP8 e4m3 [out, in], weight_scale_inv float32 [ceil(out/b), ceil(in/b)]),
    one scale per block = amax / 448 (rounded up to a power of two with ``ue8m0``)."""
    out_f, in_f = w.shape
    nb_o, nb_i = -(-out_f // block), -(-in_f // block)
    padded = w.float().new_zeros(nb_o * block, nb_i * block)
    padded[:out_f, :in_f] = w.float()
    blocks = padded.view(nb_o, block, nb_i, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12)
    scale = amax / FP8_MAX
    if ue8m0:
        scale = round_scale_ue8m0(scale)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(nb_o * block, nb_i * block)[:out_f, :in_f].contiguous(), scale.contiguous()


def quantize_int8_rows(x: Tensor, amax: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric int8 quantization of each row of the last dim (a weight's output channel, an
    activation's token): scale = amax / 127 (amax floored at 1e-12 so zero rows stay zero),
    q = round_half_even(x * (127 / amax)) clamped to [-127, 127] (a multiply: ~3x faster on CPU
    than dividing by the scale). ``amax`` (float32 x.shape[:-1]) may be given when the caller
    knows it exactly. Returns (q int8, shape of x; scale float32 x.shape[:-1])."""
    xf = x.float()
    if amax is None:
        lo, hi = xf.aminmax(dim=-1)  # one pass, no |x| temporary
        amax = torch.maximum(hi, -lo)
    amax = amax.float().clamp_min(1e-12)
    q = torch.mul(xf, (INT8_MAX / amax).unsqueeze(-1)).round_().clamp_(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), amax / INT8_MAX


def dequantize_int8_rows(q: Tensor, scale: Tensor) -> Tensor:
    """Inverse of ``quantize_int8_rows``: float32, q * its row's scale."""
    return q.float() * scale.float().unsqueeze(-1)
