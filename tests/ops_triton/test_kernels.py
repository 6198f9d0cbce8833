"""The Triton kernels of the cuda backend against the reference backend.

On a GPU (``pytest --backend cuda``) they run compiled, at real sizes, in bf16 and FP8; on a CPU
they run under the Triton interpreter with fp16/fp32 inputs (its bf16 ``tl.dot`` is broken
upstream) and small sizes. The randomized sweep draws DSA_SWEEP shapes (default 1000 on a GPU,
12 on a CPU).
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")  # conftest set TRITON_INTERPRET=1 when there is no GPU
ON_GPU = torch.cuda.is_available()

from dsa_ascend import kv_fp8, paging  # noqa: E402
from dsa_ascend.backends import reference as ref  # noqa: E402
from dsa_ascend.backends.cuda import kernels  # noqa: E402
from dsa_ascend.quant import quantize_fp8_blocks  # noqa: E402

DEV = torch.device("cuda" if ON_GPU else "cpu")
LOWP = torch.bfloat16 if ON_GPU else torch.float16
SWEEP = int(os.environ.get("DSA_SWEEP", "1000" if ON_GPU else "12"))
K = kernels()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _paged(n_tokens_per_row, width, block_size, g, dtype=torch.float32):
    """A paged cache with shuffled pages for rows of the given lengths."""
    blocks_per_row = [-(-n // block_size) for n in n_tokens_per_row]
    total = sum(blocks_per_row) + 3  # a few unused pages
    perm = torch.randperm(total, generator=g)
    table = torch.zeros(len(n_tokens_per_row), max(blocks_per_row), dtype=torch.int32)
    used = 0
    for r, nb in enumerate(blocks_per_row):
        table[r, :nb] = perm[used:used + nb].int()
        used += nb
    cache = torch.randn(total, block_size, width, generator=g).to(dtype)
    return cache, table


def _step(q_lens, kv_lens):
    """A packed step on DEV: cu_seqlens_q, seqlens_k, and every token's sequence and position."""
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32).to(DEV)
    sk = torch.tensor(kv_lens, dtype=torch.int32).to(DEV)
    rows = paging.token_rows(cu, sum(q_lens))
    return cu, sk, rows, paging.query_positions(cu, sk, sum(q_lens), rows=rows)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _sparse_mla_case(seed, t, h, k_sel, dtype, kv_len=None, pad_frac=0.2, splits=None, impl=None,
                     fp8=False):
    """``fp8``: the kernel reads the FP8 cache (kv_fp8.pack of the float cache, varied scales) and
    the reference its dequantized values."""
    g = _gen(seed)
    rows = 2
    kv_len = kv_len or max(8, k_sel)
    cache, table = _paged([kv_len] * rows, 576, 16, g)
    kernel_cache = None
    if fp8:
        cache[..., :512] *= torch.rand(cache.shape[:2], generator=g)[..., None] * 4
        kernel_cache = kv_fp8.pack(cache[..., :512], cache[..., 512:])
        cache = kv_fp8.unpack(kernel_cache, 512)
    q = torch.randn(t, h, 576, generator=g)
    token_row = torch.randint(0, rows, (t,), generator=g).int()
    idx = torch.stack([torch.randperm(kv_len, generator=g)[:k_sel] for _ in range(t)]).int()
    if idx.shape[1] < k_sel:  # more slots than keys: pad
        idx = torch.cat([idx, idx.new_full((t, k_sel - idx.shape[1]), -1)], 1)
    idx[torch.rand(t, k_sel, generator=g) < pad_frac] = -1
    idx[:, 0] = torch.randint(0, kv_len, (t,), generator=g).int()  # at least one key per query
    q, cache = q.to(dtype), (cache if fp8 else cache.to(dtype))
    kernel_cache = cache if kernel_cache is None else kernel_cache
    scale = 576 ** -0.5
    out, lse = K.sparse_mla_fwd(q.to(DEV), kernel_cache.to(DEV), idx.to(DEV), table.to(DEV),
                                token_row.to(DEV), scale, 512, num_splits=splits, impl=impl)
    # float64 reference on the same (rounded) inputs
    r_out, r_lse = ref._sparse_attention(q.double(), cache.double(), idx, table, token_row.long(),
                                         scale, 512)
    return out.cpu(), lse.cpu(), r_out, r_lse, (q, cache, idx, table, token_row, scale)


def _bounds(dtype, inputs):
    """Tolerances (relative on the output, absolute on the LSE) from the reference's own error when
    it rounds its inputs to ``dtype`` as the kernel does (the cache to the kernel's dtype: the FP8
    cache's dequantized values too): a float32-input kernel must be ~exact, a low-precision one
    within 4x that error (2^-8 and 0.02 at least)."""
    if dtype == torch.float32:
        return 2e-5, 1e-4
    q, cache, idx, table, rows, scale = inputs
    s_out, s_lse = ref._sparse_attention(q.double(), cache.double(), idx, table, rows.long(), scale, 512)
    lowp = q.to(dtype).float()
    l_out, l_lse = ref._sparse_attention(lowp, cache.to(dtype).float(), idx, table, rows.long(), scale,
                                         512)
    finite = torch.isfinite(s_lse)
    lse_err = (l_lse.double() - s_lse)[finite].abs().max().item() if finite.any() else 0.0
    return 4 * max(_rel(l_out.to(dtype).float(), s_out), 2 ** -8), max(4 * lse_err, 2e-2)


def _bound(dtype, inputs):
    return _bounds(dtype, inputs)[0]


