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
