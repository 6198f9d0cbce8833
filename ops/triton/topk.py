"""Top-k selection per row of a float32 score matrix: radix select on the float bits.

Scores map to order-preserving uint32 keys. In ``topk_rows`` four histogram passes (8-bit
digits, most significant first; 11/11/10-bit digits measured 4.8x slower) pin down the exact
k-th largest key T and how many entries equal to T are still wanted; a final pass writes the
positions of keys > T (ascending) and then the lowest positions of keys == T (deterministic ties:
lower position wins).
-inf scores (masked keys) come out as -1. Entries past the row's own length are ignored.

Three schedules with the same output, bit for bit: ``topk_rows`` (one program per row, all
passes in one launch), ``topk_resident`` (one program per row of up to 32K keys, the row held in
registers and searched bit by bit) and ``topk_multi`` (each row split over many programs: a
wide top-digit histogram, candidate compaction, an exact select among the candidates, an
ordered write from the compacted lists; two reads of the scores). ``select_topk`` takes
``topk_resident`` for short rows and ``topk_multi`` for the others. On GPUs the one-program-a-row
select, ``topk_multi``'s compaction pass, and its first pass where it aggregates atomics within
warps run as Gluon kernels (``topk_sm90``: the same contracts, explicit layouts).
"""

from __future__ import annotations

import os

import torch

import triton
import triton.language as tl

from . import topk_sm90
from .pdl import device_info, grid_dep, launch_opts, pdl_level
from .topk_sm90 import WARP_GROUP_COUNT_ASM


@triton.jit
def _sortable(x):
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 == +0.0: one key, so they tie like the floats do
    bits = x.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)


@triton.jit
def _digit_hist(key, inb, prefix, prefix_mask, SHIFT: tl.constexpr, BITS: tl.constexpr):
    """Histogram of the digits at SHIFT of the keys matching ``prefix``, in 2 * 2^BITS bins (the
    upper half counts the keys that do not match)."""
    NB: tl.constexpr = 1 << BITS
    match = inb & ((key & prefix_mask) == prefix)
    digit = ((key >> SHIFT) & (NB - 1)).to(tl.int32)
    return tl.histogram(tl.where(match, digit, NB), 2 * NB)


@triton.jit
def _pick_digit(hist, prefix, prefix_mask, remaining, SHIFT: tl.constexpr, BITS: tl.constexpr):
    """From ``_digit_hist``'s histogram: the prefix refined by the digit that holds the
    ``remaining``-th largest matching key, its mask, and the count still wanted inside it."""
    NB: tl.constexpr = 1 << BITS
    bins = tl.arange(0, 2 * NB)
    real = bins < NB
    hist = tl.where(real, hist, 0)
    suffix = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # entries with digit >= bin
    chosen = tl.max(tl.where(real & (suffix >= remaining), bins, -1), 0)
    above = tl.sum(tl.where(real & (bins > chosen), hist, 0), 0)
    prefix = prefix | (chosen.to(tl.uint32) << SHIFT)
    prefix_mask = prefix_mask | ((NB - 1) << SHIFT)
    return prefix, prefix_mask, remaining - above