@pytest.mark.parametrize("t,h,k_sel,splits", [(7, 16, 64, None), (3, 64, 128, 3), (2, 128, 96, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, LOWP])
def test_sparse_mla_matches_reference(t, h, k_sel, splits, dtype):
    out, lse, r_out, r_lse, inputs = _sparse_mla_case(t * 131 + h, t, h, k_sel, dtype, splits=splits)
    assert torch.isfinite(out).all()
    assert _rel(out.float(), r_out) <= _bound(dtype, inputs)
    assert (lse.double() - r_lse).abs().max() <= (1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.skipif(not ON_GPU, reason="the sm90 (Gluon) kernel needs a Hopper GPU; Gluon has no interpreter")
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("impl", ["sm90", "triton"])
def test_sparse_mla_both_kernels_on_gpu(impl, fp8):
    """Both sparse MLA kernels at real sizes, on the bf16 and the FP8 cache (the default picks sm90
    on Hopper; the Triton kernel must stay right for other GPUs): ragged -1 padding, splits, a head
    count not a multiple of 64, more slots than keys."""
    if impl == "sm90" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("not a Hopper GPU")
    for i, (t, h, k_sel, kv_len, splits) in enumerate([(33, 128, 2048, 5000, None), (5, 64, 700, 900, 3),
                                                       (4, 96, 300, 300, 1), (2, 128, 2048, 40, None)]):
        out, lse, r_out, r_lse, inputs = _sparse_mla_case(90 + i, t, h, k_sel, LOWP, kv_len=kv_len,
                                                          splits=splits, impl=impl, fp8=fp8)
        out_bound, lse_bound = _bounds(LOWP, inputs)
        assert torch.isfinite(out).all()
        assert _rel(out.float(), r_out) <= out_bound, (impl, fp8, t, h, k_sel, splits)
        assert (lse.double() - r_lse).abs().max() <= lse_bound, (impl, fp8, t, h, k_sel, splits)


@pytest.mark.skipif(not ON_GPU, reason="the cluster pair is in the sm90 (Gluon) kernel; Gluon has no interpreter")
def test_sparse_mla_fp8_cluster_pair_is_bit_identical(monkeypatch):
    """The FP8 cache as cluster pairs (``DSA_MLA_PAIR``, the default: the two CTAs of a token each dequantize
    half of every tile and bulk-copy it to the other) against solo CTAs, bit for bit (each row is
    dequantized once either way, by the same arithmetic), eager and as a CUDA graph, and against
    the float64 reference. Head counts of 2 and 4 head blocks (pairs) and of 1 (no partner: solo
    CTAs), ragged -1 padding, splits, partial tiles, more slots than keys."""
    from dsa_ascend.backends.cuda import graph_replay

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("not a Hopper GPU")
    sm90 = K.sparse_mla.sparse_mla_sm90
    for i, (t, h, k_sel, kv_len, splits) in enumerate([(33, 128, 2048, 5000, 2), (16, 128, 2048, 4096, 1),
                                                       (5, 96, 700, 900, 3), (4, 256, 300, 300, None),
                                                       (3, 64, 500, 600, None), (2, 128, 2048, 40, None)]):
        got = {}
        for pair in ("0", "1"):
            monkeypatch.setenv(sm90.PAIR_ENV, pair)
            got[pair] = _sparse_mla_case(400 + i, t, h, k_sel, LOWP, kv_len=kv_len, splits=splits,
                                         impl="sm90", fp8=True)
        where = (t, h, k_sel, kv_len, splits)
        assert torch.equal(got["0"][0], got["1"][0]) and torch.equal(got["0"][1], got["1"][1]), where
        out, lse, r_out, r_lse, inputs = got["1"]
        out_bound, lse_bound = _bounds(LOWP, inputs)
        assert _rel(out.float(), r_out) <= out_bound, where
        assert (lse.double() - r_lse).abs().max() <= lse_bound, where
    # a graph replay of the pair (the decode step is captured whole) against the eager solo call
    g = _gen(7)
    cache, table = _paged([3000] * 4, 576, 64, g)
    packed = kv_fp8.pack(cache[..., :512], cache[..., 512:], True).to(DEV)
    q = torch.randn(24, 128, 576, generator=g).to(LOWP).to(DEV)
    idx = torch.stack([torch.randperm(3000, generator=g)[:2048] for _ in range(24)]).int()
    idx[torch.rand(24, 2048, generator=g) < 0.1] = -1
    args = (q, packed, idx.to(DEV), table.to(DEV), torch.arange(24).remainder(4).int().to(DEV),
            576 ** -0.5, 512)
    monkeypatch.setenv(sm90.PAIR_ENV, "0")
    want = K.sparse_mla_fwd(*args, impl="sm90")
    monkeypatch.setenv(sm90.PAIR_ENV, "1")
    box = {}
    replay = graph_replay(lambda: box.update(out=K.sparse_mla_fwd(*args, impl="sm90")))
    for _ in range(2):
        replay()
        torch.cuda.synchronize()
        assert torch.equal(box["out"][0], want[0]) and torch.equal(box["out"][1], want[1])


def test_sparse_mla_pair_switch(monkeypatch):
    """The cluster pair is on unless ``DSA_MLA_PAIR=0``."""
    sm90 = K.sparse_mla.sparse_mla_sm90
    monkeypatch.delenv(sm90.PAIR_ENV, raising=False)
    assert sm90.pair_enabled()
    monkeypatch.setenv(sm90.PAIR_ENV, "0")
    assert not sm90.pair_enabled()
    monkeypatch.setenv(sm90.PAIR_ENV, "1")
    assert sm90.pair_enabled()


def test_sparse_mla_impl_argument():
    args = _sparse_mla_args()
    with pytest.raises(ValueError, match="impl must be None, 'sm90' or 'triton'"):
        K.sparse_mla_fwd(*args, impl="cutlass")
    if not ON_GPU:
        with pytest.raises(ValueError, match="impl='sm90' needs a Hopper GPU"):
            K.sparse_mla_fwd(*args, impl="sm90")


def _sparse_mla_args():
    g = _gen(3)
    cache, table = _paged([40], 576, 16, g)
    q = torch.randn(2, 64, 576, generator=g).to(LOWP)
    idx = torch.randint(0, 40, (2, 8), generator=g).int()
    return (q.to(DEV), cache.to(LOWP).to(DEV), idx.to(DEV), table.to(DEV),
            torch.zeros(2, dtype=torch.int32, device=DEV), 576 ** -0.5, 512)


def test_sparse_mla_more_slots_than_keys():
    """K larger than the keys that exist: most slots are -1; rows with one key are exact."""
    out, lse, r_out, r_lse, _ = _sparse_mla_case(5, 4, 16, 64, torch.float32, kv_len=5, pad_frac=0.0)
    assert _rel(out, r_out) <= 2e-5 and (lse.double() - r_lse).abs().max() <= 1e-4


def test_sparse_mla_sweep():
    g = _gen(1234)
    for i in range(SWEEP):
        t = int(torch.randint(1, 9 if ON_GPU else 3, (1,), generator=g))
        h = [16, 32, 64, 128][int(torch.randint(0, 4 if ON_GPU else 2, (1,), generator=g))]
        k_sel = int(torch.randint(1, 2049 if ON_GPU else 80, (1,), generator=g))
        kv_len = int(torch.randint(1, 3000 if ON_GPU else 100, (1,), generator=g))
        dtype = LOWP if i % 2 else torch.float32
        splits = [None, 1, 2, 5][i % 4]
        fp8 = i % 3 == 2  # the FP8 cache too (on Hopper with a bf16 q: the sm90 kernel's FP8 path)
        out, lse, r_out, r_lse, inputs = _sparse_mla_case(i, t, h, k_sel, dtype, kv_len=kv_len,
                                                          splits=splits, fp8=fp8)
        err, bound = _rel(out.float(), r_out), _bound(dtype, inputs)
        assert err <= bound, (i, t, h, k_sel, kv_len, dtype, splits, fp8, err, bound)


@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, LOWP])
def test_sparse_mla_fp8_cache(dtype, ue8m0):
    """The FP8 latent cache (uint8 entries, dsa_ascend/kv_fp8.py): the kernel dequantizes each
    gathered entry; compared with float64 attention over the dequantized cache."""
    g = _gen(77 + ue8m0)
    t, h, k_sel, kv_len, rows = (9, 128, 700, 1500, 3) if ON_GPU else (3, 16, 40, 60, 2)
    cache, table = _paged([kv_len] * rows, 576, 16, g)
    cache[..., :512] *= torch.rand(cache.shape[:2], generator=g)[..., None] * 4  # varied scales
    packed = kv_fp8.pack(cache[..., :512], cache[..., 512:], ue8m0=ue8m0)
    dequant = kv_fp8.unpack(packed, 512).double()
    q = torch.randn(t, h, 576, generator=g).to(dtype)
    token_row = torch.randint(0, rows, (t,), generator=g).int()
    idx = torch.stack([torch.randperm(kv_len, generator=g)[:k_sel] for _ in range(t)]).int()
    idx[torch.rand(t, k_sel, generator=g) < 0.2] = -1
    idx[:, 0] = 0
    splits = 2 if ON_GPU else 1
    out, lse = K.sparse_mla_fwd(q.to(DEV), packed.to(DEV), idx.to(DEV), table.to(DEV),
                                token_row.to(DEV), 576 ** -0.5, 512, num_splits=splits)
    r_out, r_lse = ref._sparse_attention(q.double(), dequant, idx, table, token_row.long(),
                                         576 ** -0.5, 512)
    bound, lse_bound = _bounds(dtype, (q, dequant, idx, table, token_row, 576 ** -0.5))
    assert torch.isfinite(out.float()).all()
    assert _rel(out.float().cpu(), r_out) <= bound
    assert (lse.double().cpu() - r_lse).abs().max() <= lse_bound


