"""The ``reference`` backend: plain torch, float32 math, any device; the ground truth of every
parity test. Memory-bounded: scores are computed for bounded chunks of queries, never [S, S]."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import kv_fp8, paging
from ..quant import (
    FP8_DTYPE,
    dequantize_fp8_blocks,
    dequantize_weight,
    quantize_fp8_blocks,
    quantize_int8_rows,
)

# Upper bound on the elements of one chunk's float32 intermediate (64 MiB).
CHUNK_ELEMENTS = 1 << 24
# RunConfig.indexer_dtype modes this backend runs, preferred ("auto") first: the official FP8.
INDEXER_DTYPES = ("fp8", "bf16", "int8")


def unavailable_reason(device: Optional[torch.device]) -> Optional[str]:
    return None


def rope(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    from ..model.rope import apply_rope_half, apply_rope_interleaved

    r = 2 * cos.shape[-1]
    if x.dim() == 3:  # every head turns by its token's angles
        cos, sin = cos[:, None], sin[:, None]
    turn = apply_rope_interleaved if interleaved else apply_rope_half
    if r == x.shape[-1]:
        return turn(x, cos, sin)
    return torch.cat([turn(x[..., :r], cos, sin), x[..., r:]], dim=-1)


def hadamard_rotate(x: Tensor) -> Tensor:
    n = x.shape[-1]
    y = x.float()
    lead = y.shape[:-1]
    h = 1
    while h < n:  # Sylvester butterflies: H_2n = [[H_n, H_n], [H_n, -H_n]]
        y = y.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return (y.reshape(*lead, n) * n ** -0.5).to(x.dtype)


def quantize_fp8(x: Tensor, block_size: int, ue8m0: bool) -> tuple[Tensor, Tensor]:
    return quantize_fp8_blocks(x, block_size, ue8m0)


def fp8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, act_quant: bool,
               ue8m0: bool) -> Tensor:
    xf = x.float()
    if act_quant:
        if x.shape[-1] % 128:
            raise ValueError(f"fp8_linear: activation quantization needs in_features % 128 == 0, "
                             f"got {x.shape[-1]}")
        xf = dequantize_fp8_blocks(*quantize_fp8_blocks(x, 128, ue8m0))
    return (xf @ dequantize_weight(weight, weight_scale).t()).to(x.dtype)


def int8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor) -> Tensor:
    # Integer products and their sums stay below 2^53 (127 * 127 * in_features), so float64
    # matmul is the exact int32 accumulation of an int8 GEMM on any device.
    xq, x_scale = quantize_int8_rows(x)
    acc = xq.double() @ weight.double().t()
    return (acc.float() * x_scale.unsqueeze(-1) * weight_scale.float()).to(x.dtype)


def select_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row of ``scores`` [N, L] (-inf = ineligible) with deterministic ties (lower
    position wins). Returns (positions int32 [N, k], values [N, k]) sorted by descending value,
    ties by ascending position, -1 / -inf where fewer than k are eligible."""
    n, length = scores.shape
    kk = min(k, length)
    kth = scores.topk(kk, dim=-1).values[:, -1:]
    above = scores > kth
    tied = scores == kth
    # Among entries equal to the k-th value keep the lowest positions, so the set is unique.
    take = above | (tied & (tied.cumsum(-1) <= kk - above.sum(-1, keepdim=True)))
    pos = torch.arange(length, device=scores.device).expand(n, length)[take].view(n, kk)
    val = scores.gather(1, pos)
    order = torch.sort(val, dim=-1, descending=True, stable=True).indices
    pos, val = pos.gather(1, order), val.gather(1, order)
    pos = torch.where(torch.isneginf(val), -1, pos).to(torch.int32)
    if kk < k:
        pos = torch.cat([pos, pos.new_full((n, k - kk), -1)], dim=1)
        val = torch.cat([val, val.new_full((n, k - kk), float("-inf"))], dim=1)
    return pos, val