@triton.jit
def _radix_pass(S, row_len, prefix, prefix_mask, remaining, SHIFT: tl.constexpr,
                BITS: tl.constexpr, BLOCK: tl.constexpr):
    """One histogram pass over the digits at SHIFT of keys matching ``prefix``: returns the
    refined prefix, mask and the count still wanted inside the chosen digit."""
    NB: tl.constexpr = 1 << BITS
    hist = tl.zeros([2 * NB], tl.int32)
    for start in range(0, row_len, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < row_len
        key = _sortable(tl.load(S + offs, mask=inb, other=float("-inf")))
        hist += _digit_hist(key, inb, prefix, prefix_mask, SHIFT, BITS)
    return _pick_digit(hist, prefix, prefix_mask, remaining, SHIFT, BITS)


@triton.jit
def _topk_kernel(S, LEN, OUT, stride_s, stride_o, k, BLOCK: tl.constexpr, BYTE_DIGITS: tl.constexpr):
    r = tl.program_id(0)
    row = S + r.to(tl.int64) * stride_s
    row_len = tl.load(LEN + r)
    kk = tl.minimum(k, row_len)
    prefix = tl.zeros([], tl.uint32)
    mask = tl.zeros([], tl.uint32)
    remaining = kk
    if BYTE_DIGITS:  # 4 passes of 8-bit digits: small histograms
        prefix, mask, remaining = _radix_pass(row, row_len, prefix, mask, remaining, 24, 8, BLOCK)
        prefix, mask, remaining = _radix_pass(row, row_len, prefix, mask, remaining, 16, 8, BLOCK)
        prefix, mask, remaining = _radix_pass(row, row_len, prefix, mask, remaining, 8, 8, BLOCK)
        prefix, mask, remaining = _radix_pass(row, row_len, prefix, mask, remaining, 0, 8, BLOCK)
    else:  # 3 passes of 11/11/10-bit digits
        prefix, mask, remaining = _radix_pass(row, row_len, prefix, mask, remaining, 21, 11, BLOCK)
        prefix, mask, remaining = _radix_pass(row, row_len, prefix, mask, remaining, 10, 11, BLOCK)
        prefix, mask, remaining = _radix_pass(row, row_len, prefix, mask, remaining, 0, 10, BLOCK)
    n_gt = kk - remaining
    out = OUT + r.to(tl.int64) * stride_o
    done_gt = 0
    done_eq = 0
    for start in range(0, row_len, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < row_len
        x = tl.load(row + offs, mask=inb, other=float("-inf"))
        key = _sortable(x)
        gt = inb & (key > prefix)
        eq = inb & (key == prefix)
        pos = tl.where(x == float("-inf"), -1, offs)
        c_gt = tl.cumsum(gt.to(tl.int32), 0)
        tl.store(out + done_gt + c_gt - 1, pos, mask=gt)
        c_eq = tl.cumsum(eq.to(tl.int32), 0) + done_eq
        take = eq & (c_eq <= remaining)
        tl.store(out + n_gt + c_eq - 1, pos, mask=take)
        done_gt += tl.sum(gt.to(tl.int32), 0)
        done_eq += tl.sum(eq.to(tl.int32), 0)


# -------------------------------------------------- one program a row, the row in registers
# For rows of up to RESIDENT_MAX keys: one program loads its whole row once (32 keys a thread at
# 32K on 32 warps) and finds the k-th largest key T bit by bit on registers, most significant
# first: T | 2^b is kept when at least kk keys are >= it (a subtract and a shift-add a key, one
# block reduction a bit). One packed scan then ranks the keys > T and == T in
# position order, as ``topk_rows`` writes them. No launch but one, no workspace, no atomics.
RESIDENT_MAX = 32768
# Whether ``topk_resident`` takes the Gluon radix kernel (``topk_sm90._radix_kernel_gl``) by
# default; ``DSA_TOPK_RADIX=0/1`` overrides. H100, CUDA graphs, against the bisection kernel:
# 1.4-2.2x at every size timed, 64 x 32K 40.4 -> 23.6 us (BENCHMARKS.md session 17).
RADIX_DEFAULT = True
# Longer rows, up to CLUSTER_MAX x RESIDENT_MAX keys, in one launch as well: the radix kernel on
# a cluster of CTAs a row (``topk_cluster``), opt-in (``DSA_TOPK_CLUSTER=1``). H100 (session
# 20): correct (tests, memcheck). On its own scores it is 1.2-1.5x faster than the
# multi-program select from 8 rows up (32 x 128K 53.5 against 72.9 us), slower on one row. In
# the decode op, whose first pass rides in the logits kernel, it is slower: B=32 at 128K 0.262
# against 0.248 ms, B=1 0.044 against 0.034.
CLUSTER_DEFAULT = False
CLUSTER_MAX = 8  # CTAs a cluster: the portable limit


@triton.jit
def _resident_kernel(S, LEN, OUT, VALS, stride_s, stride_o, n_cols, k, BLOCK: tl.constexpr,
                     KPAD: tl.constexpr, WITH_VALS: tl.constexpr, ASM: tl.constexpr):
    r = tl.program_id(0)
    row_len = tl.minimum(tl.load(LEN + r), n_cols)
    kk = tl.minimum(k, row_len)
    offs = tl.arange(0, BLOCK)
    inb = offs < row_len
    row = S + r.to(tl.int64) * stride_s
    # loads masked by the buffer's width (vectors); keys past the row become 0, below every
    # score's key (_sortable maps -inf to 0x007FFFFF)
    x = tl.load(row + offs, mask=offs < n_cols, other=float("-inf"))
    # bits 31..1 of T on the keys' top 31 bits, as non-negative int32: for a candidate c with
    # bit 0 clear, key >= c exactly when (key >> 1) >= (c >> 1), and (key >> 1) - (c >> 1)
    # cannot overflow, so its sign bit counts the keys below c (a subtract and a shift-add a key)
    hi = tl.where(inb, _sortable(x) >> 1, 0).to(tl.int32)
    t_hi = tl.zeros([], tl.int32)
    for i in range(31):
        cand = t_hi | (1 << (30 - i))
        if ASM:  # opaque to LLVM, which turns the plain form into compares and popcounts (2x)
            sign = tl.inline_asm_elementwise(
                "{ .reg .s32 d; sub.s32 d, $1, $2; shr.u32 $0, d, 31; }", "=r,r,r",
                [hi, tl.full([BLOCK], 0, tl.int32) + cand], dtype=tl.int32, is_pure=True, pack=1)
        else:
            sign = ((hi - cand).to(tl.uint32, bitcast=True) >> 31).to(tl.int32)
        below = tl.sum(sign, 0)
        t_hi = tl.where(BLOCK - below >= kk, cand, t_hi)
    # bit 0 on the full keys: the scores again, from L2 (volatile: the compiler would reuse the
    # first load and hold it in registers through the loop, spilling)
    x = tl.load(row + offs, mask=offs < n_cols, other=float("-inf"), volatile=True)
    key = tl.where(inb, _sortable(x), 0)
    thresh = t_hi.to(tl.uint32, bitcast=True) << 1
    n = tl.sum((key >= (thresh | 1)).to(tl.int32), 0)
    thresh = tl.where(n >= kk, thresh | 1, thresh)
    # thresh is now the kk-th largest key (all ones when kk = 0: nothing is taken below)
    gt = key > thresh
    eq = (key == thresh) & inb
    # one scan for both ranks, 16 bits apart (BLOCK <= 32768 keeps them apart)
    rank = tl.cumsum(gt.to(tl.int32) + (eq.to(tl.int32) << 16), 0)
    n_gt = tl.sum(gt.to(tl.int32), 0)
    take = eq & (((rank >> 16) & 0xFFFF) <= kk - n_gt)
    at = tl.where(gt, (rank & 0xFFFF) - 1, n_gt + ((rank >> 16) & 0xFFFF) - 1)
    out = OUT + r.to(tl.int64) * stride_o
    tl.store(out + at, tl.where(x == float("-inf"), -1, offs), mask=gt | take)
    pad = tl.arange(0, KPAD)
    tl.store(out + pad, tl.full([KPAD], -1, tl.int32), mask=(pad >= kk) & (pad < k))
    if WITH_VALS:
        vals = VALS + r.to(tl.int64) * stride_o
        tl.store(vals + at, x, mask=gt | take)
        tl.store(vals + pad, tl.full([KPAD], float("-inf"), tl.float32),
                 mask=(pad >= kk) & (pad < k))


# -------------------------------------------------- multi-program select: 2 reads of the scores
# Pass 1 histograms the top HI bits of every key (sign, exponent and the leading mantissa bits:
# 8 bins per power of two at HI = 12; scores bunched within one power of two, as the indexer's
# are, give more candidates, 14 bits fewer) into one histogram per row (or a few partial ones
# that are summed: fewer atomics on each hot bin); one program per row finds the bin of the row's
# k-th largest key. Pass 2 counts, per chunk, the keys in bins above it, compacts the keys of
# that bin (the candidates, a few hundred to a few thousand) into a per-row buffer, and lists,
# ascending, the positions of every key in that bin or above: the only keys the output can hold
# (k plus the candidates, a few per cent of the row). One program per row then pins the k-th
# largest key T exactly among the candidates alone, and adds each chunk's counts of keys > T and
# == T. Pass 3 writes the output in position order from each chunk's list (the whole chunk was
# read here before: 3.2-4x slower, BENCHMARKS.md session 8). Every count is an integer sum, so
# nothing depends on the order in which programs run (nor on the order of the candidates in
# their buffer).
CHUNK = 1024  # scores a program (1K and 2K measured on the H100: 1K as fast or faster)
HI_BITS = 12
# Pass 1's in-program bins (``default_hist_window``; H200, 512 x 128K indexer scores: 32 bins
# 0.354 ms, 64: 0.298, 128: 0.314, none: 0.458; a 128K prefill 602 -> 585 ms).
HIST_WINDOW = 64
# Up to this many rows pass 1 splits its histograms and takes no window; beyond it, one
# histogram a row and the window (both measured on the H200, BENCHMARKS.md sessions 8-9).
FEW_ROWS = 132
# Warps of the Gluon passes 1 and 2 (topk_sm90) a 1024-key chunk
COMPACT_WARPS = 4


@triton.jit
def _chosen_bin(HIST, kk, NB: tl.constexpr, SPLIT: tl.constexpr):
    """From a row's finished pass-1 histogram (SPLIT partial ones, summed): the bin holding its
    kk-th largest key, and how many keys are still wanted from that bin."""
    bins = tl.arange(0, NB)
    hist = tl.load(HIST + bins)
    for g in tl.static_range(1, SPLIT):
        hist += tl.load(HIST + g * NB + bins)
    suffix = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # keys in this bin or above
    chosen = tl.max(tl.where(suffix >= kk, bins, -1), 0)
    above = tl.sum(tl.where(bins > chosen, hist, 0), 0)
    return chosen, kk - above


@triton.jit
def _choose_kernel(LEN, HIST, SEL, k, NB: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr):
    """Per row, once: the pass-1 bin of the k-th largest key and the count wanted from it."""
    grid_dep(PDL)
    r = tl.program_id(0)
    chosen, remaining = _chosen_bin(HIST + r * SPLIT * NB, tl.minimum(k, tl.load(LEN + r)), NB,
                                    SPLIT)
    tl.store(SEL + 2 * r, chosen)
    tl.store(SEL + 2 * r + 1, remaining)


@triton.jit
def _warp_group_count(digit):
    """For each lane: how many lanes of its warp hold the same digit, on the lowest such lane,
    else 0 (PTX match.any; the same warp-aggregated atomics CUB's histograms use)."""
    return tl.inline_asm_elementwise(WARP_GROUP_COUNT_ASM, "=r,r", [digit], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def _hi_hist_kernel(S, LEN, HIST, stride_s, n_cols, HI: tl.constexpr, CHUNK: tl.constexpr,
                    WARP_AGG: tl.constexpr, SPLIT: tl.constexpr, WINDOW: tl.constexpr,
                    PDL: tl.constexpr):
    """Pass 1: program (r, c) counts the top digits of chunk c of row r into HIST[r] with L2
    atomics (measured 7x faster than tl.histogram's 4096 bins plus one atomic a bin). WINDOW > 0:
    the keys within WINDOW bins of the chunk's lowest digit are counted in the program first
    (tl.histogram over WINDOW bins: a few ballots a key) and added with one atomic a non-empty
    bin; only the others take an atomic each (512 rows x 128K indexer scores: 0.458 -> 0.298 ms
    at 64 bins, H200). WARP_AGG (GPU): one atomic per distinct digit in a warp's 32 keys; the keys
    bunch into a few bins, so the plain one-atomic-a-key form serialized on them (45% of a
    512 x 128K select)."""
    grid_dep(PDL)
    r = tl.program_id(0)
    start = tl.program_id(1) * CHUNK
    row_len = tl.load(LEN + r)
    if start >= row_len:
        return
    offs = start + tl.arange(0, CHUNK)
    inb = offs < row_len
    # masked by the buffer's width, so the loads are 16-byte vectors (see _compact_kernel)
    key = _sortable(tl.load(S + r.to(tl.int64) * stride_s + offs, mask=offs < n_cols,
                            other=float("-inf")))
    digit = (key >> (32 - HI)).to(tl.int32)
    # SPLIT partial histograms a row (chunk c into partial c % SPLIT): fewer atomics on a hot bin
    hist = HIST + (r * SPLIT + tl.program_id(1) % SPLIT) * (1 << HI)
    rest = inb
    if WINDOW > 0:
        lo = tl.min(tl.where(inb, digit, 1 << HI), 0)
        near = inb & (digit - lo < WINDOW)
        counts = tl.histogram(digit - lo, WINDOW, mask=near)
        tl.atomic_add(hist + lo + tl.arange(0, WINDOW), counts, mask=counts > 0, sem="relaxed")
        rest = inb & ~near
    if WARP_AGG:
        n = _warp_group_count(tl.where(rest, digit, -1))
        tl.atomic_add(hist + digit, n, mask=rest & (n > 0), sem="relaxed")
    else:
        tl.atomic_add(hist + digit, tl.full([CHUNK], 1, tl.int32), mask=rest, sem="relaxed")


@triton.jit
def _compact_kernel(S, LEN, SEL, COUNTS, NCAND, CAND_S, CAND_P, NSEL, SEL_P, stride_s, stride_c,
                    n_chunks, HI: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr):
    """Pass 2: COUNTS[r, c, 0] = keys of chunk c in bins above the k-th key's bin; that bin's
    keys (score and position) are appended to row r's candidate buffer. The positions of every
    key in that bin or above (the only ones the output can hold) go, ascending, to the chunk's
    own region of SEL_P, NSEL[r, c] of them: pass 3 reads those instead of the whole chunk."""
    grid_dep(PDL)
    r = tl.program_id(0)
    c = tl.program_id(1)
    start = c * CHUNK
    row_len = tl.load(LEN + r)
    if start >= row_len:
        return
    chosen = tl.load(SEL + 2 * r)
    offs = start + tl.arange(0, CHUNK)
    inb = offs < row_len
    # loads masked by the buffer's width (stride_c), not the row's length: a mask the compiler
    # can prove constant over 16 keys makes them 16-byte vectors; keys past the row are dropped
    # by ``inb`` below
    x = tl.load(S + r.to(tl.int64) * stride_s + offs, mask=offs < stride_c, other=float("-inf"))
    digit = (_sortable(x) >> (32 - HI)).to(tl.int32)
    above = inb & (digit > chosen)
    cand = inb & (digit == chosen)
    keep = above | cand
    # both counts from one reduction: keys above in the low 16 bits, candidates above them
    both = tl.sum(above.to(tl.int32) + (cand.to(tl.int32) << 16), 0)
    n_above = both & 0xFFFF
    n = both >> 16
    tl.store(COUNTS + (r * n_chunks + c) * 2, n_above)
    tl.store(NSEL + r * n_chunks + c, n_above + n)
    if n_above + n > 0:
        # one scan for both ranks: kept keys in the low 16 bits, candidates above them (CHUNK
        # <= 16384, checked by topk_multi, keeps the two apart and the sum below 2^31)
        rank = tl.cumsum(keep.to(tl.int32) + (cand.to(tl.int32) << 16), 0)
        tl.store(SEL_P + r.to(tl.int64) * stride_c + start + (rank & 0xFFFF) - 1, offs, mask=keep)
        if n > 0:
            slot = tl.atomic_add(NCAND + r, n, sem="relaxed") + (rank >> 16) - 1
            tl.store(CAND_S + r.to(tl.int64) * stride_c + slot, x, mask=cand)
            tl.store(CAND_P + r.to(tl.int64) * stride_c + slot, offs, mask=cand)


@triton.jit
def _finish_kernel(SEL, NCAND, CAND_S, CAND_P, COUNTS, THRESH, stride_c, n_chunks,
                   HI: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                   DIGIT: tl.constexpr, PDL: tl.constexpr):
    """Row r's k-th largest key T (radix passes of DIGIT bits over the candidates' low 32 - HI
    bits only) and the count still wanted among the keys == T; adds each candidate > T / == T
    to its chunk's COUNTS. Up to BLOCK candidates (the usual case) are loaded once and every pass
    runs on registers. Narrow digits: a histogram's cost grows with its bins (tl.histogram
    ballots each bit of the bin and each lane counts 2 * 2^DIGIT / 32 bins), so five passes of
    4-bit digits cost less than three of 8 bits."""
    grid_dep(PDL)
    NB: tl.constexpr = 1 << HI
    LO: tl.constexpr = 32 - HI
    N_FULL: tl.constexpr = LO // DIGIT
    REST: tl.constexpr = LO % DIGIT
    r = tl.program_id(0)
    m = tl.load(NCAND + r)
    chosen = tl.load(SEL + 2 * r)
    remaining = tl.load(SEL + 2 * r + 1)
    prefix = chosen.to(tl.uint32) << LO
    mask = tl.full([], (NB - 1) << LO, tl.uint32)
    cs = CAND_S + r.to(tl.int64) * stride_c
    cp = CAND_P + r.to(tl.int64) * stride_c
    if m <= BLOCK:
        offs = tl.arange(0, BLOCK)
        inb = offs < m
        key = _sortable(tl.load(cs + offs, mask=inb, other=float("-inf")))
        for i in tl.static_range(N_FULL):
            hist = _digit_hist(key, inb, prefix, mask, LO - DIGIT * (i + 1), DIGIT)
            prefix, mask, remaining = _pick_digit(hist, prefix, mask, remaining,
                                                  LO - DIGIT * (i + 1), DIGIT)
        if REST > 0:
            hist = _digit_hist(key, inb, prefix, mask, 0, REST)
            prefix, mask, remaining = _pick_digit(hist, prefix, mask, remaining, 0, REST)
        at = COUNTS + (r * n_chunks + tl.load(cp + offs, mask=inb, other=0) // CHUNK) * 2
        tl.atomic_add(at, tl.full([BLOCK], 1, tl.int32), mask=inb & (key > prefix), sem="relaxed")
        tl.atomic_add(at + 1, tl.full([BLOCK], 1, tl.int32), mask=inb & (key == prefix),
                      sem="relaxed")
    else:
        for i in tl.static_range(N_FULL):
            prefix, mask, remaining = _radix_pass(cs, m, prefix, mask, remaining,
                                                  LO - DIGIT * (i + 1), DIGIT, BLOCK)
        if REST > 0:
            prefix, mask, remaining = _radix_pass(cs, m, prefix, mask, remaining, 0, REST, BLOCK)
        for start in range(0, m, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inb = offs < m
            key = _sortable(tl.load(cs + offs, mask=inb, other=float("-inf")))
            at = COUNTS + (r * n_chunks + tl.load(cp + offs, mask=inb, other=0) // CHUNK) * 2
            tl.atomic_add(at, tl.full([BLOCK], 1, tl.int32), mask=inb & (key > prefix),
                          sem="relaxed")
            tl.atomic_add(at + 1, tl.full([BLOCK], 1, tl.int32), mask=inb & (key == prefix),
                          sem="relaxed")
    tl.store(THRESH + 2 * r, prefix.to(tl.int32, bitcast=True))
    tl.store(THRESH + 2 * r + 1, remaining)


@triton.jit
def _write_kernel(S, LEN, THRESH, COUNTS, NSEL, SEL_P, OUT, VALS, stride_s, stride_c, stride_o, k,
                  n_chunks, CHUNK: tl.constexpr, MAX_CHUNKS: tl.constexpr, PAD: tl.constexpr,
                  BLOCK: tl.constexpr, WITH_VALS: tl.constexpr, PDL: tl.constexpr):
    """Pass 3: chunk c of row r writes its keys > T, then its share of the keys == T that the tie
    rule keeps (lowest positions first), at offsets given by the counts of the chunks before it;
    and its share of the -1 padding after the row's kk entries. It reads only the chunk's keys
    in the k-th key's bin or above (pass 2 listed their positions, ascending), BLOCK at a time.
    WITH_VALS: the selected scores too, at the same offsets (-inf with the padding), sparing the
    caller a gather."""
    grid_dep(PDL)
    r = tl.program_id(0)
    c = tl.program_id(1)
    row_len = tl.load(LEN + r)
    kk = tl.minimum(k, row_len)
    out = OUT + r.to(tl.int64) * stride_o
    vals = VALS + r.to(tl.int64) * stride_o
    pad = c * PAD + tl.arange(0, PAD)
    tl.store(out + pad, tl.full([PAD], -1, tl.int32), mask=(pad >= kk) & (pad < k))
    if WITH_VALS:
        tl.store(vals + pad, tl.full([PAD], float("-inf"), tl.float32), mask=(pad >= kk) & (pad < k))
    if c * CHUNK >= row_len:
        return
    thresh = tl.load(THRESH + 2 * r).to(tl.uint32, bitcast=True)
    remaining = tl.load(THRESH + 2 * r + 1)
    n_gt = kk - remaining
    prev = tl.arange(0, MAX_CHUNKS)
    counts = COUNTS + (r * n_chunks + prev) * 2
    gt_before = tl.sum(tl.load(counts, mask=prev < c, other=0), 0)
    eq_before = tl.sum(tl.load(counts + 1, mask=prev < c, other=0), 0)
    n = tl.load(NSEL + r * n_chunks + c)
    listed = SEL_P + r.to(tl.int64) * stride_c + c * CHUNK
    row = S + r.to(tl.int64) * stride_s
    for j0 in range(0, n, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        live = j < n
        p = tl.load(listed + j, mask=live, other=0)
        x = tl.load(row + p, mask=live, other=float("-inf"))
        key = _sortable(x)
        gt = live & (key > thresh)
        eq = live & (key == thresh)
        pos = tl.where(x == float("-inf"), -1, p)
        at_gt = gt_before + tl.cumsum(gt.to(tl.int32), 0) - 1
        tl.store(out + at_gt, pos, mask=gt)
        c_eq = eq_before + tl.cumsum(eq.to(tl.int32), 0)
        take = eq & (c_eq <= remaining)
        tl.store(out + n_gt + c_eq - 1, pos, mask=take)
        if WITH_VALS:
            tl.store(vals + at_gt, x, mask=gt)
            tl.store(vals + n_gt + c_eq - 1, x, mask=take)
        gt_before += tl.sum(gt.to(tl.int32), 0)
        eq_before += tl.sum(eq.to(tl.int32), 0)


def default_hist_split(n_rows: int) -> int:
    """Partial pass-1 histograms a row: 4 where few rows share the atomics (1.1-1.4x at 1-132
    rows), 1 from 133 rows up (1-4% faster at 512; H200, BENCHMARKS.md session 8)."""
    return 4 if n_rows <= FEW_ROWS else 1


def default_hist_window(n_rows: int) -> int:
    """Pass 1's in-program window: HIST_WINDOW bins from 133 rows up (the prefill chunks); none
    for fewer (decode at 128 rows ran 1.5% slower with it, 0.831 -> 0.843 ms)."""
    return HIST_WINDOW if n_rows > FEW_ROWS else 0


def hist_workspace(n_rows: int, hi_bits: int = HI_BITS, hist_split: int | None = None,
                   device=None, length: int | None = None) -> torch.Tensor:
    """A zeroed pass-1 histogram for ``topk_multi(..., hist=)``: int32 [n_rows * split * 2^hi_bits]
    (row r's partial g at (r * split + g) * 2^hi_bits), for a producer that counts the top
    ``hi_bits`` of each sortable key itself (the indexer's logits kernel does). With ``length``
    (the scores' width) it also holds the select's zeroed counts for rows of that width, so the
    select zeroes nothing itself (one memset a step instead of two)."""
    split = default_hist_split(n_rows) if hist_split is None else hist_split
    extra = 0 if length is None else _count_words(n_rows, length, CHUNK)
    return torch.zeros(n_rows * split * (1 << hi_bits) + extra, dtype=torch.int32, device=device)


def _count_words(n_rows: int, length: int, chunk: int) -> int:
    """The select's zeroed counts: candidates [n] and chunk counts [n, chunks, 2]."""
    return n_rows * (1 + 2 * max(1, triton.cdiv(length, chunk)))


def _real_gpu(t: torch.Tensor) -> bool:
    """A CUDA tensor and no Triton interpreter (which runs no inline PTX)."""
    return t.device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


def topk_multi(scores: torch.Tensor, lengths: torch.Tensor, k: int, chunk: int | None = None,
               hi_bits: int = HI_BITS, warp_agg: bool = False, values: bool = False,
               write_block: int = 64, write_warps: int = 1, finish_warps: int = 8,
               hist_split: int | None = None, finish_block: int = 2048, finish_digit: int = 4,
               hist: torch.Tensor | None = None, hist_window: int | None = None,
               scan_warps: int | None = None, compact_impl: str | None = None,
               hist_impl: str | None = None):
    """``topk_rows``'s contract, each row split over many programs, reading the scores twice
    (top-digit histogram; count + compaction) plus one program per row over the candidates and
    an ordered write from the compacted lists: every SM busy at any row count. ``hi_bits``
    (9..15) is the width of the pass-1 digit. ``warp_agg`` (GPU only) aggregates pass 1's
    atomics within warps: 1.3-1.7x on scores bunched in a few bins, as the indexer's are, and
    2-3% slower on spread ones (H100, BENCHMARKS.md session 6). ``values``: return (positions,
    their scores), -inf where the position is -1. Tuning knobs, defaults measured on the H200
    (BENCHMARKS.md session 8): ``chunk`` (scores a program, a power of two), ``hist_split``
    (partial pass-1 histograms a row; default 4 up to 132 rows, else 1), ``finish_block`` /
    ``finish_digit`` / ``finish_warps`` (the candidates' program: its block, digit width and
    warps), ``write_block`` / ``write_warps`` (pass 3). ``hist``: pass 1 already done by the
    caller (``hist_workspace``'s layout, the same ``hi_bits`` and ``hist_split``, counting
    exactly the keys before each row's length): it is skipped; a ``hist_workspace(...,
    length=)`` also carries the select's zeroed counts (for the default ``chunk``), so nothing
    is zeroed here. ``hist_window`` (0 or a power of two up to 2^hi_bits; default
    ``default_hist_window(n)``): pass 1 counts the keys near each chunk's lowest digit in the
    program first. ``compact_impl`` / ``hist_impl``: the kernel of pass 2 / pass 1, "gluon"
    (``topk_sm90``, GPUs only; pass 1's with ``warp_agg`` only; BENCHMARKS.md session 11),
    "triton", or None (Gluon where it runs); ``scan_warps``: the warps of passes 1 and 2
    (default: 4, 8 from 4096-key chunks in the Triton kernels; ``COMPACT_WARPS`` in the Gluon
    ones)."""
    n, length = scores.shape
    out = torch.empty((n, k), dtype=torch.int32, device=scores.device)
    vals = torch.empty((n, k), dtype=torch.float32, device=scores.device) if values else out
    if not n or not k:
        out.fill_(-1)
        return (out, vals.fill_(float("-inf"))) if values else out
    if not 9 <= hi_bits <= 15:
        raise ValueError(f"topk_multi: hi_bits must lie in [9, 15], got {hi_bits}")
    chunk = chunk or CHUNK
    hist_split = default_hist_split(n) if hist_split is None else hist_split
    if hist_split < 1:
        raise ValueError(f"topk_multi: hist_split must be >= 1, got {hist_split}")
    hist_window = default_hist_window(n) if hist_window is None else hist_window
    if hist_window & (hist_window - 1) or not 0 <= hist_window <= 1 << hi_bits:
        raise ValueError(f"topk_multi: hist_window must be 0 or a power of two up to 2^hi_bits="
                         f"{1 << hi_bits}, got {hist_window}")
    if chunk & (chunk - 1) or not 16 <= chunk <= 16384:
        raise ValueError(f"topk_multi: chunk must be a power of two in [16, 16384], got {chunk}")
    n_chunks = max(1, triton.cdiv(length, chunk))
    max_chunks = triton.next_power_of_2(n_chunks)
    nb = 1 << hi_bits
    n_hist = n * hist_split * nb
    n_counts = _count_words(n, length, chunk)
    if hist is not None and (hist.dtype != torch.int32 or hist.numel() not in (n_hist, n_hist + n_counts)
                             or hist.device != scores.device):
        raise ValueError(f"topk_multi: hist must be int32 [{n_hist}] or [{n_hist + n_counts}] "
                         f"(hist_workspace with length) on {scores.device} (rows x hist_split x "
                         f"2^hi_bits), got {hist.dtype} {tuple(hist.shape)} on {hist.device}")
    # one zeroed workspace: [histograms [n, split, nb],] candidate counts [n], chunk counts [n, c, 2]
    if hist is not None and hist.numel() == n_hist + n_counts:  # zeroed by the caller with hist
        work, own = hist, n_hist
    else:
        own = 0 if hist is not None else n_hist
        work = torch.zeros(own + n_counts, dtype=torch.int32, device=scores.device)
    ncand, counts = work[own:own + n], work[own + n:]
    hist_done = hist is not None
    hist = hist[:n_hist] if hist_done else work[:n_hist]
    cand_s = torch.empty((n, length), dtype=torch.float32, device=scores.device)
    # one uninitialized int32 buffer (fewer allocations a call): candidate positions [n, L],
    # listed positions [n, L], listed counts [n, c], the chosen bins [n, 2], thresholds [n, 2]
    ints = torch.empty(n * (2 * length + n_chunks + 4), dtype=torch.int32, device=scores.device)
    cand_p, sel_p = ints[:n * length].view(n, length), ints[n * length:2 * n * length].view(n, length)
    nsel = ints[2 * n * length:n * (2 * length + n_chunks)]
    sel = ints[n * (2 * length + n_chunks):n * (2 * length + n_chunks + 2)]
    thresh = ints[n * (2 * length + n_chunks + 2):]
    grid = (n, n_chunks)
    warps = scan_warps or (8 if chunk >= 4096 else 4)
    pdl_grid, pdl_row = pdl_level(scores, n * n_chunks), pdl_level(scores, n)  # grids (n, c), (n,)
    gluon_ok = topk_sm90.available(scores)
    for name, impl in (("compact_impl", compact_impl), ("hist_impl", hist_impl)):
        if impl not in (None, "gluon", "triton"):
            raise ValueError(f"topk_multi: {name} must be None, 'gluon' or 'triton', got {impl!r}")
        if impl == "gluon" and not gluon_ok:
            raise ValueError(f"topk_multi: {name}='gluon' needs a CUDA GPU (sm80+), Gluon and no "
                             "Triton interpreter")
    if hist_impl == "gluon" and not warp_agg:
        raise ValueError("topk_multi: hist_impl='gluon' counts with warp-aggregated atomics; "
                         "pass warp_agg=True")
    if not hist_done and warp_agg and (hist_impl == "gluon" or (hist_impl is None and gluon_ok)):
        topk_sm90.hi_hist(grid, scores, lengths, hist, length, hi_bits, chunk, hist_split,
                          hist_window, scan_warps or COMPACT_WARPS, pdl_grid)
    elif not hist_done:
        _hi_hist_kernel[grid](scores, lengths, hist, scores.stride(0), length, HI=hi_bits,
                              CHUNK=chunk, WARP_AGG=warp_agg and _real_gpu(scores), SPLIT=hist_split,
                              WINDOW=hist_window, PDL=pdl_grid, num_warps=warps,
                              **launch_opts(pdl_grid))
    _choose_kernel[(n,)](lengths, hist, sel, k, NB=nb, SPLIT=hist_split, PDL=pdl_row, num_warps=8,
                         **launch_opts(pdl_row))
    if compact_impl == "gluon" or (compact_impl is None and gluon_ok):
        topk_sm90.compact(grid, scores, lengths, sel, counts, ncand, cand_s, cand_p, nsel, sel_p,
                          length, n_chunks, hi_bits, chunk, scan_warps or COMPACT_WARPS, pdl_grid)
    else:
        _compact_kernel[grid](scores, lengths, sel, counts, ncand, cand_s, cand_p, nsel, sel_p,
                              scores.stride(0), length, n_chunks, HI=hi_bits, CHUNK=chunk,
                              PDL=pdl_grid, num_warps=warps, **launch_opts(pdl_grid))
    _finish_kernel[(n,)](sel, ncand, cand_s, cand_p, counts, thresh, length, n_chunks,
                         HI=hi_bits, CHUNK=chunk, BLOCK=finish_block, DIGIT=finish_digit,
                         PDL=pdl_row, num_warps=finish_warps, **launch_opts(pdl_row))
    _write_kernel[grid](scores, lengths, thresh, counts, nsel, sel_p, out, vals, scores.stride(0),
                        length, out.stride(0), k, n_chunks, CHUNK=chunk, MAX_CHUNKS=max_chunks,
                        PAD=triton.next_power_of_2(triton.cdiv(k, n_chunks)), BLOCK=write_block,
                        WITH_VALS=values, PDL=pdl_grid, num_warps=write_warps,
                        **launch_opts(pdl_grid))
    return (out, vals) if values else out


def radix_default() -> bool:
    """Whether ``topk_resident`` takes the radix kernel when not told: ``RADIX_DEFAULT``, or
    ``DSA_TOPK_RADIX=0/1``."""
    return os.environ.get("DSA_TOPK_RADIX", "1" if RADIX_DEFAULT else "0") != "0"


def radix_serves(t: torch.Tensor) -> bool:
    """Whether ``topk_resident`` takes the radix kernel by default for scores on ``t``'s
    device: the Gluon kernels run there and ``radix_default()``."""
    return topk_sm90.available(t) and radix_default()


def cluster_sms(t: torch.Tensor) -> int:
    """The SM count of ``t``'s device where the cluster select (``topk_cluster``) serves there
    (the radix kernel serves, sm90+, ``DSA_TOPK_CLUSTER``, default ``CLUSTER_DEFAULT``), else 0."""
    if os.environ.get("DSA_TOPK_CLUSTER", "1" if CLUSTER_DEFAULT else "0") == "0":
        return 0
    if not radix_serves(t):
        return 0
    sm90, sms = device_info(t)
    return sms if sm90 else 0


# SMs a GPC (graphics processing cluster) is taken to hold at least: a thread-block cluster's
# CTAs run on one GPC, so a wave holds GPCs x (GPC_SMS // size) clusters, not sms // size.
# The H100 SXM and H200 have 132 SMs over 8 GPCs of 16 or 18 (the GH100's 144 less disabled
# TPCs; the split is the part's, not read from the device), so clusters of 8 fit 16 a wave.
GPC_SMS = 16


def cluster_plan(n_rows: int, length: int, sms: int) -> tuple[int, int] | None:
    """(CTAs a row, keys a CTA) for ``topk_cluster`` on rows of ``RESIDENT_MAX`` < ``length``
    <= ``CLUSTER_MAX * RESIDENT_MAX`` keys: the smallest block of 16K or 32K keys whose
    clusters (a power of two of CTAs, at most ``CLUSTER_MAX``) fit one wave of ``sms`` CTAs,
    one a SM, counted by GPC (``GPC_SMS``); None where none does (more rows: ``topk_multi``),
    or ``sms`` is 0."""
    if sms <= 0 or not RESIDENT_MAX < length <= CLUSTER_MAX * RESIDENT_MAX:
        return None
    for block in (RESIDENT_MAX // 2, RESIDENT_MAX):
        size = triton.next_power_of_2(triton.cdiv(length, block))
        if size <= CLUSTER_MAX and n_rows <= (sms // GPC_SMS) * (GPC_SMS // size):
            return size, block
    return None


def resident_fits(n_rows: int, length: int, radix: bool | None = None, sms: int = 0) -> bool:
    """Whether ``select_topk`` takes one launch for ``n_rows`` full rows of ``length``
    keys (``topk_resident``, or above ``RESIDENT_MAX`` keys ``topk_cluster`` where
    ``cluster_plan(n_rows, length, sms)`` has one; ``sms``: ``cluster_sms``).
    ``radix``: whether the radix kernel serves (``radix_serves``; None:
    ``radix_default()``). With it: every row of up to ``RESIDENT_MAX`` keys
    (H100, CUDA graphs, against ``topk_multi``: 1.2-3.1x from 8 rows at 4K-32K, 1.55x at
    1 x 16K, even at 1 x 32K; BENCHMARKS.md session 17). With the bisection kernels: up to 8192
    keys at any row count, up to 16384 from 32 rows, up to 32768 from 64 rows (H200, against
    ``topk_multi``: 1.15-2.3x up to 16K (session 12); with the 2-D Gluon kernel, 1.24x at
    64 x 32K, 1.68x at 132 x 32K, 1.10x at 1024 x 32K, 1.26x at 1024 x 16K (session 13);
    1 x 16K no faster, and 32 x 32K 1.02x slower alone and 1.16x slower in the decode indexer
    step than the fused multi-program select)."""
    if cluster_plan(n_rows, length, sms) is not None:
        return True
    if radix_default() if radix is None else radix:
        return length <= RESIDENT_MAX
    return (length <= 8192 or (length <= 16384 and n_rows >= 32)
            or (length <= RESIDENT_MAX and n_rows >= 64))


def resident_warps(n_rows: int, block: int, radix: bool = False) -> int:
    """``topk_resident``'s default warps for a block of keys. The radix kernel (H100): 32 from
    16K keys (at most 32 keys a thread), 16 for 4K keys and for 8K keys in 256 rows or more
    (1024 x 8K 50.1 -> 46.6 us, 1024 x 4K 41.3 -> 35.2; 128 x 8K 13.2 on 32 against 13.9),
    256 keys a warp below. The bisection kernels (H200): 32 from 16K keys (16K: 1.09-1.11x
    over 16 warps; 32K: the same), 4 for 8K keys in more than 512 rows (several programs an
    SM: 1024 x 8K 112.6 -> 97.9 us), else 256 keys a warp up to 16."""
    if block >= 16384:
        return 32
    if radix:
        if block == 8192:
            return 16 if n_rows >= 256 else 32
        return max(1, min(16, block // 256))
    if block == 8192 and n_rows > 512:
        return 4
    return max(1, min(16, block // 256))


def topk_resident(scores: torch.Tensor, lengths: torch.Tensor, k: int, values: bool = False,
                  num_warps: int | None = None, impl: str | None = None,
                  radix: bool | None = None):
    """``topk_rows``'s contract for rows of up to ``RESIDENT_MAX`` keys, in one launch: one
    program a row holds its row in registers (``_resident_kernel``). ``num_warps``: a power of
    two up to 32 (default ``resident_warps``). ``impl``: "gluon" (``topk_sm90``,
    GPUs only), "triton", or None (Gluon where it runs). ``radix`` (Gluon only): T by three
    shared-memory radix passes (``topk_sm90._radix_kernel_gl``) instead of 31 bisection steps;
    None: ``radix_default()`` where it serves (at most 32 keys a thread). ``values``:
    (positions, their scores), -inf where the position is -1."""
    n, length = scores.shape
    if length > RESIDENT_MAX:
        raise ValueError(f"topk_resident: rows of at most {RESIDENT_MAX} keys, got {length}")
    if scores.stride(-1) != 1:
        raise ValueError("topk_resident: scores must have unit stride along the row")
    if num_warps is not None and (num_warps & (num_warps - 1) or not 1 <= num_warps <= 32):
        raise ValueError(f"topk_resident: num_warps must be a power of two in [1, 32], "
                         f"got {num_warps}")
    if impl not in (None, "gluon", "triton"):
        raise ValueError(f"topk_resident: impl must be None, 'gluon' or 'triton', got {impl!r}")
    gluon_ok = topk_sm90.available(scores)
    if impl == "gluon" and not gluon_ok:
        raise ValueError("topk_resident: impl='gluon' needs a CUDA GPU (sm80+), Gluon and no "
                         "Triton interpreter")
    if radix and (impl == "triton" or not gluon_ok):
        raise ValueError("topk_resident: radix=True is a Gluon kernel: a CUDA GPU (sm80+), "
                         "Gluon, no Triton interpreter and impl None or 'gluon'")
    out = torch.empty((n, k), dtype=torch.int32, device=scores.device)
    vals = torch.empty((n, k), dtype=torch.float32, device=scores.device) if values else out
    if not n or not k:
        out.fill_(-1)
        return (out, vals.fill_(float("-inf"))) if values else out
    block = max(32, triton.next_power_of_2(length))
    gluon = impl == "gluon" or (impl is None and gluon_ok)
    auto = radix is None
    if auto:
        radix = gluon and radix_default()
    warps = num_warps or resident_warps(n, block, radix=radix)
    block = max(block, 32 * warps)  # at least one key a thread
    if gluon:
        fits = block // (32 * warps) <= 32
        if auto:  # the radix kernel where this many warps hold the row, else bisection
            radix = radix and fits
        elif radix and not fits:
            raise ValueError(f"topk_resident: radix=True takes at most 32 keys a thread, got "
                             f"{block // (32 * warps)} ({block} keys on {warps} warps)")
        topk_sm90.resident(scores, lengths, out, vals, k, block, values, warps, radix=radix)
    else:
        _resident_kernel[(n,)](scores, lengths, out, vals, scores.stride(0), out.stride(0),
                               length, k, BLOCK=block, KPAD=max(2048, triton.next_power_of_2(k)),
                               WITH_VALS=values, ASM=_real_gpu(scores), num_warps=warps)
    return (out, vals) if values else out


def topk_cluster(scores: torch.Tensor, lengths: torch.Tensor, k: int, values: bool = False,
                 size: int | None = None, block: int | None = None):
    """``topk_rows``'s contract for rows of ``RESIDENT_MAX`` to ``CLUSTER_MAX * RESIDENT_MAX``
    keys in one launch: the radix kernel on a cluster of ``size`` CTAs a row, ``block`` keys
    each in registers (``topk_sm90._radix_kernel_gl`` with CLUSTER; default ``cluster_plan``).
    Each of the three passes sums the cluster's histograms through distributed shared memory.
    sm90+ with Gluon only. ``values``: (positions, their scores), -inf where the position is -1."""
    n, length = scores.shape
    if scores.stride(-1) != 1:
        raise ValueError("topk_cluster: scores must have unit stride along the row")
    if not topk_sm90.available(scores) or not device_info(scores)[0]:
        raise ValueError("topk_cluster: needs an sm90+ GPU, Gluon and no Triton interpreter")
    if not 0 <= k < 65536:
        raise ValueError(f"topk_cluster: k must be in [0, 65536), got {k}")
    if not RESIDENT_MAX < length <= CLUSTER_MAX * RESIDENT_MAX:
        raise ValueError(f"topk_cluster: rows of {RESIDENT_MAX + 1} to "
                         f"{CLUSTER_MAX * RESIDENT_MAX} keys, got {length}")
    if size is None or block is None:  # cluster_plan's, or 32K keys a CTA past one wave
        plan = (cluster_plan(n, length, device_info(scores)[1])
                or (triton.next_power_of_2(triton.cdiv(length, RESIDENT_MAX)), RESIDENT_MAX))
        size, block = (size or plan[0]), (block or plan[1])
    if size & (size - 1) or not 2 <= size <= CLUSTER_MAX:
        raise ValueError(f"topk_cluster: size must be a power of two in [2, {CLUSTER_MAX}], got {size}")
    if block not in (RESIDENT_MAX // 2, RESIDENT_MAX) or size * block < length:
        raise ValueError(f"topk_cluster: block must be {RESIDENT_MAX // 2} or {RESIDENT_MAX} with "
                         f"size * block >= the row length ({length}), got size {size}, block {block}")
    out = torch.empty((n, k), dtype=torch.int32, device=scores.device)
    vals = torch.empty((n, k), dtype=torch.float32, device=scores.device) if values else out
    if not n or not k:
        out.fill_(-1)
        return (out, vals.fill_(float("-inf"))) if values else out
    topk_sm90.resident(scores, lengths, out, vals, k, block, values,
                       resident_warps(n, block, radix=True), radix=True, cluster_size=size)
    return (out, vals) if values else out


def select_topk(scores: torch.Tensor, lengths: torch.Tensor, k: int, values: bool = False,
                warp_agg: bool = False, hi_bits: int = HI_BITS, hist: torch.Tensor | None = None,
                resident: bool | None = None):
    """Top-k positions per row (-1 padded). Short rows (``resident_fits``; ``resident`` forces
    the choice, None: by shape when no ``hist`` is given) take ``topk_resident``, one program a
    row with the row in registers and no workspace. The others take ``topk_multi``, faster than
    the one-program-per-row ``topk_rows`` at every size measured on the H100 and the H200,
    1 x 128K to 1024 x 32K, and than a one-program-a-row version of its own three reads (1.5-7x
    slower on the H200; not kept, BENCHMARKS.md). Its temporary memory: about three times the
    scores (the candidate buffers and the position lists, sized for the worst case of every key
    tied) plus up to 4 x 2^hi_bits x 4 bytes of histograms a row.
    ``values``: (positions, their scores); ``warp_agg``, ``hi_bits``, ``hist``: see ``topk_multi``.
    Bunched scores (``warp_agg``, the indexer's) in 32 to FEW_ROWS rows (decode batches) take a
    4096-candidate register block on 16 warps for the candidates' select: they have 750-2600
    candidates a row at 128K, so the 2048 block's loop ran for the largest (H200, the finish
    kernel: B=32 12.5 -> 8.0 us, B=64 12.8 -> 8.3, B=128 26.1 -> 20.3). It is slower where
    there are fewer candidates or rows: N(0, 1) scores 64 x 32K 5.7 -> 7.7 us, and the decode op
    at B=1 35.8 -> 37.1-39.4 us (BENCHMARKS.md session 11)."""
    if resident is None:
        resident = hist is None and resident_fits(*scores.shape, radix=radix_serves(scores),
                                                  sms=cluster_sms(scores))
    if resident:
        if hist is not None:
            raise ValueError("select_topk: resident=True takes no pass-1 hist (it has no pass 1)")
        if scores.shape[1] > RESIDENT_MAX:
            return topk_cluster(scores, lengths, k, values=values)
        return topk_resident(scores, lengths, k, values=values)
    big = warp_agg and 32 <= scores.shape[0] <= FEW_ROWS
    return topk_multi(scores, lengths, k, values=values, warp_agg=warp_agg, hi_bits=hi_bits,
                      hist=hist, finish_block=4096 if big else 2048, finish_warps=16 if big else 8)


def topk_rows(scores: torch.Tensor, lengths: torch.Tensor, k: int, block: int = 4096,
              byte_digits: bool = True) -> torch.Tensor:
    """scores float32 [N, L], lengths int32 [N] (entries >= length ignored) -> int32 [N, k]:
    the positions of each row's k largest scores (ties: lower position), -1 for -inf / missing."""
    n = scores.shape[0]
    out = torch.full((n, k), -1, dtype=torch.int32, device=scores.device)
    if n and k:
        _topk_kernel[(n,)](scores, lengths, out, scores.stride(0), out.stride(0), k, BLOCK=block,
                           BYTE_DIGITS=byte_digits, num_warps=8 if block >= 2048 else 4)
    return out
