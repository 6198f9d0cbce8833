"""The input mappings of ``tools/bench_peer.py``: its side-by-side numbers mean something only if
our kernels get the peer's tensors, so the mapping of the peer's layouts and per-query key
windows onto our paged API is checked here (CPU, the Triton interpreter; GPU where present)."""

from __future__ import annotations

import importlib
import pathlib
import sys

import pytest
import torch

triton = pytest.importorskip("triton")  # conftest set TRITON_INTERPRET=1 when there is no GPU

from dsa_ascend import paging  # noqa: E402

TOOLS = pathlib.Path(__file__).resolve().parents[2] / "tools"


@pytest.fixture(scope="module")
def bp():
    sys.path.insert(0, str(TOOLS))
    try:
        mod = importlib.import_module("bench_peer")
    finally:
        sys.path.remove(str(TOOLS))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mod.DEV = dev  # the tools default to the GPU; the helpers take their device from here
    return mod


def _windows(g, n_docs=4):
    """Per-query windows [ks, ke) as a context-parallel rank sees them: documents packed one after
    another, each query causal within its document, the queries two non-adjacent slices."""
    lens = torch.randint(3, 40, (n_docs,), generator=g)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)[:-1]])
    ks = torch.cat([torch.full((int(n),), int(s)) for s, n in zip(starts, lens)])
    ke = torch.cat([torch.arange(int(s) + 1, int(s) + int(n) + 1) for s, n in zip(starts, lens)])
    total = int(lens.sum())
    keep = torch.cat([torch.arange(total // 4, total // 2), torch.arange(3 * total // 4, total)])
    return ks[keep].int(), ke[keep].int(), total


def test_windows_map_to_sequences_with_the_same_keys(bp):
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        ks, ke, _ = _windows(g)
        cu, sk, table = bp.windows_to_sequences(ks, ke)
        t = ks.numel()
        rows = paging.token_rows(cu, t)
        pos = paging.query_positions(cu, sk, t, rows=rows)
        for i in range(t):  # query i sees exactly keys ks[i] .. ke[i] - 1, in order
            assert table[rows[i], :pos[i] + 1].tolist() == list(range(int(ks[i]), int(ke[i]))), i


def test_indexer_logits_on_mapped_windows_match_float64(bp):
    """Our logits kernel at block size 1 on the mapped windows against float64 from the spec."""
    g = torch.Generator().manual_seed(5)
    ks, ke, total = _windows(g)
    cu, sk, table = bp.windows_to_sequences(ks, ke)
    t, h, d = ks.numel(), 4, 32
    dev = bp.DEV
    q, k = torch.randn(t, h, d, generator=g), torch.randn(total, d, generator=g)
    w, scale = torch.randn(t, h, generator=g), torch.rand(total, generator=g) + 0.5
    rows = paging.token_rows(cu, t)
    pos = paging.query_positions(cu, sk, t, rows=rows)
    progs = bp.K.indexer.programs(cu, rows, pos, 0, t, 2)
    width = triton.cdiv(int(sk.max()), 32) * 32
    got = bp.K.indexer.indexer_logits(q.to(dev), w.to(dev), k.to(dev), scale.to(dev), table, progs, 0, t,
                                      width, 1, 2, 32).cpu()
    for i in range(t):
        keys = slice(int(ks[i]), int(ke[i]))
        want = (torch.relu(q[i].double() @ k[keys].double().T) * w[i].double()[:, None]).sum(0)
        want = want * scale[keys].double()
        n = int(ke[i] - ks[i])
        assert torch.allclose(got[i, :n].double(), want, rtol=1e-4, atol=1e-4), i


def test_peer_sparse_mla_layout_maps_onto_the_paged_cache(bp):
    """The peer's [B, S, H, 576] / [B, SKV, 1, 576] tensors and SKV-padded indices as our paged
    views: the float64 reference on our view equals a direct evaluation on the peer's tensors."""
    g = torch.Generator().manual_seed(7)
    b, s, h, skv, topk = 2, 3, 4, 128, 8
    q, kv = torch.randn(b, s, h, 576, generator=g), torch.randn(b, skv, 1, 576, generator=g)
    idx = torch.randint(0, skv + 1, (b, s, 1, topk), generator=g).int()  # skv = padding
    q, kv, idx = q.to(bp.DEV), kv.to(bp.DEV), idx.to(bp.DEV)
    oq, cache, ind, table, rows_ = bp.ours_from_peer(q, kv, idx)
    assert (ind == -1).sum() == (idx == skv).sum()
    picks = list(range(b * s))
    got = bp.reference_rows(oq, cache, ind, table, rows_, picks)
    for bi in range(b):
        for si in range(s):
            sel = idx[bi, si, 0][idx[bi, si, 0] < skv].long()
            kvr = kv[bi, sel, 0].double()
            p = torch.softmax(q[bi, si].double() @ kvr.T * bp.SCALE, dim=-1)
            assert torch.allclose(got[bi * s + si], p @ kvr[:, :512]), (bi, si)


def test_flashmla_prefill_inputs_address_the_same_rows(bp):
    """FlashMLA's sparse prefill takes one flat kv: every query's indices must reach the rows of
    its own sequence that the peer's indices name, and the peer's padding (SKV) must become -1."""
    g = torch.Generator().manual_seed(11)
    b, s, h, skv, topk = 3, 4, 2, 64, 16
    q, kv = torch.randn(b, s, h, 576, generator=g), torch.randn(b, skv, 1, 576, generator=g)
    idx = torch.randint(0, skv + 1, (b, s, 1, topk), generator=g).int()
    fq, fkv, find = bp.flashmla_sparse_inputs(q, kv, idx)
    assert fq.shape == (b * s, h, 576) and fkv.shape == (b * skv, 1, 576) and find.shape == (b * s, 1, topk)
    assert fq.data_ptr() == q.data_ptr() and fkv.data_ptr() == kv.data_ptr()  # views, no copies
    for bi in range(b):
        for si in range(s):
            t = bi * s + si
            pad = idx[bi, si, 0] == skv
            assert (find[t, 0][pad] == -1).all()
            assert torch.equal(fkv[find[t, 0][~pad].long(), 0], kv[bi, idx[bi, si, 0][~pad].long(), 0])
            assert torch.equal(fq[t], q[bi, si])


def test_flashmla_slots_follow_the_block_table(bp):
    """Positions through a shuffled block table to the flat slots FlashMLA's decode reads: the
    slot's row of the paged cache is the position's row; -1 stays -1."""
    g = torch.Generator().manual_seed(13)
    b, ctx, bs, topk = 3, 256, 16, 20
    table = torch.randperm(b * ctx // bs, generator=g).int().view(b, -1)
    cache = torch.randn(b * ctx // bs, bs, 8, generator=g)
    pos = torch.stack([torch.randperm(ctx, generator=g)[:topk] for _ in range(b)]).int()
    pos[1, :3] = -1
    slots = bp.flashmla_slots(pos, table, bs)
    assert slots.dtype == torch.int32 and (slots[1, :3] == -1).all() and (slots[pos >= 0] >= 0).all()
    flat = cache.view(-1, 8)
    for r in range(b):
        for j in range(topk):
            p = int(pos[r, j])
            if p >= 0:
                assert torch.equal(flat[int(slots[r, j])], cache[int(table[r, p // bs]), p % bs])
