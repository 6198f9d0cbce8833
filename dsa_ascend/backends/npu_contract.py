"""CONTRACT EMULATOR (CPU, plain torch) of three Ascend operators -- not an NPU implementation.

``emulated_npu_lightning_indexer``, ``emulated_npu_quant_lightning_indexer`` and
``emulated_npu_sparse_flash_attention`` reproduce the documented calling contract of
``torch_npu.npu_lightning_indexer``, ``torch_npu.npu_quant_lightning_indexer`` (int8, Atlas A3)
and ``torch_npu.npu_sparse_flash_attention`` (CANN 8.3+, see /work/shared/docs/NPU_NOTES.md and
the ops-transformer README of QuantLightningIndexer): the same argument names, layouts and
semantics. They exist so that the ``npu`` backend's glue (the
translation of our cache and index conventions into those layouts) is tested on a machine
without an NPU; our own AscendC operators (ops/ascendc) implement the same contract. Nothing
here ran on, or was checked against, Ascend hardware.

The contract, as emulated:
- Layouts. query: "BSND" [B, S1, N1, D] or "TND" [T, N1, D]. key/value: "BSND" [B, S2, N2, D],
  "TND" [T2, N2, D], or "PA_BSND" [blocks, block_size, N2, D] with ``block_table`` [B, max_blocks]
  int32 (entry j of sequence b lives in block ``block_table[b, j // block_size]``). N2 = 1.
- Lengths. For a "TND" tensor the ``actual_seq_lengths_*`` are CUMULATIVE end offsets [B]
  (no leading zero) and required; otherwise they are per-sequence lengths [B] (query default:
  S1; key default: S2; required for PA_BSND).
- sparse_mode 3 ("rightDownCausal"): query row i of a sequence with q_len queries and kv_len
  keys sees keys j <= kv_len - q_len + i (the last query sees every key: chunked prefill and
  decode); sparse_mode 0: every key in [0, kv_len).
- Indices are per-sequence key positions, int32, valid entries first and -1 after. The indexer
  orders them by descending score, ties to the lower position (the AscendC ``Sort`` rule); the
  attention uses the entries before the first -1 (and, in sparse_mode 3, drops any beyond the
  causal limit).
- Rows of a BSND query beyond its actual length produce -1 indices / zero outputs.
- The quantized indexer takes int8 query/key and dequant scales per (token, head) of the query
  and per token of the key, applied inside the ReLU (they are positive, so the same as folding
  the query's into the weights); it returns the indices only.
Deviations (for testing only): float32 inputs are accepted besides bf16/fp16 (weights and
dequant scales of the quantized indexer: besides fp16); index ``values`` are float32 (-inf where
padded), and the quantized indexer returns them too with ``return_value=True``; softmax_max /
softmax_sum ([T, N2, N1] for TND, [B, S1, N2, N1] for BSND, float32) are returned for every key
layout, whereas the documented operator returns them only when ``layout_kv`` is not PA_BSND.
Memory stays bounded: scores are formed for chunks of query rows, never [S1, S2] for a whole
batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 24  # float32 elements of one chunk's score block (64 MiB)
MAX_INT64 = 2 ** 63 - 1
SPARSE_COUNTS = tuple(range(1, 2049)) + tuple(range(3072, 8193, 1024))
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

Lengths = Union[Tensor, Sequence[int], None]


class ContractError(ValueError):
    """The arguments break the emulated operator's documented contract."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ContractError(msg)


def _as_list(x: Lengths) -> Optional[list[int]]:
    if x is None:
        return None
    return [int(v) for v in (x.tolist() if isinstance(x, Tensor) else x)]


@dataclass
class _Queries:
    """A query tensor flattened to rows [rows, N, D] and where each sequence's rows start."""
    rows: Tensor
    starts: list[int]
    lens: list[int]


