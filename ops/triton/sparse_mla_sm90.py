"""Sparse MLA forward for Hopper (sm90) in Gluon, warp-specialized: the contract of
``sparse_mla._sparse_mla_fwd_kernel`` (bf16/fp16 latent cache or the FP8 one, 64 heads a CTA)
on FlashMLA's sparse-prefill schedule, written from its published design
(csrc/sm90/prefill/sparse).

A CTA takes 64 heads of one token and walks its selected entries two 64-entry tiles (K0, K1) at
a time, with three warpgroups:
- producer (4 warps, 40 registers): gathers the tiles' cache rows with ``cp.async`` into two
  buffers, each in halves (latent columns 0-255 = "L"; 256-511 plus rope = "R") that complete on
  their own mbarriers, in the order they are consumed; a round's row numbers are fetched a round
  ahead and staged through shared memory;
- warpgroup 0 (232 registers) computes S0 = Q K0^T and owns O[:, :256];
- warpgroup 1 computes S1 = Q K1^T and owns O[:, 256:].
So no S is computed twice (the earlier single-partition kernels computed it in both warpgroups:
13.6 instead of 8.9 MFLOP a tile) and each P V is an n=256 wgmma. A round, per warpgroup:
WG0 softmax(S0) with its running max -> max to shared -> O_L += P0 V0_L (P0 from registers);
WG1 softmax(S1) against that max -> the pair's max m1 -> O_R += P1 V1_R; WG0 rebases P0 and O_L
onto m1 and stores P0 (in K0's rope rows, dead by then); WG1 stores P1; then O_R += P0 V0_R and
O_L += P1 V1_L from shared memory, and WG0 issues the next S0 behind its last P V. Both O halves
and row sums end on the same max; the sums are added at the end. mbarriers carry every hand-off
(a partition barrier then one arrival); the wgmma views are indexed at a loop-variant 0 so their
~80 64-bit descriptors are built per round instead of hoisted and spilled (1024 -> 12 bytes of
spills, 1.5x faster; the final register split removed the rest).
H100, same process (BENCHMARKS.md, session 6): prefill 4096 x 2048 entries 4.44-4.50 ms = 520-526
TFLOPS against 8.09 ms for the Triton kernel; decode B=64 / 128 at 32K 0.102 / 0.187 ms against
0.175 / 0.335. With the gathers skipped (timing only) prefill ran at 649 TFLOPS: the rest
is the gathers' latency in a two-tile ring (shared memory holds no third: Q, two tiles and P1
take 225.6 of the 227 KiB a CTA may use). The gathers ask cp.async for evict_last (the rows
are shared by the CTAs of many tokens), but Triton 3.6's lowering drops the hint: its PTX has no
L2 cache hint, while Triton 3.9's has (BENCHMARKS.md session 19). So the +3% that session 6
measured with it was not the hint.
Tried: an L2 prefetch of the next round's rows (decode 0.132 against 0.109 ms, prefill 3% slower;
as one bulk prefetch a row, H200 session 14: decode unchanged within noise, prefill 3-5%
slower).

The FP8 latent cache (dsa_ascend/kv_fp8.py; bf16 q) takes its own producer, ``_producer_fp8``:
the FP8 bytes pass through registers and are dequantized into the same bf16 tiles, so the
consumers are unchanged; there the L2 prefetch pays (1.03x). H200, B=64 / 128 at 32K: 0.132 /
0.248 ms against 0.201 / 0.387 for the Triton kernel; the producer binds (BENCHMARKS.md
session 13).

The cluster pair (the default for the FP8 cache with an even number of 64-head blocks a token;
``DSA_MLA_PAIR=0`` turns it off): the two CTAs of a token run as one cluster, and each producer
dequantizes half of every tile's rows and bulk-copies them into the partner's tile (DSMEM), so a
CTA loads and converts half as much. Bit-identical to solo CTAs by construction (every row is
dequantized once, the same way), and so checked on an H100 (tests, compute-sanitizer memcheck).
H100, B=64 / 128 at 32K (graphs): 0.1222-0.1229 / 0.2278-0.2286 ms against 0.1371-0.1379 /
0.2541-0.2550 for solo CTAs; FlashMLA's FP8 decode 0.1024 / 0.1932 (BENCHMARKS.md session 20).

Gluon has no interpreter: on a CPU the Triton kernel runs; ``available()`` says whether this one can.
"""

from __future__ import annotations

import os

import torch

import triton

from . import cluster

try:  # Gluon ships with Triton >= 3.5; without it the portable Triton kernel is used
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        async_copy,
        fence_async_shared,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    # cp.async into shared memory: async_load from Triton 3.7 (the old name raises there)
    _async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    # a CTA (here: partition) barrier: gl.barrier from Triton 3.7, gl.thread_barrier before
    _barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    _GLUON = True
except ImportError:  # pragma: no cover - depends on the Triton build
    _GLUON = False


def available(q: torch.Tensor, kv: torch.Tensor) -> bool:
    """Whether this kernel serves these inputs: a Hopper GPU, Gluon, and a 16-bit q with a cache
    of its dtype, or a bf16 q with the FP8 cache (uint8 entries of dsa_ascend/kv_fp8.py, whose
    rope part is bf16)."""
    if not _GLUON or q.device.type != "cuda":
        return False
    fp8 = kv.dtype == torch.uint8 and q.dtype == torch.bfloat16
    if not fp8 and (kv.dtype != q.dtype or q.dtype not in (torch.bfloat16, torch.float16)):
        return False
    return torch.cuda.get_device_capability(q.device)[0] == 9


