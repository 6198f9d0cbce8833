"""Address arithmetic of the paged cache, shared by the cache and the reference kernels."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def token_rows(cu_seqlens_q: Tensor, total: Optional[int] = None) -> Tensor:
    """[T] int64: which sequence each packed query token belongs to. Pass ``total`` (T, known
    from a shape) and no host sync happens: the output size need not be read back."""
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    return torch.repeat_interleave(torch.arange(q_lens.numel(), device=q_lens.device), q_lens,
                                   output_size=total)


def query_positions(cu_seqlens_q: Tensor, seqlens_k: Tensor, total: Optional[int] = None,
                    rows: Optional[Tensor] = None) -> Tensor:
    """[T] int64 absolute position of each packed query token (its own key is the last visible).
    ``rows``: ``token_rows(cu_seqlens_q, total)`` where the caller has it already."""
    rows = token_rows(cu_seqlens_q, total) if rows is None else rows
    t = torch.arange(rows.numel(), device=rows.device)
    start = (seqlens_k.long() - (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long())
    return start[rows] + (t - cu_seqlens_q[:-1].long()[rows])


def slots(block_table: Tensor, rows: Tensor, positions: Tensor, block_size: int) -> Tensor:
    """Flat cache slots (block * block_size + offset) of ``positions`` (any shape, -1 allowed:
    those map to slot 0 and must be masked by the caller) of sequences ``rows`` (broadcastable)."""
    pos = positions.long().clamp_min(0)
    block = block_table.long()[rows, pos // block_size]
    return block * block_size + pos % block_size