def test_topk_rows_exact_sets_and_ties():
    g = _gen(7)
    n, length = (64, 32768) if ON_GPU else (6, 2000)
    s = torch.randn(n, length, generator=g)
    s[1] = torch.randint(0, 4, (length,), generator=g).float()  # massive ties
    s[2, 50:] = float("-inf")  # fewer finite scores than k
    s[4, :300] = torch.where(torch.arange(300) % 2 == 0, 0.0, -0.0)  # -0.0 ties with +0.0
    lens = torch.full((n,), length, dtype=torch.int32)
    lens[3] = 100
    k = 2048 if ON_GPU else 64
    got = K.topk_rows(s.to(DEV), lens.to(DEV), k).cpu()
    got8 = K.topk_rows(s.to(DEV), lens.to(DEV), k, byte_digits=True).cpu()
    assert torch.equal(got, got8)  # same deterministic output from both digit schedules
    # the multi-program radix select: same deterministic output (ascending positions, padding)
    # small write blocks: a chunk's listed keys take several steps of pass 3; small finish
    # blocks: the candidates overflow the block and every pass loops over them
    for chunk, hi, wb, fb, digit, win in (
            ((1024, 11, 128, 4096, 4, 64), (4096, 9, 16, 64, 8, 0), (2048, 15, 512, 128, 4, 8))
            if ON_GPU else
            ((128, 11, 128, 4096, 4, 64), (512, 9, 16, 64, 8, 0), (128, 15, 8, 32, 4, 8))):
        for split in (1, 3):
            assert torch.equal(K.topk.topk_multi(s.to(DEV), lens.to(DEV), k, chunk=chunk,
                                                 hi_bits=hi, write_block=wb, finish_block=fb,
                                                 finish_digit=digit, hist_split=split,
                                                 hist_window=win).cpu(),
                               got), (chunk, hi, wb, fb, split, win)
    # both compaction kernels (the Gluon one runs on GPUs only), at several warp counts
    for impl, warps in ((("triton", 4), ("gluon", 2), ("gluon", 4), ("gluon", 8)) if ON_GPU
                        else (("triton", 1), ("triton", 4))):
        for win in (0, 64):
            assert torch.equal(K.topk.topk_multi(s.to(DEV), lens.to(DEV), k, compact_impl=impl,
                                                 hist_impl=impl, warp_agg=True, hist_window=win,
                                                 scan_warps=warps).cpu(), got), (impl, warps, win)
    # one program a row, the row in registers: the same output, positions and scores (on GPUs
    # the bisection kernels and the radix one, at its fewest warps and at 32)
    for impl, warps, radix in ((("triton", 16, None), ("gluon", None, False), ("gluon", 4, False),
                                ("gluon", 32, False), ("gluon", None, True), ("gluon", 32, True))
                               if ON_GPU else (("triton", None, None), ("triton", 1, None))):
        idx, vals = K.topk.topk_resident(s.to(DEV), lens.to(DEV), k, values=True,
                                         num_warps=warps, impl=impl, radix=radix)
        assert torch.equal(idx.cpu(), got), (impl, warps, radix)
        assert torch.equal(vals.cpu(), torch.where(got >= 0, s.gather(1, got.clamp_min(0).long()),
                                                   float("-inf"))), (impl, warps, radix)
    assert torch.equal(K.select_topk(s.to(DEV), lens.to(DEV), k).cpu(), got)  # the policy
    idx, vals = K.select_topk(s.to(DEV), lens.to(DEV), k, values=True, warp_agg=True)  # + scores
    assert torch.equal(idx.cpu(), got)
    assert torch.equal(vals.cpu(), torch.where(got >= 0, s.gather(1, got.clamp_min(0).long()),
                                               float("-inf")))
    for r in range(n):
        want, _ = ref.select_topk(s[r:r + 1, :lens[r]], k)
        assert sorted(got[r].tolist()) == sorted(want[0].tolist()), r
        n_valid = int((got[r] >= 0).sum())  # valid entries first, then the -1 padding
        assert (got[r][n_valid:] == -1).all(), r


@pytest.mark.parametrize("window", [0, 8, 64])
def test_topk_first_pass_histogram_is_a_bincount(window):
    """Pass 1 alone against a torch bincount of the keys' top digits, on bunched scores (most of
    a chunk within a few bins of its lowest digit: the in-program window's case) and on spread
    ones (many keys outside it: the atomic-a-key fallback), with ragged row lengths."""
    g = _gen(31 + window)
    n, length, hi, chunk = (6, 70000, 12, 1024) if ON_GPU else (5, 900, 12, 128)
    s = torch.randn(n, length, generator=g)
    s[:3] = 1.0 + 0.05 * s[:3]  # bunched: one or two exponents
    s[4, 17] = float("-inf")
    lens = torch.randint(1, length + 1, (n,), generator=g).int()
    lens[0] = length
    lens[1] = length // 3
    s[1, lens[1]:] = float("nan")  # past a row's length: loaded (vector loads), never counted
    for split in (1, 2):
        hist = torch.zeros(n * split << hi, dtype=torch.int32, device=DEV)
        K.topk._hi_hist_kernel[(n, triton.cdiv(length, chunk))](
            s.to(DEV), lens.to(DEV), hist, length, length, HI=hi, CHUNK=chunk, WARP_AGG=ON_GPU,
            SPLIT=split, WINDOW=window, PDL=0, num_warps=4)
        got = [hist.cpu().view(n, split, 1 << hi).sum(1)]
        if ON_GPU:  # the Gluon pass 1 (warp-aggregated; no interpreter) counts the same
            hist_gl = torch.zeros_like(hist)
            K.topk_sm90.hi_hist((n, triton.cdiv(length, chunk)), s.to(DEV), lens.to(DEV), hist_gl,
                                length, hi, chunk, split, window, 4)
            got.append(hist_gl.cpu().view(n, split, 1 << hi).sum(1))
        for r in range(n):
            want = torch.bincount(_sortable_keys(s[r, :lens[r]]) >> (32 - hi), minlength=1 << hi)
            for i, g_ in enumerate(got):
                assert torch.equal(g_[r], want.int()), (window, split, r, i)


def test_topk_multi_names_a_bad_digit_width_or_chunk():
    s = torch.randn(2, 64).to(DEV)
    lens = torch.full((2,), 64, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="hi_bits must lie in"):
        K.topk.topk_multi(s, lens, 8, hi_bits=16)
    for chunk in (96, 32768):
        with pytest.raises(ValueError, match="chunk must be a power of two"):
            K.topk.topk_multi(s, lens, 8, chunk=chunk)
    with pytest.raises(ValueError, match="hist_split must be >= 1"):
        K.topk.topk_multi(s, lens, 8, hist_split=0)
    for win in (48, 1 << 13):
        with pytest.raises(ValueError, match="hist_window must be 0 or a power of two"):
            K.topk.topk_multi(s, lens, 8, hi_bits=12, hist_window=win)
    for name in ("compact_impl", "hist_impl"):
        with pytest.raises(ValueError, match=f"{name} must be None, 'gluon' or 'triton'"):
            K.topk.topk_multi(s, lens, 8, **{name: "cuda"})
        if not ON_GPU:
            with pytest.raises(ValueError, match=f"{name}='gluon' needs a CUDA GPU"):
                K.topk.topk_multi(s, lens, 8, **{name: "gluon"})
    if ON_GPU:
        with pytest.raises(ValueError, match="hist_impl='gluon' counts with warp-aggregated"):
            K.topk.topk_multi(s, lens, 8, hist_impl="gluon")
    with pytest.raises(ValueError, match="hist must be int32"):
        K.topk.topk_multi(s, lens, 8, hist=torch.zeros(7, dtype=torch.int32, device=DEV))
    wide = torch.randn(1, K.topk.RESIDENT_MAX + 1).to(DEV)
    with pytest.raises(ValueError, match="topk_resident: rows of at most"):
        K.topk.topk_resident(wide, lens[:1], 8)
    with pytest.raises(ValueError, match="topk_resident: scores must have unit stride"):
        K.topk.topk_resident(s.t(), lens, 8)
    with pytest.raises(ValueError, match="topk_resident: num_warps must be a power of two"):
        K.topk.topk_resident(s, lens, 8, num_warps=3)
    with pytest.raises(ValueError, match="topk_resident: impl must be None, 'gluon' or 'triton'"):
        K.topk.topk_resident(s, lens, 8, impl="cuda")
    if not ON_GPU:
        with pytest.raises(ValueError, match="topk_resident: impl='gluon' needs a CUDA GPU"):
            K.topk.topk_resident(s, lens, 8, impl="gluon")
        with pytest.raises(ValueError, match="topk_resident: radix=True is a Gluon kernel"):
            K.topk.topk_resident(s, lens, 8, radix=True)
    with pytest.raises(ValueError, match="topk_resident: radix=True is a Gluon kernel"):
        K.topk.topk_resident(s, lens, 8, impl="triton", radix=True)
    if K.topk_sm90._GLUON:  # checked before the launch: on a CPU too
        with pytest.raises(ValueError, match=r"digits must satisfy d0 >= d1 >= 32 - d0 - d1"):
            K.topk_sm90.resident(s, lens, s, s, 8, 32, False, 1, radix=True, digits=(10, 12))
    # the policy: every row of up to RESIDENT_MAX keys where the radix kernel serves
    assert K.topk.resident_fits(1, 32768, radix=True)
    assert not K.topk.resident_fits(1, 32768, radix=False)
    assert not K.topk.resident_fits(1, 32769, radix=True)
    if ON_GPU:
        with pytest.raises(ValueError, match="radix=True takes at most 32 keys a thread"):
            K.topk.topk_resident(torch.randn(2, 8192, device=DEV), lens, 8, num_warps=4,
                                 radix=True)
    with pytest.raises(ValueError, match="select_topk: resident=True takes no pass-1 hist"):
        K.select_topk(s, lens, 8, resident=True, hist=torch.zeros(2 << 12, dtype=torch.int32,
                                                                  device=DEV))


