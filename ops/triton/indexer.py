"""Lightning-indexer logits on the paged index-key cache, then top-k.

I(t, s) = k_scale(s) * sum_h w(t, h) * ReLU(q(t, h) . k(s)), s <= pos(t). A program takes
BLOCK_M query tokens of ONE sequence (so they share a block table) and BLOCK_N key positions:
one [BLOCK_M * H, D] x [D, BLOCK_N] product (FP8 or bf16 operands, float32 accumulation), ReLU,
the head-weighted sum, the key scale and the causal mask. Key tiles wholly beyond the block's last
query are skipped (their scores stay -inf). Queries are processed in chunks so that the float32
score matrix held at once is bounded (``max_chunk_elements``), then each chunk goes through the
radix top-k.
"""

from __future__ import annotations

import torch

import triton
import triton.language as tl
from dsa_ascend import paging

from .topk import select_topk


@triton.jit
def _indexer_logits_kernel(
    Q, W, KC, KS, BT, PROG, OUT,
    stride_qt, stride_wt, stride_bt, stride_ot,
    t0, block_size,
    H: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SCALE: tl.constexpr, IEEE: tl.constexpr,
):
    p = tl.program_id(0)
    nb = tl.program_id(1)
    row = tl.load(PROG + p * 4 + 0)
    t_start = tl.load(PROG + p * 4 + 1)
    t_end = tl.load(PROG + p * 4 + 2)
    pos_start = tl.load(PROG + p * 4 + 3)  # absolute position of token t_start
    n0 = nb * BLOCK_N
    last_pos = pos_start + (t_end - t_start) - 1
    if n0 > last_pos:
        return
    offs_m = tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, H)
    offs_d = tl.arange(0, D)
    tok = t_start + offs_m
    mmask = tok < t_end
    # q rows (token, head) flattened: [BLOCK_M * H, D]
    q_rows = (tok[:, None] * stride_qt + offs_h[None, :] * D).reshape(BLOCK_M * H)
    qmask = tl.broadcast_to(mmask[:, None], (BLOCK_M, H)).reshape(BLOCK_M * H)
    q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=qmask[:, None], other=0.0)
    w = tl.load(W + tok[:, None] * stride_wt + offs_h[None, :], mask=mmask[:, None], other=0.0)

    offs_n = n0 + tl.arange(0, BLOCK_N)
    nmask = offs_n <= last_pos
    blk = tl.load(BT + row * stride_bt + offs_n // block_size, mask=nmask, other=0)
    slot = blk.to(tl.int64) * block_size + offs_n % block_size
    k = tl.load(KC + slot[:, None] * D + offs_d[None, :], mask=nmask[:, None], other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.maximum(s, 0.0).reshape(BLOCK_M, H, BLOCK_N)
    score = tl.sum(s * w[:, :, None], 1)  # [BLOCK_M, BLOCK_N]
    if HAS_SCALE:
        score = score * tl.load(KS + slot, mask=nmask, other=0.0)[None, :]
    pos = pos_start + offs_m
    score = tl.where(offs_n[None, :] <= pos[:, None], score, float("-inf"))
    out = OUT + (tok - t0).to(tl.int64)[:, None] * stride_ot + offs_n[None, :]
    tl.store(out, score, mask=mmask[:, None] & (offs_n[None, :] < stride_ot))


def indexer_logits(q, weights, kc, ks, block_table, progs, t0, t1, width, block_size, block_m,
                   block_n, num_warps=None, num_stages=3):
    """Scores [t1 - t0, width] float32 (-inf where masked) of queries t0..t1 (programs ``progs``)."""
    t, h, d = q.shape
    scores = torch.full((t1 - t0, width), float("-inf"), dtype=torch.float32, device=q.device)
    grid = (progs.shape[0], width // block_n)
    _indexer_logits_kernel[grid](
        q, weights, kc, ks if ks is not None else weights, block_table, progs, scores,
        q.stride(0), weights.stride(0), block_table.stride(0), scores.stride(0),
        t0, block_size,
        H=h, D=d, BLOCK_M=block_m, BLOCK_N=block_n, HAS_SCALE=ks is not None,
        IEEE=q.dtype == torch.float32,
        num_warps=num_warps or (4 if block_m * h <= 64 else 8), num_stages=num_stages,
    )
    return scores


def _programs(cu: list[int], lens: list[int], t0: int, t1: int, block_m: int, device) -> torch.Tensor:
    """(row, t_start, t_end, pos_start) for every BLOCK_M run of tokens of one sequence in [t0, t1)."""
    progs = []
    for r in range(len(lens)):
        a, b = max(cu[r], t0), min(cu[r + 1], t1)
        first_pos = lens[r] - (cu[r + 1] - cu[r])
        for s in range(a, b, block_m):
            progs.append((r, s, min(s + block_m, b), first_pos + (s - cu[r])))
    return torch.tensor(progs, dtype=torch.int32, device=device).view(-1, 4)


def indexer_topk(q, weights, k_cache, k_scale, block_table, cu_seqlens_q, seqlens_k, topk,
                 max_seqlen_k: int | None = None, block_m: int | None = None,
                 block_n: int | None = None, max_chunk_elements: int = 1 << 26):
    """The ``dsa.indexer_topk`` op (see dsa_ascend/ops.py): indices int32 [T, topk] with -1
    padding (valid entries first, ascending positions) and their float32 scores. With
    ``max_seqlen_k`` (host metadata) and one token per program, the launch is planned on the
    device: no host sync, so a decode step can be captured in a CUDA graph."""
    t, h, d = q.shape
    device = q.device
    indices = torch.full((t, topk), -1, dtype=torch.int32, device=device)
    values = torch.full((t, topk), float("-inf"), dtype=torch.float32, device=device)
    if t == 0:
        return indices, values
    ieee = q.dtype == torch.float32
    if block_m is None:  # tl.dot needs M = block_m * h >= 16; 64 heads x 1 token was fastest
        block_m = max(1, (16 if ieee else 64) // h)
    if block_n is None:
        block_n = 32 if ieee else 128
    if max_seqlen_k is not None and block_m == 1:
        # (row, t, t + 1, position) per token, from device tensors; the output size is T
        rows = paging.token_rows(cu_seqlens_q, t)
        pos = paging.query_positions(cu_seqlens_q, seqlens_k, t)
        tok = torch.arange(t, device=device)
        all_progs = torch.stack([rows, tok, tok + 1, pos], 1).to(torch.int32)
        max_len = max_seqlen_k

        def programs(t0, t1):
            return all_progs[t0:t1]
    else:
        cu, lens = cu_seqlens_q.tolist(), seqlens_k.tolist()  # one sync: the grid needs them
        pos = _positions(cu, lens, device)
        max_len = max(lens)

        def programs(t0, t1):
            return _programs(cu, lens, t0, t1, block_m, device)
    q = q.contiguous()
    weights = weights.contiguous()
    kc = k_cache.reshape(-1, d)
    ks = k_scale.reshape(-1) if k_scale is not None else None
    width = triton.cdiv(max_len, block_n) * block_n
    chunk = max(1, max_chunk_elements // width)
    for t0 in range(0, t, chunk):
        t1 = min(t0 + chunk, t)
        scores = indexer_logits(q, weights, kc, ks, block_table, programs(t0, t1), t0, t1, width,
                                k_cache.shape[1], block_m, block_n)
        # clamp: a max_seqlen_k below a real length (a broken contract) must not read past a row
        row_len = (pos[t0:t1] + 1).clamp_max(width).to(torch.int32)
        idx = select_topk(scores, row_len, topk)
        indices[t0:t1] = idx
        values[t0:t1] = torch.where(idx >= 0, scores.gather(1, idx.clamp_min(0).long()),
                                    float("-inf"))
    return indices, values


def _positions(cu: list[int], lens: list[int], device) -> torch.Tensor:
    return torch.cat([torch.arange(lens[r] - (cu[r + 1] - cu[r]), lens[r])
                      for r in range(len(lens))]).to(device)
