"""Lightning-indexer logits on the paged index-key cache, then top-k.

I(t, s) = k_scale(s) * sum_h w(t, h) * ReLU(q(t, h) . k(s)), s <= pos(t). A program takes
BLOCK_M query tokens of ONE sequence (they share a block table and a causal frontier) and a run
of key tiles of BLOCK_N positions. Per tile: one [BLOCK_N, D] x [D, BLOCK_M * H] product (FP8
or bf16 operands, float32 accumulation) with the KEYS as the MMA's rows, so the head-weighted
sum runs along the accumulator's columns: inside a thread plus two lane shuffles, not across
warps through shared memory (with heads as rows it was; 197 TFLOPS, BENCHMARKS.md). The queries'
tile is loaded once and reused for every key tile. Key tiles wholly beyond the block's last query
are skipped (their scores stay -inf). The loop is bound by instruction issue, not by the MMA, so
its integer work is kept small: the page size is a constant, and the tiles wholly before the
run's first token (all but the one or two at the causal frontier) take their rows from scalar
block-table loads and run without masks (450 -> 240 instructions a tile, 609 -> 877 TFLOPS;
H200, BENCHMARKS.md session 10). Queries are processed in chunks so that the float32 score
matrix held at once is bounded (``max_chunk_elements``), then each chunk goes through the radix
top-k. The launch table is built on the device: no host sync when the caller passes the step's
``max_seqlen_k``, so a decode step can be captured in a CUDA graph; with one token a run (decode)
one small kernel builds it and the top-k's row lengths (``decode_plan``). With
``fused_first_pass`` the logits kernel also counts the top-k's first-pass histogram from the
scores in its registers, and the select skips its own pass over them: by default for decode
chunks of up to ``FUSED_MAX_ROWS`` rows, where it saves 3-10% (a prefill chunk's one atomic a key
cost more than the select's warp-aggregated pass; H200, BENCHMARKS.md session 9). Chunks of
short rows (decode: ``topk.resident_fits``; prefill: up to ``PREFILL_RESIDENT_MAX`` keys) take
the one-program-a-row select instead, which has no first pass (1.06-1.7x on the op there,
BENCHMARKS.md session 12).
"""

from __future__ import annotations

import torch

import triton
import triton.language as tl
from dsa_ascend import paging

from .pdl import grid_dep, launch_opts, pdl_level
from .topk import (
    HI_BITS,
    _sortable,
    cluster_sms,
    default_hist_split,
    hist_workspace,
    radix_serves,
    resident_fits,
    select_topk,
)

# Prefill chunks take the one-program-a-row select up to this key width. Their rows are causal,
# half as long on average: the multi-program select's work follows a row's length, the other's
# does not. H200, the op as a CUDA graph, multi -> one program a row: 4 x 2K 694 -> 481 us,
# 1 x 4K 536 -> 483, 4 x 4K 1735 -> 1575; 1 x 8K 1392 -> 1509, 2 x 8K 2877 -> 3111, 1 x 16K
# 4814 -> 5556 (BENCHMARKS.md session 12).
PREFILL_RESIDENT_MAX = 4096
# indexer_topk's default for fused_first_pass: decode chunks (one token a program) of at most
# this many rows. H200, 128K keys, indexer + top-k: B=1 0.0433 -> 0.0392 ms, B=8 0.103 -> 0.094,
# B=32 0.256 -> 0.249, B=64 0.454 -> 0.441 (session 9); B=128 0.762 -> 0.713 with the 13-bit
# digit (session 11; 0.731 with 12 bits); a 4096-token prefill chunk 19.1 -> 23.7 ms (slower).
FUSED_MAX_ROWS = 128
# Query tokens a program takes in prefill (runs of one sequence), with 64-key FP8 tiles. H200,
# 512 queries x 128K keys: 4 x 64 (8 warps, 3 stages) 1.159 ms = 947 TFLOPS, 2 x 64 (4 warps, 2
# stages) 1.209, the earlier 2 x 128 (8 warps, 3 stages) 1.657 (BENCHMARKS.md session 10).
# Steps of up to two tokens a sequence (MTP-style decode) take runs of 2: at 32 sequences x 2
# tokens x 128K keys the op took 0.466 ms with runs of 4 (half the columns idle), 0.387 with 2.
PREFILL_BLOCK_M = 4


