"""Top-k selection per row of a float32 score matrix: radix select on the float bits.

Scores map to order-preserving uint32 keys; four histogram passes (8-bit digits, most
significant first; 11/11/10-bit digits measured 4.8x slower) pin down the exact k-th largest key
T and how many entries equal to T are still wanted; a final pass writes the positions of keys > T
(ascending) and then the lowest positions of keys == T (deterministic ties: lower position wins).
-inf scores (masked keys) come out as -1. Entries past the row's own length are ignored.

Two schedules with the same output, bit for bit: ``topk_rows`` (one program per row, all passes
in one launch: for many rows) and ``topk_multi`` (each row split over many programs, one launch
per pass: for fewer rows than SMs, e.g. decode). ``select_topk`` picks between them.
"""

from __future__ import annotations

import torch

import triton
import triton.language as tl


@triton.jit
def _sortable(x):
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 == +0.0: one key, so they tie like the floats do
    bits = x.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)


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
        match = inb & ((key & prefix_mask) == prefix)
        digit = ((key >> SHIFT) & (NB - 1)).to(tl.int32)
        hist += tl.histogram(tl.where(match, digit, NB), 2 * NB)
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


@triton.jit
def _choose_digit(HIST, remaining, NB: tl.constexpr):
    """From a finished histogram of one digit: the digit holding the remaining-th largest key,
    and how many keys are still wanted inside it."""
    bins = tl.arange(0, NB)
    hist = tl.load(HIST + bins)
    suffix = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
    chosen = tl.max(tl.where(suffix >= remaining, bins, -1), 0)
    above = tl.sum(tl.where(bins > chosen, hist, 0), 0)
    return chosen, remaining - above


@triton.jit
def _prefix_after(HIST, r, n_rows, kk, PASSES: tl.constexpr):
    """Prefix (and its mask) of the k-th largest key pinned by the first PASSES byte digits, and
    the count still wanted among the keys that match it."""
    prefix = tl.zeros([], tl.uint32)
    mask = tl.zeros([], tl.uint32)
    remaining = kk
    for p in tl.static_range(PASSES):
        chosen, remaining = _choose_digit(HIST + (p * n_rows + r) * 256, remaining, 256)
        prefix = prefix | (chosen.to(tl.uint32) << (24 - 8 * p))
        mask = mask | (255 << (24 - 8 * p))
    return prefix, mask, remaining


@triton.jit
def _mc_hist_kernel(S, LEN, HIST, stride_s, n_rows, k, PASS: tl.constexpr, CHUNK: tl.constexpr):
    """Pass PASS of the multi-program radix select: program (r, c) adds the byte-digit histogram
    of chunk c of row r (keys matching the prefix pinned so far) into HIST[PASS, r]."""
    r = tl.program_id(0)
    start = tl.program_id(1) * CHUNK
    row_len = tl.load(LEN + r)
    if start >= row_len:
        return
    kk = tl.minimum(k, row_len)
    prefix, pmask, remaining = _prefix_after(HIST, r, n_rows, kk, PASS)
    offs = start + tl.arange(0, CHUNK)
    inb = offs < row_len
    key = _sortable(tl.load(S + r.to(tl.int64) * stride_s + offs, mask=inb, other=float("-inf")))
    match = inb & ((key & pmask) == prefix)
    digit = ((key >> (24 - 8 * PASS)) & 255).to(tl.int32)
    hist = tl.histogram(tl.where(match, digit, 256), 512)
    bins = tl.arange(0, 512)
    tl.atomic_add(HIST + (PASS * n_rows + r) * 256 + bins, hist, mask=(bins < 256) & (hist > 0),
                  sem="relaxed")


@triton.jit
def _mc_count_kernel(S, LEN, HIST, COUNTS, stride_s, n_rows, k, n_chunks, CHUNK: tl.constexpr):
    """COUNTS[r, c] = (keys > T, keys == T) in chunk c of row r, T = the row's k-th largest key."""
    r = tl.program_id(0)
    c = tl.program_id(1)
    start = c * CHUNK
    row_len = tl.load(LEN + r)
    kk = tl.minimum(k, row_len)
    thresh, _, _ = _prefix_after(HIST, r, n_rows, kk, 4)
    offs = start + tl.arange(0, CHUNK)
    inb = offs < row_len
    key = _sortable(tl.load(S + r.to(tl.int64) * stride_s + offs, mask=inb, other=float("-inf")))
    base = COUNTS + (r * n_chunks + c) * 2
    tl.store(base, tl.sum((inb & (key > thresh)).to(tl.int32), 0))
    tl.store(base + 1, tl.sum((inb & (key == thresh)).to(tl.int32), 0))


