"""The ``npu`` backend: the DSA operators on Ascend, through one of three operator providers.

An operator provider supplies two functions with the torch_npu calling contract
(``lightning_indexer`` = ``npu_lightning_indexer``, ``sparse_flash_attention`` =
``npu_sparse_flash_attention``; see /work/shared/docs/NPU_NOTES.md):

- ``custom``: our AscendC operators (ops/ascendc), registered as ``torch.ops.custom.
  dsa_lightning_indexer`` / ``torch.ops.custom.dsa_sparse_flash_attention`` by the package that
  ``ops/ascendc/build.sh`` builds and installs (``dsa_ascend_npu_ops``);
- ``builtin``: ``torch_npu.npu_lightning_indexer`` / ``torch_npu.npu_sparse_flash_attention``
  (shipped with CANN 8.3+);
- ``emulator``: ``npu_contract``, a CPU emulation of that contract -- for testing this glue
  on a machine without an NPU, never for inference.

``DSA_NPU_KERNELS=custom|builtin|auto|emulator`` picks one (default ``auto``: custom when built,
else builtin when torch_npu has the operators, else unavailable with both reasons). It is read
on every call, but the registry (``backends.implementations``) checks availability only at the
backend's first use in a process, so set it before loading a model.

This module translates our conventions into the operators' layouts (queries TND with cumulative
lengths; caches PA_BSND as zero-copy views: latent cache [blocks, bs, 576] -> key
``[..., :512].unsqueeze(2)`` and key_rope ``[..., 512:].unsqueeze(2)``; index keys
[blocks, bs, 128] -> ``.unsqueeze(2)``; indices [T, K] <-> [T, 1, K]). The Hadamard rotation,
FP8 quantization and FP8 linears come from the reference backend's torch code. The indexer
operator is bf16/fp16: the model must run with ``indexer_dtype="bf16"``. TODO: the int8 indexer
path (``npu_quant_lightning_indexer`` with per-token-head scales).

Probing never imports torch_npu eagerly: without the CANN toolkit its import fails and, through
torch's device-backend autoload, would take ``import torch`` down with it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ..quant import FP8_DTYPE
from . import reference

ENV = "DSA_NPU_KERNELS"
MODES = ("auto", "custom", "builtin", "emulator")
CUSTOM_PACKAGE = "dsa_ascend_npu_ops"  # built by ops/ascendc/build.sh
CUSTOM_OPS = ("dsa_lightning_indexer", "dsa_sparse_flash_attention")
BUILTIN_OPS = ("npu_lightning_indexer", "npu_sparse_flash_attention")


class NpuKernelsUnavailable(RuntimeError):
    """The selected operator provider cannot run; the message says what is missing."""


@dataclass(frozen=True)
class OperatorProvider:
    """Two functions with the torch_npu contract, and what this provider can return."""
    name: str
    lightning_indexer: Callable
    sparse_flash_attention: Callable
    lse_with_paged_kv: bool  # softmax_max/sum available with layout_kv="PA_BSND"


def kernel_mode() -> str:
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise NpuKernelsUnavailable(f"{ENV}={mode!r} is not one of {'|'.join(MODES)}")
    return mode


# --------------------------------------------------------------------------- providers
def _torch_npu_reason() -> Optional[str]:
    if importlib.util.find_spec("torch_npu") is None:
        return "torch_npu is not installed (pip install '.[npu]' on a machine with CANN)"
    try:
        importlib.import_module("torch_npu")
    except Exception as e:  # noqa: BLE001 - any import failure is a reason to report
        return f"torch_npu failed to import ({type(e).__name__}: {e}); is CANN installed/sourced?"
    if not (hasattr(torch, "npu") and torch.npu.is_available()):
        return "torch_npu sees no NPU (torch.npu.is_available() is False)"
    return None


def _custom_reason() -> Optional[str]:
    if importlib.util.find_spec(CUSTOM_PACKAGE) is None:
        return (f"our AscendC operators are not built ({CUSTOM_PACKAGE} is not installed; run "
                "ops/ascendc/build.sh on a machine with CANN >= 8.3)")
    try:
        importlib.import_module(CUSTOM_PACKAGE)
    except Exception as e:  # noqa: BLE001
        return f"{CUSTOM_PACKAGE} failed to import ({type(e).__name__}: {e})"
    missing = [op for op in CUSTOM_OPS if not hasattr(torch.ops.custom, op)]
    if missing:
        return f"{CUSTOM_PACKAGE} registered no torch.ops.custom.{missing}"
    return None


def _builtin_reason() -> Optional[str]:
    torch_npu = importlib.import_module("torch_npu")
    missing = [op for op in BUILTIN_OPS if not hasattr(torch_npu, op)]
    if missing:
        return (f"this torch_npu has no {missing} (they ship with CANN >= 8.3 and a matching "
                "torch_npu)")
    return None


def _provider_reason(mode: str) -> Optional[str]:
    """Why ``mode``'s provider cannot run (torch_npu already known to work for the NPU modes)."""
    if mode == "emulator":
        return None
    if mode == "custom":
        return _custom_reason()
    if mode == "builtin":
        return _builtin_reason()
    custom, builtin = _custom_reason(), _builtin_reason()
    if custom is None or builtin is None:
        return None
    return f"no operator provider ({ENV}=auto): custom: {custom}; builtin: {builtin}"