@triton.jit
def _key_slots(bt_row, offs_n, last_pos, BLOCK_SIZE: tl.constexpr):
    """Flat cache rows of key positions ``offs_n`` (past ``last_pos``: a row of the table's
    first page, never read: the caller masks those keys). The page size is a constant, so the
    page and offset are a shift and a mask (a runtime one cost an integer division a row, ~15
    instructions each, several a tile: a third of the loop's instructions; sm90 SASS)."""
    blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=offs_n <= last_pos, other=0)
    return blk.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE


@triton.jit
def _tile_pages(bt_row, n0, last_pos, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Block-table entries of the one or two pages that hold keys n0 .. n0 + BLOCK_N - 1 (a
    page past ``last_pos``: 0, never read), for pages of a multiple of BLOCK_N keys or of
    BLOCK_N / 2. Scalars: one load each."""
    b0 = tl.load(bt_row + n0 // BLOCK_SIZE, mask=n0 <= last_pos, other=0)
    if BLOCK_SIZE < BLOCK_N:
        b1 = tl.load(bt_row + n0 // BLOCK_SIZE + 1, mask=n0 + BLOCK_SIZE <= last_pos, other=0)
    else:
        b1 = b0
    return b0, b1


@triton.jit
def _tile_slots(b0, b1, n0, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Flat cache rows of keys n0 .. n0 + BLOCK_N - 1 from their pages (``_tile_pages``): an
    add and a select a key, the in-page offsets being loop-invariant."""
    r = tl.arange(0, BLOCK_N)
    if BLOCK_SIZE < BLOCK_N:  # two pages of BLOCK_N / 2 (n0 is page-aligned)
        return tl.where(r < BLOCK_SIZE, b0, b1).to(tl.int64) * BLOCK_SIZE + r % BLOCK_SIZE
    else:  # one page holds the whole tile
        return b0.to(tl.int64) * BLOCK_SIZE + (n0 % BLOCK_SIZE + r)


@triton.jit
def _score_tile(KC, KS, slot, n0, qt, w, pos, last_pos, out_rows, mmask, hist_rows,
                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                H_PAD: tl.constexpr, HAS_SCALE: tl.constexpr, IEEE: tl.constexpr,
                DO_HIST: tl.constexpr, HI: tl.constexpr, MASKED: tl.constexpr):
    """One key tile's scores of the program's BLOCK_M tokens, stored (and counted into the
    pass-1 histograms with DO_HIST). MASKED: the tile may hold keys past ``last_pos`` or past a
    token's own position; else every key is before every token (no masks at all)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    nmask = offs_n <= last_pos
    if MASKED:
        k = tl.load(KC + slot[:, None] * D + offs_d[None, :], mask=nmask[:, None], other=0.0)
    else:
        k = tl.load(KC + slot[:, None] * D + offs_d[None, :])
    if IEEE:
        s = tl.dot(k, qt, input_precision="ieee")
    else:
        s = tl.dot(k, qt)  # [BLOCK_N, BLOCK_M * H_PAD]
    s = tl.maximum(s, 0.0) * w[None, :]
    score = tl.sum(tl.reshape(s, (BLOCK_N, BLOCK_M, H_PAD)), 2)  # [BLOCK_N, BLOCK_M]
    if HAS_SCALE:
        if MASKED:
            score = score * tl.load(KS + slot, mask=nmask, other=0.0)[:, None]
        else:
            score = score * tl.load(KS + slot)[:, None]
    live = mmask[None, :]
    if MASKED:
        seen = offs_n[:, None] <= pos[None, :]
        score = tl.where(seen, score, float("-inf"))
        live = live & seen
    tl.store(out_rows[None, :] + offs_n[:, None], score, mask=mmask[None, :])
    if DO_HIST:  # the top-k's pass 1 on the scores in registers: each row's keys 0..pos
        # One plain atomic a key: the head reduction leaves each score replicated over the
        # lanes that held its heads, and Triton issues an atomic from one replica only; a
        # warp-aggregated count (topk._warp_group_count) would count every replica.
        digit = (_sortable(score) >> (32 - HI)).to(tl.int32)
        tl.atomic_add(hist_rows[None, :] + digit, tl.full([BLOCK_N, BLOCK_M], 1, tl.int32),
                      mask=live, sem="relaxed")


@triton.jit
def _indexer_logits_kernel(
    Q, W, KC, KS, BT, PROG, OUT, HIST,
    stride_qt, stride_wt, stride_bt, width,
    t0, tiles_per_prog,
    H: tl.constexpr, H_PAD: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_SCALE: tl.constexpr, IEEE: tl.constexpr,
    DO_HIST: tl.constexpr, HI: tl.constexpr, SPLIT: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    PDL: tl.constexpr,
):
    grid_dep(PDL)
    p = tl.program_id(0)
    row = tl.load(PROG + p * 4 + 0)
    t_start = tl.load(PROG + p * 4 + 1)
    t_end = tl.load(PROG + p * 4 + 2)
    pos_start = tl.load(PROG + p * 4 + 3)  # absolute position of token t_start
    if t_end <= t_start:  # an empty program of the launch table
        return
    last_pos = pos_start + (t_end - t_start) - 1
    n_lo = tl.program_id(1) * tiles_per_prog * BLOCK_N
    n_hi = tl.minimum(tl.minimum(n_lo + tiles_per_prog * BLOCK_N, last_pos + 1), width)

    # the queries' columns: (token, head) flattened, heads padded to H_PAD (zero q and w)
    offs_c = tl.arange(0, BLOCK_M * H_PAD)
    c_tok = offs_c // H_PAD
    c_head = offs_c % H_PAD
    cmask = (t_start + c_tok < t_end) & (c_head < H)
    c_row = (t_start + c_tok).to(tl.int64)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + (c_row * stride_qt + c_head * D)[:, None] + offs_d[None, :],
                mask=cmask[:, None], other=0.0)  # [BLOCK_M * H_PAD, D]
    w = tl.load(W + c_row * stride_wt + c_head, mask=cmask, other=0.0)

    offs_m = tl.arange(0, BLOCK_M)
    tok = t_start + offs_m
    mmask = tok < t_end
    pos = pos_start + offs_m
    out_rows = OUT + (tok - t0).to(tl.int64) * width
    # this program's partial histogram of each of its rows (HIST: topk.hist_workspace's layout)
    hist_rows = HIST + ((tok - t0).to(tl.int64) * SPLIT + tl.program_id(1) % SPLIT) * (1 << HI)
    bt_row = BT + row * stride_bt
    qt = tl.trans(q)
    if BLOCK_SIZE % BLOCK_N == 0 or BLOCK_N == 2 * BLOCK_SIZE:
        # Pages and tiles nest (a page holds whole tiles, or a tile two whole pages). Tiles
        # wholly before the run's first token need no masks: their keys' pages come from one or
        # two scalar block-table loads, one tile ahead (so the key loads depend only on
        # loop-carried values and the pipeliner issues them stages early). The tile(s) at the
        # causal frontier then take the masked form.
        n_full = tl.maximum(tl.minimum((pos_start + 1) // BLOCK_N * BLOCK_N, n_hi), n_lo)
        b0_next, b1_next = _tile_pages(bt_row, n_lo, last_pos, BLOCK_N, BLOCK_SIZE)
        for n0 in range(n_lo, n_full, BLOCK_N):
            b0, b1 = b0_next, b1_next
            b0_next, b1_next = _tile_pages(bt_row, n0 + BLOCK_N, last_pos, BLOCK_N, BLOCK_SIZE)
            _score_tile(KC, KS, _tile_slots(b0, b1, n0, BLOCK_N, BLOCK_SIZE), n0, qt, w, pos,
                        last_pos, out_rows, mmask, hist_rows, D, BLOCK_M, BLOCK_N, H_PAD,
                        HAS_SCALE, IEEE, DO_HIST, HI, MASKED=False)
        for n0 in range(n_full, n_hi, BLOCK_N):
            slot = _key_slots(bt_row, n0 + tl.arange(0, BLOCK_N), last_pos, BLOCK_SIZE)
            _score_tile(KC, KS, slot, n0, qt, w, pos, last_pos, out_rows, mmask, hist_rows, D,
                        BLOCK_M, BLOCK_N, H_PAD, HAS_SCALE, IEEE, DO_HIST, HI, MASKED=True)
    else:  # small or odd-sized pages: a block-table hop a key, every tile masked
        slot_next = _key_slots(bt_row, n_lo + tl.arange(0, BLOCK_N), last_pos, BLOCK_SIZE)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            slot = slot_next  # one tile ahead, as above
            slot_next = _key_slots(bt_row, n0 + BLOCK_N + tl.arange(0, BLOCK_N), last_pos,
                                   BLOCK_SIZE)
            _score_tile(KC, KS, slot, n0, qt, w, pos, last_pos, out_rows, mmask, hist_rows, D,
                        BLOCK_M, BLOCK_N, H_PAD, HAS_SCALE, IEEE, DO_HIST, HI, MASKED=True)


def indexer_logits(q, weights, kc, ks, block_table, progs, t0, t1, width, block_size, block_m,
                   block_n, num_warps=None, num_stages=None, tiles_per_prog=None, hist=None,
                   hi_bits=HI_BITS, hist_split=1):
    """Scores [t1 - t0, width] float32 of queries t0..t1 (programs ``progs``, from ``programs``).
    ``width`` is a multiple of ``block_n``. A row is written over every key tile up to its
    program's last query (-inf past the row's own position); tiles beyond are left unwritten,
    not filled (a full -inf fill cost one more write of the whole matrix): readers take row r
    over [0, pos(r)] only, as the top-k does through its row lengths. ``hist`` (zeroed,
    ``topk.hist_workspace(t1 - t0, hi_bits, hist_split)``): the kernel also counts the top
    ``hi_bits`` of each row's keys 0..pos(r) into it, the top-k's first pass done on the scores
    while they are in registers."""
    t, h, d = q.shape
    scores = torch.empty((t1 - t0, width), dtype=torch.float32, device=q.device)
    n_tiles = width // block_n
    if tiles_per_prog is None:  # long runs amortize the query load and the pipeline's fill
        # (H100, 4096 x 8K: 32 tiles 0.719 ms, 16 tiles 0.744, 8 tiles 0.810, 4 tiles 0.956),
        # but keep >= 4 programs per SM (decode: one token a row)
        tiles_per_prog = 32
        sms = _sm_count(q.device)
        while tiles_per_prog > 1 and progs.shape[0] * triton.cdiv(n_tiles, tiles_per_prog) < 4 * sms:
            tiles_per_prog //= 2
    h_pad = max(16, triton.next_power_of_2(h))
    grid = (progs.shape[0], triton.cdiv(n_tiles, tiles_per_prog))
    pdl = pdl_level(q, grid[0] * grid[1])
    _indexer_logits_kernel[grid](
        q, weights, kc, ks if ks is not None else weights, block_table, progs, scores,
        hist if hist is not None else progs,
        q.stride(0), weights.stride(0), block_table.stride(0), width,
        t0, tiles_per_prog,
        H=h, H_PAD=h_pad, D=d, BLOCK_M=block_m, BLOCK_N=block_n, HAS_SCALE=ks is not None,
        IEEE=q.dtype == torch.float32, DO_HIST=hist is not None,
        # constexprs of the histogram: fixed without one, so they add no compiled variants
        HI=hi_bits if hist is not None else HI_BITS, SPLIT=hist_split if hist is not None else 1,
        BLOCK_SIZE=block_size, PDL=pdl, **launch_opts(pdl),
        # H200, FP8, 64 heads: 1 x 128 keys 4 warps, 2 stages (decode); 2 x 64 4 warps, 2
        # stages; 4 x 64 8 warps, 3 stages (BENCHMARKS.md session 10)
        num_warps=num_warps or (4 if block_m * h_pad <= 128 else 8),
        num_stages=num_stages or (2 if block_m <= 2 else 3),
    )
    return scores


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _decode_plan_kernel(CU, SK, PROG, ROWLEN, t0, t1, n_rows, width, STEPS: tl.constexpr,
                        BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Tokens t0..t1, one run each: (row, t, t + 1, pos) into PROG and min(pos + 1, width) into
    ROWLEN; row = the last r with cu[r] <= t (binary search: empty sequences are passed over)."""
    grid_dep(PDL)
    tok = t0 + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = tok < t1
    lo = tl.zeros([BLOCK], tl.int32)
    hi = tl.full([BLOCK], 0, tl.int32) + n_rows
    for _ in tl.static_range(STEPS):  # invariant: cu[lo] <= tok < cu[hi]
        mid = (lo + hi) // 2
        go_up = tl.load(CU + mid, mask=live, other=0) <= tok
        lo = tl.where(go_up, mid, lo)
        hi = tl.where(go_up, hi, mid)
    pos = tl.load(SK + lo, mask=live, other=0) - (tl.load(CU + lo + 1, mask=live, other=0) - tok)
    out = PROG + (tok - t0) * 4
    tl.store(out, lo, mask=live)
    tl.store(out + 1, tok, mask=live)
    tl.store(out + 2, tok + 1, mask=live)
    tl.store(out + 3, pos, mask=live)
    tl.store(ROWLEN + (tok - t0), tl.minimum(pos + 1, width), mask=live)


