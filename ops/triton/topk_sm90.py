"""The top-k select's passes 1 and 2 (``topk._hi_hist_kernel`` with warp-aggregated atomics,
``topk._compact_kernel``) and its one-program-a-row select for short rows
(``topk._resident_kernel``) in Gluon, for GPUs.

The Triton kernel loads a chunk's scores as 16-byte vectors (4 keys a thread), but its masked
scatter stores get a one-key-a-thread layout from the compiler, so every store's 64-bit
pointers, values and masks go through shared memory first (six layout conversions, three of
them of pointer tensors). Here one explicit layout ([4] keys a thread, 32 lanes, WARPS warps)
serves the load, the compares, the reduction, the scan and the scatter stores, so nothing is
converted: 528 instead of 640 instructions a thread at 4 warps (Triton 3.6, sm90,
``tools/kernel_sass.py``), 1.6-2.1 warp-instructions a key at 1-4 warps against 2.5.
H200, same process, the indexer's decode scores at 128K (BENCHMARKS.md session 11): B=32
18.5 -> 14.2 us, B=64 35.2 -> 26.9, B=128 68.6 -> 52.6; 512 bunched rows of 64K-128K 208 -> 158
us. 4 warps a 1024-key chunk: 2 and 8 were slower at every size measured but 1 x 128K
(8 warps: 2.1 against 2.3 us). Pass 1 the same way: 728 -> 648 instructions with the
in-program window (most of them are the window's histogram), 312 -> 224 without; H200, 512
bunched rows 209.6 -> 194.2 us, 1024 x 32K N(0, 1) 158.7 -> 143.6, 64 x 32K 21.3 -> 16.6.

The one-program-a-row select gives each thread contiguous keys, so its rank scan runs along a
thread, then the lanes, then the warps: 2392 instructions a thread at 32K keys on 32 warps
against the Triton kernel's 4120 (and 155 spill stores there); H200, 132 x 16K 29.8 -> 28.4
us, 1024 x 32K 483 -> 377 (BENCHMARKS.md session 12). Up to 32 keys a thread, a 2-D form keeps
the keys' low bits packed in one register a thread instead of reloading the row for them: 2088
instructions at 32K on 32 warps; 64 x 32K 46.8 -> 38.6 us, 1024 x 32K 376 -> 287 (session 13).
The radix form (``_radix_kernel_gl``, the default where it runs: ``topk.RADIX_DEFAULT``) finds
the k-th key by three shared-memory histogram passes instead of 31 bisection steps: about 1700
instructions run a thread against 4900, 21 barriers against 93; H100, 64 x 32K 40.4 -> 23.6 us,
1024 x 32K 297 -> 152 (session 17). Its cluster form (``CLUSTER`` > 1, ``topk.topk_cluster``,
opt-in: ``DSA_TOPK_CLUSTER=1``) splits a row of up to 256K keys over a thread-block cluster of
2-8 CTAs, 16K or 32K keys each: each pass's bins are summed over the cluster through
distributed shared memory (``ld.shared::cluster``), so every CTA picks the same digit, and each
writes its picks after the lower ranks' (their counts, exchanged the same way). One launch in
place of the multi-program select's five. Written without a GPU (session 18), checked on an
H100 (session 20): faster than the multi-program select alone, slower inside the decode op
(``topk.CLUSTER_DEFAULT`` says by how much), so it stays opt-in.

Gluon has no interpreter: on a CPU (and without Gluon) ``topk_multi`` runs the Triton kernels;
both forms write the same histograms, counts, lists and candidate sets (the candidates' order in their buffer
depends on the order programs run in either way, and nothing downstream depends on it).
"""

from __future__ import annotations

import os

import torch

import triton
import triton.language as tl

from . import cluster
from .pdl import launch_opts

# PTX for each lane: how many lanes of its warp hold the same value, on the lowest such lane, else
# 0 (match.any; the warp-aggregated atomics of CUB's histograms). Used by the Triton and the
# Gluon pass 1 alike (an inline-asm string must be a constexpr to be read inside a kernel).
WARP_GROUP_COUNT_ASM = tl.constexpr("""{
    .reg .b32 m, lt, lo;
    .reg .pred p;
    match.any.sync.b32 m, $1, -1;
    mov.u32 lt, %lanemask_lt;
    and.b32 lo, m, lt;
    setp.eq.u32 p, lo, 0;
    popc.b32 $0, m;
    @!p mov.u32 $0, 0;
    }""")

try:  # Gluon ships with Triton >= 3.5
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    # a CTA barrier: gl.barrier from Triton 3.7, gl.thread_barrier before
    _barrier_gl = getattr(gl, "thread_barrier", None) or gl.barrier
    _GLUON = True
except ImportError:  # pragma: no cover - depends on the Triton build
    _GLUON = False


def available(scores: torch.Tensor) -> bool:
    """Whether the Gluon kernels can run on ``scores``: a CUDA tensor, Gluon, no interpreter."""
    if not _GLUON or scores.device.type != "cuda":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    return torch.cuda.get_device_capability(scores.device)[0] >= 8


