"""Sparse MLA forward (absorbed form) on the paged latent cache, for prefill and decode.

Per query token t: H heads of q (576 = 512 latent + 64 rope) attend to the K cache entries
selected by the indexer (positions within t's sequence, -1 = padding). One KV entry serves all
heads, so a program takes BLOCK_H heads of one token and streams its selected entries in tiles of
BLOCK_K: S = q_nope . kv_nope + q_pe . kv_pe, online softmax (base 2), O += P . kv_nope.
The positions are first turned into cache rows (``cache_slots``, one small launch), so the loop
holds no block-table lookup, and each tile's rows are loaded one iteration ahead; the head blocks
of one token are neighbours in launch order, so they share the gathered tiles through L2
(together 1.29x over the first version, BENCHMARKS.md).
Small batches split the K entries over NUM_SPLITS programs per token; a combine kernel merges the
partial (O, LSE) pairs. Accumulation is float32; q/kv may be bf16, fp16 or fp32, or the cache may
be the FP8 format of dsa_ascend/kv_fp8.py (uint8 rows: FP8 latent tiles with float32 scales, bf16
rope), dequantized in registers to q's dtype before the dots.
"""

from __future__ import annotations

import torch

import triton
import triton.language as tl

from . import sparse_mla_sm90

LOG2E = 1.4426950408889634