def decode_plan(cu_seqlens_q, seqlens_k, t0: int, t1: int, width: int):
    """``programs(..., block_m=1)`` and the top-k's row lengths (pos + 1, at most ``width``) of
    tokens t0..t1 in one launch, from cu_seqlens_q / seqlens_k alone: a decode step's plan
    (torch ops built the same tables with a dozen small kernels, ~25 us a layer; BENCHMARKS.md)."""
    n = t1 - t0
    n_rows = cu_seqlens_q.shape[0] - 1
    progs = torch.empty((n, 4), dtype=torch.int32, device=cu_seqlens_q.device)
    row_len = torch.empty((n,), dtype=torch.int32, device=cu_seqlens_q.device)
    block = min(1024, max(16, triton.next_power_of_2(n)))
    grid = (triton.cdiv(n, block),)
    pdl = pdl_level(progs, grid[0])
    _decode_plan_kernel[grid](
        cu_seqlens_q.to(torch.int32), seqlens_k.to(torch.int32), progs, row_len, t0, t1, n_rows,
        width, STEPS=max(1, (n_rows - 1).bit_length() + 1), BLOCK=block, PDL=pdl,
        num_warps=4, **launch_opts(pdl))
    return progs, row_len


def programs(cu_seqlens_q, rows, pos, t0: int, t1: int, block_m: int) -> torch.Tensor:
    """Launch table int32 [n, 4]: (row, t_start, t_end, pos_start) for every run of up to
    ``block_m`` tokens of one sequence within [t0, t1) (``rows``/``pos``: every packed token's
    sequence and position). n = cdiv(t1 - t0, block_m) + R, the rows past the runs being empty
    programs (t_start == t_end, position -1); n = t1 - t0 when ``block_m`` is 1. Built on the
    device without a host sync: n follows from shapes alone."""
    device = rows.device
    if block_m == 1:  # every token is a run: four small launches (decode steps run this)
        tok = torch.arange(t0, t1, device=device)
        return torch.stack([rows[t0:t1], tok, tok + 1, pos[t0:t1]], 1).to(torch.int32)
    n = triton.cdiv(t1 - t0, block_m) + cu_seqlens_q.shape[0] - 1
    table = torch.zeros((n + 1, 4), dtype=torch.int32, device=device)  # the last row: a dump
    table[:, 3] = -1
    cu = cu_seqlens_q.long()
    rows, pos = rows[t0:t1], pos[t0:t1]
    tok = torch.arange(t0, t1, device=device)
    first = cu[rows].clamp_min(t0)  # runs restart at t0 (a chunk boundary)
    start = (tok - first) % block_m == 0
    end = torch.minimum(tok + block_m, cu[rows + 1].clamp_max(t1))
    slot = torch.where(start, start.long().cumsum(0) - 1, n)
    table[slot] = torch.stack([rows, tok, end, pos], 1).to(torch.int32)
    return table[:n]


