"""Sparse MLA forward for Hopper (sm90) in Gluon: the contract of ``sparse_mla._sparse_mla_fwd_kernel``
(bf16/fp16 latent cache, 64 heads a program, 64 entries a tile) with the layouts set by hand.

For S = Q K^T (64 heads x 64 entries) feeding P V, Triton puts all 8 warps along the heads (its
"chained dot" rule) but sizes the wgmma for warps split along the keys: each warpgroup computes
the whole S with two n=32 instructions, reading Q (72 KB) from shared memory twice a tile. Here
each warpgroup computes S with one n=64 instruction; the softmax stays warp-local and P is already
laid out as the A operand of P V (warps [4, 2], n=256: each warpgroup owns 256 of the 512 output
columns). The gathers are ``cp.async`` into a two-stage ring issued by hand one tile ahead.
H100, same process (BENCHMARKS.md): decode B=64/128 at 32K 0.153/0.293 ms against the Triton
kernel's 0.173/0.327 (+13%); prefill 4096 x 2048 entries 8.28 ms against 8.06 (-3%), so
``sparse_mla_fwd`` uses this kernel for decode-sized launches only. Tried: S split over the keys
between the warpgroups (one n=32 instruction each, half the shared-memory reads, the softmax's
row max and sum combined across warpgroups): 9.84 ms, slower; those cross-warpgroup exchanges
stall both warpgroups every tile.

Gluon has no interpreter: on a CPU the Triton kernel runs; ``available()`` says whether this one can.
"""

from __future__ import annotations

import torch

import triton

try:  # Gluon ships with Triton >= 3.5; without it the portable Triton kernel is used
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        async_copy,
        fence_async_shared,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    _GLUON = True
except ImportError:  # pragma: no cover - depends on the Triton build
    _GLUON = False


def available(q: torch.Tensor, kv: torch.Tensor) -> bool:
    """Whether this kernel serves these inputs: a Hopper GPU, Gluon, 16-bit q and cache."""
    if not _GLUON or q.device.type != "cuda" or kv.dtype != q.dtype:
        return False
    if q.dtype not in (torch.bfloat16, torch.float16):
        return False
    return torch.cuda.get_device_capability(q.device)[0] == 9


