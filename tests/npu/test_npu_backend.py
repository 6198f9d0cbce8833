"""The npu backend's glue on CPU through the contract emulator (DSA_NPU_KERNELS=emulator): the
dsa ops and the whole tiny model match the reference backend. No NPU is involved."""

from __future__ import annotations

import pytest
import torch

import dsa_ascend
from dsa_ascend import backends
from dsa_ascend.backends import BackendUnavailable, npu, reference, resolve
from dsa_ascend.quant import FP8_DTYPE, quantize_int8_rows

CPU = torch.device("cpu")
EXACT_BF16_INDEXER = dict(device="cpu", dtype=torch.float32, indexer_dtype="bf16",
                          fp8_act_quant=False, simulate_fp8_latent=False, max_seq_len=512,
                          max_batch_size=4)


@pytest.fixture
def emulator(monkeypatch):
    monkeypatch.setenv(npu.ENV, "emulator")
    backends._cache.pop("npu", None)
    yield
    backends._cache.pop("npu", None)  # a later test without the knob must not find it cached


def test_refused_on_cpu_unless_emulator(monkeypatch):
    monkeypatch.delenv(npu.ENV, raising=False)
    with pytest.raises(BackendUnavailable, match="emulator"):
        resolve("npu", CPU)
    monkeypatch.setenv(npu.ENV, "emulator")
    assert resolve("npu", CPU) == "npu"
    monkeypatch.setenv(npu.ENV, "fastest")
    assert "not one of" in backends.unavailable_reason("npu", CPU)


def test_paged_views_share_the_cache():
    kv = torch.randn(3, 16, 576)
    pa = npu._paged(kv)
    key, key_rope = pa[..., :512], pa[..., 512:]
    assert key.shape == (3, 16, 1, 512) and key_rope.shape == (3, 16, 1, 64)
    assert key.data_ptr() == kv.data_ptr()
    assert key_rope.data_ptr() == kv.data_ptr() + 512 * kv.element_size()


