"""The CPU contract emulator of torch_npu's lightning indexer and sparse flash attention against
naive float64 loops written here from the documented contract (NPU_NOTES.md): layouts TND /
BSND / PA_BSND (shuffled block tables), cumulative TND lengths, sparse_mode 3 with kv longer than
q, -1 padding. None of this says anything about NPU hardware; it pins what the glue relies on."""

from __future__ import annotations

import pytest
import torch

from dsa_ascend.backends.npu_contract import (
    ContractError,
    emulated_npu_lightning_indexer,
    emulated_npu_quant_lightning_indexer,
    emulated_npu_sparse_flash_attention,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def paged(keys: list[torch.Tensor], block_size: int, g: torch.Generator):
    """Sequences' keys [L_b, D] -> PA_BSND cache [blocks, bs, 1, D] with a shuffled block table."""
    need = [-(-k.shape[0] // block_size) for k in keys]
    max_blocks = max(need) + 1
    perm = torch.randperm(sum(need) + 3, generator=g)  # spare blocks hold garbage
    cache = torch.randn(perm.numel(), block_size, 1, keys[0].shape[-1], generator=g) * 100
    table = torch.full((len(keys), max_blocks), 0, dtype=torch.int32)
    used = 0
    for b, k in enumerate(keys):
        for j in range(need[b]):
            blk = int(perm[used])
            used += 1
            table[b, j] = blk
            part = k[j * block_size:(j + 1) * block_size]
            cache[blk, : part.shape[0], 0] = part
    return cache, table


# ----------------------------------------------------------------------------- float64 truth
def naive_scores(q, w, k, q_len, kv_len, mode=3):
    """q [ql, N, D], w [ql, N], k [L, D] -> float64 [ql, L] (-inf where masked)."""
    s = torch.full((q_len, kv_len), float("-inf"), dtype=torch.float64)
    for i in range(q_len):
        limit = min(kv_len, kv_len - q_len + 1 + i) if mode == 3 else kv_len
        for j in range(max(0, limit)):
            dots = (q[i].double() @ k[j].double()).clamp_min(0)
            s[i, j] = (dots * w[i].double()).sum()
    return s


def check_topk(idx, val, s64, k):
    """idx/val [K] of one row vs its float64 scores: the right count, a top set up to rounding,
    descending order, -1 / -inf after."""
    finite = torch.isfinite(s64)
    n = min(k, int(finite.sum()))
    assert (idx[n:] == -1).all() and torch.isneginf(val[n:]).all()
    sel = idx[:n].long()
    assert (sel >= 0).all() and sel.unique().numel() == n and finite[sel].all()
    tol = 1e-5 * (s64[finite].abs().max().item() + 1 if n else 1)
    if n < int(finite.sum()):
        rest = s64.clone()
        rest[sel] = float("-inf")
        assert s64[sel].min() >= rest.max() - tol
    torch.testing.assert_close(val[:n].double(), s64[sel], atol=tol, rtol=0)
    assert (val[:n][1:] <= val[:n][:-1] + tol).all()


def naive_attention(q, qr, k, kr, idx, scale, kv_len, q_len, i):
    """One query row (all heads) over the positions ``idx`` (contract: stop at the first -1,
    drop entries beyond the causal limit). -> out [N, Dv], max [N], sum [N] in float64."""
    limit = kv_len - q_len + 1 + i
    sel = []
    for j in idx.tolist():
        if j < 0:
            break
        if j < limit:
            sel.append(j)
    n = q.shape[0]
    if not sel:
        f64 = dict(dtype=torch.float64)
        return (torch.zeros(n, k.shape[-1], **f64), torch.full((n,), float("-inf"), **f64),
                torch.zeros(n, **f64))
    ks, krs = k[sel].double(), kr[sel].double()
    s = (q.double() @ ks.T + qr.double() @ krs.T) * scale  # [N, k]
    m = s.max(-1).values
    p = torch.exp(s - m[:, None])
    return (p @ ks) / p.sum(-1, keepdim=True), m, p.sum(-1)


# ----------------------------------------------------------------------------- the indexer
@pytest.mark.parametrize("block_size", [4, 16])
def test_indexer_tnd_query_paged_keys_chunked_prefill(block_size):
    g = gen(block_size)
    n, d, topk = 4, 32, 8
    q_lens, kv_lens = [5, 0, 1, 7, 3], [21, 6, 9, 7, 2]  # kv > q: chunked prefill; 1: decode
    keys = [torch.randn(L, d, generator=g) for L in kv_lens]
    cache, table = paged(keys, block_size, g)
    q = torch.randn(sum(q_lens), n, d, generator=g)
    w = torch.randn(sum(q_lens), n, generator=g)
    cum = torch.tensor(q_lens).cumsum(0).to(torch.int32)
    idx, val = emulated_npu_lightning_indexer(
        q, cache, w, actual_seq_lengths_query=cum, actual_seq_lengths_key=torch.tensor(kv_lens, dtype=torch.int32),
        block_table=table, layout_query="TND", layout_key="PA_BSND", sparse_count=topk,
        sparse_mode=3, return_value=True)
    assert idx.shape == (sum(q_lens), 1, topk) and idx.dtype == torch.int32
    t0 = 0
    for ql, kl, k in zip(q_lens, kv_lens, keys):
        s64 = naive_scores(q[t0:t0 + ql], w[t0:t0 + ql], k, ql, kl)
        for i in range(ql):
            check_topk(idx[t0 + i, 0], val[t0 + i, 0], s64[i], topk)
        t0 += ql


def test_indexer_bsnd_matches_naive_and_pads_short_rows():
    g = gen(1)
    b, s1, s2, n, d, topk = 3, 4, 12, 2, 16, 5
    q = torch.randn(b, s1, n, d, generator=g)
    k = torch.randn(b, s2, 1, d, generator=g)
    w = torch.rand(b, s1, n, generator=g)
    q_lens, kv_lens = [4, 2, 1], [12, 3, 7]
    idx, val = emulated_npu_lightning_indexer(
        q, k, w, actual_seq_lengths_query=q_lens, actual_seq_lengths_key=kv_lens,
        layout_query="BSND", layout_key="BSND", sparse_count=topk, return_value=True)
    assert idx.shape == (b, s1, 1, topk)
    for bi in range(b):
        s64 = naive_scores(q[bi, : q_lens[bi]], w[bi, : q_lens[bi]], k[bi, :, 0], q_lens[bi], kv_lens[bi])
        for i in range(s1):
            if i < q_lens[bi]:
                check_topk(idx[bi, i, 0], val[bi, i, 0], s64[i], topk)
            else:  # rows beyond the actual query length
                assert (idx[bi, i, 0] == -1).all()


def test_indexer_sparse_mode_0_sees_every_key_and_ties_go_to_the_lower_position():
    d = 8
    k = torch.ones(1, 10, 1, d)  # identical keys: every score ties
    q = torch.ones(1, 2, 1, d)
    w = torch.ones(1, 2, 1)
    idx0, _ = emulated_npu_lightning_indexer(q, k, w, sparse_count=4, sparse_mode=0)
    assert idx0[0, :, 0].tolist() == [[0, 1, 2, 3]] * 2
    idx3, _ = emulated_npu_lightning_indexer(q, k, w, sparse_count=12, sparse_mode=3)
    # rightDownCausal: row 0 of 2 queries against 10 keys sees 9, row 1 sees all 10
    assert idx3[0, 0, 0].tolist() == list(range(9)) + [-1] * 3
    assert idx3[0, 1, 0].tolist() == list(range(10)) + [-1] * 2


def test_quant_indexer_applies_both_dequant_scales_inside_the_relu():
    """npu_quant_lightning_indexer: int8 q/k, score = sum_n w ReLU(qs[t, n] ks[s] (q . k)),
    TND query, PA_BSND key and key_dequant_scale [blocks, bs, 1]; indices only by default."""
    g = gen(5)
    n, d, topk, bs = 4, 32, 6, 8
    q_lens, kv_lens = [3, 2], [17, 9]
    keys = [torch.randint(-127, 128, (L, d), generator=g).float() for L in kv_lens]
    cache, table = paged(keys, bs, g)
    cache = cache.round().clamp(-127, 127).to(torch.int8)
    scales = [torch.rand(L, generator=g) + 0.1 for L in kv_lens]
    scale_cache = torch.zeros(cache.shape[:3])  # [blocks, bs, 1], paged like the keys
    for b, sc in enumerate(scales):
        for j, v in enumerate(sc):
            scale_cache[table[b, j // bs], j % bs, 0] = v
    t = sum(q_lens)
    q = torch.randint(-127, 128, (t, n, d), generator=g).to(torch.int8)
    qs = torch.rand(t, n, generator=g) + 0.1
    w = torch.randn(t, n, generator=g)
    cum = torch.tensor(q_lens).cumsum(0).to(torch.int32)
    common = dict(actual_seq_lengths_query=cum, actual_seq_lengths_key=torch.tensor(kv_lens, dtype=torch.int32),
                  block_table=table, layout_query="TND", layout_key="PA_BSND", sparse_count=topk)
    only = emulated_npu_quant_lightning_indexer(q, cache, w, qs, scale_cache, **common)
    idx, val = emulated_npu_quant_lightning_indexer(q, cache, w, qs, scale_cache, return_value=True,
                                                    **common)
    assert torch.equal(only, idx) and idx.shape == (t, 1, topk)
    t0 = 0
    for ql, kl, k, ks in zip(q_lens, kv_lens, keys, scales):
        for i in range(ql):
            s64 = torch.full((kl,), float("-inf"), dtype=torch.float64)
            for j in range(kl - ql + 1 + i):
                dots = q[t0 + i].double() @ k[j].double()  # exact integers
                s64[j] = (w[t0 + i].double() * (qs[t0 + i].double() * ks[j].double() * dots).clamp_min(0)).sum()
            check_topk(idx[t0 + i, 0], val[t0 + i, 0], s64, topk)
        t0 += ql


def test_indexer_contract_errors():
    q, k, w = torch.randn(3, 2, 8), torch.randn(2, 4, 1, 8), torch.randn(3, 2)
    table = torch.zeros(1, 2, dtype=torch.int32)
    with pytest.raises(ContractError, match="cumulative"):
        emulated_npu_lightning_indexer(q, k, w, layout_query="TND", layout_key="PA_BSND",
                                       block_table=table, actual_seq_lengths_key=[5])
    with pytest.raises(ContractError, match="sparse_count"):
        emulated_npu_lightning_indexer(q, k, w, actual_seq_lengths_query=[3], layout_query="TND",
                                       layout_key="PA_BSND", block_table=table,
                                       actual_seq_lengths_key=[5], sparse_count=2500)
    with pytest.raises(ContractError, match="N2 = 1"):
        emulated_npu_lightning_indexer(q, torch.randn(2, 4, 2, 8), w, actual_seq_lengths_query=[3],
                                       layout_query="TND", layout_key="PA_BSND", block_table=table,
                                       actual_seq_lengths_key=[5])


# ----------------------------------------------------------------------------- sparse attention
def _random_indices(q_lens, kv_lens, k, g):
    """Per row: a random subset of its visible positions, then -1, then garbage after the -1
    (the contract: entries after the first -1 are padding whatever they hold)."""
    rows = []
    for ql, kl in zip(q_lens, kv_lens):
        for i in range(ql):
            vis = max(0, kl - ql + 1 + i)
            m = min(k - 1, vis)
            sel = torch.randperm(vis, generator=g)[:m] if vis else torch.empty(0, dtype=torch.long)
            row = torch.full((k,), -1, dtype=torch.int32)
            row[:m] = sel.to(torch.int32)
            if m + 1 < k:
                row[m + 1:] = 0  # garbage after the first -1
            rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize("block_size", [4, 16])
def test_sparse_attention_tnd_query_paged_kv(block_size):
    g = gen(10 + block_size)
    n, d, dr, topk, scale = 4, 32, 8, 6, 0.3
    q_lens, kv_lens = [3, 1, 0, 5], [14, 9, 4, 5]
    lat = [torch.randn(L, d + dr, generator=g) for L in kv_lens]
    cache, table = paged(lat, block_size, g)
    t = sum(q_lens)
    q = torch.randn(t, n, d + dr, generator=g)
    idx = _random_indices(q_lens, kv_lens, topk, g)
    idx[0, 0] = 13  # beyond row 0's causal limit (14 - 3 + 0 = 11): dropped in sparse_mode 3
    cum = torch.tensor(q_lens).cumsum(0).to(torch.int32)
    kv = cache
    out, smax, ssum = emulated_npu_sparse_flash_attention(
        q[..., :d], kv[..., :d], kv[..., :d], idx[:, None], scale, block_table=table,
        actual_seq_lengths_query=cum, actual_seq_lengths_kv=kv_lens, query_rope=q[..., d:],
        key_rope=kv[..., d:], layout_query="TND", layout_kv="PA_BSND", sparse_mode=3,
        return_softmax_lse=True)
    assert out.shape == (t, n, d) and smax.shape == ssum.shape == (t, 1, n)
    r = 0
    for ql, kl, x in zip(q_lens, kv_lens, lat):
        for i in range(ql):
            o64, m64, s64 = naive_attention(q[r, :, :d], q[r, :, d:], x[:, :d], x[:, d:], idx[r],
                                            scale, kl, ql, i)
            torch.testing.assert_close(out[r].double(), o64, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(smax[r, 0].double(), m64, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ssum[r, 0].double(), s64, atol=1e-5, rtol=1e-5)
            r += 1


def test_sparse_attention_bsnd_equals_tnd_paged():
    g = gen(3)
    b, s1, n, d, dr, topk, bs = 2, 2, 2, 16, 4, 5, 4
    kv_lens = [7, 11]
    lat = [torch.randn(L, d + dr, generator=g) for L in kv_lens]
    cache, table = paged(lat, bs, g)
    dense = torch.zeros(b, max(kv_lens), 1, d + dr)
    for i, x in enumerate(lat):
        dense[i, : x.shape[0], 0] = x
    q = torch.randn(b, s1, n, d + dr, generator=g)
    idx = _random_indices([s1] * b, kv_lens, topk, g).view(b, s1, 1, topk)
    common = dict(actual_seq_lengths_kv=kv_lens, sparse_mode=3, return_softmax_lse=True)
    o1, m1, s1_ = emulated_npu_sparse_flash_attention(
        q[..., :d], dense[..., :d], dense[..., :d], idx, 0.5, query_rope=q[..., d:],
        key_rope=dense[..., d:], layout_query="BSND", layout_kv="BSND", **common)
    o2, m2, s2_ = emulated_npu_sparse_flash_attention(
        q[..., :d].reshape(b * s1, n, d), cache[..., :d], cache[..., :d], idx.view(b * s1, 1, topk),
        0.5, block_table=table, actual_seq_lengths_query=[s1, 2 * s1],
        query_rope=q[..., d:].reshape(b * s1, n, dr), key_rope=cache[..., d:], layout_query="TND",
        layout_kv="PA_BSND", **common)
    torch.testing.assert_close(o1.view(b * s1, n, d), o2, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m1.view(-1), m2.view(-1))
    torch.testing.assert_close(s1_.view(-1), s2_.view(-1))


def test_sparse_attention_row_with_nothing_valid_and_layout_rule():
    q, kv = torch.randn(1, 1, 2, 8), torch.randn(1, 4, 1, 8)
    idx = torch.full((1, 1, 1, 3), -1, dtype=torch.int32)
    out, m, s = emulated_npu_sparse_flash_attention(q, kv, kv, idx, 1.0, return_softmax_lse=True)
    assert (out == 0).all() and torch.isneginf(m).all() and (s == 0).all()
    with pytest.raises(ContractError, match="must equal layout_kv"):
        emulated_npu_sparse_flash_attention(q.view(1, 2, 8), kv, kv, idx.view(1, 1, 3), 1.0,
                                            actual_seq_lengths_query=[1], layout_query="TND",
                                            layout_kv="BSND")
