"""The ``dsa`` ops of each backend (``pytest --backend ...``) against float64 references written
here from DSA_SPEC §2-5 and the op contracts in ``dsa_ascend/ops.py``.

Tolerances come from float32 rounding bounds: a length-n float32 sum of products errs by at most
about n * 2^-24 times the sum of the absolute values of its terms (the classical recursive
summation bound; blocked or pairwise orders do better), so each check computes that sum of
absolute values in float64 alongside the reference.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close_to_ref, require_indexer_dtype, seeded

from dsa_ascend.backends.reference import select_topk
from dsa_ascend.ops import Ops
from dsa_ascend.quant import FP8_DTYPE, quantize_fp8_blocks, quantize_int8_rows

F32_EPS = 2.0 ** -24


# ------------------------------------------------------------------------------ helpers
def _sylvester(n: int) -> torch.Tensor:
    """The n x n Hadamard matrix in Sylvester order, by Kronecker products (float64)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(h2, h)
    return h


def _paged(lengths: list[int], block_size: int, g: torch.Generator, spare: int = 3):
    """A random, non-contiguous block table for rows of the given lengths: shuffled page ids
    with ``spare`` pages no row owns, and table entries past a row's pages pointing at one of
    those spares (garbage that must never be read)."""
    pages = [-(-n // block_size) for n in lengths]
    total = sum(pages) + spare
    perm = torch.randperm(total, generator=g)
    width = max(pages) + 1
    table = torch.full((len(lengths), width), int(perm[-1]), dtype=torch.int32)
    used = 0
    for r, n in enumerate(pages):
        table[r, :n] = perm[used:used + n].int()
        used += n
    return table, total


def _gather(cache: torch.Tensor, table: torch.Tensor, row: int, positions) -> torch.Tensor:
    """Cache entries of sequence ``row`` at absolute ``positions`` (the test's own paging)."""
    bs = cache.shape[1]
    pos = torch.as_tensor(positions, dtype=torch.long)
    return cache[table[row, pos // bs].long(), pos % bs]


def _cu(q_lens: list[int]) -> torch.Tensor:
    return torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)


# ------------------------------------------------------------------------------ rope
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_op_turns_each_pair_by_its_tokens_angle(backend, device, interleaved):
    """x [T, H, d] with the first 2n channels turned, pair by pair as DSA_SPEC §3 pairs them,
    the rest passed through; and the [T, d] form (the keys) the same as one head."""
    ops = Ops(backend)
    g = seeded(3 + interleaved)
    t, h, d, n = 6, 4, 128, 32
    x = torch.randn(t, h, d, generator=g) * torch.exp(torch.randn(t, h, 1, generator=g))
    pos = torch.randint(0, 4096, (t, 1), generator=g).double()
    ang = pos * torch.rand(1, n, generator=g).double()  # the angles' tables hold t * inv_freq
    cos, sin = ang.cos().float(), ang.sin().float()
    got = ops.rope(x.to(device), cos.to(device), sin.to(device), interleaved).cpu()
    assert got.dtype == x.dtype and got.shape == x.shape
    xd, c, s = x.double(), cos.double()[:, None], sin.double()[:, None]
    want = xd.clone()
    for i in range(n):
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + n)
        want[..., a] = xd[..., a] * c[..., i] - xd[..., b] * s[..., i]
        want[..., b] = xd[..., a] * s[..., i] + xd[..., b] * c[..., i]
    # Two float32 products and a sum, each rounded: 3 ulps of |a| + |b| (|cos|, |sin| <= 1).
    bound = 3 * F32_EPS * 2 * xd.abs().amax(-1, keepdim=True)
    assert ((got.double() - want).abs() <= bound).all()
    assert torch.equal(got[..., 2 * n:], x[..., 2 * n:])
    keys = ops.rope(x[:, 1].to(device), cos.to(device), sin.to(device), interleaved).cpu()
    assert torch.equal(keys, got[:, 1])


def test_rope_op_names_the_bad_argument(backend, device):
    ops = Ops(backend)
    x, cs = torch.randn(4, 2, 64, device=device), torch.randn(4, 32, device=device)
    with pytest.raises(ValueError, match=r"rope: x must be a float \[T, d\] or \[T, H, d\]"):
        ops.rope(x[None], cs, cs, True)
    with pytest.raises(ValueError, match=r"rope: cos must be float32 \[4, n\]"):
        ops.rope(x, cs[:3], cs, True)
    with pytest.raises(ValueError, match=r"rope: sin must be float32"):
        ops.rope(x, cs, cs.double(), True)
    with pytest.raises(ValueError, match=r"0 < 2n <= d=64"):
        ops.rope(x, torch.randn(4, 40, device=device), torch.randn(4, 40, device=device), True)


# ------------------------------------------------------------------------------ hadamard
@pytest.mark.parametrize("n", [2, 16, 64, 128])
def test_hadamard_rotate_is_the_scaled_sylvester_matrix(backend, device, n):
    ops = Ops(backend)
    g = seeded(n)
    x = torch.randn(2, 3, n, generator=g) * torch.exp(torch.randn(2, 3, 1, generator=g))
    got = ops.hadamard_rotate(x.to(device)).cpu()
    assert got.dtype == torch.float32 and got.shape == x.shape
    h = _sylvester(n) * n ** -0.5
    want = x.double() @ h.T
    # Each output is a +-sum of the n inputs: log2(n) float32 additions deep, then one scaling.
    bound = (math.log2(n) + 2) * F32_EPS * x.double().abs().sum(-1, keepdim=True) * n ** -0.5
    assert ((got.double() - want).abs() <= bound).all()
    # Orthogonal: the norm is kept, and (H / sqrt n)^2 = I.
    norm_err = (got.double().norm(dim=-1) - x.double().norm(dim=-1)).abs()
    assert (norm_err <= 8 * math.log2(n) * F32_EPS * x.double().norm(dim=-1)).all()
    twice = ops.hadamard_rotate(got.to(device)).cpu().double()
    assert ((twice - x.double()).abs() <= 2 * bound * math.sqrt(n)).all()


def test_hadamard_rotate_keeps_a_low_precision_dtype(backend, device):
    ops = Ops(backend)
    g = seeded(7)
    x = torch.randn(5, 128, generator=g).to(torch.bfloat16)
    got = ops.hadamard_rotate(x.to(device)).cpu()
    assert got.dtype == torch.bfloat16
    want = x.double() @ (_sylvester(128) * 128 ** -0.5).T
    # One bf16 rounding of the output (2^-8 relative) on top of the float32 bound.
    bound = 2.0 ** -8 * want.abs() + 9 * F32_EPS * x.double().abs().sum(-1, keepdim=True)
    assert ((got.double() - want).abs() <= bound).all()


# ------------------------------------------------------------------------------ quantize_fp8
@pytest.mark.parametrize("ue8m0", [False, True])
def test_quantize_fp8_op_scales_and_values(backend, device, ue8m0):
    ops = Ops(backend)
    g = seeded(11)
    mags = torch.exp(2 * torch.randn(6, 4, 2, 1, generator=g))
    x = (torch.randn(6, 4, 2, 128, generator=g) * mags).view(6, 4, 256)
    x[0, 0, :128] *= 1e-6  # an all-tiny block: scale from the 1e-4 clamp
    q, scale = ops.quantize_fp8(x.to(device), 128, ue8m0)
    q, scale = q.cpu(), scale.cpu()
    assert q.dtype == FP8_DTYPE and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (6, 4, 2)

    amax = x.double().view(6, 4, 2, 128).abs().amax(-1).clamp_min(1e-4)
    want = amax / 448.0
    if ue8m0:
        want = torch.exp2(torch.ceil(torch.log2(want)))
        assert torch.equal(scale.double(), want)
        # Power-of-two scales make x / scale exact, so the FP8 values are fully determined:
        # round-to-nearest-even of the float64 quotient.
        expect = (x.double().view(6, 4, 2, 128) / want[..., None]).clamp(-448, 448)
        assert torch.equal(q.view(6, 4, 2, 128).float(), expect.float().to(FP8_DTYPE).float())
    else:
        # amax / 448 in float32: the clamp constant, 1/448 and the product, one rounding each.
        assert ((scale.double() - want).abs() <= 4 * F32_EPS * want).all()
        qb = q.view(-1, 128).float()
        xb = x.view(-1, 128)
        big = xb.abs().amax(-1) >= 1e-4
        arg = xb.abs().argmax(-1)
        rows = torch.arange(xb.shape[0])
        assert torch.equal(qb[rows, arg][big], 448.0 * torch.sign(xb[rows, arg][big]))
    back = q.view(6, 4, 2, 128).double() * scale.double()[..., None]
    err = (back - x.double().view(6, 4, 2, 128)).abs()
    # Half an e4m3 step: 2^-4 of a normal value, 2^-10 of the scale for subnormals.
    bound = torch.maximum(2.0 ** -4 * x.double().view(6, 4, 2, 128).abs(), 2.0 ** -10 * scale.double()[..., None])
    assert (err <= bound * (1 + 4 * F32_EPS)).all()
    assert amax[0, 0, 0].item() == 1e-4  # the all-tiny block really hit the clamp


# ------------------------------------------------------------------------------ indexer_topk
# (start position, query length) of each row: chunked prefill (start > 0), a long row and a
# single-token (decode-like) row and a row from position 0; positions < topk - 1 leave fewer
# eligible keys than topk.
INDEXER_ROWS = [(3, 20), (40, 7), (9, 1), (0, 5)]
TOPK, IDX_HEADS, IDX_DIM, BLOCK = 16, 4, 128, 16


# The indexer modes of the op-level tests and the RunConfig.indexer_dtype each stands for.
INDEXER_MODE = {"fp8": "fp8", "int8": "int8", "float": "bf16"}


def _indexer_case(seed: int, mode: str):
    g = seeded(seed)
    starts = [s for s, _ in INDEXER_ROWS]
    q_lens = [n for _, n in INDEXER_ROWS]
    lens = [s + n for s, n in INDEXER_ROWS]
    table, n_blocks = _paged(lens, BLOCK, g)
    t = sum(q_lens)
    # Keys of very different norms so k_scale matters to the ranking.
    k = torch.randn(n_blocks, BLOCK, IDX_DIM, generator=g) * torch.exp(
        torch.randn(n_blocks, BLOCK, 1, generator=g))
    q = torch.randn(t, IDX_HEADS, IDX_DIM, generator=g)
    w = torch.randn(t, IDX_HEADS, generator=g)
    if mode == "fp8":
        q, _ = quantize_fp8_blocks(q, IDX_DIM)  # per token per head; the q scales are the caller's
        k, k_scale = quantize_fp8_blocks(k, IDX_DIM)
        k_scale = k_scale.squeeze(-1)
    elif mode == "int8":
        q, _ = quantize_int8_rows(q)  # per token per head, symmetric
        k, k_scale = quantize_int8_rows(k)  # per token
    else:
        k_scale = None
    return dict(q=q, w=w, k=k, k_scale=k_scale, table=table, starts=starts, q_lens=q_lens,
                cu=_cu(q_lens), seqlens=torch.tensor(lens, dtype=torch.int32))


def dot_rel(backend: str, fp8: bool, d: int, h: int) -> float:
    """Error of an indexer score relative to the sum of the absolute values of its terms.
    float32 accumulation (the reference; IEEE float32 dots on GPUs): (D + H + 4) 2^-24. FP8
    operands on a GPU backend go through tensor cores whose FP8 accumulation keeps only about 14
    mantissa bits on Hopper (DeepSeek-V3 report, section 3.3.2), the official kernels included:
    a D = 128 dot is four k = 32 MMA steps, each losing at most ~2^-14 of the terms so far, so
    8 x 2^-14 leaves a factor 2."""
    if fp8 and backend != "reference":
        return 8 * 2.0 ** -14
    return (d + h + 4) * F32_EPS


def _indexer_ref(case, row: int, tok: int, pos: int, rel: float = None):
    """Float64 I(t, s) for s <= pos; an elementwise bound on a float32 computation's error; and
    which keys are "robust": every head's q . k is farther from 0 than its float32 error bound,
    so ReLU zeroes exactly the same heads in float32 (an exact 0 score stays exactly 0)."""
    keys = _gather(case["k"].float().double(), case["table"], row, range(pos + 1))
    q = case["q"][tok].float().double()  # [H, D] (FP8 values are exact in float64)
    w = case["w"][tok].double()
    dots = q @ keys.T  # [H, L]
    abs_dots = q.abs() @ keys.abs().T
    robust = (dots.abs() > (IDX_DIM + 2) * F32_EPS * abs_dots).all(0)
    score = w @ dots.clamp_min(0)
    absum = w.abs() @ abs_dots
    if case["k_scale"] is not None:
        ks = _gather(case["k_scale"].double(), case["table"], row, range(pos + 1))
        score, absum = score * ks, absum * ks
    rel = dot_rel("reference", False, IDX_DIM, IDX_HEADS) if rel is None else rel
    bound = rel * absum
    return score, bound, robust


def _expected_topk(ref: torch.Tensor, bound: torch.Tensor, robust: torch.Tensor, k: int):
    """The float64 top-k set with the ops' tie rule (lower position first), or None when float32
    rounding could change it. A key whose score is an exact, robust ReLU zero is exactly 0 in
    float32 too (no error); any other key's float32 score lies within ``bound`` of ``ref``. The
    set is sure when every chosen key beats every other key by more than their two bounds, or
    ties it exactly with no error on either side and a lower position."""
    err = torch.where((ref == 0) & robust, torch.zeros_like(bound), bound)
    order = sorted(range(ref.numel()), key=lambda s: (-ref[s].item(), s))
    chosen, rest = torch.tensor(order[:k]), torch.tensor(order[k:])
    beats = (ref[chosen] - err[chosen])[:, None] > (ref[rest] + err[rest])[None, :]
    exact = ((err[chosen][:, None] == 0) & (err[rest][None, :] == 0)
             & (ref[chosen][:, None] == ref[rest][None, :]) & (chosen[:, None] < rest[None, :]))
    return set(order[:k]) if (beats | exact).all() else None


@pytest.mark.parametrize("mode", ["fp8", "int8", "float"])
def test_indexer_topk_paged_chunked_prefill(backend, device, mode):
    require_indexer_dtype(backend, INDEXER_MODE[mode])
    case = _indexer_case(21, mode)
    ops = Ops(backend)
    dev = lambda x: None if x is None else x.to(device)  # noqa: E731
    idx, val = ops.indexer_topk(dev(case["q"]), dev(case["w"]), dev(case["k"]), dev(case["k_scale"]),
                                dev(case["table"]), dev(case["cu"]), dev(case["seqlens"]), TOPK)
    idx, val = idx.cpu(), val.cpu()
    t = case["q"].shape[0]
    assert idx.dtype == torch.int32 and idx.shape == (t, TOPK)
    assert val.dtype == torch.float32 and val.shape == (t, TOPK)

    rel = dot_rel(backend, mode == "fp8", IDX_DIM, IDX_HEADS)
    checked = skipped = padded_rows = 0
    tok = 0
    for row, (start, n) in enumerate(INDEXER_ROWS):
        for i in range(n):
            pos = start + i
            ref, bound, robust = _indexer_ref(case, row, tok, pos, rel)
            n_valid = min(TOPK, pos + 1)
            got_i, got_v = idx[tok], val[tok]
            # -1 / -inf padding exactly when fewer than topk keys are eligible.
            assert (got_i[:n_valid] >= 0).all() and (got_i[n_valid:] == -1).all(), (tok, got_i)
            assert torch.isneginf(got_v[n_valid:]).all()
            padded_rows += n_valid < TOPK
            sel = got_i[:n_valid].long()
            # Causal and distinct.
            assert sel.max().item() <= pos and len(set(sel.tolist())) == n_valid
            # Scores are the float64 scores of the returned positions.
            v = got_v[:n_valid].double()
            assert ((v - ref[sel]).abs() <= bound[sel]).all(), (tok, (v - ref[sel]).abs().max())
            if backend == "reference":
                # The order of the valid entries is not part of the op contract (ops.py); the
                # reference promises descending scores, equal scores by ascending position.
                assert (v[:-1] >= v[1:]).all()
                ties = v[:-1] == v[1:]
                assert (sel[:-1][ties] < sel[1:][ties]).all()
            # The index set is the float64 top-k set (ties: lower positions), where float32
            # rounding cannot change it.
            if n_valid == pos + 1:
                assert set(sel.tolist()) == set(range(pos + 1))
                checked += 1
            else:
                want = _expected_topk(ref, bound, robust, n_valid)
                if want is None:
                    skipped += 1
                else:
                    assert set(sel.tolist()) == want, tok
                    checked += 1
            tok += 1
    assert padded_rows >= 10  # the early positions of rows 0 and 3 really exercise the padding
    # Near-ties are rare at float32 precision: the test keeps its teeth. With FP8 tensor-core
    # accumulation the margins are ~60x wider; still, half of the 14 queries with more than
    # topk eligible keys must be decided.
    assert skipped <= (3 if rel < 1e-4 else 7), (checked, skipped)


@pytest.mark.parametrize("mode", ["fp8", "int8", "float"])
def test_indexer_topk_equal_scores_prefer_lower_positions(backend, device, mode):
    """Bit-identical keys (and scales) repeated over the sequence give exactly equal scores:
    the op contract keeps the lowest positions among equal scores (the set is the contract;
    the reference also orders equal scores by ascending position)."""
    require_indexer_dtype(backend, INDEXER_MODE[mode])
    g = seeded(23)
    lens, q_lens, topk = [45, 2], [3, 2], 8
    table, n_blocks = _paged(lens, BLOCK, g)
    q = torch.randn(5, IDX_HEADS, IDX_DIM, generator=g)
    w = torch.rand(5, IDX_HEADS, generator=g) + 0.5
    if mode == "fp8":
        q, _ = quantize_fp8_blocks(q, IDX_DIM)
    elif mode == "int8":
        q, _ = quantize_int8_rows(q)
    for _ in range(50):  # draw three keys until every query scores them clearly apart
        base = torch.randn(3, IDX_DIM, generator=g)
        base_scale = torch.ones(3, 1)
        if mode == "fp8":
            base, base_scale = quantize_fp8_blocks(base, IDX_DIM)
        elif mode == "int8":
            base, base_scale = quantize_int8_rows(base)
            base_scale = base_scale[:, None]
        # Float64 score of each distinct key for each query.
        dots = torch.einsum("thd,bd->thb", q.float().double(), base.float().double())
        per_base = torch.einsum("thb,th->tb", dots.clamp_min(0), w.double()) * base_scale.double().view(1, 3)
        srt = per_base.sort(-1).values
        if ((srt[:, 1:] - srt[:, :-1]) > 1e-3 * srt[:, -1:]).all():
            break
    else:
        raise AssertionError("no well-separated keys in 50 draws")
    pattern = torch.randint(0, 3, (n_blocks, BLOCK), generator=g)
    k = (base.view(torch.uint8) if mode == "fp8" else base)[pattern]
    k = k.view(FP8_DTYPE) if mode == "fp8" else k
    k_scale = base_scale.squeeze(-1)[pattern] if mode != "float" else None
    cu = _cu(q_lens)
    dev = lambda x: None if x is None else x.to(device)  # noqa: E731
    args = (dev(q), dev(w), dev(k), dev(k_scale), dev(table), dev(cu),
            dev(torch.tensor(lens, dtype=torch.int32)), topk)
    idx, _ = Ops(backend).indexer_topk(*args)
    # the host's max_seqlen_k (lets a backend plan its launch without a sync): same result
    planned, _ = Ops(backend).indexer_topk(*args, max_seqlen_k=max(lens))
    assert torch.equal(planned.cpu(), idx.cpu())
    with pytest.raises(ValueError, match="indexer_topk: max_seqlen_k must be None or positive"):
        Ops(backend).indexer_topk(*args, max_seqlen_k=0)
    if backend == "reference":  # it reads the lengths anyway, so it checks the bound
        with pytest.raises(ValueError, match=f"max_seqlen_k={max(lens) - 1} is below"):
            Ops(backend).indexer_topk(*args, max_seqlen_k=max(lens) - 1)
    idx = idx.cpu()
    tok = 0
    for row, (length, n) in enumerate(zip(lens, q_lens)):
        which = _gather(pattern, table, row, range(length))
        for pos in range(length - n, length):
            # The three keys score far apart (relative 1e-3): every equality below is exact.
            want, _ = _topk_python(per_base[tok, which[: pos + 1]].tolist(), topk)
            n_valid = min(topk, pos + 1)
            got = idx[tok].tolist()
            assert set(got[:n_valid]) == set(want[:n_valid]), (tok, got, want)
            assert got[n_valid:] == want[n_valid:] == [-1] * (topk - n_valid)
            if backend == "reference":
                assert got == want
            tok += 1
    assert (idx == -1).any()


def test_indexer_topk_topk_larger_than_every_row(backend, device):
    """topk above every row's length: all eligible keys come back, the rest is padding."""
    case = _indexer_case(22, "float")
    ops = Ops(backend)
    big = 64
    idx, _ = ops.indexer_topk(case["q"].to(device), case["w"].to(device), case["k"].to(device), None,
                              case["table"].to(device), case["cu"].to(device),
                              case["seqlens"].to(device), big)
    idx = idx.cpu()
    tok = 0
    for start, n in INDEXER_ROWS:
        for i in range(n):
            pos = start + i
            assert sorted(idx[tok, : pos + 1].tolist()) == list(range(pos + 1))
            assert (idx[tok, pos + 1:] == -1).all()
            tok += 1


# ------------------------------------------------------------------------------ select_topk
def _topk_python(row: list[float], k: int) -> tuple[list[int], list[float]]:
    """Highest values first, ties by ascending position; -inf entries are not eligible."""
    order = sorted((p for p, v in enumerate(row) if v != float("-inf")), key=lambda p: (-row[p], p))[:k]
    vals = [row[p] for p in order]
    return order + [-1] * (k - len(order)), vals + [float("-inf")] * (k - len(order))


def test_select_topk_ties_pick_lowest_positions_in_ascending_order():
    ninf = float("-inf")
    rows = torch.tensor([
        [1.0, 3.0, 3.0, 2.0, 3.0, 3.0, ninf, 3.0],
        [5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0],
        [0.0, -0.0, 0.0, -0.0, -1.0, 0.0, ninf, ninf],  # -0.0 ties with +0.0
        [ninf, 2.0, ninf, 2.0, ninf, ninf, ninf, ninf],  # fewer eligible than k
    ])
    pos, val = select_topk(rows, 3)
    assert pos.dtype == torch.int32
    assert pos.tolist() == [[1, 2, 4], [0, 1, 2], [0, 1, 2], [1, 3, -1]]
    assert val[0].tolist() == [3.0, 3.0, 3.0] and val[3, 2].item() == ninf
    pos, val = select_topk(rows, 6)
    assert pos.tolist() == [[1, 2, 4, 5, 7, 3], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 5, 4],
                            [1, 3, -1, -1, -1, -1]]
    # k larger than the row: padded to k.
    pos, val = select_topk(rows[:1], 10)
    assert pos.tolist() == [[1, 2, 4, 5, 7, 3, 0, -1, -1, -1]]
    assert torch.isneginf(val[0, 7:]).all()


def test_select_topk_many_ties_random():
    g = seeded(31)
    scores = torch.randint(0, 4, (50, 40), generator=g).float()
    scores[torch.rand(50, 40, generator=g) < 0.3] = float("-inf")
    for k in (1, 7, 25, 40, 45):
        pos, val = select_topk(scores, k)
        for r in range(scores.shape[0]):
            want_p, want_v = _topk_python(scores[r].tolist(), k)
            assert pos[r].tolist() == want_p, (k, r)
            assert val[r].tolist() == want_v, (k, r)


# ------------------------------------------------------------------------------ sparse MLA
D_QK, D_V, MLA_HEADS, MLA_BLOCK = 576, 512, 4, 16
SCALE = 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2  # the release's softmax scale


def _mla_ref(q: torch.Tensor, kv_sel: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype):
    """softmax(scale * q . kv) @ kv[:, :d_v] and logsumexp (natural log), in ``dtype``.
    q [H, D], kv_sel [K, D], valid [K] bool."""
    q, kv = q.to(dtype), kv_sel[valid].to(dtype)
    s = (q @ kv.T) * SCALE  # [H, K']
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[:, None])
    return p @ kv[:, :D_V], lse