@triton.jit
def _slots_kernel(IDX, BT, ROW, SLOT, stride_it, stride_bt, K, block_size,
                  BLOCK: tl.constexpr):
    """SLOT[t, j] = the flat cache row of position IDX[t, j] of token t's sequence, -1 where the
    position is -1: the block-table hop done once, not inside the attention loop."""
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < K
    pos = tl.load(IDX + t.to(tl.int64) * stride_it + offs, mask=inb, other=-1)
    valid = pos >= 0
    pos = tl.where(valid, pos, 0)
    row = tl.load(ROW + t)
    blk = tl.load(BT + row * stride_bt + pos // block_size, mask=valid & inb, other=0)
    slot = tl.where(valid, blk * block_size + pos % block_size, -1)
    tl.store(SLOT + t.to(tl.int64) * K + offs, slot, mask=inb)


@triton.jit
def _sparse_mla_fwd_kernel(
    Q, KV, SLOT, OUT, LSE,
    stride_qt, stride_qh, stride_os, stride_ot, stride_oh,
    stride_ls, stride_lt,
    H, K, k_per_split, scale_log2,
    D_NOPE: tl.constexpr, D_ROPE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr, KV_FP8: tl.constexpr, ROW_WIDTH: tl.constexpr,
):
    # Head blocks of one token are adjacent in launch order, so the second block's gathers of
    # the same entries hit L2.
    hb = tl.program_id(0)
    t = tl.program_id(1)
    split = tl.program_id(2)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = offs_h < H
    offs_d = tl.arange(0, D_NOPE)
    offs_r = tl.arange(0, D_ROPE)
    q_base = Q + t.to(tl.int64) * stride_qt + offs_h[:, None] * stride_qh
    q_nope = tl.load(q_base + offs_d[None, :], mask=hmask[:, None], other=0.0)
    q_pe = tl.load(q_base + D_NOPE + offs_r[None, :], mask=hmask[:, None], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D_NOPE], tl.float32)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    slot_base = SLOT + t.to(tl.int64) * K
    offs_k = k_lo + tl.arange(0, BLOCK_K)
    slot_next = tl.load(slot_base + offs_k, mask=offs_k < k_hi, other=-1)
    for kb in range(k_lo, k_hi, BLOCK_K):
        slot = slot_next  # this tile's rows were loaded one iteration ahead
        offs_k = kb + BLOCK_K + tl.arange(0, BLOCK_K)
        slot_next = tl.load(slot_base + offs_k, mask=offs_k < k_hi, other=-1)
        valid = slot >= 0
        kv_row = KV + tl.where(valid, slot, 0).to(tl.int64)[:, None] * ROW_WIDTH
        if KV_FP8:  # bytes: latent fp8 | float32 scale per 128-tile | rope bf16 (kv_fp8.py)
            raw = tl.load(kv_row + offs_d[None, :], mask=valid[:, None], other=0)
            offs_t = tl.arange(0, D_NOPE // 128)
            sc = tl.load((kv_row + D_NOPE).to(tl.pointer_type(tl.float32)) + offs_t[None, :],
                         mask=valid[:, None], other=0.0)  # [BLOCK_K, tiles]: 16 bytes a row
            lat = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            lat = tl.reshape(lat, (BLOCK_K, D_NOPE // 128, 128)) * sc[:, :, None]
            kv_nope = tl.reshape(lat, (BLOCK_K, D_NOPE)).to(q_nope.dtype)
            rope_ptr = (kv_row + D_NOPE + 4 * (D_NOPE // 128)).to(tl.pointer_type(tl.bfloat16))
            kv_pe = tl.load(rope_ptr + offs_r[None, :], mask=valid[:, None], other=0.0)
            kv_pe = kv_pe.to(q_pe.dtype)
        else:
            kv_nope = tl.load(kv_row + offs_d[None, :], mask=valid[:, None], other=0.0)
            kv_pe = tl.load(kv_row + D_NOPE + offs_r[None, :], mask=valid[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q_nope, tl.trans(kv_nope), input_precision="ieee")
            s += tl.dot(q_pe, tl.trans(kv_pe), input_precision="ieee")
        else:
            s = tl.dot(q_nope, tl.trans(kv_nope))
            s += tl.dot(q_pe, tl.trans(kv_pe))
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, kv_nope.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(kv_nope.dtype), kv_nope)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    o_ptr = OUT + split * stride_os + t.to(tl.int64) * stride_ot + offs_h[:, None] * stride_oh
    tl.store(o_ptr + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=hmask[:, None])
    tl.store(LSE + split * stride_ls + t.to(tl.int64) * stride_lt + offs_h, lse, mask=hmask)


def _num_splits(tokens: int, head_blocks: int, k: int, block_k: int, device) -> int:
    if device.type != "cuda":
        return 1
    # Measured on H100 (BENCHMARKS.md): splitting only pays when well under one program per
    # SM; at 128 programs (B=64, h=128) it was 1.5x slower than no split.
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = tokens * head_blocks
    if 2 * programs >= sms:
        return 1
    return max(1, min(-(-sms // programs), k // (4 * block_k)))


def sparse_mla_fwd(q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor,
                   block_table: torch.Tensor, token_row: torch.Tensor, scale: float, d_v: int,
                   num_splits: int | None = None, block_h: int | None = None,
                   block_k: int | None = None, num_warps: int | None = None,
                   num_stages: int | None = None, impl: str | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, 576], kv_cache [blocks, block_size, 576] (float) or [blocks, block_size, 656]
    (uint8, the FP8 format of dsa_ascend/kv_fp8.py), indices int32 [T, K] (positions),
    block_table int32 [R, max_blocks], token_row int32 [T] -> (out [T, H, d_v], lse [T, H]).
    ``impl``: "sm90" (the warp-specialized Gluon kernel of sparse_mla_sm90.py), "triton", or None:
    sm90 wherever it serves the inputs (Hopper; a 16-bit q and cache of one dtype, or a bf16 q and
    the FP8 cache; d_v 512, rope 64, >= 64 heads) unless Triton tiles (block_h/block_k/num_warps/
    num_stages) are given; with no entries to attend (K = 0) the Triton kernel writes the empty
    result."""
    t, h, d = q.shape
    d_rope = d - d_v
    assert d_v & (d_v - 1) == 0 and d_rope & (d_rope - 1) == 0, "d_v and the rope width must be powers of 2"
    kv_fp8 = kv_cache.dtype == torch.uint8
    assert not kv_fp8 or kv_cache.shape[-1] == d_v + 4 * (d_v // 128) + 2 * d_rope, "FP8 entry width"
    k = indices.shape[1]
    if kv_cache.shape[0] * kv_cache.shape[1] >= 2 ** 31:
        raise ValueError(f"sparse_mla_fwd: kv_cache has {kv_cache.shape[0] * kv_cache.shape[1]} "
                         "entries; the kernel addresses them with int32 slots (< 2^31)")
    q = q.contiguous()
    kv = kv_cache.contiguous()
    ieee = q.dtype == torch.float32
    block_h_arg, block_k_arg, num_warps_arg = block_h, block_k, num_warps
    if block_h is None:
        block_h = 64 if h >= 64 else max(16, triton.next_power_of_2(h))
    if block_k is None:
        block_k = 32 if ieee else 64
    head_blocks = triton.cdiv(h, block_h)
    splits = num_splits or _num_splits(t, head_blocks, k, block_k, q.device)
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, k_per_split) if k else 1
    if splits == 1:
        out = q.new_empty((1, t, h, d_v))
        lse = torch.empty((1, t, h), dtype=torch.float32, device=q.device)
    else:
        out = torch.empty((splits, t, h, d_v), dtype=torch.float32, device=q.device)
        lse = torch.empty((splits, t, h), dtype=torch.float32, device=q.device)
    if num_warps is None:
        num_warps = 8 if block_h * d_v >= 64 * 512 else 4
    sm90_ok = d_v == 512 and d_rope == 64 and sparse_mla_sm90.available(q, kv)
    if impl not in (None, "sm90", "triton"):
        raise ValueError(f"sparse_mla_fwd: impl must be None, 'sm90' or 'triton', got {impl!r}")
    if impl == "sm90" and not sm90_ok:
        raise ValueError("sparse_mla_fwd: impl='sm90' needs a Hopper GPU, Gluon, a 16-bit q and "
                         "cache of one dtype (or a bf16 q and the FP8 cache), d_v 512 and rope 64")
    # The sm90 kernel is warp-specialized with its own fixed tiles: the default wherever it serves
    # the inputs and no Triton tiling was asked for (H100: 1.8x prefill, 1.7-1.8x decode, BENCHMARKS.md).
    default_tiles = all(x is None for x in (block_h_arg, block_k_arg, num_warps_arg, num_stages))
    use_sm90 = k > 0 and (impl == "sm90" or (impl is None and sm90_ok and h >= 64 and default_tiles))
    slots = cache_slots(indices, block_table, token_row, kv.shape[1])
    if t and use_sm90:
        sparse_mla_sm90.launch(q, kv, slots, out, lse, h, k, k_per_split, scale * LOG2E, d_v,
                               d_rope, splits)
    elif t:
        _sparse_mla_fwd_kernel[(head_blocks, t, splits)](
            q, kv, slots, out, lse,
            q.stride(0), q.stride(1),
            out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
            h, k, k_per_split, scale * LOG2E,
            D_NOPE=d_v, D_ROPE=d_rope, BLOCK_H=block_h, BLOCK_K=block_k, IEEE=ieee,
            KV_FP8=kv_fp8, ROW_WIDTH=kv.shape[-1],
            num_warps=num_warps, num_stages=num_stages or (1 if ieee else 2),
        )
    if splits == 1:
        return out[0], lse[0]
    return combine_splits(out, lse, q.dtype)


def cache_slots(indices: torch.Tensor, block_table: torch.Tensor, token_row: torch.Tensor,
                block_size: int) -> torch.Tensor:
    """int32 [T, K]: flat cache rows of ``indices`` (positions of each token's sequence ``token_row``
    in ``block_table``), -1 where the index is -1."""
    t, k = indices.shape
    slots = torch.empty((t, k), dtype=torch.int32, device=indices.device)
    if t and k:
        block = min(1024, triton.next_power_of_2(k))
        _slots_kernel[(t, triton.cdiv(k, block))](indices, block_table, token_row, slots,
                                                  indices.stride(0), block_table.stride(0), k,
                                                  block_size, BLOCK=block)
    return slots


@triton.jit
def _combine_kernel(OUT, LSE, MERGED, TOTAL, n_splits, T, H, D: tl.constexpr,
                    SPLITS: tl.constexpr, BLOCK_H: tl.constexpr):
    """One launch for the merge: weight_s = exp(lse_s - lse), lse = log sum_s exp(lse_s);
    rows whose every split is empty (lse -inf) come out 0 with lse -inf."""
    t = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = offs_h < H
    offs_s = tl.arange(0, SPLITS)
    lse = tl.load(LSE + (offs_s[:, None] * T + t) * H + offs_h[None, :],
                  mask=(offs_s[:, None] < n_splits) & hmask[None, :], other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe[None, :])
    denom = tl.sum(w, 0)
    total = tl.where(denom == 0.0, float("-inf"), m_safe + tl.log(denom))
    w = w / tl.where(denom == 0.0, 1.0, denom)[None, :]
    offs_d = tl.arange(0, D)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    for s in range(n_splits):
        o = tl.load(OUT + ((s * T + t) * H + offs_h[:, None]).to(tl.int64) * D + offs_d[None, :],
                    mask=hmask[:, None], other=0.0)
        w_s = tl.sum(tl.where(offs_s[:, None] == s, w, 0.0), 0)
        acc += o * w_s[:, None]
    tl.store(MERGED + (t * H + offs_h[:, None]).to(tl.int64) * D + offs_d[None, :],
             acc.to(MERGED.dtype.element_ty), mask=hmask[:, None])
    tl.store(TOTAL + t * H + offs_h, total, mask=hmask)


def combine_splits(out: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype):
    """Merge partial results over disjoint key sets: out [S, T, H, D] float32 (contiguous),
    lse [S, T, H] -> (merged [T, H, D] in ``dtype``, lse [T, H])."""
    s, t, h, d = out.shape
    merged = torch.empty((t, h, d), dtype=dtype, device=out.device)
    total = torch.empty((t, h), dtype=torch.float32, device=out.device)
    if t and h:
        block_h = min(16, triton.next_power_of_2(h))
        _combine_kernel[(t, triton.cdiv(h, block_h))](
            out.contiguous(), lse.contiguous(), merged, total, s, t, h, D=d,
            SPLITS=triton.next_power_of_2(s), BLOCK_H=block_h)
    return merged, total


__all__ = ["sparse_mla_fwd", "combine_splits", "cache_slots"]