if _GLUON:
    @gluon.jit
    def _sparse_mla_fwd_sm90(
        Q, KV, SLOT, OUT, LSE,
        stride_qt, stride_qh, stride_os, stride_ot, stride_oh,
        stride_ls, stride_lt,
        H, K, k_per_split, scale_log2,
        D_NOPE: gl.constexpr, D_ROPE: gl.constexpr, BLOCK_H: gl.constexpr,
        BLOCK_K: gl.constexpr, ROW_WIDTH: gl.constexpr,
    ):
        gl.static_assert(BLOCK_H == 64, "one warpgroup M of heads")
        gl.static_assert(gl.num_warps() == 8, "two warpgroups")
        dtype: gl.constexpr = Q.dtype.element_ty
        # --- layouts
        # S whole in each warpgroup with one n=BLOCK_K wgmma (Q read once a warpgroup), so the
        # softmax is warp-local and P is already in the A-operand registers of P V
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[8, 1], instr_shape=[16, BLOCK_K, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, D_NOPE // 2, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        ld_nope: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [8, 1], [1, 0])
        ld_rope: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D_ROPE // 8), D_ROPE // 8], [8, 1], [1, 0])
        nope_sl: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        rope_sl: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)

        hb = gl.program_id(0)
        t = gl.program_id(1)
        split = gl.program_id(2)

        # --- the program's queries into shared memory (resident for the whole loop)
        q_base = Q + t.to(gl.int64) * stride_qt
        h_n = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, ld_nope))
        d_n = gl.arange(0, D_NOPE, layout=gl.SliceLayout(0, ld_nope))
        q_nope = gl.load(q_base + h_n[:, None] * stride_qh + d_n[None, :], mask=(h_n < H)[:, None],
                         other=0.0)
        h_r = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, ld_rope))
        d_r = gl.arange(0, D_ROPE, layout=gl.SliceLayout(0, ld_rope))
        q_pe = gl.load(q_base + h_r[:, None] * stride_qh + D_NOPE + d_r[None, :],
                       mask=(h_r < H)[:, None], other=0.0)
        q_nope_s = gl.allocate_shared_memory(dtype, [BLOCK_H, D_NOPE], nope_sl, q_nope)
        q_pe_s = gl.allocate_shared_memory(dtype, [BLOCK_H, D_ROPE], rope_sl, q_pe)
        # two-stage ring of gathered KV tiles
        kv_nope_s = gl.allocate_shared_memory(dtype, [2, BLOCK_K, D_NOPE], nope_sl)
        kv_pe_s = gl.allocate_shared_memory(dtype, [2, BLOCK_K, D_ROPE], rope_sl)

        k_lo = split * k_per_split
        k_hi = gl.minimum(k_lo + k_per_split, K)
        slot_base = SLOT + t.to(gl.int64) * K
        kk_n = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, ld_nope))
        kk_r = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, ld_rope))
        kk_s = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, s_layout))

        # prologue: the first tile's gather
        _gather(KV, slot_base, k_lo, k_hi, kk_n, d_n, kk_r, d_r, kv_nope_s.index(0), kv_pe_s.index(0),
                D_NOPE, ROW_WIDTH)

        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_H], gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = gl.zeros([BLOCK_H, D_NOPE], gl.float32, layout=o_layout)
        s_zero = gl.zeros([BLOCK_H, BLOCK_K], gl.float32, layout=s_layout)
        n_tiles = gl.cdiv(k_hi - k_lo, BLOCK_K)
        for i in range(0, n_tiles):
            kb = k_lo + i * BLOCK_K
            buf = i % 2
            async_copy.wait_group(0)  # this thread's copies of tile i have landed;
            fence_async_shared()  # they are made visible to the wgmma (async) proxy ...
            gl.thread_barrier()  # ... as are every thread's; all are done with tile i - 1 too
            # the next tile's gather overlaps this tile's MMAs (its buffer held tile i - 1)
            _gather(KV, slot_base, kb + BLOCK_K, k_hi, kk_n, d_n, kk_r, d_r,
                    kv_nope_s.index(1 - buf), kv_pe_s.index(1 - buf), D_NOPE, ROW_WIDTH)
            kv_n = kv_nope_s.index(buf)
            kv_r = kv_pe_s.index(buf)
            s = warpgroup_mma(q_nope_s, kv_n.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma(q_pe_s, kv_r.permute((1, 0)), s, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
            offs_k = kb + kk_s
            valid = gl.load(slot_base + offs_k, mask=offs_k < k_hi, other=-1) >= 0
            s = gl.where(valid[None, :], s * scale_log2, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, 1))
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = gl.exp2(m_i - m_safe)
            p = gl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + gl.sum(p, 1)
            m_i = m_new
            alpha_o = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))
            acc = acc * alpha_o[:, None]
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            acc = warpgroup_mma(p_op, kv_n, acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        async_copy.wait_group(0)

        l_safe = gl.where(l_i == 0.0, 1.0, l_i)
        lse = gl.where(l_i == 0.0, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
        inv = gl.convert_layout(1.0 / l_safe, gl.SliceLayout(1, o_layout))
        out = acc * inv[:, None]
        h_o = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, o_layout))
        d_o = gl.arange(0, D_NOPE, layout=gl.SliceLayout(0, o_layout))
        o_ptr = OUT + split * stride_os + t.to(gl.int64) * stride_ot + h_o[:, None] * stride_oh
        gl.store(o_ptr + d_o[None, :], out.to(OUT.dtype.element_ty), mask=(h_o < H)[:, None])
        h_l = hb * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, s_layout))
        gl.store(LSE + split * stride_ls + t.to(gl.int64) * stride_lt + h_l, lse, mask=h_l < H)

    @gluon.jit
    def _gather(KV, slot_base, kb, k_hi, kk_n, d_n, kk_r, d_r, dst_nope, dst_pe,
                D_NOPE: gl.constexpr, ROW_WIDTH: gl.constexpr):
        """cp.async the cache rows of entries kb .. kb + BLOCK_K (zeros past k_hi or at -1)."""
        offs = kb + kk_n
        slot = gl.load(slot_base + offs, mask=offs < k_hi, other=-1)
        ok = slot >= 0
        row = KV + gl.where(ok, slot, 0).to(gl.int64) * ROW_WIDTH
        async_copy.async_copy_global_to_shared(dst_nope, row[:, None] + d_n[None, :], mask=ok[:, None])
        offs_r = kb + kk_r
        slot_r = gl.load(slot_base + offs_r, mask=offs_r < k_hi, other=-1)
        ok_r = slot_r >= 0
        row_r = KV + gl.where(ok_r, slot_r, 0).to(gl.int64) * ROW_WIDTH + D_NOPE
        async_copy.async_copy_global_to_shared(dst_pe, row_r[:, None] + d_r[None, :], mask=ok_r[:, None])
        async_copy.commit_group()


def launch(q, kv, slots, out, lse, h, k, k_per_split, scale_log2, d_v, d_rope, splits):
    """Launch over (head block, token, split), as the Triton kernel does."""
    t = q.shape[0]
    _sparse_mla_fwd_sm90[(triton.cdiv(h, 64), t, splits)](
        q, kv, slots, out, lse,
        q.stride(0), q.stride(1),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        h, k, k_per_split, scale_log2,
        D_NOPE=d_v, D_ROPE=d_rope, BLOCK_H=64, BLOCK_K=64, ROW_WIDTH=kv.shape[-1],
        num_warps=8,
    )