def _queries(op: str, query: Tensor, layout: str, actual: Lengths, name: str) -> _Queries:
    lengths = _as_list(actual)
    if layout == "TND":
        _require(query.dim() == 3, f"{op}: {name} with layout TND must be [T, N, D], got "
                 f"{tuple(query.shape)}")
        _require(lengths is not None, f"{op}: layout TND needs cumulative actual_seq_lengths for "
                 f"{name}")
        ends = lengths
        starts = [0] + ends[:-1]
        _require(all(e >= s for s, e in zip(starts, ends)) and (not ends or ends[-1] <= query.shape[0]),
                 f"{op}: cumulative lengths for {name} {ends} must be non-decreasing and <= T="
                 f"{query.shape[0]}")
        return _Queries(query, starts, [e - s for s, e in zip(starts, ends)])
    if layout == "BSND":
        _require(query.dim() == 4, f"{op}: {name} with layout BSND must be [B, S, N, D], got "
                 f"{tuple(query.shape)}")
        b, s = query.shape[:2]
        lens = lengths if lengths is not None else [s] * b
        _require(len(lens) == b and all(0 <= v <= s for v in lens),
                 f"{op}: actual lengths for {name} {lens} must be B={b} values in [0, {s}]")
        return _Queries(query.reshape(b * s, *query.shape[2:]), [i * s for i in range(b)], lens)
    raise ContractError(f"{op}: layout {layout!r} of {name} is not supported (BSND | TND)")


