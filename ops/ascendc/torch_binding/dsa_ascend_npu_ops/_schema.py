"""The ``torch.ops.custom`` schemas of our AscendC operators and their fake (Meta) kernels.

Pure Python, importable anywhere (tests/npu/test_npu_binding.py checks it on CPU): the compiled
``_C`` library only adds the NPU (PrivateUse1) kernels to these schemas. Argument names, order
and defaults are torch_npu's (``npu_lightning_indexer``, ``npu_quant_lightning_indexer``,
``npu_sparse_flash_attention``), so the npu backend calls either with the same keywords. Our
operators also return the indexer scores when ``return_value`` (the quantized one too).
"""

from __future__ import annotations

import torch

NAMESPACE = "custom"
MAX_INT64 = "9223372036854775807"
SCHEMAS = {
    "dsa_lightning_indexer": (
        "(Tensor query, Tensor key, Tensor weights, *, Tensor? actual_seq_lengths_query=None, "
        "Tensor? actual_seq_lengths_key=None, Tensor? block_table=None, str layout_query=\"BSND\", "
        "str layout_key=\"BSND\", int sparse_count=2048, int sparse_mode=3, "
        f"int pre_tokens={MAX_INT64}, int next_tokens={MAX_INT64}, bool return_value=False) "
        "-> (Tensor, Tensor)"),
    "dsa_quant_lightning_indexer": (
        "(Tensor query, Tensor key, Tensor weights, Tensor query_dequant_scale, "
        "Tensor key_dequant_scale, *, Tensor? actual_seq_lengths_query=None, "
        "Tensor? actual_seq_lengths_key=None, Tensor? block_table=None, int query_quant_mode=0, "
        "int key_quant_mode=0, str layout_query=\"BSND\", str layout_key=\"BSND\", "
        f"int sparse_count=2048, int sparse_mode=3, int pre_tokens={MAX_INT64}, "
        f"int next_tokens={MAX_INT64}, bool return_value=False) -> (Tensor, Tensor)"),
    "dsa_sparse_flash_attention": (
        "(Tensor query, Tensor key, Tensor value, Tensor sparse_indices, float scale_value, *, "
        "Tensor? block_table=None, Tensor? actual_seq_lengths_query=None, "
        "Tensor? actual_seq_lengths_kv=None, Tensor? query_rope=None, Tensor? key_rope=None, "
        "int sparse_block_size=1, str layout_query=\"BSND\", str layout_kv=\"BSND\", "
        f"int sparse_mode=3, int pre_tokens={MAX_INT64}, int next_tokens={MAX_INT64}, "
        "int attention_mode=2, bool return_softmax_lse=False) -> (Tensor, Tensor, Tensor)"),
}


def _indexer_out(query, sparse_count, return_value):
    shape = (*query.shape[:-2], 1, sparse_count)
    values = query.new_empty(shape if return_value else (0,), dtype=torch.float32)
    return query.new_empty(shape, dtype=torch.int32), values


def _fake_indexer(query, key, weights, *, actual_seq_lengths_query=None,
                  actual_seq_lengths_key=None, block_table=None, layout_query="BSND",
                  layout_key="BSND", sparse_count=2048, sparse_mode=3, pre_tokens=None,
                  next_tokens=None, return_value=False):
    return _indexer_out(query, sparse_count, return_value)


def _fake_quant_indexer(query, key, weights, query_dequant_scale, key_dequant_scale, *,
                        actual_seq_lengths_query=None, actual_seq_lengths_key=None,
                        block_table=None, query_quant_mode=0, key_quant_mode=0,
                        layout_query="BSND", layout_key="BSND", sparse_count=2048, sparse_mode=3,
                        pre_tokens=None, next_tokens=None, return_value=False):
    return _indexer_out(query, sparse_count, return_value)


def _fake_attention(query, key, value, sparse_indices, scale_value, *, block_table=None,
                    actual_seq_lengths_query=None, actual_seq_lengths_kv=None, query_rope=None,
                    key_rope=None, sparse_block_size=1, layout_query="BSND", layout_kv="BSND",
                    sparse_mode=3, pre_tokens=None, next_tokens=None, attention_mode=2,
                    return_softmax_lse=False):
    stats = (*query.shape[:-2], 1, query.shape[-2]) if return_softmax_lse else (0,)
    return (torch.empty_like(query), query.new_empty(stats, dtype=torch.float32),
            query.new_empty(stats, dtype=torch.float32))


FAKES = {"dsa_lightning_indexer": _fake_indexer,
         "dsa_quant_lightning_indexer": _fake_quant_indexer,
         "dsa_sparse_flash_attention": _fake_attention}
_LIBRARY = None


def define() -> None:
    """Defines the schemas and fake kernels once per process (a fragment of ``custom``, which
    other packages may also extend)."""
    global _LIBRARY
    if _LIBRARY is not None:
        return
    lib = torch.library.Library(NAMESPACE, "FRAGMENT")
    for name, schema in SCHEMAS.items():
        lib.define(name + schema)
        torch.library.register_fake(f"{NAMESPACE}::{name}", FAKES[name], lib=lib)
    _LIBRARY = lib
