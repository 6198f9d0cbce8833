"""The reference backend is memory-bounded: a 32K-token prefill of the tiny preset never builds
an [S, S] (let alone [S, S, heads]) tensor: attention and indexer scores are chunked."""

from __future__ import annotations

import pytest
import torch
from conftest import seeded
from torch.utils._python_dispatch import TorchDispatchMode

import dsa_ascend


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces while active."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), func
        return out


@pytest.mark.slow
def test_32k_prefill_never_materializes_seq_by_seq(tiny_dir, backend, device):
    s = 32768
    model = dsa_ascend.load(tiny_dir, backend=backend, device=device, dtype=torch.bfloat16,
                            max_seq_len=s, max_batch_size=1)
    tokens = torch.randint(0, model.config.vocab_size, (s,), generator=seeded(0))
    with LargestTensor() as largest:
        logits = model.forward_ragged([tokens], rows=[0], start_pos=[0], last_only=True)[0]
    assert torch.isfinite(logits).all()
    # The largest legitimate tensors are linear in S (e.g. [S, heads, 576] queries): far below
    # S*S = 1.07e9 elements, let alone S*S*heads.
    assert largest.numel < s * s // 8, (largest.numel, largest.op)