@pytest.mark.parametrize("kind", ["equal", "signed_zeros", "all_inf", "mostly_inf", "wide"])
def test_topk_resident_edge_rows(kind):
    """The one-program-a-row selects (on GPUs both Gluon kernels, the radix one at its fewest
    warps and at 32) on degenerate rows against ``topk_rows``: every key equal, +0.0 / -0.0
    only, all or most scores -inf, magnitudes over 2^+-40; rows of length 0, shorter than k and
    full; NaN past a row's length; a width that is no power of two."""
    g = _gen(sum(map(ord, kind)))
    n, length, k = (6, 30000, 2048) if ON_GPU else (6, 700, 64)
    s = torch.randn(n, length, generator=g)
    if kind == "equal":
        s = torch.full((n, length), 0.75)
    elif kind == "signed_zeros":
        s = torch.where(torch.rand(n, length, generator=g) < 0.5, 0.0, -0.0)
    elif kind == "all_inf":
        s = torch.full((n, length), float("-inf"))
    elif kind == "mostly_inf":
        s = s.masked_fill(torch.rand(n, length, generator=g) < 0.97, float("-inf"))
    else:
        s = s * torch.exp(20 * torch.rand(n, length, generator=g) - 10)
    lens = torch.tensor([length, 0, k // 2, length - 1, 3 * k // 2, 1], dtype=torch.int32)
    s[3, lens[3]:] = float("nan")
    want = K.topk_rows(s.to(DEV), lens.to(DEV), k).cpu()
    variants = ((None, None), (None, False), (None, True), (32, True)) if ON_GPU else ((None, None),)
    for warps, radix in variants:
        idx, vals = K.topk.topk_resident(s.to(DEV), lens.to(DEV), k, values=True,
                                         num_warps=warps, radix=radix)
        assert torch.equal(idx.cpu(), want), (kind, warps, radix)
        assert torch.equal(vals.cpu(), torch.where(want >= 0, s.gather(1, want.clamp_min(0).long()),
                                                   float("-inf"))), (kind, warps, radix)
    for r in range(n):
        ref_idx, _ = ref.select_topk(s[r:r + 1, :lens[r]], k)
        assert sorted(want[r].tolist()) == sorted(ref_idx[0].tolist()), (kind, r)


def test_topk_sweep():
    g = _gen(99)
    for i in range(SWEEP):
        length = int(torch.randint(1, 40000 if ON_GPU else 600, (1,), generator=g))
        k = int(torch.randint(1, 2049 if ON_GPU else 64, (1,), generator=g))
        s = torch.randn(2, length, generator=g)
        if i % 3 == 0:
            s = s.round(decimals=1)  # ties
        lens = torch.tensor([length, max(1, length // 2)], dtype=torch.int32)
        got = K.topk_rows(s.to(DEV), lens.to(DEV), k).cpu()
        multi = K.topk.topk_multi(s.to(DEV), lens.to(DEV), k,
                                  chunk=(1024, 2048, None)[i % 3] if ON_GPU else 64 << (i % 3),
                                  warp_agg=bool(i % 2)).cpu()
        assert torch.equal(multi, got), (i, length, k)
        if length <= K.topk.RESIDENT_MAX:
            assert torch.equal(K.topk.topk_resident(s.to(DEV), lens.to(DEV), k).cpu(), got), \
                (i, length, k)
            if ON_GPU:  # both Gluon kernels, whichever is the default
                for radix in (False, True):
                    assert torch.equal(K.topk.topk_resident(s.to(DEV), lens.to(DEV), k,
                                                            radix=radix).cpu(), got), \
                        (i, length, k, radix)
        for r in range(2):
            want, _ = ref.select_topk(s[r:r + 1, :lens[r]], k)
            assert sorted(got[r].tolist()) == sorted(want[0].tolist()), (i, length, k, r)


@pytest.mark.skipif(not ON_GPU, reason="the cluster select is a Gluon kernel on thread-block clusters (sm90+)")
def test_topk_cluster_matches_multi(monkeypatch):
    """The radix select on a cluster of CTAs a row (``topk_cluster``: rows of 32K to 256K keys,
    the clusters' histograms summed through distributed shared memory), positions and scores,
    bit for bit against ``topk_multi``: every cluster size and block, ragged rows (0 keys, under
    32K, one key past a block), ties, -inf, bunched scores, signed zeros, k = 1 to 2048; then
    ``select_topk`` and the decode indexer + top-k with ``DSA_TOPK_CLUSTER=1`` against the
    default (the same op without its fused first pass)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need sm90")
    g = _gen(31)
    for length, size, block in [(32769, 2, 32768), (40000, 4, 16384), (65536, 2, 32768),
                                (100000, 8, 16384), (131072, 4, 32768), (131072, 8, 16384),
                                (160000, 8, 32768), (262144, 8, 32768)]:
        n = 6
        s = torch.randn(n, length, generator=g)
        s[1] = torch.randint(0, 4, (length,), generator=g).float()  # massive ties
        s[2] = s[2].masked_fill(torch.rand(length, generator=g) < 0.99, float("-inf"))
        s[3] = 5 + torch.rand(length, generator=g) * 1e-3  # bunched into a few bins
        s[4, ::2] = 0.0
        s[4, 1::2] = -0.0
        lens = torch.tensor([length, length - 1, 0, 30000, block + 1, length // 3], dtype=torch.int32)
        for k in (1, 777, 2048):
            want = K.topk.topk_multi(s.to(DEV), lens.to(DEV), k, values=True)
            got = K.topk.topk_cluster(s.to(DEV), lens.to(DEV), k, values=True, size=size, block=block)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (length, size, block, k)
    # the policy, and the decode op at 128K with and without it
    s = torch.randn(3, 131072, generator=g)
    lens = torch.tensor([131072, 99999, 40000], dtype=torch.int32)
    want = K.topk.topk_multi(s.to(DEV), lens.to(DEV), 2048)
    monkeypatch.setenv("DSA_TOPK_CLUSTER", "1")
    assert K.topk.cluster_sms(s.to(DEV)) > 0
    assert torch.equal(K.select_topk(s.to(DEV), lens.to(DEV), 2048), want)
    b, ctx = 4, 131072
    cache, table = _paged([ctx] * b, 128, 64, g)
    kq, ks = quantize_fp8_blocks(cache, 128)
    q, _ = quantize_fp8_blocks(torch.randn(b, 64, 128, generator=g), 128)
    args = (q.to(DEV), torch.rand(b, 64, generator=g).to(DEV), kq.to(DEV), ks.squeeze(-1).to(DEV),
            table.to(DEV), torch.arange(b + 1, dtype=torch.int32, device=DEV),
            torch.tensor([ctx, ctx - 5, 70000, 33000], dtype=torch.int32, device=DEV), 2048)
    got = K.indexer_topk(*args, max_seqlen_k=ctx)
    monkeypatch.setenv("DSA_TOPK_CLUSTER", "0")
    want = K.indexer_topk(*args, max_seqlen_k=ctx)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_topk_cluster_plan():
    """Where the cluster select goes (a pure function of the shape): rows over 32K keys, the
    smallest block whose clusters fit one wave (clusters counted by GPCs of 16 SMs: 8 on 132
    SMs), none past 8 x 32K keys or one wave."""
    plan = K.topk.cluster_plan
    assert plan(1, 32768, 132) is None and plan(1, 262145, 132) is None and plan(1, 65536, 0) is None
    assert plan(1, 32769, 132) == (4, 16384)
    assert plan(16, 131072, 132) == (8, 16384) and plan(17, 131072, 132) == (4, 32768)
    assert plan(32, 131072, 132) == (4, 32768) and plan(33, 131072, 132) is None  # 8 GPCs x 4, not 132 // 4
    assert plan(16, 160000, 132) == (8, 32768) and plan(17, 160000, 132) is None
    assert plan(64, 40000, 132) == (2, 32768) and plan(65, 40000, 132) is None  # 8 GPCs x 8, not 132 // 2
    assert plan(14, 131072, 114) == (8, 16384) and plan(15, 131072, 114) == (4, 32768)  # 7 GPCs
    assert K.topk.resident_fits(32, 131072, radix=True, sms=132)
    assert not K.topk.resident_fits(32, 131072, radix=True)  # sms=0: the cluster select is off
    if not ON_GPU or torch.cuda.get_device_capability()[0] < 9:
        with pytest.raises(ValueError, match="topk_cluster: needs an sm90\\+ GPU"):
            K.topk.topk_cluster(torch.zeros(1, 40000, device=DEV), torch.ones(1, dtype=torch.int32,
                                                                              device=DEV), 8)
    else:
        s = torch.zeros(2, 40000, device=DEV)
        with pytest.raises(ValueError, match="size must be a power of two"):
            K.topk.topk_cluster(s, torch.ones(2, dtype=torch.int32, device=DEV), 8, size=3, block=32768)
        with pytest.raises(ValueError, match="size \\* block >= the row length"):
            K.topk.topk_cluster(s, torch.ones(2, dtype=torch.int32, device=DEV), 8, size=2, block=16384)


def _indexer_case(seed, q_lens, kv_lens, h, topk, fp8, **kw):
    g = _gen(seed)
    d = 128
    t = sum(q_lens)
    cache, table = _paged(kv_lens, d, 64 if ON_GPU else 16, g)
    q = torch.randn(t, h, d, generator=g)
    w = torch.rand(t, h, generator=g)
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    sk = torch.tensor(kv_lens, dtype=torch.int32)
    if fp8:
        q, _ = quantize_fp8_blocks(q, d)
        cache, ks = quantize_fp8_blocks(cache, d)
        ks = ks.squeeze(-1)
    else:
        q, cache, ks = q.to(LOWP).float(), cache.to(LOWP).float(), None
    r_idx, r_val = ref.indexer_topk(q, w, cache, ks, table, cu, sk, topk)
    if fp8 and not ON_GPU:  # the interpreter has no FP8 dot: FP8 values are exact in fp16
        kq, kc = q.to(torch.float16), cache.to(torch.float16)
    elif fp8:
        kq, kc = q, cache
    else:
        kq, kc = q.to(LOWP), cache.to(LOWP)
    g_idx, g_val = K.indexer_topk(kq.to(DEV), w.to(DEV), kc.to(DEV),
                                  ks.to(DEV) if ks is not None else None, table.to(DEV),
                                  cu.to(DEV), sk.to(DEV), topk, **kw)
    ref_all = ref.indexer_topk(q, w, cache, ks, table, cu, sk, max(kv_lens))  # every key's score
    return g_idx.cpu(), g_val.cpu(), r_idx, r_val, ref_all


@pytest.mark.parametrize("select", ["default", "multi"])
@pytest.mark.parametrize("fp8", [True, False])
def test_indexer_topk_matches_reference(fp8, select, monkeypatch):
    """The op against the reference; ``multi``: the multi-program select wherever the default
    would take the one-program-a-row select (short rows: every row of these sizes)."""
    if select == "multi":
        monkeypatch.setattr(K.indexer, "resident_fits", lambda n_rows, length, radix=None, sms=0: False)
    h = 64 if ON_GPU else 8
    q_lens, kv_lens = ([300, 1, 2], [4000, 1777, 2]) if ON_GPU else ([20, 1, 2], [60, 37, 2])
    topk = 2048 if ON_GPU else 16
    g_idx, g_val, r_idx, r_val, ref_all = _indexer_case(3, q_lens, kv_lens, h, topk, fp8)
    _assert_close_topk(g_idx, g_val, r_idx, r_val, ref_all)


def _assert_close_topk(g_idx, g_val, r_idx, r_val, ref_all):
    # -1 padding exactly where fewer keys than topk are visible, and causality
    assert torch.equal((g_idx < 0).sum(1), (r_idx < 0).sum(1))
    # Compare by score: FP8 tensor-core accumulation (about 14 mantissa bits on Hopper) and
    # float32 summation order reorder near-ties, so every key the kernel selected must score,
    # by the reference, within a tolerance of the reference's k-th score.
    full_idx, full_val = ref_all
    t, width = full_idx.shape
    score = torch.full((t, width + 1), float("-inf"), dtype=torch.float64)
    score.scatter_(1, full_idx.long().clamp_min(0) + (full_idx < 0).long() * width, full_val.double())
    valid = r_idx >= 0
    kth = torch.where(valid, r_val.double(), float("inf")).min(1).values  # last valid ref score
    tol = 2e-3 * score[:, :width].nan_to_num(neginf=0).abs().amax(1)
    picked = score.gather(1, g_idx.long().clamp_min(0))
    ok = (picked >= (kth - tol)[:, None]) | (g_idx < 0)
    assert ok.all(), (~ok).nonzero()[:5]
    # the returned values are the selected keys' scores
    close = ((g_val.double() - picked).abs() <= tol[:, None]) | (g_idx < 0)
    assert close.all(), (~close).nonzero()[:5]
    same = sum(sorted(a.tolist()) == sorted(b.tolist()) for a, b in zip(g_idx, r_idx))
    print(f"identical top-k sets: {same}/{len(g_idx)} rows")


@pytest.mark.parametrize("block_m", [1, 2, 4])
def test_indexer_token_runs_and_chunks(block_m):
    """Runs of block_m query tokens share key tiles; runs never cross a sequence and restart at
    every chunk boundary (a small max_chunk_elements forces several chunks)."""
    h = 64 if ON_GPU else 8
    q_lens, kv_lens = ([37, 1, 5, 130], [900, 1, 5, 2100]) if ON_GPU else ([7, 1, 5, 3], [40, 1, 5, 19])
    topk = 256 if ON_GPU else 8
    chunk = 2 ** 18 if ON_GPU else 7 * 64  # tokens a chunk: 2^18 / 2176 and 448 / 64
    for fp8 in (True, False):
        got = _indexer_case(5, q_lens, kv_lens, h, topk, fp8, block_m=block_m,
                            max_chunk_elements=chunk)
        _assert_close_topk(*got)


def test_indexer_launch_table():
    """The device-built launch table against a plain enumeration of the runs."""
    q_lens, kv_lens = [3, 1, 6, 2], [10, 4, 6, 9]
    cu = torch.tensor([0, 3, 4, 10, 12], dtype=torch.int32, device=DEV)
    sk = torch.tensor(kv_lens, dtype=torch.int32, device=DEV)
    rows = paging.token_rows(cu, 12)
    pos = paging.query_positions(cu, sk, 12)
    for block_m in (1, 2, 4):
        for t0, t1 in ((0, 12), (2, 9), (5, 6)):
            want = []
            for r, (a, b) in enumerate(zip(cu.tolist()[:-1], cu.tolist()[1:])):
                a, b = max(a, t0), min(b, t1)
                for s in range(a, b, block_m):
                    want.append([r, s, min(s + block_m, b), kv_lens[r] - q_lens[r] + s - cu.tolist()[r]])
            got = K.indexer.programs(cu, rows, pos, t0, t1, block_m).cpu()
            real = got[got[:, 2] > got[:, 1]].tolist()
            assert real == want, (block_m, t0, t1)
            empty = got[got[:, 2] <= got[:, 1]]
            assert (empty[:, 3] == -1).all() and (empty[:, 1] == empty[:, 2]).all()


def test_decode_plan_matches_the_enumeration():
    """The decode step's one-launch plan (runs of one token, row lengths) against a plain
    enumeration, on random batches with empty sequences and widths below some lengths."""
    g = _gen(11)
    for trial in range(20):
        n_rows = int(torch.randint(1, 300, (1,), generator=g))
        q_lens = torch.randint(0, 3, (n_rows,), generator=g)
        q_lens[int(torch.randint(0, n_rows, (1,), generator=g))] = 1  # at least one token
        kv_lens = q_lens + torch.randint(0, 200000, (n_rows,), generator=g)
        width = int(torch.randint(1, 200000, (1,), generator=g))
        cu = torch.cat([torch.zeros(1, dtype=torch.long), q_lens.cumsum(0)])
        t = int(cu[-1])
        want = [[r, s, s + 1, int(kv_lens[r] - q_lens[r] + s - cu[r])]
                for r in range(n_rows) for s in range(int(cu[r]), int(cu[r + 1]))]
        for t0 in (0, t // 2):
            progs, row_len = K.indexer.decode_plan(cu.int().to(DEV), kv_lens.int().to(DEV), t0, t, width)
            assert progs.cpu().tolist() == want[t0:], trial
            assert row_len.cpu().tolist() == [min(p + 1, width) for *_, p in want[t0:]], trial


def test_indexer_topk_device_planned_launch_is_identical():
    """With ``max_seqlen_k`` (host metadata) there is no host sync: the output is, bit for bit,
    that of the call without it (which reads max(seqlens_k) back), also when the bound exceeds
    the longest sequence (wider, masked score rows)."""
    g = _gen(17)
    h, d, topk = 16, 128, (2048 if ON_GPU else 16)
    q_lens, kv_lens = ([1, 3, 1, 2], [3000, 700, 1, 2]) if ON_GPU else ([1, 3, 1, 2], [70, 33, 1, 2])
    cache, table = _paged(kv_lens, d, 64 if ON_GPU else 16, g)
    q = torch.randn(sum(q_lens), h, d, generator=g).to(LOWP)
    w = torch.rand(sum(q_lens), h, generator=g)
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    sk = torch.tensor(kv_lens, dtype=torch.int32)
    args = (q.to(DEV), w.to(DEV), cache.to(LOWP).to(DEV), None, table.to(DEV), cu.to(DEV),
            sk.to(DEV), topk)
    host = K.indexer_topk(*args, block_m=1)
    for bound in (max(kv_lens), max(kv_lens) + 300):
        planned = K.indexer_topk(*args, max_seqlen_k=bound, block_m=1)
        assert torch.equal(planned[0], host[0]) and torch.equal(planned[1], host[1]), bound
    # a bound below a real length breaks the contract: only keys below it are scored, and
    # nothing reads past the score rows
    short = max(kv_lens) // 2
    idx, _ = K.indexer_topk(*args, max_seqlen_k=short, block_m=1)
    assert int(idx.max()) < triton.cdiv(short, 128) * 128


def test_pdl_level_rule(monkeypatch):
    """Programmatic dependent launch (ops/triton/pdl.py): off on a CPU and under the
    interpreter; on sm90+ an early release for grids of at most one program a SM, a wait only
    for larger ones; DSA_PDL overrides."""
    import importlib
    from types import SimpleNamespace

    pdl = importlib.import_module(K.__name__ + ".pdl")  # the kernels' own module
    assert pdl.pdl_level(torch.empty(1), 8) == 0  # a CPU tensor
    if not pdl._GDC:
        pytest.skip("this Triton has no griddepcontrol wrappers")
    monkeypatch.setattr(pdl, "_device_info", lambda index: (True, 132))
    gpu = SimpleNamespace(device=torch.device("cuda", 0))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pdl.pdl_level(gpu, 8) == 0
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.delenv("DSA_PDL", raising=False)
    assert [pdl.pdl_level(gpu, n) for n in (1, 132, 133, 4096)] == [2, 2, 1, 1]
    for mode, want in (("0", 0), ("1", 1), ("2", 2)):
        monkeypatch.setenv("DSA_PDL", mode)
        assert pdl.pdl_level(gpu, 4096) == want
    monkeypatch.setattr(pdl, "_device_info", lambda index: (False, 132))  # before Hopper
    assert pdl.pdl_level(gpu, 8) == 0


@pytest.mark.skipif(not ON_GPU, reason="programmatic dependent launch needs an sm90 GPU")
@pytest.mark.parametrize("b", [1, 40])
def test_decode_indexer_pdl_forms_are_bit_identical(b, monkeypatch):
    """A decode step's indexer + top-k (plan, logits with the fused first pass, the
    multi-program select) in every PDL form and as a CUDA graph: the same output, bit for bit,
    as plain launches. 40K keys a row: too long for the one-program-a-row select."""
    from dsa_ascend.backends.cuda import graph_replay

    g = _gen(23)
    d, h, ctx, topk = 128, 64, 40000, 2048
    cache, table = _paged([ctx] * b, d, 64, g)
    kq, ks = quantize_fp8_blocks(cache, d)
    q, _ = quantize_fp8_blocks(torch.randn(b, h, d, generator=g), d)
    args = (q.to(DEV), torch.rand(b, h, generator=g).to(DEV), kq.to(DEV), ks.squeeze(-1).to(DEV),
            table.to(DEV), torch.arange(b + 1, dtype=torch.int32, device=DEV),
            torch.full((b,), ctx, dtype=torch.int32, device=DEV), topk)
    monkeypatch.setenv("DSA_PDL", "0")
    want = K.indexer_topk(*args, max_seqlen_k=ctx)
    for mode in ("1", "2", "auto"):
        monkeypatch.setenv("DSA_PDL", mode)
        got = K.indexer_topk(*args, max_seqlen_k=ctx)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), mode
        box = {}
        replay = graph_replay(lambda box=box: box.update(out=K.indexer_topk(*args, max_seqlen_k=ctx)))
        for _ in range(3):
            replay()
        torch.cuda.synchronize()
        out = box["out"]
        assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1]), f"{mode}, graph"


def _sortable_keys(x):
    """The top-k's order-preserving uint32 keys of float32 scores (-0.0 as +0.0), as int64."""
    b = torch.where(x == 0, torch.zeros_like(x), x).view(torch.int32).long() & 0xFFFFFFFF
    return torch.where(b >> 31 != 0, ~b & 0xFFFFFFFF, b | 0x80000000)


@pytest.mark.parametrize("block_m", [1, 2])
def test_indexer_logits_counts_the_topk_first_pass(block_m):
    """The logits kernel's fused pass 1 of the top-k: per row, the histogram of the top hi_bits
    of the keys of its own scores over [0, pos], summed over the partial histograms, exactly."""
    g = _gen(29 + block_m)
    h, d = 16, 128
    q_lens, kv_lens = ([5, 1, 3], [700, 1, 259]) if ON_GPU else ([5, 1, 3], [70, 1, 33])
    cache, table = _paged(kv_lens, d, 16, g)
    t = sum(q_lens)
    q = torch.randn(t, h, d, generator=g).to(LOWP)
    w = torch.rand(t, h, generator=g)
    cu, sk, rows, pos = _step(q_lens, kv_lens)
    block_n = 32
    width = triton.cdiv(max(kv_lens), block_n) * block_n
    for hi, split in ((12, 1), (13, 4)):
        for t0, t1 in ((0, t), (2, t)):
            progs = (K.indexer.decode_plan(cu, sk, t0, t1, width)[0] if block_m == 1 else
                     K.indexer.programs(cu, rows, pos, t0, t1, block_m))
            hist = K.topk.hist_workspace(t1 - t0, hi, split, device=DEV)
            scores = K.indexer.indexer_logits(
                q.to(DEV), w.to(DEV), cache.to(LOWP).to(DEV).view(-1, d), None, table.to(DEV),
                progs, t0, t1, width, 16, block_m, block_n, hist=hist, hi_bits=hi,
                hist_split=split).cpu()
            got = hist.cpu().view(t1 - t0, split, 1 << hi).sum(1)
            for r in range(t1 - t0):
                n = int(pos[t0 + r]) + 1
                want = torch.bincount(_sortable_keys(scores[r, :n]) >> (32 - hi), minlength=1 << hi)
                assert torch.equal(got[r], want.int()), (hi, split, t0, r)


@pytest.mark.parametrize("block_size", [4, 16, 24, 48, 64, 96, 256])
def test_indexer_logits_page_sizes(block_size):
    """The logits kernel's three ways to find a key tile's cache rows (pages of whole tiles,
    two pages a tile, a block-table hop a key, which pages that do not nest with the tiles
    take) against float64 scores, over ragged rows whose tiles are wholly before a run's tokens
    (the unmasked loop), at its causal frontier and past a row's length, with k-scales and
    signed head weights, in decode (one token a run) and prefill runs of 2 and 4."""
    g = _gen(41 + block_size)
    h, d = 16, 128
    block_n = 32 if not ON_GPU else 128
    q_lens, kv_lens = ([1, 3, 2], [5 * block_n + 3, 2 * block_n + 1, 3])
    cache, table = _paged(kv_lens, d, block_size, g)
    ks = torch.rand(cache.shape[:2], generator=g) + 0.5
    t = sum(q_lens)
    q = torch.randn(t, h, d, generator=g).to(LOWP)
    w = torch.randn(t, h, generator=g)
    cu, sk, rows, pos = _step(q_lens, kv_lens)
    kc = cache.to(LOWP)
    width = triton.cdiv(max(kv_lens), block_n) * block_n
    # float64 scores from the spec: I(t, s) = k_scale(s) * sum_h w(t, h) * ReLU(q(t, h) . k(s))
    flat_k = kc.double().view(-1, d)
    flat_s = ks.double().view(-1)
    for block_m in (1, 2, 4):
        progs = (K.indexer.decode_plan(cu, sk, 0, t, width)[0] if block_m == 1 else
                 K.indexer.programs(cu, rows, pos, 0, t, block_m))
        got = K.indexer.indexer_logits(q.to(DEV), w.to(DEV), kc.to(DEV).view(-1, d),
                                       ks.to(DEV).view(-1), table.to(DEV), progs, 0, t, width,
                                       block_size, block_m, block_n).cpu()
        for r in range(t):
            n = int(pos[r]) + 1
            s_pos = torch.arange(n)
            slot = table[int(rows[r])][s_pos // block_size].long() * block_size + s_pos % block_size
            qd, kd = q[r].double(), flat_k[slot]
            dots = torch.einsum("hd,sd->sh", qd, kd)
            want = flat_s[slot] * (dots.clamp_min(0) * w[r].double()).sum(1)
            # float32 accumulation of d-term dots and an h-term sum (the products are exact in
            # float32): d + h + 2 roundings, each within 2^-23 of the running sum's magnitude
            # (2^-24 rounded to nearest; 2^-23 covers a tensor core that truncates), per key
            mags = torch.einsum("hd,sd->sh", qd.abs(), kd.abs()) * w[r].double().abs()
            tol = (d + h + 2) * 2.0 ** -23 * flat_s[slot] * mags.sum(1)
            assert ((got[r, :n].double() - want).abs() <= tol).all(), (block_m, r)
            # the rest of the tile holding the row's position is written, -inf
            assert (got[r, n:triton.cdiv(n, block_n) * block_n] == float("-inf")).all(), (block_m, r)


def test_indexer_topk_fused_first_pass_is_the_plain_select():
    """The op, with pass 1 fused into the logits kernel or not, returns, bit for bit, the plain
    select of its scores."""
    g = _gen(31)
    h, d, topk = 16, 128, (2048 if ON_GPU else 16)
    q_lens, kv_lens = ([1, 4, 1], [3000, 2200, 5]) if ON_GPU else ([1, 4, 1], [70, 50, 5])
    cache, table = _paged(kv_lens, d, 16, g)
    t = sum(q_lens)
    q = torch.randn(t, h, d, generator=g).to(LOWP).to(DEV)
    w = torch.rand(t, h, generator=g).to(DEV)
    cu, sk, rows, pos = _step(q_lens, kv_lens)
    kc, tb = cache.to(LOWP).to(DEV), table.to(DEV)
    block_n = 32 if LOWP == torch.float32 else 128
    width = triton.cdiv(max(kv_lens), block_n) * block_n
    for block_m, fused in ((1, True), (2, True), (2, False)):
        idx, val = K.indexer_topk(q, w, kc, None, tb, cu, sk, topk, block_m=block_m,
                                  block_n=block_n, fused_first_pass=fused)
        progs = (K.indexer.decode_plan(cu, sk, 0, t, width)[0] if block_m == 1 else
                 K.indexer.programs(cu, rows, pos, 0, t, block_m))
        scores = K.indexer.indexer_logits(q, w, kc.view(-1, d), None, tb, progs, 0, t, width, 16,
                                          block_m, block_n)
        want_i, want_v = K.topk.topk_multi(scores, (pos + 1).int(), topk, values=True)
        assert torch.equal(idx, want_i) and torch.equal(val, want_v), block_m


@pytest.mark.parametrize("n", [2, 64, 128, 1024])
def test_hadamard_kernel_is_bit_identical_to_reference(n):
    """Same float32 butterflies in the same order as the reference: identical bits, so the cuda
    and reference backends feed the FP8 quantizer (and the top-k) the same values."""
    g = _gen(n)
    dtypes = (torch.float32, torch.float16) + ((torch.bfloat16,) if ON_GPU else ())
    for dtype in dtypes:  # the interpreter rounds float32 -> bf16 differently from a GPU
        x = (torch.randn(3, 37, n, generator=g) * torch.exp(torch.randn(3, 37, 1, generator=g)))
        x = x.to(dtype)
        got = K.quant.hadamard_rotate(x.to(DEV)).cpu()
        assert got.dtype == dtype
        assert torch.equal(got, ref.hadamard_rotate(x)), dtype


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("heads,d,n", [(None, 64, 32), (5, 64, 32), (128, 64, 32), (6, 128, 32),
                                        (64, 128, 32), (3, 200, 16), (40, 200, 16)])
def test_rope_kernel_is_bit_identical_to_reference(interleaved, heads, d, n):
    """MLA's q_pe (a strided view of q, [T, H, 64]), k_pe ([T, 64]) and the indexer's partial
    rotation ([T, H, 128], 64 channels turned): the same float32 products and sums as the
    reference with FMA contraction off, so identical bits; the reference itself within 4 ulps
    of a float64 RoPE written from the spec."""
    g = _gen(d + n + (heads or 0) + interleaved)
    t = 7
    cos_t, sin_t = torch.randn(t, n, generator=g), torch.randn(t, n, generator=g)
    dtypes = (torch.float32, torch.float16) + ((torch.bfloat16,) if ON_GPU else ())
    for dtype in dtypes:  # the interpreter rounds float32 -> bf16 differently from a GPU
        shape = (t, d) if heads is None else (t, heads, d)
        wide = torch.randn(*shape[:-1], d + 24, generator=g).to(dtype)
        x = wide[..., 8:8 + d]  # strided rows, as q_pe is a view of q
        got = K.rope.rope(x.to(DEV), cos_t.to(DEV), sin_t.to(DEV), interleaved)
        got = got.cpu()
        want = ref.rope(x, cos_t, sin_t, interleaved)
        assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous()
        assert torch.equal(got, want), dtype
        # the reference against float64, channel by channel from the spec's pairing
        xd, c, s = x.double(), cos_t.double(), sin_t.double()
        if heads is not None:
            c, s = c[:, None], s[:, None]
        exact = xd.clone()
        for i in range(n):
            a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + n)
            exact[..., a] = xd[..., a] * c[..., i] - xd[..., b] * s[..., i]
            exact[..., b] = xd[..., a] * s[..., i] + xd[..., b] * c[..., i]
        ulp = torch.finfo(dtype).eps
        bound = (xd.abs().amax(-1, keepdim=True) * (c.abs() + s.abs()).amax(-1, keepdim=True)
                 * (ulp + 4 * torch.finfo(torch.float32).eps))
        assert ((want.double() - exact).abs() <= bound).all(), dtype
        assert torch.equal(got[..., 2 * n:], x[..., 2 * n:])  # passed through untouched


@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_quantize_fp8_kernel_is_bit_identical_to_reference(block, ue8m0):
    g = _gen(block + ue8m0)
    x = torch.randn(5, 9, 4 * block, generator=g) * torch.exp(2 * torch.randn(5, 9, 1, generator=g))
    x[0, 0, :block] *= 1e-7  # an all-tiny block: the 1e-4 amax clamp
    x[1, 1, 3] = 6.0e4  # an outlier (finite in fp16 too)
    for dtype in (torch.float32, LOWP):
        xd = x.to(dtype)
        q, scale = K.quant.quantize_fp8(xd.to(DEV), block, ue8m0)
        r_q, r_scale = quantize_fp8_blocks(xd, block, ue8m0)
        assert q.dtype == r_q.dtype and q.shape == r_q.shape and scale.shape == r_scale.shape
        assert torch.equal(scale.cpu(), r_scale), dtype
        if ON_GPU:  # the interpreter's float32 -> e4m3 conversion is wrong (124.3 -> 64)
            assert torch.equal(q.cpu().view(torch.uint8), r_q.view(torch.uint8)), dtype


@pytest.mark.parametrize("fmt", ["fp8", "fp8-ue8m0", "float"])
def test_store_kv_kernel_is_bit_identical_to_reference(fmt):
    """The cache write kernel against the reference's pack + index_copy_, on random bytes (or
    floats) in the cache, strided fp32 / low-precision inputs and a d_v of 3 tiles (padded
    tile and rope ranges). The kernel rounds with integer ops, so the interpreter checks the
    FP8 bytes too."""
    g = _gen(41 + len(fmt))
    for d_v, d_rope in ((512, 64), (384, 40)):
        blocks, bs, t = 6, 16, 45
        wide = torch.randn(t, d_v + d_rope + 50, generator=g) * torch.exp(
            2 * torch.randn(t, 1, generator=g))
        wide[0, :128] *= 1e-7  # an all-tiny tile: the 1e-4 amax clamp
        wide[2, 7] = 3.0e4
        slots = torch.randperm(blocks * bs, generator=g)[:2 * t:2]  # a strided view
        ue8m0 = fmt == "fp8-ue8m0"
        for dtype in (torch.float32, LOWP):
            w = wide.to(dtype)
            latent, rope = w[:, 5:5 + d_v], w[:, 50 + d_v:50 + d_v + d_rope]
            if fmt == "float":
                cache = torch.randn(blocks, bs, d_v + d_rope, generator=g).to(LOWP)
            else:
                cache = torch.randint(0, 256, (blocks, bs, kv_fp8.entry_bytes(d_v, d_rope)),
                                      generator=g, dtype=torch.uint8)
            want = cache.clone()
            ref.store_kv(want, slots, latent, rope, ue8m0)
            assert K.kv_store.supports(cache, latent, rope)
            got = cache.to(DEV)
            K.kv_store.store_kv(got, slots.to(DEV), latent.to(DEV), rope.to(DEV), ue8m0)
            assert torch.equal(got.cpu(), want), (fmt, d_v, dtype)  # every byte


def test_store_kv_rounds_like_torch_on_every_half_value():
    """The kernel's integer e4m3 / bf16 roundings against torch's conversions, exhaustively over
    float16 values in [-448, 448] (subnormals, ties, the extremes) and fp32 values between
    them: each tile holds 448, so its ue8m0 scale is 1 and q = x exactly."""
    h = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    h = h[h.float().abs() <= 448].float()
    mid = (h[:-1] + h[1:]) / 2  # float32 midpoints, which float16 cannot hold
    x = torch.cat([h, mid, torch.tensor([448.0, -448.0, 0.0, -0.0])])
    n = -(-x.numel() // 127) * 127
    x = torch.cat([x, x[: n - x.numel()]]).view(-1, 127)
    latent = torch.cat([torch.full((x.shape[0], 1), 448.0), x], 1).repeat(1, 4)  # 4 tiles
    rope = latent[:, 1:65] * 3.1  # bf16 rounding of assorted floats
    t = latent.shape[0]
    cache = torch.zeros(1, t, kv_fp8.entry_bytes(512, 64), dtype=torch.uint8)
    slots = torch.arange(t)
    got = cache.to(DEV)
    K.kv_store.store_kv(got, slots.to(DEV), latent.to(DEV), rope.to(DEV), True)
    want = cache.clone()
    ref.store_kv(want, slots, latent, rope, True)
    assert torch.equal(got.cpu(), want)


def test_combine_splits_matches_float64():
    g = _gen(23)
    s, t, h, d = 5, 4, 24, 64
    out = torch.randn(s, t, h, d, generator=g)
    lse = torch.randn(s, t, h, generator=g) * 4
    lse[:2, 1] = float("-inf")  # some splits of a token saw no key
    lse[:, 2, :3] = float("-inf")  # no split saw a key: out 0, lse -inf
    out[:, 2, :3] = 0.0
    merged, total = K.combine_splits(out.to(DEV), lse.to(DEV), torch.float32)
    want_lse = torch.logsumexp(lse.double(), 0)
    w = torch.exp(lse.double() - want_lse.nan_to_num(neginf=0.0)[None])
    want = (out.double() * w[..., None]).sum(0)
    assert torch.equal(total.cpu()[2, :3], want_lse[2, :3].float())  # -inf exactly
    finite = torch.isfinite(want_lse)
    assert (total.cpu().double() - want_lse)[finite].abs().max() < 1e-5
    assert (merged.cpu().double() - want).abs().max() < 1e-5 * want.abs().max()


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_decode_indexer_and_sparse_mla_capture_in_a_cuda_graph():
    """No host sync in a decode step's indexer + top-k + sparse MLA (a sync would make the
    capture fail), and the replay computes what the eager calls compute."""
    from dsa_ascend.backends.cuda import graph_replay

    g = _gen(29)
    b, h, d, topk, ctx = 3, 64, 128, 1024, 1000  # k > keys: -1 padding; 4 splits + combine
    kv_lens = [ctx, ctx - 200, 300]
    kcache, table = _paged(kv_lens, d, 64, g)
    kq, ks = quantize_fp8_blocks(kcache, d)
    q, _ = quantize_fp8_blocks(torch.randn(b, h, d, generator=g), d)
    w = torch.rand(b, h, generator=g)
    cu = torch.arange(b + 1, dtype=torch.int32)
    sk = torch.tensor(kv_lens, dtype=torch.int32)
    latent, _ = _paged(kv_lens, 576, 64, g)
    qm = torch.randn(b, 128, 576, generator=g).to(LOWP)
    args = [x.to(DEV) for x in (q, w, kq, ks.squeeze(-1), table, cu, sk)]
    lat, qm = latent.to(LOWP).to(DEV), qm.to(DEV)
    rows = torch.arange(b, dtype=torch.int32, device=DEV)

    def step():
        idx, _ = K.indexer_topk(*args, topk, max_seqlen_k=ctx)
        return idx, K.sparse_mla_fwd(qm, lat, idx, args[4], rows, 576 ** -0.5, 512)

    want_idx, (want_o, want_lse) = step()
    got = {}
    replay = graph_replay(lambda: got.update(out=step()))
    replay()
    torch.cuda.synchronize()
    idx, (o, lse) = got["out"]
    assert torch.equal(idx, want_idx) and torch.equal(o, want_o) and torch.equal(lse, want_lse)


def test_sparse_mla_names_a_cache_too_large_for_int32_slots():
    kv = torch.empty((1 << 25, 64, 576), dtype=torch.float16, device="meta")  # 2^31 entries
    q = torch.randn(1, 16, 576, dtype=torch.float16)
    idx = torch.zeros(1, 16, dtype=torch.int32)
    with pytest.raises(ValueError, match="kv_cache has 2147483648 entries"):
        K.sparse_mla_fwd(q, kv, idx, idx, idx[:, 0], 0.1, 512)