def _paged_inputs(g, q_lens, kv_lens, bs, width):
    blocks = sum(-(-L // bs) for L in kv_lens) + 2
    cache = torch.randn(blocks, bs, width, generator=g)
    perm = torch.randperm(blocks, generator=g).to(torch.int32)
    max_blocks = max(-(-L // bs) for L in kv_lens)
    table = torch.zeros(len(kv_lens), max_blocks, dtype=torch.int32)
    used = 0
    for r, L in enumerate(kv_lens):
        n = -(-L // bs)
        table[r, :n] = perm[used:used + n]
        used += n
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    return cache, table, cu, torch.tensor(kv_lens, dtype=torch.int32)


def test_dsa_ops_match_reference(emulator):
    g = torch.Generator().manual_seed(0)
    q_lens, kv_lens, bs = [4, 1, 6], [19, 8, 6], 4
    k_cache, table, cu, lens = _paged_inputs(g, q_lens, kv_lens, bs, 128)
    t = sum(q_lens)
    q, w = torch.randn(t, 8, 128, generator=g), torch.randn(t, 8, generator=g)
    args = (q, w, k_cache, None, table, cu, lens, 10)
    i_npu, v_npu = npu.indexer_topk(*args)
    i_ref, v_ref = reference.indexer_topk(*args)
    assert i_npu.shape == i_ref.shape and i_npu.dtype == torch.int32
    for a, b in zip(i_npu, i_ref):  # the SET is the contract
        assert set(a.tolist()) == set(b.tolist())
    torch.testing.assert_close(v_npu.sort(-1).values, v_ref.sort(-1).values)

    kv, table, cu, lens = _paged_inputs(g, q_lens, kv_lens, bs, 576)
    qa = torch.randn(t, 4, 576, generator=g)
    out, lse = npu.sparse_mla_prefill(qa, kv, i_ref, table, cu, lens, 0.07, 512)
    out_r, lse_r = reference.sparse_mla_prefill(qa, kv, i_ref, table, cu, lens, 0.07, 512)
    torch.testing.assert_close(out, out_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_r, atol=1e-5, rtol=1e-5)

    qd = torch.randn(3, 2, 4, 576, generator=g)  # decode, S_q = 2
    idx = torch.stack([torch.randperm(L - 1, generator=g)[:5] for L in kv_lens for _ in range(2)])
    idx = torch.cat([idx, torch.full((6, 2), -1)], 1).to(torch.int32).view(3, 2, 7)
    out, lse = npu.sparse_mla_decode(qd, kv, idx, table, lens, 0.07, 512)
    out_r, lse_r = reference.sparse_mla_decode(qd, kv, idx, table, lens, 0.07, 512)
    torch.testing.assert_close(out, out_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_r, atol=1e-5, rtol=1e-5)


def test_fp8_indexer_is_refused_with_the_option_named(emulator, tiny_dir):
    q = torch.zeros(2, 8, 128).to(FP8_DTYPE)
    k = torch.zeros(2, 4, 128).to(FP8_DTYPE)
    with pytest.raises(npu.NpuKernelsUnavailable, match="indexer_dtype='bf16' or 'int8'"):
        npu.indexer_topk(q, torch.ones(2, 8), k, torch.ones(2, 4), torch.zeros(1, 2, dtype=torch.int32),
                         torch.tensor([0, 2], dtype=torch.int32), torch.tensor([2], dtype=torch.int32), 4)
    with pytest.raises(BackendUnavailable, match="indexer_dtype='fp8'.*bf16|int8"):
        dsa_ascend.load(tiny_dir, backend="npu", **{**EXACT_BF16_INDEXER, "indexer_dtype": "fp8"})


def test_auto_indexer_dtype_is_the_backends_preferred(emulator, tiny_dir):
    opts = {**EXACT_BF16_INDEXER, "indexer_dtype": "auto"}
    assert dsa_ascend.load(tiny_dir, backend="npu", **opts).run.indexer_dtype == "bf16"
    ref = dsa_ascend.load(tiny_dir, backend="reference", **opts)
    assert ref.run.indexer_dtype == "fp8" and ref.cache.layers[0].index_k.dtype == FP8_DTYPE
    assert backends.indexer_dtype("npu", "int8") == "int8"


def _int8_indexer_case(g, q_lens, kv_lens, bs, heads=8):
    k_f, table, cu, lens = _paged_inputs(g, q_lens, kv_lens, bs, 128)
    k8, k_scale = quantize_int8_rows(k_f)
    t = sum(q_lens)
    q8, q_scale = quantize_int8_rows(torch.randn(t, heads, 128, generator=g))
    w = torch.randn(t, heads, generator=g) * q_scale  # the model folds the q scales in
    return (q8, w, k8, k_scale, table, cu, lens)


def test_int8_indexer_matches_reference(emulator):
    """Our int8 indexer glue (q scales in the weights, query_dequant_scale = 1, the float32
    key-scale cache as key_dequant_scale [blocks, bs, 1]) against the reference op."""
    g = torch.Generator().manual_seed(5)
    args = _int8_indexer_case(g, [4, 1, 6], [19, 8, 6], 4)
    i_npu, v_npu = npu.indexer_topk(*args, 10)
    i_ref, v_ref = reference.indexer_topk(*args, 10)
    assert i_npu.dtype == torch.int32 and i_npu.shape == i_ref.shape
    for a, b in zip(i_npu, i_ref):
        assert set(a.tolist()) == set(b.tolist())
    torch.testing.assert_close(v_npu.sort(-1).values, v_ref.sort(-1).values)


def test_int8_indexer_through_a_torch_npu_like_provider(monkeypatch):
    """The builtin path's glue, on CPU: torch_npu's int8 indexer takes float16 weights and
    scales and returns indices only; the scores become NaN (the model reads the indices)."""
    from dsa_ascend.backends import npu_contract as emu

    seen = {}

    def builtin_like(query, key, weights, query_dequant_scale, key_dequant_scale, **kw):
        seen.update(w=weights.dtype, qs=query_dequant_scale, ks=key_dequant_scale.dtype, kw=kw)
        return emu.emulated_npu_quant_lightning_indexer(query, key, weights, query_dequant_scale,
                                                        key_dequant_scale, **kw)

    fake = npu.OperatorProvider("builtin", emu.emulated_npu_lightning_indexer,
                                emu.emulated_npu_sparse_flash_attention, False, builtin_like,
                                quant_scale_dtype=torch.float16)
    monkeypatch.setattr(npu, "provider", lambda mode=None: fake)
    g = torch.Generator().manual_seed(6)
    args = _int8_indexer_case(g, [3, 2], [11, 40], 16)
    idx, val = npu.indexer_topk(*args, 8)
    ref, _ = reference.indexer_topk(*args, 8)
    assert seen["w"] == seen["ks"] == torch.float16 and bool((seen["qs"] == 1).all())
    assert seen["kw"]["layout_key"] == "PA_BSND" and "return_value" not in seen["kw"]
    overlap = [len(set(a.tolist()) & set(b.tolist())) / 8 for a, b in zip(idx, ref)]
    assert min(overlap) >= 0.75  # float16 weights and scales may swap near-ties
    assert torch.isnan(val[idx >= 0]).all() and torch.isneginf(val[idx < 0]).all()
    monkeypatch.setattr(npu, "provider", lambda mode=None: npu.OperatorProvider(
        "builtin", None, None, False, None, quant_unavailable="no npu_quant_lightning_indexer"))
    with pytest.raises(npu.NpuKernelsUnavailable, match="no npu_quant_lightning_indexer.*bf16"):
        npu.indexer_topk(*args, 8)


def test_fp8_latent_cache_is_refused_with_the_option_named(emulator):
    kv = torch.zeros(2, 4, 656, dtype=torch.uint8)
    with pytest.raises(npu.NpuKernelsUnavailable, match="kv_cache_dtype='auto'"):
        npu.sparse_mla_decode(torch.zeros(1, 1, 2, 576), kv, torch.zeros(1, 1, 4, dtype=torch.int32),
                              torch.zeros(1, 2, dtype=torch.int32), torch.tensor([3], dtype=torch.int32),
                              0.1, 512)


@pytest.mark.parametrize("indexer_dtype", ["bf16", "int8"])
def test_tiny_model_prefill_and_decode_match_reference(emulator, tiny_dir, indexer_dtype):
    opts = {**EXACT_BF16_INDEXER, "indexer_dtype": indexer_dtype}
    ref = dsa_ascend.load(tiny_dir, backend="reference", **opts)
    emu = dsa_ascend.load(tiny_dir, backend="npu", **opts)
    assert emu.cache.layers[0].index_k.dtype == (torch.int8 if indexer_dtype == "int8" else torch.float32)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 512, (2, 37), generator=g)  # longer than index_topk (16)
    a, b = ref(tokens[:, :30], 0), emu(tokens[:, :30], 0)  # prefill
    tol = 1e-4 * a.abs().max().item()
    assert (a - b).abs().max().item() <= tol
    a, b = ref(tokens[:, 30:33], 30), emu(tokens[:, 30:33], 30)  # chunked prefill
    assert (a - b).abs().max().item() <= tol
    nxt_a = nxt_b = a[:, -1].argmax(-1, keepdim=True)
    for pos in range(33, 41):  # greedy decode, each model on its own tokens
        la, lb = ref(nxt_a, pos), emu(nxt_b, pos)
        assert (la - lb).abs().max().item() <= tol
        nxt_a, nxt_b = la[:, -1].argmax(-1, keepdim=True), lb[:, -1].argmax(-1, keepdim=True)
        assert torch.equal(nxt_a, nxt_b)