if _GLUON:
    @gluon.jit
    def _add(a, b):
        return a + b

    @gluon.jit
    def _or(a, b):
        return a | b

    @gluon.jit
    def _sortable_gl(x):
        """``topk._sortable``: order-preserving uint32 keys of float32 scores."""
        x = gl.where(x == 0.0, 0.0, x)  # -0.0 and +0.0: one key
        bits = x.to(gl.uint32, bitcast=True)
        return gl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)

    @gluon.jit
    def _chunk_digits(S, r, stride_s, offs, n_cols, HI: gl.constexpr):
        """A chunk's scores and the top HI bits of their sortable keys (``topk._sortable``),
        loaded as 16-byte vectors: masked by the buffer's width ``n_cols``, not the row's length
        (the callers drop keys past the row)."""
        x = gl.load(S + r.to(gl.int64) * stride_s + offs, mask=offs < n_cols, other=float("-inf"))
        return x, (_sortable_gl(x) >> (32 - HI)).to(gl.int32)

    @gluon.jit
    def _grid_dep_gl(PDL: gl.constexpr):
        """``pdl.grid_dep`` in Gluon: wait for the previous kernel (PDL >= 1), then release the
        next (PDL == 2)."""
        if PDL >= 1:
            gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32,
                                      is_pure=False, pack=1)
        if PDL >= 2:
            gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [],
                                      dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _compact_kernel_gl(S, LEN, SEL, COUNTS, NCAND, CAND_S, CAND_P, NSEL, SEL_P, stride_s,
                           stride_c, n_chunks, HI: gl.constexpr, CHUNK: gl.constexpr,
                           WARPS: gl.constexpr, PDL: gl.constexpr):
        """``topk._compact_kernel``, every tensor in one layout (see the module docstring)."""
        _grid_dep_gl(PDL)
        layout: gl.constexpr = gl.BlockedLayout([4], [32], [WARPS], [0])
        r = gl.program_id(0)
        c = gl.program_id(1)
        start = c * CHUNK
        row_len = gl.load(LEN + r)
        if start < row_len:
            chosen = gl.load(SEL + 2 * r)
            offs = start + gl.arange(0, CHUNK, layout=layout)
            inb = offs < row_len
            x, digit = _chunk_digits(S, r, stride_s, offs, stride_c, HI)
            above = inb & (digit > chosen)
            cand = inb & (digit == chosen)
            keep = above | cand
            # keys above in the low 16 bits, candidates above them (CHUNK <= 16384)
            both = gl.sum(above.to(gl.int32) + (cand.to(gl.int32) << 16), 0)
            n_above = both & 0xFFFF
            n = both >> 16
            gl.store(COUNTS + (r * n_chunks + c) * 2, n_above)
            gl.store(NSEL + r * n_chunks + c, n_above + n)
            if n_above + n > 0:
                rank = gl.associative_scan(keep.to(gl.int32) + (cand.to(gl.int32) << 16), 0, _add)
                gl.store(SEL_P + r.to(gl.int64) * stride_c + start + (rank & 0xFFFF) - 1, offs,
                         mask=keep)
                if n > 0:
                    slot = gl.atomic_add(NCAND + r, n, sem="relaxed") + (rank >> 16) - 1
                    gl.store(CAND_S + r.to(gl.int64) * stride_c + slot, x, mask=cand)
                    gl.store(CAND_P + r.to(gl.int64) * stride_c + slot, offs, mask=cand)

    @gluon.jit
    def _warp_group_count_gl(digit):
        """``topk._warp_group_count``: per element index, the lanes of a warp holding the same
        digit, counted on the lowest of them (0 on the others)."""
        return gl.inline_asm_elementwise(WARP_GROUP_COUNT_ASM, "=r,r", [digit], dtype=gl.int32,
                                         is_pure=True, pack=1)

    @gluon.jit
    def _hi_hist_kernel_gl(S, LEN, HIST, stride_s, n_cols, HI: gl.constexpr, CHUNK: gl.constexpr,
                           SPLIT: gl.constexpr, WINDOW: gl.constexpr, WARPS: gl.constexpr,
                           PDL: gl.constexpr):
        """``topk._hi_hist_kernel`` with warp-aggregated atomics, in one layout."""
        _grid_dep_gl(PDL)
        layout: gl.constexpr = gl.BlockedLayout([4], [32], [WARPS], [0])
        bins_layout: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
        r = gl.program_id(0)
        c = gl.program_id(1)
        start = c * CHUNK
        row_len = gl.load(LEN + r)
        if start < row_len:
            offs = start + gl.arange(0, CHUNK, layout=layout)
            inb = offs < row_len
            _, digit = _chunk_digits(S, r, stride_s, offs, n_cols, HI)
            hist = HIST + (r * SPLIT + c % SPLIT) * (1 << HI)
            rest = inb
            if WINDOW > 0:
                lo = gl.min(gl.where(inb, digit, 1 << HI), 0)
                near = inb & (digit - lo < WINDOW)
                counts = gl.histogram(digit - lo, WINDOW, mask=near, layout=bins_layout)
                bins = gl.arange(0, WINDOW, layout=bins_layout)
                gl.atomic_add(hist + lo + bins, counts, mask=counts > 0, sem="relaxed")
                rest = inb & ~near
            n = _warp_group_count_gl(gl.where(rest, digit, -1))
            gl.atomic_add(hist + digit, n, mask=rest & (n > 0), sem="relaxed")


    @gluon.jit
    def _resident_kernel_gl(S, LEN, OUT, VALS, stride_s, stride_o, n_cols, k,
                            BLOCK: gl.constexpr, KPAD: gl.constexpr, WITH_VALS: gl.constexpr,
                            WARPS: gl.constexpr):
        """``topk._resident_kernel`` with each thread's keys contiguous (BLOCK / (32 WARPS) of
        them): the rank scan is one run a thread, then the lanes, then the warps."""
        layout: gl.constexpr = gl.BlockedLayout([BLOCK // (32 * WARPS)], [32], [WARPS], [0])
        pad_layout: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
        r = gl.program_id(0)
        row_len = gl.minimum(gl.load(LEN + r), n_cols)
        kk = gl.minimum(k, row_len)
        offs = gl.arange(0, BLOCK, layout=layout)
        inb = offs < row_len
        row = S + r.to(gl.int64) * stride_s
        x = gl.load(row + offs, mask=offs < n_cols, other=float("-inf"))
        hi = gl.where(inb, _sortable_gl(x) >> 1, 0).to(gl.int32)
        t_hi = r * 0
        for i in range(31):
            cand = t_hi | (1 << (30 - i))
            sign = gl.inline_asm_elementwise(
                "{ .reg .s32 d; sub.s32 d, $1, $2; shr.u32 $0, d, 31; }", "=r,r,r",
                [hi, gl.full([BLOCK], 0, gl.int32, layout) + cand], dtype=gl.int32,
                is_pure=True, pack=1)
            t_hi = gl.where(BLOCK - gl.sum(sign, 0) >= kk, cand, t_hi)
        x = gl.load(row + offs, mask=offs < n_cols, other=float("-inf"), volatile=True)
        key = gl.where(inb, _sortable_gl(x), 0)
        lo = t_hi.to(gl.uint32, bitcast=True) << 1
        # bit 0 and the count of keys > T from one reduction: keys >= lo | 1 (low 16 bits),
        # keys > lo | 1 (high 16 bits); keys > lo are keys >= lo | 1
        both = gl.sum((key >= (lo | 1)).to(gl.int32) + ((key > (lo | 1)).to(gl.int32) << 16), 0)
        up = (both & 0xFFFF) >= kk
        thresh = gl.where(up, lo | 1, lo)
        n_gt = gl.where(up, (both >> 16) & 0xFFFF, both & 0xFFFF)
        gt = key > thresh
        eq = (key == thresh) & inb
        rank = gl.associative_scan(gt.to(gl.int32) + (eq.to(gl.int32) << 16), 0, _add)
        r_eq = (rank >> 16) & 0xFFFF
        take = eq & (r_eq <= kk - n_gt)
        at = gl.where(gt, (rank & 0xFFFF) - 1, n_gt + r_eq - 1)
        out = OUT + r.to(gl.int64) * stride_o
        gl.store(out + at, gl.where(x == float("-inf"), -1, offs), mask=gt | take)
        pad = gl.arange(0, KPAD, layout=pad_layout)
        gl.store(out + pad, gl.full([KPAD], -1, gl.int32, pad_layout), mask=(pad >= kk) & (pad < k))
        if WITH_VALS:
            vals = VALS + r.to(gl.int64) * stride_o
            gl.store(vals + at, x, mask=gt | take)
            gl.store(vals + pad, gl.full([KPAD], float("-inf"), gl.float32, pad_layout),
                     mask=(pad >= kk) & (pad < k))


    @gluon.jit
    def _resident2d_kernel_gl(S, LEN, OUT, VALS, stride_s, stride_o, n_cols, k,
                              BLOCK: gl.constexpr, KPAD: gl.constexpr, WITH_VALS: gl.constexpr,
                              WARPS: gl.constexpr):
        """``_resident_kernel_gl`` without its reload of the row, for at most 32 keys a thread:
        the keys sit in a [threads, E] tensor whose rows are threads, and their low bits are
        packed into one register a thread (bit c of the word: key c's bit 0), so the bit-0 step
        and the write rebuild the full keys from registers. The rank scan runs along axis 1 in
        the thread, then over the threads' totals. The scores (WITH_VALS) are re-read for the
        selected keys only."""
        E: gl.constexpr = BLOCK // (32 * WARPS)
        T: gl.constexpr = 32 * WARPS
        gl.static_assert(E <= 32, "the low bits of a thread's keys fill one 32-bit word")
        l2: gl.constexpr = gl.BlockedLayout([1, E], [32, 1], [WARPS, 1], [1, 0])
        pad_layout: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
        tid = gl.arange(0, T, layout=gl.SliceLayout(1, l2))
        col = gl.expand_dims(gl.arange(0, E, layout=gl.SliceLayout(0, l2)), 0)
        offs = gl.expand_dims(tid, 1) * E + col
        r = gl.program_id(0)
        row_len = gl.minimum(gl.load(LEN + r), n_cols)
        kk = gl.minimum(k, row_len)
        inb = offs < row_len
        row = S + r.to(gl.int64) * stride_s
        x = gl.load(row + offs, mask=offs < n_cols, other=float("-inf"))
        key = gl.where(inb, _sortable_gl(x), 0)
        hi = (key >> 1).to(gl.int32)
        low = gl.sum(((key & 1) << col.to(gl.uint32)).to(gl.int32), 1)  # disjoint bits: a sum is an or
        t_hi = r * 0
        for i in range(31):
            cand = t_hi | (1 << (30 - i))
            sign = gl.inline_asm_elementwise(
                "{ .reg .s32 d; sub.s32 d, $1, $2; shr.u32 $0, d, 31; }", "=r,r,r",
                [hi, gl.full([T, E], 0, gl.int32, l2) + cand], dtype=gl.int32, is_pure=True, pack=1)
            t_hi = gl.where(BLOCK - gl.sum(gl.sum(sign, 1), 0) >= kk, cand, t_hi)
        key = (hi.to(gl.uint32, bitcast=True) << 1) | ((gl.expand_dims(low, 1) >> col) & 1).to(gl.uint32)
        lo = t_hi.to(gl.uint32, bitcast=True) << 1
        both = gl.sum(gl.sum((key >= (lo | 1)).to(gl.int32) + ((key > (lo | 1)).to(gl.int32) << 16), 1), 0)
        up = (both & 0xFFFF) >= kk
        thresh = gl.where(up, lo | 1, lo)
        n_gt = gl.where(up, (both >> 16) & 0xFFFF, both & 0xFFFF)
        gt = key > thresh
        eq = (key == thresh) & inb
        v = gt.to(gl.int32) + (eq.to(gl.int32) << 16)
        tot = gl.convert_layout(gl.sum(v, 1), pad_layout)  # one value a thread in both layouts
        before = gl.convert_layout(gl.associative_scan(tot, 0, _add) - tot, gl.SliceLayout(1, l2))
        rank = gl.associative_scan(v, 1, _add) + gl.expand_dims(before, 1)
        r_eq = (rank >> 16) & 0xFFFF
        take = eq & (r_eq <= kk - n_gt)
        at = gl.where(gt, (rank & 0xFFFF) - 1, n_gt + r_eq - 1)
        out = OUT + r.to(gl.int64) * stride_o
        # a -inf score's key is 0x007FFFFF (_sortable_gl): such picks are written as -1
        gl.store(out + at, gl.where(key == 0x007FFFFF, -1, offs), mask=gt | take)
        pad = gl.arange(0, KPAD, layout=pad_layout)
        gl.store(out + pad, gl.full([KPAD], -1, gl.int32, pad_layout), mask=(pad >= kk) & (pad < k))
        if WITH_VALS:
            vals = VALS + r.to(gl.int64) * stride_o
            sel = gt | take
            gl.store(vals + at, gl.load(row + offs, mask=sel, other=0.0), mask=sel)
            gl.store(vals + pad, gl.full([KPAD], float("-inf"), gl.float32, pad_layout),
                     mask=(pad >= kk) & (pad < k))


    # PTX for each key: add 1 to the int32 bin at byte offset 4 * $1 of the kernel's shared
    # memory (Gluon 3.6 has no shared-memory atomics; ptxas makes it ATOMS.POPC.INC, which
    # adds a warp's increments of one address at once). The bins are the kernel's first
    # allocation, which Triton places at offset 0 of global_smem: ``tools/kernel_sass.py``
    # checks that in the PTX of every preset that uses this.
    _RED_SHARED_ASM = gl.constexpr("""{
        .reg .u32 a;
        mov.u32 a, global_smem;
        mad.lo.u32 a, $1, 4, a;
        red.shared.add.u32 [a], 1;
        mov.b32 $0, 0;
        }""")

    # The cluster form (``CLUSTER`` CTAs a row, one block of keys each, launched by
    # ``cluster.launch``): PTX for the int32 at word $1 of the shared memory of the cluster's
    # CTA $2 (its bins: they start at global_smem + 0 in every CTA)
    _LD_CLUSTER_ASM = gl.constexpr("""{
        .reg .u32 a;
        mov.u32 a, global_smem;
        mad.lo.u32 a, $1, 4, a;
        mapa.shared::cluster.u32 a, a, $2;
        ld.shared::cluster.u32 $0, [a];
        }""")
    # PTX: thread 0 ($1 == 0) stores $2 at word $3 of this CTA's shared memory
    _ST_WORD_ASM = gl.constexpr("""{
        .reg .u32 a;
        .reg .pred p;
        setp.eq.s32 p, $1, 0;
        mov.u32 a, global_smem;
        mad.lo.u32 a, $3, 4, a;
        @p st.shared.u32 [a], $2;
        mov.b32 $0, 0;
        }""")
    _CLUSTER_SYNC_ASM = gl.constexpr(cluster.SYNC_PTX)

    @gluon.constexpr_function
    def _cluster_guard_asm(size):
        """PTX: trap (a launch error) unless the CTA runs in a cluster of ``size`` CTAs, as the
        MLA pair's guard does: a cluster kernel launched without its cluster would read other
        CTAs' shared memory at ranks that do not exist."""
        return ("{ .reg .b32 n; .reg .pred p; mov.u32 n, %cluster_nctarank; "
                f"setp.ne.u32 p, n, {size}; @p trap; mov.b32 $0, 0; }}")

    # PTX for each thread: write its selected keys, in position order, from bit masks of its E
    # keys (bit e: the key at position $6 + e): the keys above T ($1) at slots $3, $3 + 1, ...,
    # then the keys equal to T ($2) at slots $4, $4 + 1, ... while the slot is below $5 (kk),
    # into the output row at $9. A slot takes the position, or -1 where the score is -inf
    # ($8 != 0: T is at or below -inf's key, so a pick may be -inf; the score is read back from
    # the scores' row at $7 for that); with the scores, each pick's score, read back, goes to
    # the row at $10. The loops run as many times as the lane with the most picks (2 of 32
    # keys a thread on average at k = 2048 of 32K).
    _WRITE_PICKS_ASM = """{
        .reg .pred p, q;
        .reg .b32 m, t, e, pos, idx, slot, lim, v;
        .reg .b64 a, o;
        mov.b32 m, $1;
        mov.b32 slot, $3;
        mov.b32 lim, $5;
    $$L_gt_${:uid}:
        setp.eq.b32 p, m, 0;
        @p bra $$L_eq0_${:uid};
        BODY
        bra $$L_gt_${:uid};
    $$L_eq0_${:uid}:
        mov.b32 m, $2;
        mov.b32 slot, $4;
    $$L_eq_${:uid}:
        setp.eq.b32 p, m, 0;
        setp.ge.u32 q, slot, lim;
        or.pred p, p, q;
        @p bra $$L_end_${:uid};
        BODY
        bra $$L_eq_${:uid};
    $$L_end_${:uid}:
        mov.b32 $0, 0;
        }"""
    _WRITE_BODY = """neg.s32 t, m;
        and.b32 t, t, m;
        xor.b32 m, m, t;
        bfind.u32 e, t;
        add.u32 pos, $6, e;
        mov.b32 idx, pos;
        mul.wide.u32 o, pos, 4;
        add.u64 a, $7, o;
        setp.ne.b32 q, $8, 0;
        LOADV
        mul.wide.u32 o, slot, 4;
        add.u64 a, $9, o;
        st.global.b32 [a], idx;
        STOREV
        add.u32 slot, slot, 1;"""

    def _write_picks_asm(with_vals):
        if with_vals:  # the score is read for every pick
            load = """ld.global.b32 v, [a];
        setp.eq.and.b32 q, v, 0xFF800000, q;
        @q mov.b32 idx, -1;"""
            store = """add.u64 a, $10, o;
        st.global.b32 [a], v;"""
        else:  # only where a pick may be -inf
            load = """@q ld.global.b32 v, [a];
        @q setp.eq.b32 q, v, 0xFF800000;
        @q mov.b32 idx, -1;"""
            store = ""
        body = _WRITE_BODY.replace("LOADV", load).replace("STOREV", store)
        return gl.constexpr(_WRITE_PICKS_ASM.replace("BODY", body))

    _WRITE_PICKS_IDX_ASM = _write_picks_asm(False)
    _WRITE_PICKS_VALS_ASM = _write_picks_asm(True)

    @gluon.jit
    def _count_digits(off):
        """One shared-memory increment a key, at bin ``off``."""
        gl.inline_asm_elementwise(_RED_SHARED_ASM, "=r,r", [off], dtype=gl.int32, is_pure=False,
                                  pack=1)

    @gluon.jit
    def _popc(m):
        return gl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [m], dtype=gl.int32,
                                         is_pure=True, pack=1)

    @gluon.constexpr_function
    def _next_pow2(n):
        return triton.next_power_of_2(n)

    @gluon.jit
    def _warp_rows_scan(v, REVERSE: gl.constexpr, WARPS: gl.constexpr):
        """Inclusive scan of a [WARPS, N] int32 tensor whose row w lies in warp w, over its
        row-major order (REVERSE: from the end): a scan along each row (in the warp), then
        one of the rows' totals, which every warp holds one a lane (a warp's shuffles instead
        of a walk over all warps' totals)."""
        lanes: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
        rows: gl.constexpr = gl.SliceLayout(1, v.type.layout)
        inner = gl.associative_scan(v, 1, _add, reverse=REVERSE)
        tot = gl.convert_layout(gl.sum(v, 1), lanes)
        ex = gl.convert_layout(gl.associative_scan(tot, 0, _add, reverse=REVERSE) - tot, rows)
        return inner + gl.expand_dims(ex, 1)

    @gluon.jit
    def _clear_bins(bins_s, WARPS: gl.constexpr):
        NB: gl.constexpr = bins_s.shape[0]
        bins_s.store(gl.zeros([NB], gl.int32, gl.BlockedLayout([NB // (32 * WARPS)], [32], [WARPS], [0])))

    @gluon.jit
    def _one_a_thread(WARPS: gl.constexpr):
        return gl.arange(0, 32 * WARPS, layout=gl.BlockedLayout([1], [32], [WARPS], [0]))

    @gluon.jit
    def _cluster_sync(WARPS: gl.constexpr):
        gl.inline_asm_elementwise(_CLUSTER_SYNC_ASM, "=r,r", [_one_a_thread(WARPS)],
                                  dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _cluster_word(like, word, rank):
        """The int32 at ``word`` (a scalar or a tensor of word indices) of the shared memory of
        the cluster's CTA ``rank``, shaped as ``like`` (each thread loads its own)."""
        return gl.inline_asm_elementwise(_LD_CLUSTER_ASM, "=r,r,r", [like * 0 + word, like * 0 + rank],
                                         dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _store_word(v, word, WARPS: gl.constexpr):
        """Thread 0 stores the scalar ``v`` at ``word`` of this CTA's shared memory."""
        tid = _one_a_thread(WARPS)
        gl.inline_asm_elementwise(_ST_WORD_ASM, "=r,r,r,r", [tid, tid * 0 + v, tid * 0 + word],
                                  dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _load_bins(bins_s, BASE: gl.constexpr, NB: gl.constexpr, CLUSTER: gl.constexpr,
                   WARPS: gl.constexpr):
        """A digit's histogram, bins [BASE, BASE + NB): this CTA's, or the sum over the
        cluster's CTAs (read from each one's shared memory)."""
        PER: gl.constexpr = NB // (32 * WARPS)
        gl.static_assert(PER >= 1, "at least one bin a thread")
        layout: gl.constexpr = gl.BlockedLayout([PER], [32], [WARPS], [0])
        if CLUSTER == 1:
            hist = bins_s.slice(BASE, NB).load(layout)
        else:
            word = BASE + gl.arange(0, NB, layout=layout)
            hist = gl.zeros([NB], gl.int32, layout)
            for rank in gl.static_range(CLUSTER):
                hist += _cluster_word(word, word, rank)
        return hist

    @gluon.jit
    def _pick_bin(hist, rem, extra0, NB: gl.constexpr, WARPS: gl.constexpr):
        """From a digit's histogram (``_load_bins``), less ``extra0`` keys counted in bin 0 that
        are not the row's: the digit of the ``rem``-th largest counted key and how many counted
        keys lie above it. The bins at or below that digit are those whose suffix count (keys
        at or above the bin) is >= rem: one packed sum counts them (bits 16 up) and the keys in
        the bins above (bits 0-15: fewer than rem <= k < 2^16)."""
        PER: gl.constexpr = NB // (32 * WARPS)
        layout: gl.constexpr = gl.BlockedLayout([1, PER], [1, 32], [WARPS, 1], [1, 0])
        hist = gl.convert_layout(gl.reshape(hist, [WARPS, 32 * PER]), layout)
        bins = (gl.expand_dims(gl.arange(0, WARPS, layout=gl.SliceLayout(1, layout)), 1) * (32 * PER)
                + gl.expand_dims(gl.arange(0, 32 * PER, layout=gl.SliceLayout(0, layout)), 0))
        hist = hist - gl.where(bins == 0, extra0, 0)
        suffix = _warp_rows_scan(hist, True, WARPS)
        packed = gl.sum(gl.sum(gl.where(suffix >= rem, 1 << 16, hist), 1), 0)
        return (packed >> 16) - 1, packed & 0xFFFF

    @gluon.jit
    def _radix_kernel_gl(S, LEN, OUT, VALS, stride_s, stride_o, n_cols, k,
                         BLOCK: gl.constexpr, KPAD: gl.constexpr, WITH_VALS: gl.constexpr,
                         WARPS: gl.constexpr, D0: gl.constexpr, D1: gl.constexpr,
                         CLUSTER: gl.constexpr = 1):
        """``_resident2d_kernel_gl``'s contract with the k-th largest key T found by three
        radix passes instead of 31 bisection steps: each pass adds one shared-memory increment
        a key to a histogram of its next digit (D0, D1, then 32 - D0 - D1 bits), then one
        reverse scan and one packed sum over the bins pick the digit that holds the kk-th
        largest key. A key that does not match the digits found so far counts in a bin of its
        lane's own past the histograms (no predicate, no bank conflict). The keys here are
        -bits for negative scores and bits + 2^31 for the others (``_sortable_gl``'s order, with
        -0.0 and +0.0 one key, by integer ops alone); keys past the row are 0, below every
        score's key: they count in bin 0 of the digits they match and are taken out of it by
        number (CLUSTER x BLOCK - row length), and in position order they rank after every key of the
        row, so they are never taken. The write: bit masks of each thread's keys above T and
        equal to T, one scan of their counts over the threads, then each thread writes its picks
        in a loop over the set bits (``_WRITE_PICKS_ASM``), the scores read back from the row.
        CLUSTER > 1: the row is split over a cluster of CLUSTER CTAs (rank c holds keys
        [c * BLOCK, (c + 1) * BLOCK)); each pass counts into its own bins, then every CTA sums
        the cluster's bins (DSMEM) and picks the same digit; each CTA's picks go after the lower
        ranks' (their counts of keys above and equal to T, exchanged the same way)."""
        D2: gl.constexpr = 32 - D0 - D1
        gl.static_assert(D0 >= D1 and D1 >= D2 and D2 >= 1, "digit widths d0 >= d1 >= d2 >= 1")
        NB0: gl.constexpr = 1 << D0
        NB1: gl.constexpr = 1 << D1
        NB2: gl.constexpr = 1 << D2
        TRASH: gl.constexpr = NB0 + NB1 + NB2  # 32 bins, one a lane, for keys not counted
        T: gl.constexpr = 32 * WARPS
        E: gl.constexpr = BLOCK // T
        gl.static_assert(E <= 32, "a thread's keys fit one 32-bit mask")
        # first: the bins sit at offset 0 of the kernel's shared memory (_RED_SHARED_ASM)
        TOT: gl.constexpr = TRASH + 32  # CLUSTER > 1: the word of this CTA's counts (T's)
        bins_s = gl.allocate_shared_memory(gl.int32, [_next_pow2(TOT + 32)],
                                           gl.SwizzledSharedLayout(1, 1, 1, [0]))
        l2: gl.constexpr = gl.BlockedLayout([1, E], [32, 1], [WARPS, 1], [1, 0])
        pad_layout: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
        w2: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [WARPS, 1], [1, 0])
        if CLUSTER > 1:
            gl.inline_asm_elementwise(_cluster_guard_asm(CLUSTER), "=r,r", [_one_a_thread(WARPS)],
                                      dtype=gl.int32, is_pure=False, pack=1)
        _clear_bins(bins_s.slice(0, NB0), WARPS)
        _clear_bins(bins_s.slice(NB0, NB1), WARPS)
        _clear_bins(bins_s.slice(NB0 + NB1, NB2), WARPS)
        tid = gl.arange(0, T, layout=gl.SliceLayout(1, l2))
        col = gl.expand_dims(gl.arange(0, E, layout=gl.SliceLayout(0, l2)), 0)
        trash = gl.expand_dims(TRASH + (tid & 31), 1)
        if CLUSTER == 1:
            r = gl.program_id(0)
            first = tid * E  # the position of each thread's first key
        else:
            r = gl.program_id(0) // CLUSTER
            first = (gl.program_id(0) % CLUSTER) * BLOCK + tid * E
        offs = gl.expand_dims(first, 1) + col
        row_len = gl.minimum(gl.load(LEN + r), n_cols)
        kk = gl.minimum(k, row_len)
        out_of_row = CLUSTER * BLOCK - row_len
        row = S + r.to(gl.int64) * stride_s
        bits = gl.load(row + offs, mask=offs < n_cols, other=float("-inf")).to(gl.int32, bitcast=True)
        sgn = bits >> 31  # 0 or -1
        key = gl.where(offs < row_len, ((bits ^ sgn) - sgn) ^ (~sgn & -2147483648), 0)
        key = key.to(gl.uint32, bitcast=True)
        _barrier_gl()  # the bins are cleared
        # digit 1: the top D0 bits of every key
        _count_digits((key >> (32 - D0)).to(gl.int32))
        _barrier_gl()
        if CLUSTER > 1:
            _cluster_sync(WARPS)  # every CTA of the row has counted
        c0, above = _pick_bin(_load_bins(bins_s, 0, NB0, CLUSTER, WARPS), kk, out_of_row, NB0,
                              WARPS)
        rem = kk - above
        # digit 2: the next D1 bits of the keys whose top D0 bits are c0 (matched as key ^ the
        # prefix below 2^(32 - D0): no second copy of the top digits held in registers)
        d1 = ((key >> D2) & (NB1 - 1)).to(gl.int32)
        in0 = (key ^ (c0.to(gl.uint32, bitcast=True) << (32 - D0))) < (1 << (32 - D0))
        _count_digits(gl.where(in0, NB0 + d1, trash))
        _barrier_gl()
        if CLUSTER > 1:
            _cluster_sync(WARPS)
        c1, above = _pick_bin(_load_bins(bins_s, NB0, NB1, CLUSTER, WARPS), rem,
                              gl.where(c0 == 0, out_of_row, 0), NB1, WARPS)
        rem = rem - above
        # digit 3: the low D2 bits of the keys whose top D0 + D1 bits are (c0, c1)
        p01 = (c0 << D1) | c1
        lo01 = p01.to(gl.uint32, bitcast=True) << D2  # the least key with digits (c0, c1)
        d2 = (key & (NB2 - 1)).to(gl.int32)
        _count_digits(gl.where((key ^ lo01) < (1 << D2), NB0 + NB1 + d2, trash))
        _barrier_gl()
        if CLUSTER > 1:
            _cluster_sync(WARPS)
        c2, above = _pick_bin(_load_bins(bins_s, NB0 + NB1, NB2, CLUSTER, WARPS), rem,
                              gl.where(p01 == 0, out_of_row, 0), NB2, WARPS)
        rem = rem - above
        # T, and kk - rem keys above it (rem = 0 and T all ones when kk = 0: nothing is taken)
        thresh = lo01 | c2.to(gl.uint32, bitcast=True)
        n_gt = kk - rem
        bit = (1 << col).to(gl.uint32, bitcast=True)
        gt_m = gl.reduce(gl.where(key > thresh, bit, 0), 1, _or)
        eq_m = gl.reduce(gl.where(key == thresh, bit, 0), 1, _or)
        cnt = _popc(gt_m) + (_popc(eq_m) << 16)
        cnt2 = gl.convert_layout(gl.reshape(cnt, [WARPS, 32]), w2)
        before = gl.reshape(_warp_rows_scan(cnt2, False, WARPS) - cnt2, [T])
        before = gl.convert_layout(before, gl.SliceLayout(1, l2))
        gt_at = before & 0xFFFF  # this thread's first slot among the keys above T
        eq_at = n_gt + (before >> 16)  # and among those equal to T
        pad_hi = k
        if CLUSTER > 1:  # after the lower ranks' picks: their counts, from their shared memory
            c = gl.program_id(0) % CLUSTER
            # the CTA's counts packed as cnt is: above T in bits 0-15, equal in 16-31 (at most
            # 32768 keys a CTA, so each fits 16 bits; the int32 sum may wrap, its bits do not)
            _store_word(gl.sum(cnt, 0), TOT, WARPS)
            _cluster_sync(WARPS)
            for rank in gl.static_range(CLUSTER - 1):
                v = gl.where(rank < c, _cluster_word(tid, TOT, rank), 0)
                gt_at += v & 0xFFFF
                eq_at += (v >> 16) & 0xFFFF
            _cluster_sync(WARPS)  # every CTA has read the others' shared memory: they may exit
            # Every read of the bins since their clearing is inline PTX, which Triton's
            # allocator does not see: without a use here it takes them for dead after the
            # clearing and puts the scratch of the scans and sums above inside them, where the
            # partners' DSMEM reads race its stores. A store the allocator sees keeps them live
            # to this point (checked per compiled kernel: _bins_alone_at_zero).
            _clear_bins(bins_s.slice(0, 32 * WARPS), WARPS)
            pad_hi = gl.where(c == 0, k, 0)  # rank 0 writes the padding
        out = OUT + r.to(gl.int64) * stride_o
        vals = VALS + r.to(gl.int64) * stride_o
        may_inf = (thresh <= 0x00800000).to(gl.int32)  # -inf's key: a pick may be -inf
        z = gl.zeros_like(before)
        picks = [gt_m.to(gl.int32, bitcast=True), eq_m.to(gl.int32, bitcast=True),
                 gt_at, eq_at, z + kk, first, row + z, z + may_inf, out + z, vals + z]
        if WITH_VALS:
            gl.inline_asm_elementwise(_WRITE_PICKS_VALS_ASM, "=r,r,r,r,r,r,r,l,r,l,l", picks,
                                      dtype=gl.int32, is_pure=False, pack=1)
        else:
            gl.inline_asm_elementwise(_WRITE_PICKS_IDX_ASM, "=r,r,r,r,r,r,r,l,r,l,l", picks,
                                      dtype=gl.int32, is_pure=False, pack=1)
        pad = gl.arange(0, KPAD, layout=pad_layout)
        gl.store(out + pad, gl.full([KPAD], -1, gl.int32, pad_layout), mask=(pad >= kk) & (pad < pad_hi))
        if WITH_VALS:
            gl.store(vals + pad, gl.full([KPAD], float("-inf"), gl.float32, pad_layout),
                     mask=(pad >= kk) & (pad < pad_hi))


# keys a thread up to which the one-program-a-row select keeps them all in registers (the 2-D
# kernel; H200, CUDA graphs, against the 1-D kernel with its reload: 64 x 32K 46.8 -> 38.6 us,
# 1024 x 32K 376 -> 287, 1024 x 16K 168 -> 153; 1024 x 8K on 4 warps, 64 keys a thread, stays
# on the 1-D kernel, which was 98 us there against 107-110 for the 2-D one at 8-32 warps)
RESIDENT_2D_MAX_PER_THREAD = 32


# the radix select's digit widths (the third is the rest of the 32 bits)
RADIX_DIGITS = (11, 11)


def radix_bins_bytes(d0: int, d1: int) -> int:
    """Bytes of the radix select's one shared buffer (``_radix_kernel_gl``'s ``bins_s``): the
    three digits' bins, 32 trash bins, the counts word, padded to a power of two."""
    return 4 * triton.next_power_of_2((1 << d0) + (1 << d1) + (1 << (32 - d0 - d1)) + 64)


def _bins_alone_at_zero(nbytes: int):
    """The check of a compiled cluster radix select: its PTX reads the partners' bins at
    global_smem + 0 until its last cluster barrier, so the bins must sit at offset 0 and no
    scratch buffer of Triton's may lie in their ``nbytes`` (the allocator, blind to inline PTX,
    overlapped them once: the scans' scratch raced the partners' reads)."""
    def check(kernel) -> None:
        named, scratch = cluster.smem_allocations(kernel)
        at = named.get("bins_s")
        if at != 0:
            raise RuntimeError(f"topk_sm90: the radix select's bins are at shared-memory offset "
                               f"{at}, not 0, which its cluster PTX assumes")
        inside = sorted({o for o in scratch if o < nbytes})
        if inside:
            raise RuntimeError(f"topk_sm90: scratch at shared-memory offsets {inside} lies in "
                               f"the cluster radix select's bins [0, {nbytes})")
    return check


def resident(scores, lengths, out, vals, k, block, values, warps, radix=False,
             digits=RADIX_DIGITS, cluster_size=1):
    """Launch the Gluon one-program-a-row select with ``topk._resident_kernel``'s arguments:
    ``radix``: the radix kernel; else the 2-D bisection kernel (no reload) up to
    ``RESIDENT_2D_MAX_PER_THREAD`` keys a thread, the 1-D one above. ``cluster_size`` > 1 (radix
    only, sm90+): a cluster of that many CTAs a row, ``block`` keys each."""
    args = (scores, lengths, out, vals, scores.stride(0), out.stride(0), scores.shape[1], k)
    kw = dict(BLOCK=block, KPAD=max(2048, triton.next_power_of_2(k)), WITH_VALS=values,
              WARPS=warps, num_warps=warps)
    if radix:
        d0, d1 = digits
        if not d0 >= d1 >= 32 - d0 - d1 >= 1:
            # each digit's bins are a slice of one shared buffer at an offset that is a multiple
            # of the slice's size (Gluon's rule), and the third digit holds the bits left
            raise ValueError(f"topk_sm90.resident: digits must satisfy d0 >= d1 >= 32 - d0 - d1 "
                             f">= 1, got {tuple(digits)}")
        if cluster_size > 1:
            cluster.launch(_radix_kernel_gl, (scores.shape[0] * cluster_size,), cluster_size, args,
                           dict(kw, D0=d0, D1=d1, CLUSTER=cluster_size),
                           check=_bins_alone_at_zero(radix_bins_bytes(d0, d1)))
        else:
            _radix_kernel_gl[(scores.shape[0],)](*args, D0=d0, D1=d1, **kw)
        return
    if cluster_size > 1:
        raise ValueError("topk_sm90.resident: cluster_size > 1 is the radix kernel's (radix=True)")
    kernel = (_resident2d_kernel_gl if block // (32 * warps) <= RESIDENT_2D_MAX_PER_THREAD
              else _resident_kernel_gl)
    kernel[(scores.shape[0],)](*args, **kw)


def hi_hist(grid, scores, lengths, hist, length, hi_bits, chunk, split, window, warps, pdl=0):
    """Launch the Gluon pass 1 with ``topk._hi_hist_kernel``'s arguments (warp-aggregated)."""
    _hi_hist_kernel_gl[grid](scores, lengths, hist, scores.stride(0), length, HI=hi_bits,
                             CHUNK=chunk, SPLIT=split, WINDOW=window, WARPS=warps, PDL=pdl,
                             num_warps=warps, **launch_opts(pdl))


def compact(grid, scores, lengths, sel, counts, ncand, cand_s, cand_p, nsel, sel_p, length,
            n_chunks, hi_bits, chunk, warps, pdl=0):
    """Launch the Gluon compaction with ``topk._compact_kernel``'s arguments."""
    _compact_kernel_gl[grid](scores, lengths, sel, counts, ncand, cand_s, cand_p, nsel, sel_p,
                             scores.stride(0), length, n_chunks, HI=hi_bits, CHUNK=chunk,
                             WARPS=warps, PDL=pdl, num_warps=warps, **launch_opts(pdl))


__all__ = ["available", "compact", "hi_hist", "resident"]
