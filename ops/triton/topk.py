"""Top-k selection per row of a float32 score matrix: radix select on the float bits.

One program per row. Scores map to order-preserving uint32 keys; four histogram passes over the
row (8-bit digits, most significant first; 11/11/10-bit digits measured 4.8x slower) pin down
the exact k-th largest key T and how
many entries equal to T are still wanted; a final pass writes the positions of keys > T and then
the lowest positions of keys == T (deterministic ties: lower position wins), in ascending
position order. -inf scores (masked keys) come out as -1. Entries past the row's own length are
ignored.
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


def select_topk(scores: torch.Tensor, lengths: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k positions per row (ascending positions, -1 padded), with the policy measured on
    H100 (BENCHMARKS.md): the radix kernel (one program per row) from 16 rows up (64 x 32K:
    0.18 ms against 0.50 ms for ``scan_topk``), ``scan_topk`` below, where one program per row
    leaves the GPU idle (1 x 128K: 0.47 ms against 0.68 ms)."""
    if scores.shape[0] >= 16:
        return topk_rows(scores, lengths, k)
    return scan_topk(scores, lengths, k)


def scan_topk(scores: torch.Tensor, lengths: torch.Tensor, k: int) -> torch.Tensor:
    """``topk_rows``'s contract in torch ops: torch's multi-block top-k finds each row's k-th
    value T, then two scans apply the tie rule exactly with no host sync: keep every score > T
    and the lowest positions of those == T (FP8 indexer scores tie often), and compact the kept
    positions in order."""
    n, length = scores.shape
    kk = min(k, length)
    pos = torch.arange(length, device=scores.device)
    s = scores.masked_fill(pos[None] >= lengths[:, None], float("-inf")) + 0.0  # -0.0 -> +0.0
    kth = torch.topk(s, kk, dim=-1, sorted=False).values.min(dim=-1, keepdim=True).values
    gt = s > kth
    eq = s == kth
    need = kk - gt.sum(-1, keepdim=True, dtype=torch.int32)
    take = gt | (eq & (eq.cumsum(-1, dtype=torch.int32) <= need))  # exactly kk per row
    take &= ~torch.isneginf(s)  # -inf (masked) entries become the -1 padding after the rest
    slot = torch.where(take, take.cumsum(-1, dtype=torch.int32) - 1, kk).long()
    out = torch.full((n, kk + 1), -1, dtype=torch.int32, device=scores.device)
    out.scatter_(1, slot, pos[None].expand(n, -1).to(torch.int32))
    out = out[:, :kk]  # column kk collected the dropped entries
    if kk < k:
        out = torch.cat([out, out.new_full((n, k - kk), -1)], dim=1)
    return out.contiguous()


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