@triton.jit
def _mc_write_kernel(S, LEN, HIST, COUNTS, OUT, stride_s, stride_o, n_rows, k, n_chunks,
                     CHUNK: tl.constexpr, MAX_CHUNKS: tl.constexpr, PAD: tl.constexpr):
    """Chunk c of row r writes its keys > T, then its share of the keys == T that the tie rule
    keeps (lowest positions first), at offsets given by the counts of the chunks before it; and
    its share of the -1 padding after the row's kk entries."""
    r = tl.program_id(0)
    c = tl.program_id(1)
    row_len = tl.load(LEN + r)
    kk = tl.minimum(k, row_len)
    out = OUT + r.to(tl.int64) * stride_o
    pad = c * PAD + tl.arange(0, PAD)
    tl.store(out + pad, tl.full([PAD], -1, tl.int32), mask=(pad >= kk) & (pad < k))
    start = c * CHUNK
    if start >= row_len:
        return
    thresh, _, remaining = _prefix_after(HIST, r, n_rows, kk, 4)
    n_gt = kk - remaining
    prev = tl.arange(0, MAX_CHUNKS)
    counts = COUNTS + (r * n_chunks + prev) * 2
    gt_before = tl.sum(tl.load(counts, mask=prev < c, other=0), 0)
    eq_before = tl.sum(tl.load(counts + 1, mask=prev < c, other=0), 0)
    offs = start + tl.arange(0, CHUNK)
    inb = offs < row_len
    x = tl.load(S + r.to(tl.int64) * stride_s + offs, mask=inb, other=float("-inf"))
    key = _sortable(x)
    gt = inb & (key > thresh)
    eq = inb & (key == thresh)
    pos = tl.where(x == float("-inf"), -1, offs)
    tl.store(out + gt_before + tl.cumsum(gt.to(tl.int32), 0) - 1, pos, mask=gt)
    c_eq = eq_before + tl.cumsum(eq.to(tl.int32), 0)
    tl.store(out + n_gt + c_eq - 1, pos, mask=eq & (c_eq <= remaining))


def topk_multi(scores: torch.Tensor, lengths: torch.Tensor, k: int,
               chunk: int | None = None) -> torch.Tensor:
    """``topk_rows``'s contract, each row split over many programs: four byte-digit histogram
    passes (per-chunk histograms added atomically into one per row; integer adds, so the
    result does not depend on their order), a count pass and an ordered write pass. Six reads of
    the scores, but every SM busy at any row count."""
    n, length = scores.shape
    out = torch.empty((n, k), dtype=torch.int32, device=scores.device)
    if not n or not k:
        return out.fill_(-1)
    if chunk is None:  # about four programs per SM, chunks of 1K..8K scores
        chunk = triton.next_power_of_2(max(1, -(-n * length // (4 * _sm_count(scores.device)))))
        chunk = min(8192, max(1024, chunk))
    n_chunks = max(1, triton.cdiv(length, chunk))
    pad = triton.next_power_of_2(triton.cdiv(k, n_chunks))
    hist = torch.zeros((4, n, 256), dtype=torch.int32, device=scores.device)
    counts = torch.empty((n, n_chunks, 2), dtype=torch.int32, device=scores.device)
    grid = (n, n_chunks)
    warps = 8 if chunk >= 4096 else 4
    for p in range(4):
        _mc_hist_kernel[grid](scores, lengths, hist, scores.stride(0), n, k, PASS=p, CHUNK=chunk,
                              num_warps=warps)
    _mc_count_kernel[grid](scores, lengths, hist, counts, scores.stride(0), n, k, n_chunks,
                           CHUNK=chunk, num_warps=warps)
    _mc_write_kernel[grid](scores, lengths, hist, counts, out, scores.stride(0), out.stride(0), n,
                           k, n_chunks, CHUNK=chunk, MAX_CHUNKS=triton.next_power_of_2(n_chunks),
                           PAD=pad, num_warps=warps)
    return out


def _sm_count(device: torch.device) -> int:
    """SMs of a CUDA device; 4 under the CPU interpreter (so both schedules get exercised)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def select_topk(scores: torch.Tensor, lengths: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k positions per row (ascending positions, -1 padded), with the policy measured on
    H100 (BENCHMARKS.md): ``topk_multi`` while there are fewer rows than SMs (one program per
    row would leave SMs idle; 1 x 128K in 0.034 ms as a graph replay against 0.69 ms), the
    one-program-per-row ``topk_rows`` from there on (1024 x 32K: both ~1.3 ms, fewer launches)."""
    if scores.shape[0] < _sm_count(scores.device):
        return topk_multi(scores, lengths, k)
    return topk_rows(scores, lengths, k)


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
