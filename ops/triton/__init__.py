"""Triton kernels of the ``cuda`` backend (installed as ``dsa_ascend.ops_triton``)."""

from . import cluster, kv_store, quant, rope
from .indexer import indexer_topk
from .sparse_mla import combine_splits, sparse_mla_fwd
from .topk import select_topk, topk_rows

__all__ = ["cluster", "kv_store", "quant", "rope", "indexer_topk", "sparse_mla_fwd", "combine_splits",
           "topk_rows", "select_topk"]