def _mla_indices(g, pos: int, k: int) -> torch.Tensor:
    """k slots: a random number of distinct causal positions, then -1 padding."""
    hi = min(k, pos + 1)
    n = int(torch.randint(min(max(1, k // 2), hi), hi + 1, (1,), generator=g))
    idx = torch.full((k,), -1, dtype=torch.int32)
    idx[:n] = torch.randperm(pos + 1, generator=g)[:n].int()
    return idx


def _check_mla(out, lse, refs64, refs32):
    o64 = torch.stack([r[0] for r in refs64])
    o32 = torch.stack([r[0] for r in refs32])
    l64 = torch.stack([r[1] for r in refs64])
    l32 = torch.stack([r[1] for r in refs32])
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    # Within 4x the error of the test's own float32 computation of the same formula; the floor
    # (64 float32 ulps of the largest value) covers an accidentally exact float32 reference.
    assert_close_to_ref(out.reshape(o64.shape), o64, o32, factor=4.0,
                        floor=64 * F32_EPS * o64.abs().max().item())
    assert_close_to_ref(lse.reshape(l64.shape), l64, l32, factor=4.0,
                        floor=64 * F32_EPS * l64.abs().max().item())


def test_sparse_mla_prefill_matches_float64(backend, device):
    g = seeded(41)
    starts, q_lens = [25, 0, 30], [5, 9, 1]
    lens = [s + n for s, n in zip(starts, q_lens)]
    table, n_blocks = _paged(lens, MLA_BLOCK, g)
    kv = torch.randn(n_blocks, MLA_BLOCK, D_QK, generator=g)
    t, k = sum(q_lens), 24
    q = torch.randn(t, MLA_HEADS, D_QK, generator=g)
    indices, refs64, refs32 = [], [], []
    tok = 0
    for r, (s0, n) in enumerate(zip(starts, q_lens)):
        for i in range(n):
            idx = _mla_indices(g, s0 + i, k)
            sel = _gather(kv, table, r, idx.clamp_min(0))
            refs64.append(_mla_ref(q[tok], sel, idx >= 0, torch.float64))
            refs32.append(_mla_ref(q[tok], sel, idx >= 0, torch.float32))
            indices.append(idx)
            tok += 1
    indices = torch.stack(indices)
    assert (indices == -1).any()
    out, lse = Ops(backend).sparse_mla_prefill(
        q.to(device), kv.to(device), indices.to(device), table.to(device), _cu(q_lens).to(device),
        torch.tensor(lens, dtype=torch.int32).to(device), SCALE, D_V)
    assert out.shape == (t, MLA_HEADS, D_V) and lse.shape == (t, MLA_HEADS)
    _check_mla(out.cpu(), lse.cpu(), refs64, refs32)


@pytest.mark.parametrize("s_q", [1, 2])
def test_sparse_mla_decode_matches_float64(backend, device, s_q):
    g = seeded(50 + s_q)
    lens = [33, 7, 50]
    b, k = len(lens), 20
    table, n_blocks = _paged(lens, MLA_BLOCK, g)
    kv = torch.randn(n_blocks, MLA_BLOCK, D_QK, generator=g)
    q = torch.randn(b, s_q, MLA_HEADS, D_QK, generator=g)
    indices = torch.empty(b, s_q, k, dtype=torch.int32)
    refs64, refs32 = [], []
    for r in range(b):
        for j in range(s_q):
            pos = lens[r] - s_q + j  # the last s_q positions of the sequence
            idx = _mla_indices(g, pos, k)
            indices[r, j] = idx
            sel = _gather(kv, table, r, idx.clamp_min(0))
            refs64.append(_mla_ref(q[r, j], sel, idx >= 0, torch.float64))
            refs32.append(_mla_ref(q[r, j], sel, idx >= 0, torch.float32))
    assert (indices == -1).any()
    out, lse = Ops(backend).sparse_mla_decode(q.to(device), kv.to(device), indices.to(device),
                                              table.to(device), torch.tensor(lens, dtype=torch.int32).to(device),
                                              SCALE, D_V)
    assert out.shape == (b, s_q, MLA_HEADS, D_V) and lse.shape == (b, s_q, MLA_HEADS)
    _check_mla(out.cpu(), lse.cpu(), refs64, refs32)


# ------------------------------------------------------------------------------ opcheck
def _opcheck_cases(device):
    g = seeded(61)
    table = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    lens = torch.tensor([20, 9], dtype=torch.int32)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    qf = torch.randn(5, 2, 128, generator=g)
    q8, _ = quantize_fp8_blocks(qf, 128)
    k8, ks = quantize_fp8_blocks(torch.randn(4, 16, 128, generator=g), 128)
    w8, w_scale = torch.randn(130, 256, generator=g).to(FP8_DTYPE), torch.rand(2, 2, generator=g) + 0.5
    kv = torch.randn(4, 16, 64, generator=g)
    idx = torch.tensor([[0, 5, 17, -1], [1, 2, -1, -1], [19, 0, 3, 4], [8, 0, -1, -1], [7, 6, 5, 4]],
                       dtype=torch.int32)
    cases = {
        "rope": (torch.randn(3, 2, 128, generator=g), torch.randn(3, 32, generator=g),
                 torch.randn(3, 32, generator=g), False),
        "hadamard_rotate": (torch.randn(3, 128, generator=g),),
        "quantize_fp8": (torch.randn(3, 256, generator=g), 128, True),
        "quantize_int8": (torch.randn(3, 2, 128, generator=g),),
        "fp8_linear": (torch.randn(3, 256, generator=g), w8, w_scale, True, True),
        "indexer_topk": (q8, torch.randn(5, 2, generator=g), k8, ks.squeeze(-1), table, cu, lens, 4),
        "indexer_topk_float": (qf, torch.randn(5, 2, generator=g), torch.randn(4, 16, 128, generator=g),
                               None, table, cu, lens, 4),
        "indexer_topk_int8": (quantize_int8_rows(qf)[0], torch.randn(5, 2, generator=g),
                              *quantize_int8_rows(torch.randn(4, 16, 128, generator=g)), table, cu,
                              lens, 4),
        "sparse_mla_prefill": (torch.randn(5, 2, 64, generator=g), kv, idx, table, cu, lens, 0.125, 32),
        "sparse_mla_decode": (torch.randn(2, 2, 2, 64, generator=g), kv, idx[:4].view(2, 2, 4), table,
                              lens, 0.125, 32),
    }
    return {name: tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
            for name, args in cases.items()}


# opcheck's test_schema compares the inputs before and after the call with torch.allclose,
# which has no float8 kernel on CPU ("mul_cpu_reduced_float" not implemented for
# 'Float8_e4m3fn'): a limitation of the harness, not of the ops. For cases with FP8 inputs the
# other utilities run, and the schema's promise (mutates_args=(): no input is written) is
# checked here byte for byte instead.
FP8_INPUT_CASES = {"fp8_linear", "indexer_topk"}
OTHER_UTILS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("case", ["rope", "hadamard_rotate", "quantize_fp8", "quantize_int8", "fp8_linear",
                                  "indexer_topk",
                                  "indexer_topk_float", "indexer_topk_int8", "sparse_mla_prefill",
                                  "sparse_mla_decode"])
def test_opcheck(backend, device, case):
    if case.startswith("indexer_topk"):
        require_indexer_dtype(backend, {"indexer_topk": "fp8", "indexer_topk_float": "bf16",
                                        "indexer_topk_int8": "int8"}[case])
    args = _opcheck_cases(device)[case] + (backend,)
    name = case if hasattr(torch.ops.dsa, case) else case.removesuffix("_float").removesuffix("_int8")
    op = getattr(torch.ops.dsa, name).default
    if case not in FP8_INPUT_CASES:
        torch.library.opcheck(op, args)
        return
    torch.library.opcheck(op, args, test_utils=OTHER_UTILS)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    before = [a.view(torch.uint8).clone() if a.dtype == FP8_DTYPE else a.clone() for a in tensors]
    op(*args)
    for a, b in zip(tensors, before):
        assert torch.equal(a.view(torch.uint8) if a.dtype == FP8_DTYPE else a, b)