@dataclass
class _Keys:
    """A key tensor seen as flat rows [rows, N2, D] plus each sequence's row addressing."""
    rows: Tensor
    lens: list[int]
    layout: str
    starts: Optional[list[int]] = None        # BSND / TND
    block_table: Optional[Tensor] = None      # PA_BSND
    block_size: int = 0

    def slots(self, b: int, pos: Tensor) -> Tensor:
        """Flat rows of positions ``pos`` (int64, all valid) of sequence ``b``."""
        if self.layout == "PA_BSND":
            blocks = self.block_table[b].long()[pos // self.block_size]
            return blocks * self.block_size + pos % self.block_size
        return self.starts[b] + pos


def _keys(op: str, key: Tensor, layout: str, actual: Lengths, block_table: Optional[Tensor],
          batch: int, name: str = "key") -> _Keys:
    lengths = _as_list(actual)
    _require(key.dim() in (3, 4), f"{op}: {name} has shape {tuple(key.shape)}")
    _require(key.shape[-2] == 1, f"{op}: {name} must have N2 = 1 KV head, got {key.shape[-2]}")
    if layout == "PA_BSND":
        _require(key.dim() == 4, f"{op}: {name} with layout PA_BSND must be [blocks, block_size, "
                 f"N2, D], got {tuple(key.shape)}")
        _require(block_table is not None and block_table.dim() == 2 and
                 block_table.dtype == torch.int32 and block_table.shape[0] == batch,
                 f"{op}: PA_BSND needs an int32 block_table [B={batch}, max_blocks], got "
                 f"{None if block_table is None else (block_table.dtype, tuple(block_table.shape))}")
        _require(lengths is not None and len(lengths) == batch,
                 f"{op}: PA_BSND needs per-sequence key lengths [B={batch}], got {lengths}")
        bs = key.shape[1]
        cap = block_table.shape[1] * bs
        _require(all(0 <= v <= cap for v in lengths),
                 f"{op}: key lengths {lengths} exceed the block table's {cap} entries")
        return _Keys(key.reshape(-1, *key.shape[2:]), lengths, layout, block_table=block_table,
                     block_size=bs)
    if layout == "BSND":
        _require(key.dim() == 4 and key.shape[0] == batch, f"{op}: {name} with layout BSND must be "
                 f"[B={batch}, S2, N2, D], got {tuple(key.shape)}")
        s2 = key.shape[1]
        lens = lengths if lengths is not None else [s2] * batch
        _require(len(lens) == batch and all(0 <= v <= s2 for v in lens),
                 f"{op}: key lengths {lens} must be B={batch} values in [0, {s2}]")
        return _Keys(key.reshape(-1, *key.shape[2:]), lens, layout,
                     starts=[i * s2 for i in range(batch)])
    if layout == "TND":
        _require(key.dim() == 3 and lengths is not None and len(lengths) == batch,
                 f"{op}: {name} with layout TND must be [T2, N2, D] with B={batch} cumulative "
                 f"lengths, got {tuple(key.shape)} and {lengths}")
        starts = [0] + lengths[:-1]
        _require(all(e >= s for s, e in zip(starts, lengths)) and lengths[-1] <= key.shape[0],
                 f"{op}: cumulative key lengths {lengths} are not valid for T2={key.shape[0]}")
        return _Keys(key, [e - s for s, e in zip(starts, lengths)], layout, starts=starts)
    raise ContractError(f"{op}: layout {layout!r} of {name} is not supported "
                        "(BSND | TND | PA_BSND)")


def _visible_limit(sparse_mode: int, kv_len: int, q_len: int, i: Tensor) -> Tensor:
    """Exclusive end of the keys query row(s) ``i`` may see."""
    if sparse_mode == 3:
        return (kv_len - q_len + 1 + i).clamp(0, kv_len)
    return torch.full_like(i, kv_len)


def _check_mode(op: str, sparse_mode: int, pre_tokens: int, next_tokens: int) -> None:
    _require(sparse_mode in (0, 3), f"{op}: sparse_mode {sparse_mode} is not emulated (0 | 3)")
    _require(pre_tokens == MAX_INT64 and next_tokens == MAX_INT64,
             f"{op}: only the default pre_tokens/next_tokens are emulated")


def _indexer_topk(op: str, q: _Queries, w: Tensor, k: _Keys, sparse_count: int, sparse_mode: int,
                  q_scale: Optional[Tensor] = None,
                  k_scale: Optional[_Keys] = None) -> tuple[Tensor, Tensor]:
    """Scores and top-k of every query row: float32 [rows, K] values, int32 [rows, K] indices.
    With scales: ReLU(q_scale[t, n] * k_scale[s] * (q[t, n] . k[s])) (int8 dots are exact in
    float32 for D <= 1040)."""
    rows, kk = q.rows.shape[0], sparse_count
    n1 = q.rows.shape[1]
    indices = torch.full((rows, kk), -1, dtype=torch.int32)
    values = torch.full((rows, kk), float("-inf"), dtype=torch.float32)
    for b, (q0, ql, kl) in enumerate(zip(q.starts, q.lens, k.lens)):
        if ql == 0 or kl == 0:
            continue
        slots = k.slots(b, torch.arange(kl))
        keys = k.rows[slots][:, 0].float()  # [L, D]
        chunk = max(1, CHUNK_ELEMENTS // (n1 * kl))
        for c0 in range(0, ql, chunk):
            c1 = min(c0 + chunk, ql)
            score = torch.einsum("cnd,ld->cnl", q.rows[q0 + c0:q0 + c1].float(), keys)
            if q_scale is not None:
                score = score * q_scale[q0 + c0:q0 + c1, :, None].float()
            if k_scale is not None:
                score = score * k_scale.rows[slots].reshape(1, 1, kl).float()
            score = torch.einsum("cnl,cn->cl", score.clamp_min(0), w[q0 + c0:q0 + c1].float())
            limit = _visible_limit(sparse_mode, kl, ql, torch.arange(c0, c1))
            score = score.masked_fill(torch.arange(kl)[None, :] >= limit[:, None], float("-inf"))
            # A stable descending sort keeps equal scores in ascending position order.
            val, pos = torch.sort(score, dim=-1, descending=True, stable=True)
            take = min(kk, kl)
            val, pos = val[:, :take], pos[:, :take].to(torch.int32)
            pos = pos.masked_fill(torch.isneginf(val), -1)
            indices[q0 + c0:q0 + c1, :take], values[q0 + c0:q0 + c1, :take] = pos, val
    return indices, values


def _indexer_inputs(op: str, query: Tensor, key: Tensor, weights: Tensor, layout_query: str,
                    layout_key: str, actual_q: Lengths, actual_k: Lengths,
                    block_table: Optional[Tensor], sparse_count: int, sparse_mode: int,
                    pre_tokens: int, next_tokens: int) -> tuple[_Queries, Tensor, _Keys]:
    _check_mode(op, sparse_mode, pre_tokens, next_tokens)
    _require(sparse_count in SPARSE_COUNTS, f"{op}: sparse_count {sparse_count} must be 1..2048 "
             "or 3072..8192 in steps of 1024")
    q = _queries(op, query, layout_query, actual_q, "query")
    n1, d = q.rows.shape[1:]
    _require(weights.shape[:-1] == query.shape[:-2] and weights.shape[-1] == n1,
             f"{op}: weights must be {tuple(query.shape[:-1])}, got {tuple(weights.shape)}")
    w = weights.reshape(q.rows.shape[0], n1)
    k = _keys(op, key, layout_key, actual_k, block_table, len(q.starts))
    _require(k.rows.shape[-1] == d, f"{op}: key head dim {k.rows.shape[-1]} != query's {d}")
    return q, w, k


def emulated_npu_lightning_indexer(
        query: Tensor, key: Tensor, weights: Tensor, *, actual_seq_lengths_query: Lengths = None,
        actual_seq_lengths_key: Lengths = None, block_table: Optional[Tensor] = None,
        layout_query: str = "BSND", layout_key: str = "BSND", sparse_count: int = 2048,
        sparse_mode: int = 3, pre_tokens: int = MAX_INT64, next_tokens: int = MAX_INT64,
        return_value: bool = False) -> tuple[Tensor, Tensor]:
    """Emulates ``torch_npu.npu_lightning_indexer``: score(t, s) = sum_n weights[t, n] *
    ReLU(query[t, n] . key[s]) then the top ``sparse_count`` keys per query row.

    Returns (indices int32, values float32) shaped [T, N2, K] (TND) or [B, S1, N2, K] (BSND);
    values is empty unless ``return_value``.
    """
    op = "npu_lightning_indexer (emulated)"
    _require(query.dtype in FLOAT_DTYPES and key.dtype in FLOAT_DTYPES,
             f"{op}: query/key must be bf16/fp16 (float32 accepted by the emulator), got "
             f"{query.dtype}/{key.dtype}")
    q, w, k = _indexer_inputs(op, query, key, weights, layout_query, layout_key,
                              actual_seq_lengths_query, actual_seq_lengths_key, block_table,
                              sparse_count, sparse_mode, pre_tokens, next_tokens)
    indices, values = _indexer_topk(op, q, w, k, sparse_count, sparse_mode)
    shape = (*query.shape[:-2], 1, sparse_count)
    return indices.view(shape), (values.view(shape) if return_value else values.new_empty(0))


def emulated_npu_quant_lightning_indexer(
        query: Tensor, key: Tensor, weights: Tensor, query_dequant_scale: Tensor,
        key_dequant_scale: Tensor, *, actual_seq_lengths_query: Lengths = None,
        actual_seq_lengths_key: Lengths = None, block_table: Optional[Tensor] = None,
        query_quant_mode: int = 0, key_quant_mode: int = 0, layout_query: str = "BSND",
        layout_key: str = "BSND", sparse_count: int = 2048, sparse_mode: int = 3,
        pre_tokens: int = MAX_INT64, next_tokens: int = MAX_INT64,
        return_value: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Emulates ``torch_npu.npu_quant_lightning_indexer`` with int8 query/key (Atlas A3):
    score(t, s) = sum_n weights[t, n] * ReLU(query_dequant_scale[t, n] * key_dequant_scale[s] *
    (query[t, n] . key[s])), then the top ``sparse_count`` keys per query row.

    query int8 [B, S1, N1, D] / [T, N1, D]; key int8 like the indexer's key (PA_BSND: [blocks,
    block_size, 1, D]); weights and query_dequant_scale [B, S1, N1] / [T, N1]; key_dequant_scale
    the key's shape without D ([blocks, block_size, 1] for PA_BSND). query/key_quant_mode 0
    (per token-head) only. Returns the indices (int32, shaped as the indexer's), like
    torch_npu; with ``return_value`` (an extension, as our own operator offers) also the
    float32 scores.
    """
    op = "npu_quant_lightning_indexer (emulated)"
    _require(query.dtype == torch.int8 and key.dtype == torch.int8,
             f"{op}: query/key must be int8 (Atlas A3), got {query.dtype}/{key.dtype}")
    _require(query_quant_mode == 0 and key_quant_mode == 0,
             f"{op}: only quant mode 0 (per token-head) exists, got {query_quant_mode}/"
             f"{key_quant_mode}")
    for name, t in (("weights", weights), ("query_dequant_scale", query_dequant_scale),
                    ("key_dequant_scale", key_dequant_scale)):
        _require(t.dtype in (torch.float16, torch.float32), f"{op}: {name} must be float16 "
                 f"(float32 accepted by the emulator), got {t.dtype}")
    q, w, k = _indexer_inputs(op, query, key, weights, layout_query, layout_key,
                              actual_seq_lengths_query, actual_seq_lengths_key, block_table,
                              sparse_count, sparse_mode, pre_tokens, next_tokens)
    _require(query_dequant_scale.shape == weights.shape,
             f"{op}: query_dequant_scale must be {tuple(weights.shape)}, got "
             f"{tuple(query_dequant_scale.shape)}")
    _require(key_dequant_scale.shape == key.shape[:-1],
             f"{op}: key_dequant_scale must be {tuple(key.shape[:-1])}, got "
             f"{tuple(key_dequant_scale.shape)}")
    k_scale = _keys(op, key_dequant_scale.unsqueeze(-1), layout_key, actual_seq_lengths_key,
                    block_table, len(q.starts), "key_dequant_scale")
    indices, values = _indexer_topk(op, q, w, k, sparse_count, sparse_mode,
                                    query_dequant_scale.reshape(w.shape), k_scale)
    shape = (*query.shape[:-2], 1, sparse_count)
    return (indices.view(shape), values.view(shape)) if return_value else indices.view(shape)


def emulated_npu_sparse_flash_attention(
        query: Tensor, key: Tensor, value: Tensor, sparse_indices: Tensor, scale_value: float, *,
        block_table: Optional[Tensor] = None, actual_seq_lengths_query: Lengths = None,
        actual_seq_lengths_kv: Lengths = None, query_rope: Optional[Tensor] = None,
        key_rope: Optional[Tensor] = None, sparse_block_size: int = 1, layout_query: str = "BSND",
        layout_kv: str = "BSND", sparse_mode: int = 3, pre_tokens: int = MAX_INT64,
        next_tokens: int = MAX_INT64, attention_mode: int = 2,
        return_softmax_lse: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Emulates ``torch_npu.npu_sparse_flash_attention`` in its MLA-absorbed use:
    s = (query . key[j] + query_rope . key_rope[j]) * scale_value over the selected positions j,
    out = softmax(s) . value[j].

    Returns (out like query with value's D, softmax_max, softmax_sum); the last two are the row
    max of s and sum(exp(s - max)) (so lse = max + log(sum)), empty unless ``return_softmax_lse``.
    A row with no valid index gives out = 0, max = -inf, sum = 0.
    """
    op = "npu_sparse_flash_attention (emulated)"
    _check_mode(op, sparse_mode, pre_tokens, next_tokens)
    _require(sparse_block_size == 1, f"{op}: only sparse_block_size 1 is emulated, got "
             f"{sparse_block_size}")
    _require((query_rope is None) == (key_rope is None),
             f"{op}: query_rope and key_rope come together")
    _require(layout_kv == "PA_BSND" or layout_query == layout_kv,
             f"{op}: layout_query {layout_query!r} must equal layout_kv {layout_kv!r} unless "
             "layout_kv is PA_BSND")
    for name, t in (("query", query), ("key", key), ("value", value)):
        _require(t.dtype in FLOAT_DTYPES, f"{op}: {name} must be bf16/fp16 (float32 accepted by "
                 f"the emulator), got {t.dtype}")
    _require(sparse_indices.dtype == torch.int32 and
             sparse_indices.shape[:-2] == query.shape[:-2] and sparse_indices.shape[-2] == 1,
             f"{op}: sparse_indices must be int32 {tuple(query.shape[:-2])} + [1, K], got "
             f"{sparse_indices.dtype} {tuple(sparse_indices.shape)}")
    q = _queries(op, query, layout_query, actual_seq_lengths_query, "query")
    qr = (_queries(op, query_rope, layout_query, actual_seq_lengths_query, "query_rope").rows
          if query_rope is not None else None)
    batch = len(q.starts)
    k = _keys(op, key, layout_kv, actual_seq_lengths_kv, block_table, batch)
    v = _keys(op, value, layout_kv, actual_seq_lengths_kv, block_table, batch, "value")
    kr = (_keys(op, key_rope, layout_kv, actual_seq_lengths_kv, block_table, batch, "key_rope")
          if key_rope is not None else None)

    rows, n1, _ = q.rows.shape
    dv, kk = v.rows.shape[-1], sparse_indices.shape[-1]
    idx_rows = sparse_indices.reshape(rows, kk).long()
    out = torch.zeros((rows, n1, dv), dtype=torch.float32)
    smax = torch.full((rows, n1), float("-inf"), dtype=torch.float32)
    ssum = torch.zeros((rows, n1), dtype=torch.float32)
    width = q.rows.shape[-1] + (qr.shape[-1] if qr is not None else 0) + dv
    for b, (q0, ql, kl) in enumerate(zip(q.starts, q.lens, k.lens)):
        chunk = max(1, CHUNK_ELEMENTS // (kk * (width + n1)))
        for c0 in range(0, ql, chunk):
            c1 = min(c0 + chunk, ql)
            idx = idx_rows[q0 + c0:q0 + c1]                                  # [c, K]
            limit = _visible_limit(sparse_mode, kl, ql, torch.arange(c0, c1))
            # Entries after the first -1 are padding whatever they hold.
            valid = ((idx >= 0).int().cumprod(-1) > 0) & (idx < limit[:, None])
            slot = k.slots(b, torch.where(valid, idx, 0))
            s = torch.einsum("cnd,ckd->cnk", q.rows[q0 + c0:q0 + c1].float(),
                             k.rows[slot][:, :, 0].float())
            if qr is not None:
                s = s + torch.einsum("cnd,ckd->cnk", qr[q0 + c0:q0 + c1].float(),
                                     kr.rows[slot][:, :, 0].float())
            s = (s * scale_value).masked_fill(~valid[:, None, :], float("-inf"))
            m = s.amax(-1)                                                   # [c, N1]
            p = torch.exp(s - torch.where(torch.isneginf(m), 0.0, m)[..., None])
            total = p.sum(-1)
            o = torch.einsum("cnk,ckd->cnd", p, v.rows[slot][:, :, 0].float())
            out[q0 + c0:q0 + c1] = o / torch.where(total > 0, total, 1.0)[..., None]
            smax[q0 + c0:q0 + c1], ssum[q0 + c0:q0 + c1] = m, total
    out = out.to(query.dtype).view(*query.shape[:-1], dv)
    if not return_softmax_lse:
        return out, smax.new_empty(0), ssum.new_empty(0)
    lse_shape = (*query.shape[:-2], 1, n1)
    return out, smax.view(lse_shape), ssum.view(lse_shape)


__all__ = ["ContractError", "emulated_npu_lightning_indexer", "emulated_npu_quant_lightning_indexer",
           "emulated_npu_sparse_flash_attention"]
