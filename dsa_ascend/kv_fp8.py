"""The FP8 latent cache format: one MLA cache entry (512 latent + 64 rope values) in 656 bytes.

Layout of one entry, a row of ``uint8`` [entry_bytes(d_v, d_rope)] (656 for DeepSeek-V3.2):

    bytes [0, d_v)                     latent, float8_e4m3fn, in tiles of 128 channels
    bytes [d_v, d_v + 4 * d_v / 128)   one float32 scale per tile (dequantized = fp8 * scale)
    bytes [..., + 2 * d_rope)          the rope key, bfloat16 (not quantized)

Each tile's scale is max(amax, 1e-4) / 448 (rounded up to a power of two with ``ue8m0``): the
official reference's ``act_quant`` on the latent, so a model with this cache computes what the
official model computes with ``simulate_fp8_latent`` (same FP8 values and scales), except that
the rope key is rounded to bf16. Rows are 16-byte aligned (656 = 41 x 16), so a kernel loads
each part with wide, aligned accesses: the latent as FP8, the scales as float32, the rope as
bf16, all through views of one byte row. The cache itself is a uint8 tensor
[blocks, block_size, entry_bytes]; ``dsa.sparse_mla_prefill`` / ``dsa.sparse_mla_decode`` accept
it in place of the float cache [blocks, block_size, d_v + d_rope].
"""

from __future__ import annotations

import torch
from torch import Tensor

from .quant import FP8_DTYPE, quantize_fp8_blocks

TILE = 128


def entry_bytes(d_v: int, d_rope: int) -> int:
    """Bytes per cache entry: d_v FP8 + 4 bytes per 128-tile scale + 2 bytes per rope value."""
    if d_v % TILE:
        raise ValueError(f"the FP8 latent cache needs d_v divisible by {TILE}, got d_v={d_v}")
    return d_v + 4 * (d_v // TILE) + 2 * d_rope


def d_rope_of(width: int, d_v: int) -> int:
    """The rope width of an FP8 cache whose entries are ``width`` bytes, or a ValueError."""
    rest = width - d_v - 4 * (d_v // TILE)
    if d_v % TILE or rest <= 0 or rest % 2:
        raise ValueError(f"a uint8 (FP8) latent cache entry of {width} bytes does not fit "
                         f"d_v={d_v} (expected {d_v} + {4 * (d_v // TILE)} + 2 * d_rope bytes)")
    return rest // 2


def pack(latent: Tensor, rope: Tensor, ue8m0: bool = False) -> Tensor:
    """latent [..., d_v] and rope [..., d_rope] (any float dtype) -> entries uint8 [..., W]."""
    d_v, d_rope = latent.shape[-1], rope.shape[-1]
    width = entry_bytes(d_v, d_rope)
    q, scale = quantize_fp8_blocks(latent, TILE, ue8m0)
    out = torch.empty((*latent.shape[:-1], width), dtype=torch.uint8, device=latent.device)
    out[..., :d_v] = q.view(torch.uint8)
    out[..., d_v:d_v + scale.shape[-1] * 4] = scale.float().contiguous().view(torch.uint8)
    out[..., width - 2 * d_rope:] = rope.to(torch.bfloat16).contiguous().view(torch.uint8)
    return out


def unpack(entries: Tensor, d_v: int) -> Tensor:
    """entries uint8 [..., W] -> float32 [..., d_v + d_rope]: latent = fp8 * its tile's scale,
    then the rope key."""
    width = entries.shape[-1]
    d_rope = d_rope_of(width, d_v)
    tiles = d_v // TILE
    e = entries.contiguous()
    q = e[..., :d_v].contiguous().view(FP8_DTYPE).float()
    scale = e[..., d_v:d_v + 4 * tiles].contiguous().view(torch.float32)
    latent = (q.view(*q.shape[:-1], tiles, TILE) * scale.unsqueeze(-1)).view(q.shape)
    rope = e[..., width - 2 * d_rope:].contiguous().view(torch.bfloat16).float()
    return torch.cat([latent, rope], dim=-1)


__all__ = ["TILE", "entry_bytes", "d_rope_of", "pack", "unpack"]
