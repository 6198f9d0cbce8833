"""The ``npu`` backend: the DSA operators on Ascend, through one of three operator providers.

An operator provider supplies functions with the torch_npu calling contract
(``lightning_indexer`` = ``npu_lightning_indexer``, ``quant_lightning_indexer`` =
``npu_quant_lightning_indexer``, ``sparse_flash_attention`` = ``npu_sparse_flash_attention``;
see /work/shared/docs/NPU_NOTES.md):

- ``custom``: our AscendC operators (ops/ascendc), registered as ``torch.ops.custom.
  dsa_lightning_indexer`` / ``dsa_quant_lightning_indexer`` / ``dsa_sparse_flash_attention`` by
  the package that ``ops/ascendc/build.sh`` builds and installs (``dsa_ascend_npu_ops``);
- ``builtin``: ``torch_npu.npu_lightning_indexer`` / ``npu_quant_lightning_indexer`` (int8,
  Atlas A3) / ``npu_sparse_flash_attention`` (shipped with CANN 8.3+);
- ``emulator``: ``npu_contract``, a CPU emulation of that contract -- for testing this glue
  on a machine without an NPU, never for inference.

``DSA_NPU_KERNELS=custom|builtin|auto|emulator`` picks one (default ``auto``: custom when built,
else builtin when torch_npu has the operators, else unavailable with both reasons). It is read
on every call, but the registry (``backends.implementations``) checks availability only at the
backend's first use in a process, so set it before loading a model.

This module translates our conventions into the operators' layouts (queries TND with cumulative
lengths; caches PA_BSND as zero-copy views: latent cache [blocks, bs, 576] -> key
``[..., :512].unsqueeze(2)`` and key_rope ``[..., 512:].unsqueeze(2)``; index keys
[blocks, bs, 128] -> ``.unsqueeze(2)``, their float32 scales [blocks, bs] -> ``.unsqueeze(2)``;
indices [T, K] <-> [T, 1, K]). The Hadamard rotation, int8 / FP8 quantization and the linears
come from the reference backend's torch code. The indexer runs bf16 (``indexer_dtype="bf16"``,
this backend's "auto") or int8 (``"int8"``: int8 q/k, the per-(token, head) q scales folded
into the weights as the model does for every backend, so the operator's query_dequant_scale is
1); the 910B/C have no FP8, so ``"fp8"`` is refused with the option named. torch_npu's int8
operator takes float16 weights and scales (Atlas A3), so the builtin path casts them (a copy of
the [blocks, bs] scale cache per call); ours reads the float32 cache in place.

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

from . import reference

ENV = "DSA_NPU_KERNELS"
MODES = ("auto", "custom", "builtin", "emulator")
CUSTOM_PACKAGE = "dsa_ascend_npu_ops"  # built by ops/ascendc/build.sh
CUSTOM_OPS = ("dsa_lightning_indexer", "dsa_quant_lightning_indexer", "dsa_sparse_flash_attention")
BUILTIN_OPS = ("npu_lightning_indexer", "npu_sparse_flash_attention")
BUILTIN_QUANT_OP = "npu_quant_lightning_indexer"  # Atlas A3 / CANN 8.3+; optional
# RunConfig.indexer_dtype modes of this backend, preferred ("auto") first. bf16 runs on both
# the 910B (A2) and 910C (A3) built-ins; torch_npu's int8 indexer is A3-only.
INDEXER_DTYPES = ("bf16", "int8")
# RunConfig.kv_cache_dtype formats the sparse attention operators read: the model-dtype latent
# cache only (the FP8 cache format of kv_fp8.py is not wired to npu_kv_quant_sparse_flash_attention).
KV_CACHE_DTYPES = ("auto",)


class NpuKernelsUnavailable(RuntimeError):
    """The selected operator provider cannot run; the message says what is missing."""


@dataclass(frozen=True)
class OperatorProvider:
    """Functions with the torch_npu contract, and what this provider can return."""
    name: str
    lightning_indexer: Callable
    sparse_flash_attention: Callable
    lse_with_paged_kv: bool  # softmax_max/sum available with layout_kv="PA_BSND"
    quant_lightning_indexer: Optional[Callable] = None  # None: int8 indexer unavailable
    quant_unavailable: str = ""  # why, when quant_lightning_indexer is None
    quant_values: bool = False  # the int8 indexer returns scores with return_value=True
    quant_scale_dtype: Optional[torch.dtype] = None  # dtype its weights/scales need (None: any)


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
                                emu.emulated_npu_sparse_flash_attention, True,
                                emu.emulated_npu_quant_lightning_indexer, quant_values=True)
    reason = _torch_npu_reason() or _provider_reason(mode)
    if reason is not None:
        raise NpuKernelsUnavailable(f"npu operators ({ENV}={mode}) unavailable: {reason}")
    if mode == "custom" or (mode == "auto" and _custom_reason() is None):
        ops = torch.ops.custom
        return OperatorProvider("custom", ops.dsa_lightning_indexer,
                                ops.dsa_sparse_flash_attention, True,
                                ops.dsa_quant_lightning_indexer, quant_values=True)
    torch_npu = importlib.import_module("torch_npu")
    quant = getattr(torch_npu, BUILTIN_QUANT_OP, None)
    return OperatorProvider(
        "builtin", torch_npu.npu_lightning_indexer, torch_npu.npu_sparse_flash_attention, False,
        quant, quant_unavailable=f"this torch_npu has no {BUILTIN_QUANT_OP} (Atlas A3, CANN >= 8.3)",
        quant_scale_dtype=torch.float16)


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
                 topk: int, max_seqlen_k: Optional[int] = None) -> tuple[Tensor, Tensor]:
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.int8):
        raise NpuKernelsUnavailable(
            f"npu backend: the lightning indexer operators take bf16/fp16 or int8 q and k, not "
            f"{q.dtype} (the 910B/C have no FP8): load the model with indexer_dtype='bf16' or "
            "'int8' (or 'auto')")
    p = provider()
    common = dict(actual_seq_lengths_query=_cumulative_ends(cu_seqlens_q),
                  actual_seq_lengths_key=seqlens_k, block_table=block_table, layout_query="TND",
                  layout_key="PA_BSND", sparse_count=topk, sparse_mode=3)
    if q.dtype == torch.int8:
        indices, values = _quant_indexer(p, q, weights, k_cache, k_scale, common)
    else:
        indices, values = p.lightning_indexer(q, _paged(k_cache), weights.to(q.dtype),
                                              return_value=True, **common)
    indices = indices.squeeze(1).to(torch.int32)  # [T, 1, K] -> [T, K]
    values = values.squeeze(1).float().masked_fill(indices < 0, float("-inf"))
    return indices, values


def _quant_indexer(p: OperatorProvider, q: Tensor, weights: Tensor, k_cache: Tensor,
                   k_scale: Tensor, common: dict) -> tuple[Tensor, Tensor]:
    """The int8 indexer: the q scales are already in ``weights`` (as for FP8), so the
    operator's per-(token, head) query_dequant_scale is 1."""
    if p.quant_lightning_indexer is None:
        raise NpuKernelsUnavailable(
            f"npu backend ({p.name} operators): no int8 lightning indexer: {p.quant_unavailable}; "
            "load the model with indexer_dtype='bf16', or build our operators "
            "(ops/ascendc/build.sh)")
    dtype = p.quant_scale_dtype or torch.float32
    w = weights.to(dtype)
    out = p.quant_lightning_indexer(
        q, _paged(k_cache), w, torch.ones_like(w), _paged(k_scale.to(dtype)),
        query_quant_mode=0, key_quant_mode=0, **common,
        **({"return_value": True} if p.quant_values else {}))
    if p.quant_values:
        return out
    # torch_npu's int8 indexer returns no scores; the model reads only the indices.
    return out, torch.full(out.shape, float("nan"), dtype=torch.float32, device=out.device)


def _sparse_attention(p: OperatorProvider, q: Tensor, kv_cache: Tensor, indices: Tensor,
                      block_table: Tensor, seqlens_k: Tensor, scale: float, d_v: int,
                      layout: str, q_lengths: Tensor) -> tuple[Tensor, Tensor]:
    if kv_cache.dtype == torch.uint8:
        raise NpuKernelsUnavailable(
            "npu backend: the sparse attention operators read a bf16/fp16 latent cache, not the "
            "FP8 format of kv_cache_dtype='fp8' (the 910B/C have no FP8; torch_npu's int8 "
            "npu_kv_quant_sparse_flash_attention is not wired): load with kv_cache_dtype='auto'")
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