def _sequence_keys(cache: Tensor, block_table_row: Tensor, length: int) -> Tensor:
    """The first ``length`` entries of one sequence, gathered from its pages."""
    bs = cache.shape[1]
    blocks = block_table_row[: -(-length // bs)].long()
    if cache.dtype == FP8_DTYPE:  # gather the bytes: not every device indexes float8 tensors
        return cache.view(torch.uint8)[blocks].view(FP8_DTYPE).reshape(-1, *cache.shape[2:])[:length]
    return cache[blocks].reshape(-1, *cache.shape[2:])[:length]


def indexer_topk(q: Tensor, weights: Tensor, k_cache: Tensor, k_scale: Optional[Tensor],
                 block_table: Tensor, cu_seqlens_q: Tensor, seqlens_k: Tensor,
                 topk: int, max_seqlen_k: Optional[int] = None) -> tuple[Tensor, Tensor]:
    t, h, _ = q.shape
    indices = torch.full((t, topk), -1, dtype=torch.int32, device=q.device)
    values = torch.full((t, topk), float("-inf"), dtype=torch.float32, device=q.device)
    cu, lens = cu_seqlens_q.tolist(), seqlens_k.tolist()
    if max_seqlen_k is not None and lens and max_seqlen_k < max(lens):
        raise ValueError(f"indexer_topk: max_seqlen_k={max_seqlen_k} is below max(seqlens_k)="
                         f"{max(lens)}")
    for r in range(len(lens)):
        t0, t1, length = cu[r], cu[r + 1], lens[r]
        if t1 == t0:
            continue
        keys = _sequence_keys(k_cache, block_table[r], length).float()  # [L, D]
        key_scale = (_sequence_keys(k_scale, block_table[r], length) if k_scale is not None
                     else None)
        first_pos = length - (t1 - t0)
        chunk = max(1, CHUNK_ELEMENTS // (h * length))
        for c0 in range(t0, t1, chunk):
            c1 = min(c0 + chunk, t1)
            pos = first_pos + torch.arange(c0 - t0, c1 - t0, device=q.device)
            visible = first_pos + (c1 - t0)  # keys beyond the chunk's last query are all masked
            logits = torch.einsum("chd,ld->chl", q[c0:c1].float(), keys[:visible]).relu_()
            score = torch.einsum("chl,ch->cl", logits, weights[c0:c1].float())
            if key_scale is not None:
                score = score * key_scale[:visible]
            key_pos = torch.arange(visible, device=q.device)
            score = score.masked_fill(key_pos[None, :] > pos[:, None], float("-inf"))
            indices[c0:c1], values[c0:c1] = select_topk(score, topk)
    return indices, values


def _sparse_attention(q: Tensor, kv_cache: Tensor, indices: Tensor, block_table: Tensor,
                      rows: Tensor, scale: float, d_v: int) -> tuple[Tensor, Tensor]:
    """q [T, H, D] attends to the cache entries at positions ``indices`` [T, K] of sequence
    ``rows`` [T]; one KV head, value = the first d_v channels of each entry."""
    t, h, d = q.shape
    k = indices.shape[-1]
    fp8 = kv_cache.dtype == torch.uint8  # the FP8 latent cache: dequantize what is gathered
    flat = kv_cache.reshape(-1, kv_cache.shape[-1])
    out = q.new_empty((t, h, d_v))
    lse = torch.empty((t, h), dtype=torch.float32, device=q.device)
    chunk = max(1, CHUNK_ELEMENTS // (k * (d + h)))
    for c0 in range(0, t, chunk):
        c1 = min(c0 + chunk, t)
        idx = indices[c0:c1].long()
        valid = idx >= 0
        kv = flat[paging.slots(block_table, rows[c0:c1, None], idx, kv_cache.shape[1])]
        kv = kv_fp8.unpack(kv, d_v) if fp8 else kv.float()
        s = torch.einsum("chd,ckd->chk", q[c0:c1].float(), kv) * scale
        s = s.masked_fill(~valid[:, None, :], float("-inf"))
        m = torch.logsumexp(s, dim=-1)  # [c, H]; -inf for a row with nothing to attend to
        p = torch.exp(s - m.nan_to_num(neginf=0.0)[..., None])
        out[c0:c1] = torch.einsum("chk,ckd->chd", p, kv[..., :d_v]).to(q.dtype)
        lse[c0:c1] = m
    return out, lse


def sparse_mla_prefill(q, kv_cache, indices, block_table, cu_seqlens_q, seqlens_k, scale, d_v):
    rows = paging.token_rows(cu_seqlens_q)
    return _sparse_attention(q, kv_cache, indices, block_table, rows, scale, d_v)


def sparse_mla_decode(q, kv_cache, indices, block_table, seqlens_k, scale, d_v):
    b, sq, h, d = q.shape
    rows = torch.arange(b, device=q.device).repeat_interleave(sq)
    out, lse = _sparse_attention(q.reshape(b * sq, h, d), kv_cache, indices.reshape(b * sq, -1),
                                 block_table, rows, scale, d_v)
    return out.view(b, sq, h, d_v), lse.view(b, sq, h)


def store_kv(kv_cache: Tensor, slot_mapping: Tensor, latent: Tensor, rope: Tensor,
             ue8m0: bool) -> None:
    if kv_cache.dtype == torch.uint8:
        entries = kv_fp8.pack(latent, rope, ue8m0)
    else:
        entries = torch.cat([latent, rope], dim=-1).to(kv_cache.dtype)
    kv_cache.view(-1, kv_cache.shape[-1]).index_copy_(0, slot_mapping, entries)


IMPLS = {
    "rope": rope,
    "hadamard_rotate": hadamard_rotate,
    "quantize_fp8": quantize_fp8,
    "quantize_int8": quantize_int8_rows,
    "fp8_linear": fp8_linear,
    "int8_linear": int8_linear,
    "indexer_topk": indexer_topk,
    "sparse_mla_prefill": sparse_mla_prefill,
    "sparse_mla_decode": sparse_mla_decode,
    "store_kv": store_kv,
}

__all__ = ["IMPLS", "select_topk", "FP8_DTYPE"]
