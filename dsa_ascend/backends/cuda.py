"""The ``cuda`` backend: Triton kernels from ``ops/triton`` (installed as
``dsa_ascend.ops_triton``) for the indexer + top-k, sparse MLA prefill/decode, RoPE, the Hadamard
rotation, FP8 block quantization and the MLA cache write (the last four bit-identical to the
reference's); the remaining ops (FP8 and int8 linears, int8 quantization) run the reference
backend's torch code on the GPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import sys
from typing import Callable, Optional

import torch

from .. import paging
from . import reference

_KERNELS = "dsa_ascend.ops_triton"


def kernels():
    """The Triton kernel package: installed, or straight from the source tree's ops/triton."""
    try:
        return importlib.import_module(_KERNELS)
    except ModuleNotFoundError:
        root = pathlib.Path(__file__).resolve().parents[2] / "ops" / "triton"
        spec = importlib.util.spec_from_file_location(_KERNELS, root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[_KERNELS] = module
        spec.loader.exec_module(module)
        return module


def unavailable_reason(device: Optional[torch.device]) -> Optional[str]:
    if device is not None and device.type != "cuda":
        return f"it runs on CUDA devices only (got {device.type!r})"
    if importlib.util.find_spec("triton") is None:
        return "the 'triton' package is not installed (pip install '.[cuda]')"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (torch.cuda.is_available() is False)"
    return None


def graph_replay(fn: Callable[[], object], warmup: int = 2) -> Callable[[], None]:
    """Capture ``fn`` (sync-free GPU work on static tensors, e.g. one decode step) in a CUDA
    graph after ``warmup`` calls on a side stream (kernel compilation, library workspaces);
    returns the replay, which relaunches the whole captured work with one host call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def rope(x, cos, sin, interleaved):
    if x.is_cuda and kernels().rope.supports(x, cos, sin):
        return kernels().rope.rope(x, cos, sin, interleaved)
    return reference.rope(x, cos, sin, interleaved)


def hadamard_rotate(x):
    if x.is_cuda and kernels().quant.supports(x.shape[-1]):
        return kernels().quant.hadamard_rotate(x)
    return reference.hadamard_rotate(x)


def quantize_fp8(x, block_size, ue8m0):
    if x.is_cuda and kernels().quant.supports(block_size):
        return kernels().quant.quantize_fp8(x, block_size, ue8m0)
    return reference.quantize_fp8(x, block_size, ue8m0)


def indexer_topk(q, weights, k_cache, k_scale, block_table, cu_seqlens_q, seqlens_k, topk,
                 max_seqlen_k=None):
    return kernels().indexer_topk(q, weights, k_cache, k_scale, block_table, cu_seqlens_q,
                                  seqlens_k, topk, max_seqlen_k)


def store_kv(kv_cache, slot_mapping, latent, rope, ue8m0):
    if kv_cache.is_cuda and kernels().kv_store.supports(kv_cache, latent, rope):
        return kernels().kv_store.store_kv(kv_cache, slot_mapping, latent, rope, ue8m0)
    return reference.store_kv(kv_cache, slot_mapping, latent, rope, ue8m0)


def sparse_mla_prefill(q, kv_cache, indices, block_table, cu_seqlens_q, seqlens_k, scale, d_v):
    rows = paging.token_rows(cu_seqlens_q, q.shape[0]).to(torch.int32)  # no host sync
    return kernels().sparse_mla_fwd(q, kv_cache, indices, block_table, rows, scale, d_v)


def sparse_mla_decode(q, kv_cache, indices, block_table, seqlens_k, scale, d_v):
    b, sq, h, d = q.shape
    rows = torch.arange(b, device=q.device, dtype=torch.int32).repeat_interleave(sq)
    out, lse = kernels().sparse_mla_fwd(q.reshape(b * sq, h, d), kv_cache,
                                        indices.reshape(b * sq, -1), block_table, rows, scale, d_v)
    return out.view(b, sq, h, d_v), lse.view(b, sq, h)


IMPLS = {
    **reference.IMPLS,
    "rope": rope,
    "hadamard_rotate": hadamard_rotate,
    "quantize_fp8": quantize_fp8,
    "indexer_topk": indexer_topk,
    "sparse_mla_prefill": sparse_mla_prefill,
    "sparse_mla_decode": sparse_mla_decode,
    "store_kv": store_kv,
}
