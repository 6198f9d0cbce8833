"""Hardware checks of the npu backend: our operators and torch_npu's built-ins against the
reference on an NPU. On a machine without one they skip with the probe's reason."""

from __future__ import annotations

import os

import pytest
import torch

from dsa_ascend.backends import npu, reference, unavailable_reason


def _hardware_reason():
    saved = os.environ.pop(npu.ENV, None)  # the emulator does not count as hardware
    try:
        return unavailable_reason("npu")
    finally:
        if saved is not None:
            os.environ[npu.ENV] = saved


REASON = _hardware_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no usable NPU: {REASON}")


@pytest.mark.parametrize("mode", ["custom", "builtin"])
def test_operators_match_reference_on_npu(mode):  # pragma: no cover - needs an Ascend NPU
    if npu._provider_reason(mode) is not None:
        pytest.skip(npu._provider_reason(mode))
    dev = torch.device("npu")
    g = torch.Generator().manual_seed(0)
    bs, lens = 128, [300, 1000]
    perm = torch.randperm(11, generator=g).to(torch.int32)  # 3 + 8 blocks of 128, shuffled
    table = torch.zeros(2, 8, dtype=torch.int32)
    table[0, :3], table[1, :8] = perm[:3], perm[3:]
    k_cache = torch.randn(11, bs, 128, generator=g).bfloat16()
    q = torch.randn(5, 64, 128, generator=g).bfloat16()
    w = torch.randn(5, 64, generator=g)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    os.environ[npu.ENV] = mode
    try:
        got, _ = npu.indexer_topk(q.to(dev), w.to(dev), k_cache.to(dev), None, table.to(dev),
                                  cu.to(dev), seqlens.to(dev), 64)
    finally:
        os.environ.pop(npu.ENV)
    want, _ = reference.indexer_topk(q.float(), w, k_cache.float(), None, table, cu, seqlens, 64)
    overlap = [len(set(a.tolist()) & set(b.tolist())) / 64 for a, b in zip(got.cpu(), want)]
    assert min(overlap) > 0.9  # bf16 rounding may swap near-ties


def _on(mode):
    if npu._provider_reason(mode) is not None:
        pytest.skip(npu._provider_reason(mode))
    os.environ[npu.ENV] = mode


@pytest.mark.parametrize("mode", ["custom", "builtin"])
def test_int8_indexer_matches_reference_on_npu(mode):  # pragma: no cover - needs an Ascend NPU
    from dsa_ascend.quant import quantize_int8_rows

    dev = torch.device("npu")
    g = torch.Generator().manual_seed(1)
    table = torch.randperm(11, generator=g).to(torch.int32)[:10].view(2, 5)
    k8, ks = quantize_int8_rows(torch.randn(11, 128, 128, generator=g))
    q8, qs = quantize_int8_rows(torch.randn(5, 64, 128, generator=g))
    w = torch.randn(5, 64, generator=g) * qs
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    seqlens = torch.tensor([300, 600], dtype=torch.int32)
    _on(mode)
    try:
        if mode == "builtin" and npu.provider().quant_lightning_indexer is None:
            pytest.skip(npu.provider().quant_unavailable)
        args = [t.to(dev) for t in (q8, w, k8, ks, table, cu, seqlens)]
        got, _ = npu.indexer_topk(*args, 64)
    finally:
        os.environ.pop(npu.ENV)
    want, _ = reference.indexer_topk(q8, w, k8, ks, table, cu, seqlens, 64)
    overlap = [len(set(a.tolist()) & set(b.tolist())) / 64 for a, b in zip(got.cpu(), want)]
    assert min(overlap) > 0.9  # float16 weights / scales (builtin) may swap near-ties


@pytest.mark.parametrize("mode", ["custom", "builtin"])
def test_sparse_attention_matches_reference_on_npu(mode):  # pragma: no cover - needs an NPU
    dev = torch.device("npu")
    g = torch.Generator().manual_seed(2)
    table = torch.randperm(12, generator=g).to(torch.int32)[:10].view(2, 5)
    kv = torch.randn(12, 128, 576, generator=g).bfloat16()
    lens, q_lens = [400, 640], [3, 2]
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    rows = [(n, m, i) for n, m in zip(lens, q_lens) for i in range(m)]
    idx = torch.stack([torch.randperm(n - m + 1 + i, generator=g)[:96] for n, m, i in rows])
    idx = torch.cat([idx, torch.full((5, 32), -1)], 1).to(torch.int32)
    q = torch.randn(5, 128, 576, generator=g).bfloat16()
    seqlens = torch.tensor(lens, dtype=torch.int32)
    _on(mode)
    try:
        out, _ = npu.sparse_mla_prefill(*[t.to(dev) for t in (q, kv, idx, table, cu, seqlens)],
                                        576 ** -0.5, 512)
    finally:
        os.environ.pop(npu.ENV)
    want, _ = reference.sparse_mla_prefill(q.float(), kv.float(), idx, table, cu, seqlens,
                                           576 ** -0.5, 512)
    torch.testing.assert_close(out.cpu().float(), want, atol=2e-2, rtol=2e-2)  # bf16 P and out