def provider(mode: Optional[str] = None) -> OperatorProvider:
    """The operator provider for ``mode`` (default: the environment's), or a clear error."""
    mode = mode or kernel_mode()
    if mode == "emulator":
        from . import npu_contract as emu

        return OperatorProvider("emulator", emu.emulated_npu_lightning_indexer,
                                emu.emulated_npu_sparse_flash_attention, True)
    reason = _torch_npu_reason() or _provider_reason(mode)
    if reason is not None:
        raise NpuKernelsUnavailable(f"npu operators ({ENV}={mode}) unavailable: {reason}")
    if mode == "custom" or (mode == "auto" and _custom_reason() is None):
        ops = torch.ops.custom
        return OperatorProvider("custom", ops.dsa_lightning_indexer,
                                ops.dsa_sparse_flash_attention, True)
    torch_npu = importlib.import_module("torch_npu")
    return OperatorProvider("builtin", torch_npu.npu_lightning_indexer,
                            torch_npu.npu_sparse_flash_attention, False)


def unavailable_reason(device: Optional[torch.device]) -> Optional[str]:
    try:
        mode = kernel_mode()
    except NpuKernelsUnavailable as e:
        return str(e)
    if mode == "emulator":
        if device is not None and device.type != "cpu":
            return (f"{ENV}=emulator runs the CPU contract emulator (for testing the glue), not on "
                    f"{device.type!r}")
        return None
    if device is not None and device.type != "npu":
        return (f"it runs on Ascend NPUs only (got {device.type!r}; {ENV}=emulator tests its glue "
                "on CPU)")
    return _torch_npu_reason() or _provider_reason(mode)


# --------------------------------------------------------------------------- the dsa ops
def _paged(cache: Tensor) -> Tensor:
    """[blocks, block_size, D] -> PA_BSND [blocks, block_size, N2 = 1, D], a view."""
    return cache.unsqueeze(2)


def _cumulative_ends(cu_seqlens_q: Tensor) -> Tensor:
    """Our cu_seqlens_q [R+1] (leading 0) -> the operators' cumulative TND lengths [R]."""
    return cu_seqlens_q[1:]


def indexer_topk(q: Tensor, weights: Tensor, k_cache: Tensor, k_scale: Optional[Tensor],
                 block_table: Tensor, cu_seqlens_q: Tensor, seqlens_k: Tensor,
                 topk: int) -> tuple[Tensor, Tensor]:
    if q.dtype == FP8_DTYPE or k_scale is not None:
        raise NpuKernelsUnavailable(
            "npu backend: the lightning indexer operator takes bf16/fp16 q and k, not FP8 with "
            "scales: load the model with indexer_dtype='bf16' (the int8 path, "
            "npu_quant_lightning_indexer, is not wired yet)")
    indices, values = provider().lightning_indexer(
        q, _paged(k_cache), weights.to(q.dtype), actual_seq_lengths_query=_cumulative_ends(cu_seqlens_q),
        actual_seq_lengths_key=seqlens_k, block_table=block_table, layout_query="TND",
        layout_key="PA_BSND", sparse_count=topk, sparse_mode=3, return_value=True)
    indices = indices.squeeze(1).to(torch.int32)  # [T, 1, K] -> [T, K]
    values = values.squeeze(1).float().masked_fill(indices < 0, float("-inf"))
    return indices, values


def _sparse_attention(p: OperatorProvider, q: Tensor, kv_cache: Tensor, indices: Tensor,
                      block_table: Tensor, seqlens_k: Tensor, scale: float, d_v: int,
                      layout: str, q_lengths: Tensor) -> tuple[Tensor, Tensor]:
    kv = _paged(kv_cache)  # views: the latent [..., :d_v] is both key and value
    key, key_rope = kv[..., :d_v], kv[..., d_v:]
    out, smax, ssum = p.sparse_flash_attention(
        q[..., :d_v], key, key, indices.unsqueeze(-2), scale, block_table=block_table,
        actual_seq_lengths_query=q_lengths, actual_seq_lengths_kv=seqlens_k,
        query_rope=q[..., d_v:], key_rope=key_rope, sparse_block_size=1, layout_query=layout,
        layout_kv="PA_BSND", sparse_mode=3, attention_mode=2,
        return_softmax_lse=p.lse_with_paged_kv)
    if p.lse_with_paged_kv:
        lse = (smax + torch.log(ssum)).squeeze(-2).float()  # [..., 1, H] -> [..., H]
    else:  # torch_npu returns softmax_max/sum only for non-paged KV; the model never reads lse
        lse = torch.full(q.shape[:-1], float("nan"), dtype=torch.float32, device=q.device)
    return out, lse


def sparse_mla_prefill(q, kv_cache, indices, block_table, cu_seqlens_q, seqlens_k, scale, d_v):
    return _sparse_attention(provider(), q, kv_cache, indices, block_table, seqlens_k, scale, d_v,
                             "TND", _cumulative_ends(cu_seqlens_q))


def sparse_mla_decode(q, kv_cache, indices, block_table, seqlens_k, scale, d_v):
    b, sq = q.shape[:2]  # BSND: the S_q queries of each sequence are its last positions
    q_lengths = torch.full((b,), sq, dtype=torch.int32, device=q.device)
    return _sparse_attention(provider(), q, kv_cache, indices, block_table, seqlens_k, scale, d_v,
                             "BSND", q_lengths)


IMPLS = {
    **reference.IMPLS,
    "indexer_topk": indexer_topk,
    "sparse_mla_prefill": sparse_mla_prefill,
    "sparse_mla_decode": sparse_mla_decode,
}