def default_hi_bits(block_m: int, n_rows: int) -> int:
    """The top-k's pass-1 digit width for a chunk: 13 bits for decode chunks of up to
    ``FUSED_MAX_ROWS`` rows (fewer candidates for the one program a row that pins the k-th key;
    their pass 1 runs in the logits kernel), else 12. H200, 128K keys, the op as a CUDA graph,
    12 -> 13 bits: B=1 0.0352 -> 0.0358 ms, B=8 0.0907 -> 0.0798, B=32 0.2195 -> 0.2165, B=64
    0.3960 -> 0.3854 (BENCHMARKS.md session 10); B=128, fused: 0.7309 -> 0.7129 (session 11).
    14 bits (B=32, 64): fewer candidates, but the op 1-5% slower (a 4x larger histogram to zero
    and scan)."""
    return HI_BITS + 1 if block_m == 1 and n_rows <= FUSED_MAX_ROWS else HI_BITS


def indexer_topk(q, weights, k_cache, k_scale, block_table, cu_seqlens_q, seqlens_k, topk,
                 max_seqlen_k: int | None = None, block_m: int | None = None,
                 block_n: int | None = None, max_chunk_elements: int = 1 << 26,
                 fused_first_pass: bool | None = None):
    """The ``dsa.indexer_topk`` op (see dsa_ascend/ops.py): indices int32 [T, topk] with -1
    padding (valid entries first, ascending positions) and their float32 scores. With
    ``max_seqlen_k`` (host metadata) there is no host sync (the launch is planned on the device),
    so a decode step can be captured in a CUDA graph; without it, one sync reads max(seqlens_k).
    ``fused_first_pass``: the top-k's pass-1 histogram counted by the logits kernel (same output,
    bit for bit); None: for decode chunks of up to ``FUSED_MAX_ROWS`` rows too long for the
    one-program-a-row select (``topk.resident_fits``), which decode chunks of short rows take."""
    t, h, d = q.shape
    device = q.device
    if t == 0:
        return (torch.empty((0, topk), dtype=torch.int32, device=device),
                torch.empty((0, topk), dtype=torch.float32, device=device))
    ieee = q.dtype == torch.float32
    if block_m is None:  # decode: one token a sequence; prefill: runs of tokens share key tiles
        n_seqs = cu_seqlens_q.shape[0] - 1
        block_m = 1 if t <= n_seqs else (2 if t <= 2 * n_seqs else PREFILL_BLOCK_M)
    if block_n is None:
        block_n = 32 if ieee else (128 if block_m == 1 else 64)
    max_len = max_seqlen_k if max_seqlen_k is not None else int(seqlens_k.max())
    if block_m > 1:
        rows = paging.token_rows(cu_seqlens_q, t)
        pos = paging.query_positions(cu_seqlens_q, seqlens_k, t, rows=rows)
    q = q.contiguous()
    weights = weights.contiguous()
    kc = k_cache.reshape(-1, d)
    ks = k_scale.reshape(-1) if k_scale is not None else None
    width = triton.cdiv(max_len, block_n) * block_n
    chunk = max(1, max_chunk_elements // width)
    parts = []
    for t0 in range(0, t, chunk):
        t1 = min(t0 + chunk, t)
        # clamp: a max_seqlen_k below a real length (a broken contract) must not read past a row
        if block_m == 1:
            progs, row_len = decode_plan(cu_seqlens_q, seqlens_k, t0, t1, width)
        else:
            progs = programs(cu_seqlens_q, rows, pos, t0, t1, block_m)
            row_len = (pos[t0:t1] + 1).clamp_max(width).to(torch.int32)
        hi_bits = default_hi_bits(block_m, t1 - t0)
        # fused_first_pass: the top-k's pass 1 runs in the logits kernel, on the scores in
        # registers; else in the select's own pass over them (indexer scores bunch into a few
        # bins: warp-aggregated atomics there, 1.3-1.7x)
        split = default_hist_split(t1 - t0)  # the select's own rule, so the layouts agree
        # short decode and two-token rows take the one-program-a-row select, which has no
        # first pass to fuse; prefill rows up to PREFILL_RESIDENT_MAX keys
        resident = ((block_m <= 2 or width <= PREFILL_RESIDENT_MAX)
                    and fused_first_pass is not True
                    and resident_fits(t1 - t0, width, radix=radix_serves(q),
                                      sms=cluster_sms(q)))
        fuse = (block_m == 1 and t1 - t0 <= FUSED_MAX_ROWS and not resident
                if fused_first_pass is None else fused_first_pass)
        hist = hist_workspace(t1 - t0, hi_bits, split, device, length=width) if fuse else None
        scores = indexer_logits(q, weights, kc, ks, block_table, progs, t0, t1, width,
                                k_cache.shape[1], block_m, block_n, hist=hist, hi_bits=hi_bits,
                                hist_split=split)
        parts.append(select_topk(scores, row_len, topk, values=True, warp_agg=True,
                                 hi_bits=hi_bits, hist=hist, resident=resident))
    if len(parts) == 1:  # decode and short prefill: no copy into a joined output
        return parts[0]
    return torch.cat([i for i, _ in parts]), torch.cat([v for _, v in parts])
