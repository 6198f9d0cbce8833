"""The paged cache's step metadata (``PagedCache.prepare``) against a plain-python account of
the same pages: rows in any order, ragged starts and lengths, pages handed out on demand from the
shared free list; and the errors of steps it cannot serve."""

from __future__ import annotations

import random

import pytest
import torch

from dsa_ascend.cache import CacheError, PagedCache


def _cache(device, block_size=4, max_batch=4, max_seq=64):
    return PagedCache(n_layers=1, max_batch_size=max_batch, max_seq_len=max_seq,
                      block_size=block_size, kv_dim=8, index_dim=4, dtype=torch.float32,
                      index_fp8=False, device=device)


def test_prepare_metadata_follows_the_pages(device):
    rng = random.Random(5)
    c = _cache(device)
    bs = c.block_size
    for _ in range(12):  # decode-like and prefill-like steps over a shuffled subset of rows
        rows = rng.sample(range(c.max_batch_size), rng.randint(1, c.max_batch_size))
        start = [c.lengths[r] - rng.randint(0, min(2, c.lengths[r])) for r in rows]  # some rewind
        q_lens = [rng.randint(1, min(9, c.max_seq_len - s)) for s in start]
        step = c.prepare(rows, start, q_lens)
        pos, slots = [], []
        for r, s, n in zip(rows, start, q_lens):
            table = c._tables[r]
            assert len(table) >= -(-(s + n) // bs)  # the pages the new tokens need
            for p in range(s, s + n):
                pos.append(p)
                slots.append(table[p // bs] * bs + p % bs)
        assert step.positions.dtype == torch.int64 and step.positions.tolist() == pos
        assert step.slot_mapping.dtype == torch.int64 and step.slot_mapping.tolist() == slots
        cu = [0]
        for n in q_lens:
            cu.append(cu[-1] + n)
        assert step.cu_seqlens_q.dtype == torch.int32 and step.cu_seqlens_q.tolist() == cu
        assert step.seqlens_k.dtype == torch.int32
        assert step.seqlens_k.tolist() == [s + n for s, n in zip(start, q_lens)]
        assert step.max_seqlen_k == max(s + n for s, n in zip(start, q_lens))
        assert step.block_table.dtype == torch.int32 and step.block_table.shape[0] == len(rows)
        for i, r in enumerate(rows):  # each row's pages, in order, on the device
            table = c._tables[r]
            assert step.block_table[i, :len(table)].tolist() == table
        assert len(set(slots)) == len(slots)  # no two new tokens share a slot
        for r, s, n in zip(rows, start, q_lens):
            assert c.lengths[r] == s + n
    # a later step's growth must not change an earlier step's block table (a copy, not a view)
    c.reset()
    first = c.prepare([0], [0], [1])
    before = first.block_table.clone()
    c.prepare([0], [1], [2 * bs])
    assert torch.equal(first.block_table, before)


def test_prepare_names_what_it_cannot_serve(device):
    c = _cache(device)
    with pytest.raises(CacheError, match="rows must be distinct"):
        c.prepare([1, 1], [0, 0], [1, 1])
    with pytest.raises(CacheError, match="outside the cache's max_batch_size=4"):
        c.prepare([4], [0], [1])
    with pytest.raises(CacheError, match="row 0: a step needs at least one token"):
        c.prepare([0], [0], [0])
    with pytest.raises(CacheError, match="start_pos=3 but the cache holds 0"):
        c.prepare([0], [3], [1])
    with pytest.raises(CacheError, match="exceeds max_seq_len=64"):
        c.prepare([0], [0], [65])