if _GLUON:
    M_INIT = gl.constexpr(-1.0e30)  # a finite start for the running max: masked rows stay NaN-free
    # registers a thread: the kernel's 168 (one CTA of 12 warps a SM) are redistributed with
    # setmaxnreg: 232 for each consumer warpgroup, 40 for the producer (224 / 56 spilled 12 bytes
    # and was 8% slower in prefill; FlashMLA uses 216 / 72)
    WG_REGS = gl.constexpr(232)
    PRODUCER_REGS = gl.constexpr(40)
    # the FP8 cache's producer holds two 128-channel chunks of FP8 latent (16 KB a warpgroup)
    # in registers
    FP8_WG_REGS = gl.constexpr(224)
    FP8_PRODUCER_REGS = gl.constexpr(64)

    @gluon.constexpr_function
    def _wgmma_layout(n):
        """Accumulator layout of one warpgroup's m64 x n wgmma."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])

    @gluon.jit
    def _consumer_state(BLOCK_H: gl.constexpr, HALF: gl.constexpr, BLOCK_K: gl.constexpr,
                        s_layout: gl.constexpr, o_layout: gl.constexpr):
        """A consumer's O half, running max and sum, and the zero S a Q K^T starts from."""
        acc = gl.zeros([BLOCK_H, HALF], gl.float32, layout=o_layout)
        m_i = gl.full([BLOCK_H], M_INIT, gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_H], gl.float32, layout=gl.SliceLayout(1, s_layout))
        return acc, m_i, l_i, gl.zeros([BLOCK_H, BLOCK_K], gl.float32, layout=s_layout)

    @gluon.jit
    def _signal(bar):
        """Every thread of this warpgroup is past its prior work; one arrival releases it."""
        _barrier()
        mbarrier.arrive(bar, count=1)

    @gluon.jit
    def _acquire(bar, phase):
        mbarrier.wait(bar, phase)
        fence_async_shared()  # the cp.async (generic proxy) rows are read by wgmma (async proxy)

    @gluon.jit
    def _valid(SLOT, slot_base, kb, k_hi, BLOCK_K: gl.constexpr, layout: gl.constexpr):
        offs = kb + gl.arange(0, BLOCK_K, layout=layout)
        return gl.load(slot_base + offs, mask=offs < k_hi, other=-1) >= 0

    # ---- the cluster pair (``PAIR``: the FP8 cache, an even number of 64-head blocks a token) ----
    # The two CTAs of a cluster take the two head blocks of one token, so they gather the same
    # rows. Each producer dequantizes half of every tile's rows (rank 0 the first 32, rank 1 the
    # last 32), stores them in its own tile and bulk-copies them into the partner's, completing
    # on the partner's ready barrier: half the loads and conversions a CTA (FlashMLA's split for
    # its FP8 decode). A producer refills a half tile once the consumers of both CTAs have freed
    # it (its free barriers count two arrivals, one remote). Gluon 3.6 has no cluster API, so the
    # remote operations are inline PTX on offsets into ``global_smem`` (K_OFF, READY_OFF,
    # FREE_OFF: the k_nope_s, k_ready and k_free allocations), which ``launch`` takes from
    # Triton's own allocator (``cluster.smem_offsets``) and checks on every compiled kernel.
    # They reach the partitions as runtime values: warp_specialize passes its arguments so,
    # constexprs included, which is also why PAIR is bound by the entry functions
    # (``_wg0_solo`` ...).
    _ONE_A_THREAD = gl.constexpr(gl.BlockedLayout([1], [32], [4], [0]))
    _CLUSTER_SYNC_ASM = gl.constexpr(cluster.SYNC_PTX)
    _MBARRIER_INIT_FENCE_ASM = gl.constexpr("fence.mbarrier_init.release.cluster; mov.b32 $0, 0;")
    # a pair kernel launched without its cluster of two traps (a launch error) instead of hanging
    _PAIR_GUARD_ASM = gl.constexpr("{ .reg .b32 n; .reg .pred p; mov.u32 n, %cluster_nctarank; "
                                   "setp.ne.u32 p, n, 2; @p trap; mov.b32 $0, 0; }")

    @gluon.jit
    def _per_thread_asm(asm: gl.constexpr):
        """``asm`` once in every thread of a 4-warp partition, with its index in the partition
        as $1."""
        tid = gl.arange(0, 128, layout=_ONE_A_THREAD)
        gl.inline_asm_elementwise(asm, "=r,r", [tid], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _thread0_asm(asm: gl.constexpr, a, b):
        """``asm`` in every thread of a 4-warp partition with its index as $1 (the asm acts in
        thread 0) and the scalars ``a``, ``b`` as $2, $3."""
        tid = gl.arange(0, 128, layout=_ONE_A_THREAD)
        gl.inline_asm_elementwise(asm, "=r,r,r,r", [tid, a, b], dtype=gl.int32, is_pure=False,
                                  pack=1)

    @gluon.jit
    def _cluster_sync():
        """Every thread of both CTAs is here (released and acquired at cluster scope): before
        the first remote operation, and before a CTA may exit while the partner can still
        reach its shared memory."""
        _per_thread_asm(_CLUSTER_SYNC_ASM)

    # thread 0 ($1 == 0): arrive on the partner CTA's mbarrier at global_smem + $2. The form
    # CUTLASS's ClusterBarrier::arrive(cta_id) uses (the default .release.cta): what it orders
    # is this CTA's wgmma reads of a half tile before the partner's bulk copy overwrites it, a
    # write-after-read that the partner's wait on the barrier and its copy's issue already
    # serialize; a .release.cluster arrive would be the memory model's formal form.
    _REMOTE_ARRIVE_ASM = gl.constexpr(
        "{ .reg .b32 a, r; .reg .pred p; setp.eq.s32 p, $1, 0; "
        "mov.u32 r, %cluster_ctarank; xor.b32 r, r, 1; "
        "mov.u32 a, global_smem; add.u32 a, a, $2; mapa.shared::cluster.u32 a, a, r; "
        "@p mbarrier.arrive.shared::cluster.b64 _, [a]; mov.b32 $0, 0; }")

    @gluon.constexpr_function
    def _push_asm(i, row0, rows, block_k, d_nope):
        """Thread 0 ($1 == 0): bulk-copy this CTA's rows [row0, row0 + rows) of half tile ``i``
        (buffer i // 2; latent columns 0-255 for even i, 256-511 for odd) of k_nope_s (at
        global_smem + $2) into the same place in the partner CTA, completing on the partner's
        ready barrier ``i`` (k_ready at global_smem + $3). In the 128-byte swizzled tile a
        64-column block holds its rows at 128 bytes each (the swizzle permutes 16-byte units
        inside a row, by the row index mod 8, which a 32-row offset keeps), so a block's run of
        rows is one contiguous range."""
        blocks = d_nope // 2 // 64
        lines = ["{ .reg .b32 base, peer, m, s, d; .reg .pred p; setp.eq.s32 p, $1, 0;",
                 "mov.u32 peer, %cluster_ctarank; xor.b32 peer, peer, 1;",
                 "mov.u32 base, global_smem;",
                 f"add.u32 m, base, $3; add.u32 m, m, {8 * i}; mapa.shared::cluster.u32 m, m, peer;"]
        for cb in range((i % 2) * blocks, (i % 2 + 1) * blocks):
            off = (i // 2) * block_k * d_nope * 2 + cb * block_k * 128 + row0 * 128
            lines.append(f"add.u32 s, base, $2; add.u32 s, s, {off}; "
                         "mapa.shared::cluster.u32 d, s, peer; "
                         "@p cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes"
                         f" [d], [s], {rows * 128}, [m];")
        lines.append("mov.b32 $0, 0; }")
        return " ".join(lines)

    @gluon.jit
    def _release(k_free, i: gl.constexpr, PAIR: gl.constexpr, free_off):
        """A consumer is done with half tile ``i``: its producer, and in a pair the partner's
        (which writes half of this tile's rows), may refill it."""
        _signal(k_free.index(i))
        if PAIR:
            _thread0_asm(_REMOTE_ARRIVE_ASM, free_off + 8 * i, 0)

    @gluon.jit
    def _online_softmax(s, valid, m_ref, m_own, l_i, acc, scale_log2, o_layout: gl.constexpr):
        s = gl.where(valid[None, :], s * scale_log2, float("-inf"))
        m_new = gl.maximum(m_ref, gl.max(s, 1))
        alpha = gl.exp2(m_own - m_new)
        p = gl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        return p, m_new, l_i, acc

    @gluon.jit
    def _store_out(acc, l_tot, OUT, o_base, h0, H, stride_oh, col0, HALF: gl.constexpr,
                   o_layout: gl.constexpr):
        l_safe = gl.where(l_tot == 0.0, 1.0, l_tot)
        inv = gl.convert_layout(gl.where(l_tot == 0.0, 0.0, 1.0 / l_safe), gl.SliceLayout(1, o_layout))
        out = acc * inv[:, None]
        h_o = h0 + gl.arange(0, acc.shape[0], layout=gl.SliceLayout(1, o_layout))
        d_o = col0 + gl.arange(0, HALF, layout=gl.SliceLayout(0, o_layout))
        gl.store(OUT + o_base + h_o[:, None] * stride_oh + d_o[None, :], out.to(OUT.dtype.element_ty),
                 mask=(h_o < H)[:, None])

    @gluon.jit
    def _wg0_pair(s, valid, j, acc, m_i, l_i, scale_log2, k0, s0_s, m_s, k_free, xbar,
                  o_layout: gl.constexpr, p_layout: gl.constexpr, PAIR: gl.constexpr,
                  free_off):
        """Warpgroup 0's part of tile pair j up to P1 V1: softmax of S0 against its last max,
        O += P0 V0[:, :256], then P0 and O rebased onto the pair's max (set by warpgroup 1)."""
        HALF: gl.constexpr = k0.shape[1] // 2
        dtype: gl.constexpr = k0.dtype
        phase = j & 1
        p, m_new, l_i, acc = _online_softmax(s, valid, m_i, m_i, l_i, acc, scale_log2, o_layout)
        m_s.store(m_new)
        _signal(xbar.index(0))
        acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), k0.slice(0, HALF, 1), acc,
                            is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        _release(k_free, 0, PAIR, free_off)
        mbarrier.wait(xbar.index(1), phase)
        m1 = m_s.load(m_new.type.layout)
        corr = gl.exp2(m_new - m1)
        s0_s.store((p * corr[:, None]).to(dtype))
        fence_async_shared()
        _signal(xbar.index(2))
        l_i = l_i * corr
        acc = acc * gl.convert_layout(corr, gl.SliceLayout(1, o_layout))[:, None]
        mbarrier.wait(xbar.index(3), phase)
        return acc, m1, l_i

    @gluon.jit
    def _wg0(ctx, PAIR: gl.constexpr):
        """Warpgroup 0: S for the even tiles, O[:, :256]; the first of each tile pair's softmax."""
        (SLOT, OUT, LSE, slot_base, o_base, l_base, h0, H, stride_oh, k_lo, k_hi, scale_log2,
         q_nope_s, q_rope_s, k_nope_s, k_rope_s, s1_s, m_s, l_s, k_ready, k_free, xbar,
         slot_s, KV, ROW_WIDTH, k_off, ready_off, free_off) = ctx
        BLOCK_H: gl.constexpr = q_nope_s.shape[1]
        D_NOPE: gl.constexpr = q_nope_s.shape[2]
        BLOCK_K: gl.constexpr = k_nope_s.shape[1]
        HALF: gl.constexpr = D_NOPE // 2
        s_layout: gl.constexpr = _wgmma_layout(BLOCK_K)
        o_layout: gl.constexpr = _wgmma_layout(HALF)
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        rounds = gl.cdiv(gl.cdiv(k_hi - k_lo, BLOCK_K), 2)
        acc, m_i, l_i, s_zero = _consumer_state(BLOCK_H, HALF, BLOCK_K, s_layout, o_layout)
        if PAIR:
            _cluster_sync()
        z = rounds >> 30
        k0 = k_nope_s.index(z)
        q_rope = q_rope_s.index(z)
        qL = q_nope_s.index(z).slice(0, HALF, 1)
        qR = q_nope_s.index(z).slice(HALF, HALF, 1)
        _acquire(xbar.index(6), 0)  # the queries
        _acquire(k_ready.index(0), 0)
        s = warpgroup_mma(qL, k0.slice(0, HALF, 1).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        _acquire(k_ready.index(1), 0)
        s = warpgroup_mma(qR, k0.slice(HALF, HALF, 1).permute((1, 0)), s, is_async=True)
        s = warpgroup_mma(q_rope, k_rope_s.index(z).permute((1, 0)), s, is_async=True)
        valid = _valid(SLOT, slot_base, k_lo, k_hi, BLOCK_K, gl.SliceLayout(0, s_layout))
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        for j in range(rounds - 1):
            # views at an index that is 0 but loop-variant: their wgmma descriptors are built per
            # round instead of ~80 hoisted 64-bit values spilling to local memory
            z = j >> 30
            k0 = k_nope_s.index(z)
            k1 = k_nope_s.index(z + 1)
            s0_s = k_rope_s.index(z)  # P0 lives in K0's rope rows, dead once S0 is done
            q_rope = q_rope_s.index(z)
            qL = q_nope_s.index(z).slice(0, HALF, 1)
            qR = q_nope_s.index(z).slice(HALF, HALF, 1)
            acc, m_i, l_i = _wg0_pair(s, valid, j, acc, m_i, l_i, scale_log2, k0, s0_s, m_s, k_free,
                                      xbar, o_layout, p_layout, PAIR, free_off)
            acc = warpgroup_mma(s1_s.index(z), k1.slice(0, HALF, 1), acc, is_async=True)
            valid = _valid(SLOT, slot_base, k_lo + 2 * (j + 1) * BLOCK_K, k_hi, BLOCK_K,
                           gl.SliceLayout(0, s_layout))
            # the next S0 overlaps this P1 V1
            _acquire(k_ready.index(0), (j & 1) ^ 1)
            s = warpgroup_mma(qL, k0.slice(0, HALF, 1).permute((1, 0)), s_zero, use_acc=False,
                              is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            _release(k_free, 2, PAIR, free_off)
            _acquire(k_ready.index(1), (j & 1) ^ 1)
            s = warpgroup_mma(qR, k0.slice(HALF, HALF, 1).permute((1, 0)), s, is_async=True)
            s = warpgroup_mma(q_rope, k_rope_s.index(z).permute((1, 0)), s, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        z = rounds >> 30
        acc, m_i, l_i = _wg0_pair(s, valid, rounds - 1, acc, m_i, l_i, scale_log2, k_nope_s.index(z),
                                  k_rope_s.index(z), m_s, k_free, xbar, o_layout, p_layout, PAIR,
                                  free_off)
        acc = warpgroup_mma(s1_s.index(z), k_nope_s.index(z + 1).slice(0, HALF, 1), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        _release(k_free, 2, PAIR, free_off)
        l_s.slice(0 * BLOCK_H, BLOCK_H).store(l_i)
        _signal(xbar.index(4))
        mbarrier.wait(xbar.index(5), 0)
        l_tot = l_i + l_s.slice(1 * BLOCK_H, BLOCK_H).load(row_s)
        _store_out(acc, l_tot, OUT, o_base, h0, H, stride_oh, 0, HALF, o_layout)
        if PAIR:
            _cluster_sync()

    @gluon.jit
    def _wg1(ctx, PAIR: gl.constexpr):
        """Warpgroup 1: S for the odd tiles, O[:, 256:]; the second softmax of each pair sets the max."""
        (SLOT, OUT, LSE, slot_base, o_base, l_base, h0, H, stride_oh, k_lo, k_hi, scale_log2,
         q_nope_s, q_rope_s, k_nope_s, k_rope_s, s1_s, m_s, l_s, k_ready, k_free, xbar,
         slot_s, KV, ROW_WIDTH, k_off, ready_off, free_off) = ctx
        BLOCK_H: gl.constexpr = q_nope_s.shape[1]
        D_NOPE: gl.constexpr = q_nope_s.shape[2]
        BLOCK_K: gl.constexpr = k_nope_s.shape[1]
        HALF: gl.constexpr = D_NOPE // 2
        dtype: gl.constexpr = q_nope_s.dtype
        s_layout: gl.constexpr = _wgmma_layout(BLOCK_K)
        o_layout: gl.constexpr = _wgmma_layout(HALF)
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        rounds = gl.cdiv(gl.cdiv(k_hi - k_lo, BLOCK_K), 2)
        acc, m_i, l_i, s_zero = _consumer_state(BLOCK_H, HALF, BLOCK_K, s_layout, o_layout)
        if PAIR:
            _cluster_sync()
        _acquire(xbar.index(6), 0)  # the queries
        for j in range(rounds):
            phase = j & 1
            kb = k_lo + (2 * j + 1) * BLOCK_K
            z = j >> 30  # loop-variant views (see warpgroup 0)
            k0 = k_nope_s.index(z)
            k1 = k_nope_s.index(z + 1)
            s0_s = k_rope_s.index(z)
            qL = q_nope_s.index(z).slice(0, HALF, 1)
            qR = q_nope_s.index(z).slice(HALF, HALF, 1)
            _acquire(k_ready.index(3), phase)
            s = warpgroup_mma(qR, k1.slice(HALF, HALF, 1).permute((1, 0)), s_zero, use_acc=False,
                              is_async=True)
            s = warpgroup_mma(q_rope_s.index(z), k_rope_s.index(z + 1).permute((1, 0)), s, is_async=True)
            _acquire(k_ready.index(2), phase)
            s = warpgroup_mma(qL, k1.slice(0, HALF, 1).permute((1, 0)), s, is_async=True)
            valid = _valid(SLOT, slot_base, kb, k_hi, BLOCK_K, gl.SliceLayout(0, s_layout))
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
            mbarrier.wait(xbar.index(0), phase)
            m0 = m_s.load(row_s)
            p, m_new, l_i, acc = _online_softmax(s, valid, m0, m_i, l_i, acc, scale_log2, o_layout)
            m_s.store(m_new)
            _signal(xbar.index(1))
            m_i = m_new
            p16 = p.to(dtype)
            acc = warpgroup_mma(gl.convert_layout(p16, p_layout), k1.slice(HALF, HALF, 1), acc,
                                is_async=True)
            s1_s.index(z).store(p16)
            mbarrier.wait(xbar.index(2), phase)
            acc = warpgroup_mma(s0_s, k0.slice(HALF, HALF, 1), acc, is_async=True)
            fence_async_shared()
            _signal(xbar.index(3))
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            _release(k_free, 3, PAIR, free_off)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            _release(k_free, 1, PAIR, free_off)
        l_s.slice(1 * BLOCK_H, BLOCK_H).store(l_i)
        _signal(xbar.index(5))
        mbarrier.wait(xbar.index(4), 0)
        l_tot = l_i + l_s.slice(0 * BLOCK_H, BLOCK_H).load(row_s)
        _store_out(acc, l_tot, OUT, o_base, h0, H, stride_oh, HALF, HALF, o_layout)
        h_l = h0 + gl.arange(0, BLOCK_H, layout=row_s)
        l_safe = gl.where(l_tot == 0.0, 1.0, l_tot)
        lse = gl.where(l_tot == 0.0, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
        gl.store(LSE + l_base + h_l, lse, mask=h_l < H)
        if PAIR:
            _cluster_sync()

    @gluon.jit
    def _copy_rows(KV, rows_s, dst, col0, ROW_WIDTH, WIDTH: gl.constexpr, layout: gl.constexpr):
        slot = rows_s.load(gl.SliceLayout(1, layout))
        ok = slot >= 0
        row = KV + gl.where(ok, slot, 0).to(gl.int64) * ROW_WIDTH + col0
        cols = gl.arange(0, WIDTH, layout=gl.SliceLayout(0, layout))
        _async_load(dst, row[:, None] + cols[None, :], mask=ok[:, None], eviction_policy="evict_last")

    @gluon.jit
    def _producer(ctx):
        """Four warps gathering the selected cache rows with cp.async, in the order they are used:
        K0 left, K1 right (+ rope), K0 right (+ rope), K1 left; each completes on its mbarrier.
        A round's 128 cache rows are fetched one round ahead (one per thread) and staged through
        shared memory, so no global-load latency sits between a buffer's release and its refill."""
        (SLOT, OUT, LSE, slot_base, o_base, l_base, h0, H, stride_oh, k_lo, k_hi, scale_log2,
         q_nope_s, q_rope_s, k_nope_s, k_rope_s, s1_s, m_s, l_s, k_ready, k_free, xbar,
         slot_s, KV, ROW_WIDTH, k_off, ready_off, free_off) = ctx
        D_NOPE: gl.constexpr = k_nope_s.shape[2]
        BLOCK_K: gl.constexpr = k_nope_s.shape[1]
        HALF: gl.constexpr = D_NOPE // 2
        D_ROPE: gl.constexpr = k_rope_s.shape[2]
        ld: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])
        ld_r: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D_ROPE // 8), D_ROPE // 8], [4, 1], [1, 0])
        one: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        k0 = k_nope_s.index(0)
        k1 = k_nope_s.index(1)
        rows0 = slot_s.slice(0, BLOCK_K)
        rows1 = slot_s.slice(BLOCK_K, BLOCK_K)
        rounds = gl.cdiv(gl.cdiv(k_hi - k_lo, BLOCK_K), 2)
        offs = k_lo + gl.arange(0, 2 * BLOCK_K, layout=one)
        cur = gl.load(slot_base + offs, mask=offs < k_hi, other=-1)
        offs += 2 * BLOCK_K
        nxt = gl.load(slot_base + offs, mask=offs < k_hi, other=-1)
        for j in range(rounds):
            phase = (j & 1) ^ 1  # the first wait on a free barrier passes
            _barrier()  # last round's rows are read
            slot_s.store(cur)
            _barrier()
            cur = nxt
            offs += 2 * BLOCK_K
            nxt = gl.load(slot_base + offs, mask=offs < k_hi, other=-1)
            mbarrier.wait(k_free.index(0), phase)
            _copy_rows(KV, rows0, k0.slice(0, HALF, 1), 0, ROW_WIDTH, HALF, ld)
            async_copy.mbarrier_arrive(k_ready.index(0), increment_count=False)
            mbarrier.wait(k_free.index(3), phase)
            _copy_rows(KV, rows1, k1.slice(HALF, HALF, 1), HALF, ROW_WIDTH, HALF, ld)
            _copy_rows(KV, rows1, k_rope_s.index(1), D_NOPE, ROW_WIDTH, D_ROPE, ld_r)
            async_copy.mbarrier_arrive(k_ready.index(3), increment_count=False)
            mbarrier.wait(k_free.index(1), phase)
            _copy_rows(KV, rows0, k0.slice(HALF, HALF, 1), HALF, ROW_WIDTH, HALF, ld)
            _copy_rows(KV, rows0, k_rope_s.index(0), D_NOPE, ROW_WIDTH, D_ROPE, ld_r)
            async_copy.mbarrier_arrive(k_ready.index(1), increment_count=False)
            mbarrier.wait(k_free.index(2), phase)
            _copy_rows(KV, rows1, k1.slice(0, HALF, 1), 0, ROW_WIDTH, HALF, ld)
            async_copy.mbarrier_arrive(k_ready.index(2), increment_count=False)

    @gluon.jit
    def _load_fp8_chunk(KV, rows_s, col0: gl.constexpr, ROW_WIDTH, D_NOPE: gl.constexpr,
                        layout: gl.constexpr):
        """The FP8 latent columns [col0, col0 + 128) of a tile's rows (one scale tile) and their
        float32 scale (0 for a -1 slot), into registers."""
        slot = rows_s.load(gl.SliceLayout(1, layout))
        ok = slot >= 0
        row = KV + gl.where(ok, slot, 0).to(gl.int64) * ROW_WIDTH
        cols = gl.arange(0, 128, layout=gl.SliceLayout(0, layout))
        raw = gl.load(row[:, None] + (col0 + cols)[None, :], mask=ok[:, None], other=0)
        scale = (row + D_NOPE + 4 * (col0 // 128)).to(gl.pointer_type(gl.float32), bitcast=True)
        return raw, gl.load(scale, mask=ok, other=0.0)

    @gluon.jit
    def _store_fp8_chunk(dst, raw, scale):
        """FP8 bytes x their tile's float32 scale, rounded once to ``dst``'s dtype
        (kv_fp8.unpack), into shared memory (generic-proxy stores: fence before wgmma reads)."""
        dst.store((raw.to(gl.float8e4nv, bitcast=True).to(gl.float32) * scale[:, None])
                  .to(dst.dtype))

    # an FP8 entry's latent and scales: 512 + 16 bytes (d_v = 512, the only width sm90 serves)
    _PREFETCH_FP8 = gl.constexpr("{ .reg .pred p; setp.ge.s32 p, $2, 0; "
                                 "@p cp.async.bulk.prefetch.L2.global [$1], 528; mov.b32 $0, 0; }")

    @gluon.jit
    def _prefetch_rows(KV, slot, ROW_WIDTH):
        """Pull each row ``slot`` (>= 0)'s FP8 latent and scales into L2 (one bulk prefetch a row:
        no registers held, so the loads that follow wait on L2 instead of HBM)."""
        row = KV + gl.where(slot >= 0, slot, 0).to(gl.int64) * ROW_WIDTH
        gl.inline_asm_elementwise(_PREFETCH_FP8, "=r,l,r", [row, slot], dtype=gl.int32,
                                  is_pure=False, pack=1)

    @gluon.jit
    def _fp8_ready(k_ready, i: gl.constexpr, ROW0: gl.constexpr, ROWS: gl.constexpr,
                   PAIR: gl.constexpr, k_off, ready_off, BLOCK_K: gl.constexpr,
                   D_NOPE: gl.constexpr):
        """This producer's rows of half tile ``i`` are stored; in a pair they go to the partner
        too, and the ready barrier's arrival also expects the partner's rows (bytes that may
        land before or after it: the barrier's transaction count may go below zero)."""
        fence_async_shared()  # generic-proxy stores, read by wgmma and the bulk copy (async proxy)
        if PAIR:
            _barrier()
            _thread0_asm(_push_asm(i, ROW0, ROWS, BLOCK_K, D_NOPE), k_off, ready_off)
            # the partner's rows: BLOCK_K - ROWS of them, D_NOPE // 2 bf16 columns
            mbarrier.expect(k_ready.index(i), (BLOCK_K - ROWS) * (D_NOPE // 2) * 2)
        else:
            _signal(k_ready.index(i))

    @gluon.jit
    def _fp8_rounds(slot_base, k_lo, k_hi, k_nope_s, k_rope_s, k_ready, k_free, slot_s, KV,
                    ROW_WIDTH, ROW0: gl.constexpr, ROWS: gl.constexpr, PAIR: gl.constexpr,
                    k_off, ready_off):
        """The FP8 producer's loop over rows [ROW0, ROW0 + ROWS) of every tile (all 64 alone,
        one half in a pair)."""
        D_NOPE: gl.constexpr = k_nope_s.shape[2]
        BLOCK_K: gl.constexpr = k_nope_s.shape[1]
        HALF: gl.constexpr = D_NOPE // 2
        D_ROPE: gl.constexpr = k_rope_s.shape[2]
        ROPE_COL: gl.constexpr = (D_NOPE + 4 * (D_NOPE // 128)) // 2  # in bf16 units
        gl.static_assert(D_NOPE == 512, "two 128-channel scale tiles a half; 528-byte prefetches")
        # a thread loads 16 bytes of ROWS / 16 rows in each 128-channel tile
        ld8: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0])
        ld_r: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D_ROPE // 8), D_ROPE // 8], [4, 1], [1, 0])
        one: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        KV16 = KV.to(gl.pointer_type(gl.bfloat16), bitcast=True)
        k0 = k_nope_s.index(0).slice(ROW0, ROWS, 0)
        k1 = k_nope_s.index(1).slice(ROW0, ROWS, 0)
        rows0 = slot_s.slice(ROW0, ROWS)
        rows1 = slot_s.slice(BLOCK_K + ROW0, ROWS)
        rounds = gl.cdiv(gl.cdiv(k_hi - k_lo, BLOCK_K), 2)
        lane = gl.arange(0, 2 * BLOCK_K, layout=one)
        offs = k_lo + lane
        cur = gl.load(slot_base + offs, mask=offs < k_hi, other=-1)
        offs += 2 * BLOCK_K
        nxt = gl.load(slot_base + offs, mask=offs < k_hi, other=-1)
        for j in range(rounds):
            phase = (j & 1) ^ 1  # the first wait on a free barrier passes
            _barrier()  # last round's rows are read
            slot_s.store(cur)
            _barrier()
            cur = nxt
            if PAIR:  # the next round's rows this CTA loads
                mine = (lane % BLOCK_K >= ROW0) & (lane % BLOCK_K < ROW0 + ROWS)
                _prefetch_rows(KV, gl.where(mine, cur, -1), ROW_WIDTH)
            else:
                _prefetch_rows(KV, cur, ROW_WIDTH)
            offs += 2 * BLOCK_K
            nxt = gl.load(slot_base + offs, mask=offs < k_hi, other=-1)
            # 128-channel chunks, two in flight: each chunk's store is followed by the next
            # chunk's load, so loads stay in flight across the half tiles' barriers
            a, sa = _load_fp8_chunk(KV, rows0, 0, ROW_WIDTH, D_NOPE, ld8)
            b, sb = _load_fp8_chunk(KV, rows0, 128, ROW_WIDTH, D_NOPE, ld8)
            mbarrier.wait(k_free.index(0), phase)
            _store_fp8_chunk(k0.slice(0, 128, 1), a, sa)
            a, sa = _load_fp8_chunk(KV, rows1, HALF, ROW_WIDTH, D_NOPE, ld8)
            _store_fp8_chunk(k0.slice(128, 128, 1), b, sb)
            b, sb = _load_fp8_chunk(KV, rows1, HALF + 128, ROW_WIDTH, D_NOPE, ld8)
            _fp8_ready(k_ready, 0, ROW0, ROWS, PAIR, k_off, ready_off, BLOCK_K, D_NOPE)
            mbarrier.wait(k_free.index(3), phase)
            _copy_rows(KV16, slot_s.slice(BLOCK_K, BLOCK_K), k_rope_s.index(1), ROPE_COL,
                       ROW_WIDTH // 2, D_ROPE, ld_r)
            async_copy.mbarrier_arrive(k_ready.index(3), increment_count=False)
            _store_fp8_chunk(k1.slice(HALF, 128, 1), a, sa)
            a, sa = _load_fp8_chunk(KV, rows0, HALF, ROW_WIDTH, D_NOPE, ld8)
            _store_fp8_chunk(k1.slice(HALF + 128, 128, 1), b, sb)
            b, sb = _load_fp8_chunk(KV, rows0, HALF + 128, ROW_WIDTH, D_NOPE, ld8)
            _fp8_ready(k_ready, 3, ROW0, ROWS, PAIR, k_off, ready_off, BLOCK_K, D_NOPE)
            mbarrier.wait(k_free.index(1), phase)
            _copy_rows(KV16, slot_s.slice(0, BLOCK_K), k_rope_s.index(0), ROPE_COL,
                       ROW_WIDTH // 2, D_ROPE, ld_r)
            async_copy.mbarrier_arrive(k_ready.index(1), increment_count=False)
            _store_fp8_chunk(k0.slice(HALF, 128, 1), a, sa)
            a, sa = _load_fp8_chunk(KV, rows1, 0, ROW_WIDTH, D_NOPE, ld8)
            _store_fp8_chunk(k0.slice(HALF + 128, 128, 1), b, sb)
            b, sb = _load_fp8_chunk(KV, rows1, 128, ROW_WIDTH, D_NOPE, ld8)
            _fp8_ready(k_ready, 1, ROW0, ROWS, PAIR, k_off, ready_off, BLOCK_K, D_NOPE)
            mbarrier.wait(k_free.index(2), phase)
            _store_fp8_chunk(k1.slice(0, 128, 1), a, sa)
            _store_fp8_chunk(k1.slice(128, 128, 1), b, sb)
            _fp8_ready(k_ready, 2, ROW0, ROWS, PAIR, k_off, ready_off, BLOCK_K, D_NOPE)

    @gluon.jit
    def _producer_fp8(ctx, PAIR: gl.constexpr):
        """The FP8 cache's producer: the same four half tiles in the same order as ``_producer``,
        but the FP8 latent goes through registers, in 128-channel chunks (8 KB, one scale tile),
        two in flight: a chunk is scaled to bf16 and stored once its buffer is free, and the next
        chunk's load is issued behind each store (1.05x over loading a whole half, then storing
        it: H200, B=64 / 128, BENCHMARKS.md session 13). The rope rows (bf16 in the entry) still
        go by cp.async. A half's barrier completes on one arrival after the stores plus, for the
        right halves, one cp.async arrival a thread. In a cluster pair each CTA loads half of
        the rows (its rank's) and the arrival after the stores also expects the partner's."""
        (SLOT, OUT, LSE, slot_base, o_base, l_base, h0, H, stride_oh, k_lo, k_hi, scale_log2,
         q_nope_s, q_rope_s, k_nope_s, k_rope_s, s1_s, m_s, l_s, k_ready, k_free, xbar,
         slot_s, KV, ROW_WIDTH, k_off, ready_off, free_off) = ctx
        BLOCK_K: gl.constexpr = k_nope_s.shape[1]
        BLOCK_H: gl.constexpr = q_nope_s.shape[1]
        if PAIR:
            _cluster_sync()
            if (h0 // BLOCK_H) % 2 == 0:  # the CTA's rank in its cluster
                _fp8_rounds(slot_base, k_lo, k_hi, k_nope_s, k_rope_s, k_ready, k_free, slot_s, KV,
                            ROW_WIDTH, 0, BLOCK_K // 2, PAIR, k_off, ready_off)
            else:
                _fp8_rounds(slot_base, k_lo, k_hi, k_nope_s, k_rope_s, k_ready, k_free, slot_s, KV,
                            ROW_WIDTH, BLOCK_K // 2, BLOCK_K // 2, PAIR, k_off, ready_off)
            _cluster_sync()
        else:
            _fp8_rounds(slot_base, k_lo, k_hi, k_nope_s, k_rope_s, k_ready, k_free, slot_s, KV,
                        ROW_WIDTH, 0, BLOCK_K, PAIR, k_off, ready_off)

    # the partitions' entries, which bind PAIR (see the cluster pair's note above)
    @gluon.jit
    def _wg0_solo(ctx):
        _wg0(ctx, False)

    @gluon.jit
    def _wg0_paired(ctx):
        _wg0(ctx, True)

    @gluon.jit
    def _wg1_solo(ctx):
        _wg1(ctx, False)

    @gluon.jit
    def _wg1_paired(ctx):
        _wg1(ctx, True)

    @gluon.jit
    def _producer_fp8_solo(ctx):
        _producer_fp8(ctx, False)

    @gluon.jit
    def _producer_fp8_paired(ctx):
        _producer_fp8(ctx, True)

    @gluon.jit
    def _sparse_mla_fwd_sm90(
        Q, KV, SLOT, OUT, LSE,
        stride_qt, stride_qh, stride_os, stride_ot, stride_oh,
        stride_ls, stride_lt,
        H, K, k_per_split, scale_log2,
        D_NOPE: gl.constexpr, D_ROPE: gl.constexpr, BLOCK_H: gl.constexpr,
        BLOCK_K: gl.constexpr, ROW_WIDTH: gl.constexpr, KV_FP8: gl.constexpr,
        PAIR: gl.constexpr, K_OFF: gl.constexpr, READY_OFF: gl.constexpr, FREE_OFF: gl.constexpr,
    ):
        gl.static_assert(BLOCK_H == 64, "one warpgroup M of heads")
        gl.static_assert(BLOCK_K == D_ROPE, "P0 reuses the rope rows of a KV tile")
        gl.static_assert(gl.num_warps() == 4, "the default partition is one warpgroup")
        gl.static_assert(KV_FP8 or not PAIR, "the cluster pair splits the FP8 dequantization")
        dtype: gl.constexpr = Q.dtype.element_ty
        sl: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        # the head blocks of one token are neighbours in launch order (their gathers meet in L2);
        # the token index rides on grid axis 0, which has no 65535 limit
        n_hb = gl.cdiv(H, BLOCK_H)
        t = gl.program_id(0) // n_hb
        h0 = (gl.program_id(0) % n_hb) * BLOCK_H
        split = gl.program_id(1)

        q_nope_s = gl.allocate_shared_memory(dtype, [1, BLOCK_H, D_NOPE], sl)
        q_rope_s = gl.allocate_shared_memory(dtype, [1, BLOCK_H, D_ROPE], sl)
        k_nope_s = gl.allocate_shared_memory(dtype, [2, BLOCK_K, D_NOPE], sl)
        k_rope_s = gl.allocate_shared_memory(dtype, [2, BLOCK_K, D_ROPE], sl)
        s1_s = gl.allocate_shared_memory(dtype, [1, BLOCK_H, BLOCK_K], sl)
        vec_sl: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        m_s = gl.allocate_shared_memory(gl.float32, [BLOCK_H], vec_sl)
        l_s = gl.allocate_shared_memory(gl.float32, [2 * BLOCK_H], vec_sl)
        slot_s = gl.allocate_shared_memory(gl.int32, [2 * BLOCK_K], vec_sl)
        k_ready = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
        k_free = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
        # the consumers' hand-offs, then (6) the queries' arrival
        xbar = gl.allocate_shared_memory(gl.int64, [7, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(4):
            if KV_FP8:  # one arrival after the stores; the right halves + one a thread (rope)
                mbarrier.init(k_ready.index(i), count=1 + 128 * (i % 2))
            else:
                mbarrier.init(k_ready.index(i), count=128)  # one cp.async arrival a producer thread
            if PAIR:  # both CTAs' consumers free a half tile: the partner's producer writes it too
                mbarrier.init(k_free.index(i), count=2)
            else:
                mbarrier.init(k_free.index(i), count=1)
        for i in gl.static_range(6):
            mbarrier.init(xbar.index(i), count=1)
        mbarrier.init(xbar.index(6), count=128)  # one cp.async arrival a thread of this warpgroup
        if PAIR:  # the inits are visible to the partner after the partitions' first cluster sync
            _per_thread_asm(_PAIR_GUARD_ASM)
            _per_thread_asm(_MBARRIER_INIT_FENCE_ASM)

        # queries into shared memory, resident for the whole loop; the consumers wait for them on
        # an mbarrier, so the producer's first gathers are issued without waiting for them
        # (bit-identical; within 0.5% in decode, H200 session 14)
        q_base = Q + t.to(gl.int64) * stride_qt
        ld: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])
        h_n = h0 + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, ld))
        for c in gl.static_range(D_NOPE // 256):
            d_n = c * 256 + gl.arange(0, 256, layout=gl.SliceLayout(0, ld))
            _async_load(q_nope_s.index(0).slice(c * 256, 256, 1),
                        q_base + h_n[:, None] * stride_qh + d_n[None, :], mask=(h_n < H)[:, None])
        ld_r: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D_ROPE // 8), D_ROPE // 8], [4, 1], [1, 0])
        h_r = h0 + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, ld_r))
        d_r = gl.arange(0, D_ROPE, layout=gl.SliceLayout(0, ld_r))
        _async_load(q_rope_s.index(0), q_base + h_r[:, None] * stride_qh + D_NOPE + d_r[None, :],
                    mask=(h_r < H)[:, None])
        async_copy.mbarrier_arrive(xbar.index(6), increment_count=False)
        _barrier()

        k_lo = split * k_per_split
        k_hi = gl.minimum(k_lo + k_per_split, K)
        slot_base = SLOT + t.to(gl.int64) * K
        o_base = split * stride_os + t.to(gl.int64) * stride_ot
        l_base = split * stride_ls + t.to(gl.int64) * stride_lt
        # one tuple: the partitions unpack it (the offsets arrive as runtime values)
        args = ((SLOT, OUT, LSE, slot_base, o_base, l_base, h0, H, stride_oh, k_lo, k_hi, scale_log2,
                 q_nope_s, q_rope_s, k_nope_s, k_rope_s, s1_s, m_s, l_s, k_ready, k_free, xbar,
                 slot_s, KV, ROW_WIDTH, K_OFF, READY_OFF, FREE_OFF),)
        if PAIR:
            gl.warp_specialize([
                (_wg0_paired, args),
                (_wg1_paired, args),
                (_producer_fp8_paired, args),
            ], [4, 4], [FP8_WG_REGS, FP8_PRODUCER_REGS])
        elif KV_FP8:
            gl.warp_specialize([
                (_wg0_solo, args),
                (_wg1_solo, args),
                (_producer_fp8_solo, args),
            ], [4, 4], [FP8_WG_REGS, FP8_PRODUCER_REGS])
        else:
            gl.warp_specialize([
                (_wg0_solo, args),
                (_wg1_solo, args),
                (_producer, args),
            ], [4, 4], [WG_REGS, PRODUCER_REGS])


KERNEL_REGS = 168  # x 384 threads = the register file; the partitions' shares are set above

PAIR_ENV = "DSA_MLA_PAIR"
# the allocations the cluster pair's inline PTX addresses: constexpr -> the kernel's name for it
PAIR_ALLOCS = {"K_OFF": "k_nope_s", "READY_OFF": "k_ready", "FREE_OFF": "k_free"}


def pair_enabled() -> bool:
    """Whether FP8-cache launches with an even number of 64-head blocks a token run as cluster
    pairs (``DSA_MLA_PAIR``, on unless ``0``): bit-identical to solo CTAs, and 1.12x faster at
    B = 64 and 128 on an H100 (BENCHMARKS.md, session 20)."""
    return os.environ.get(PAIR_ENV, "1") != "0"


_PAIR_OFFSETS: dict = {}


def _pair_consts(args, consts) -> dict:
    """The pair kernel's offset constexprs for these constexprs: from a compile with placeholder
    offsets (inline PTX does not change the allocation), cached."""
    key = tuple(sorted(consts.items()))
    if key not in _PAIR_OFFSETS:
        probe = dict(consts, **{c: 0 for c in PAIR_ALLOCS})
        found = cluster.smem_offsets(cluster.compiled(
            _sparse_mla_fwd_sm90, args, dict(probe, num_warps=4, maxnreg=KERNEL_REGS)))
        missing = [n for n in PAIR_ALLOCS.values() if n not in found]
        if missing:
            raise RuntimeError(f"sparse MLA cluster pair: no shared-memory offset found for "
                               f"{missing} in the compiled kernel (found {sorted(found)})")
        _PAIR_OFFSETS[key] = {c: found[n] for c, n in PAIR_ALLOCS.items()}
    return dict(consts, **_PAIR_OFFSETS[key])


def check_pair_offsets(kernel, consts) -> None:
    """Raise unless the compiled pair kernel's allocation puts k_nope_s, k_ready and k_free at
    the offsets its PTX was built with (``consts``' K_OFF, READY_OFF, FREE_OFF)."""
    found = cluster.smem_offsets(kernel)
    wrong = {c: (consts[c], found.get(n)) for c, n in PAIR_ALLOCS.items() if found.get(n) != consts[c]}
    if wrong:
        raise RuntimeError(f"sparse MLA cluster pair: shared-memory offsets (built, allocated) "
                           f"differ: {wrong}")


def launch(q, kv, slots, out, lse, h, k, k_per_split, scale_log2, d_v, d_rope, splits):
    """Launch over (token x head block, split); ``k`` > 0 (the caller routes k = 0 elsewhere).
    FP8-cache launches with an even number of head blocks a token run as cluster pairs where
    ``pair_enabled()``."""
    t = q.shape[0]
    head_blocks = triton.cdiv(h, 64)
    args = (q, kv, slots, out, lse, q.stride(0), q.stride(1),
            out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
            h, k, k_per_split, scale_log2)
    fp8 = kv.dtype == torch.uint8
    consts = dict(D_NOPE=d_v, D_ROPE=d_rope, BLOCK_H=64, BLOCK_K=64, ROW_WIDTH=kv.shape[-1],
                  KV_FP8=fp8, PAIR=fp8 and head_blocks % 2 == 0 and pair_enabled())
    if consts["PAIR"]:  # the two head blocks of a token (neighbours on axis 0): one cluster
        with torch.cuda.device(q.device):
            consts = _pair_consts(args, consts)
        cluster.launch(_sparse_mla_fwd_sm90, (t * head_blocks, splits), 2, args,
                       dict(consts, num_warps=4, maxnreg=KERNEL_REGS),
                       check=lambda kernel: check_pair_offsets(kernel, consts))
        return
    consts.update({c: 0 for c in PAIR_ALLOCS})
    _sparse_mla_fwd_sm90[(t * head_blocks, splits)](*args, **consts, num_warps=4,
                                                     maxnreg=KERNEL_REGS)
