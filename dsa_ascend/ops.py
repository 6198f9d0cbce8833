"""THE SEAM: the device-specific operations of DeepSeek Sparse Attention, declared once.

Every op is a ``torch.library`` custom op in the ``dsa`` namespace with a fake (meta) kernel, so
``torch.compile`` traces through it. The last argument names the backend whose implementation
runs (``reference`` | ``cuda`` | ``npu``); model code never passes it by hand: it holds an
``Ops`` bound to the backend its ``RunConfig`` chose, and reads like the paper.

Conventions shared by all ops (T = packed query tokens of R sequences):
- ``cu_seqlens_q`` int32 [R+1]: prefix sums of the query lengths (TND layout);
- ``seqlens_k`` int32 [R]: tokens in the cache for each sequence *including* this step's queries;
  a query's absolute position is ``seqlens_k[r] - q_len[r] + i``;
- ``block_table`` int32 [R, max_blocks]: pages of each sequence in the paged cache
  (cache tensors are [num_blocks, block_size, ...]);
- top-k ``indices`` hold absolute positions within the sequence (not slots), int32, the valid
  ones first and ``-1`` padding after. The SET is the contract (ties: lower position wins);
  the order of the valid entries is not (the reference sorts them by descending score, the
  Triton kernels return ascending positions).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor
from torch.library import custom_op

from . import kv_fp8
from .quant import FP8_DTYPE

OP_NAMES = (
    "rope",
    "hadamard_rotate",
    "quantize_fp8",
    "quantize_int8",
    "fp8_linear",
    "int8_linear",
    "indexer_topk",
    "sparse_mla_prefill",
    "sparse_mla_decode",
    "store_kv",
)


def _impl(backend: str, op: str) -> Callable:
    from .backends import implementations

    return implementations(backend)[op]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


# ----------------------------------------------------------------------------- argument checks
def _check_rope(x: Tensor, cos: Tensor, sin: Tensor) -> None:
    _check(x.dim() in (2, 3) and x.is_floating_point() and x.dtype != FP8_DTYPE,
           f"rope: x must be a float [T, d] or [T, H, d], got {x.dtype} {tuple(x.shape)}")
    t, d = x.shape[0], x.shape[-1]
    for name, c in (("cos", cos), ("sin", sin)):
        _check(c.dim() == 2 and c.shape[0] == t and c.dtype == torch.float32,
               f"rope: {name} must be float32 [{t}, n], got {c.dtype} {tuple(c.shape)}")
    _check(cos.shape == sin.shape and 0 < 2 * cos.shape[1] <= d,
           f"rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must match, with 0 < 2n <= "
           f"d={d}")


def _check_hadamard(x: Tensor) -> None:
    n = x.shape[-1] if x.dim() else 0
    _check(x.dim() >= 1 and n > 0 and n & (n - 1) == 0,
           f"hadamard_rotate: x's last dim must be a power of two, got shape {tuple(x.shape)}")
    _check(x.is_floating_point() and x.dtype != FP8_DTYPE,
           f"hadamard_rotate: x must be a float tensor, got {x.dtype}")


def _check_quantize(x: Tensor, block_size: int) -> None:
    _check(x.dim() >= 1 and block_size > 0 and x.shape[-1] % block_size == 0,
           f"quantize_fp8: x's last dim ({tuple(x.shape)}) must be a multiple of "
           f"block_size={block_size}")
    _check(x.is_floating_point() and x.dtype != FP8_DTYPE,
           f"quantize_fp8: x must be a float tensor, got {x.dtype}")


def _check_fp8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor) -> None:
    _check(weight.dim() == 2 and weight.dtype == FP8_DTYPE,
           f"fp8_linear: weight must be 2-D float8_e4m3fn, got {weight.dtype} "
           f"{tuple(weight.shape)}")
    out_f, in_f = weight.shape
    _check(x.shape[-1] == in_f, f"fp8_linear: x's last dim {x.shape[-1]} != weight in_features "
           f"{in_f}")
    want = ((out_f + 127) // 128, (in_f + 127) // 128)
    _check(tuple(weight_scale.shape) == want and weight_scale.dtype == torch.float32,
           f"fp8_linear: weight_scale must be float32 {want}, got {weight_scale.dtype} "
           f"{tuple(weight_scale.shape)}")


def _check_int8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor) -> None:
    _check(weight.dim() == 2 and weight.dtype == torch.int8,
           f"int8_linear: weight must be 2-D int8, got {weight.dtype} {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    _check(x.dim() >= 1 and x.shape[-1] == in_f,
           f"int8_linear: x's last dim {x.shape[-1] if x.dim() else None} != weight in_features "
           f"{in_f}")
    _check(x.is_floating_point() and x.dtype != FP8_DTYPE,
           f"int8_linear: x must be a float tensor, got {x.dtype}")
    _check(tuple(weight_scale.shape) == (out_f,) and weight_scale.dtype == torch.float32,
           f"int8_linear: weight_scale must be float32 ({out_f},), got {weight_scale.dtype} "
           f"{tuple(weight_scale.shape)}")


def _check_paged(name: str, block_table: Tensor, cu_seqlens_q: Optional[Tensor],
                 seqlens_k: Tensor) -> None:
    _check(block_table.dim() == 2 and block_table.dtype == torch.int32,
           f"{name}: block_table must be int32 [R, max_blocks], got {block_table.dtype} "
           f"{tuple(block_table.shape)}")
    r = block_table.shape[0]
    _check(seqlens_k.shape == (r,) and seqlens_k.dtype == torch.int32,
           f"{name}: seqlens_k must be int32 [{r}], got {seqlens_k.dtype} {tuple(seqlens_k.shape)}")
    if cu_seqlens_q is not None:
        _check(cu_seqlens_q.shape == (r + 1,) and cu_seqlens_q.dtype == torch.int32,
               f"{name}: cu_seqlens_q must be int32 [{r + 1}], got {cu_seqlens_q.dtype} "
               f"{tuple(cu_seqlens_q.shape)}")


# Quantized indexer q / k dtypes: one scale per token (k) and per token-head (q, folded into the
# weights by the caller). float8_e4m3fn: the official reference; int8: Ascend 910B/C (no FP8).
INDEXER_QUANT_DTYPES = (FP8_DTYPE, torch.int8)


def _check_indexer(q: Tensor, weights: Tensor, k_cache: Tensor, k_scale: Optional[Tensor],
                   block_table: Tensor, cu_seqlens_q: Tensor, seqlens_k: Tensor,
                   topk: int, max_seqlen_k: Optional[int] = None) -> None:
    _check(q.dim() == 3, f"indexer_topk: q must be [T, H, D], got {tuple(q.shape)}")
    _check(max_seqlen_k is None or max_seqlen_k >= 1,
           f"indexer_topk: max_seqlen_k must be None or positive, got {max_seqlen_k}")
    t, h, d = q.shape
    _check(weights.shape == (t, h) and weights.dtype == torch.float32,
           f"indexer_topk: weights must be float32 [{t}, {h}], got {weights.dtype} "
           f"{tuple(weights.shape)}")
    _check(k_cache.dim() == 3 and k_cache.shape[2] == d,
           f"indexer_topk: k_cache must be [blocks, block_size, {d}], got {tuple(k_cache.shape)}")
    quantized = q.dtype in INDEXER_QUANT_DTYPES
    _check((k_cache.dtype == q.dtype if quantized else k_cache.dtype not in INDEXER_QUANT_DTYPES)
           and quantized == (k_scale is not None),
           f"indexer_topk: a quantized q (FP8 or int8, got {q.dtype}) needs a k_cache of the same "
           f"dtype (got {k_cache.dtype}) and k_scale (a float q and k_cache: no k_scale)")
    if k_scale is not None:
        _check(k_scale.shape == k_cache.shape[:2] and k_scale.dtype == torch.float32,
               f"indexer_topk: k_scale must be float32 {tuple(k_cache.shape[:2])}, got "
               f"{k_scale.dtype} {tuple(k_scale.shape)}")
    _check(topk > 0, f"indexer_topk: topk must be positive, got {topk}")
    _check_paged("indexer_topk", block_table, cu_seqlens_q, seqlens_k)


def _check_kv_cache(name: str, kv_cache: Tensor, d_v: int, d_rope: int) -> None:
    """An MLA cache of d_v latent + d_rope rope channels: float [blocks, block_size, d_v +
    d_rope], or uint8 entries in the FP8 format of ``dsa_ascend.kv_fp8``."""
    if kv_cache.dtype == torch.uint8:
        try:
            width = kv_fp8.entry_bytes(d_v, d_rope)
        except ValueError as e:
            raise ValueError(f"{name}: kv_cache: {e}") from None
        _check(kv_cache.dim() == 3 and kv_cache.shape[2] == width,
               f"{name}: an FP8 (uint8) kv_cache must be [blocks, block_size, {width}] (d_v={d_v}, "
               f"d_rope={d_rope}), got {tuple(kv_cache.shape)}")
    else:
        _check(kv_cache.dim() == 3 and kv_cache.shape[2] == d_v + d_rope,
               f"{name}: kv_cache must be [blocks, block_size, {d_v + d_rope}], got "
               f"{tuple(kv_cache.shape)}")
        _check(kv_cache.is_floating_point() and kv_cache.dtype != FP8_DTYPE,
               f"{name}: kv_cache must be float (or the uint8 FP8 format), got {kv_cache.dtype}")


def _check_sparse_mla(name: str, q: Tensor, kv_cache: Tensor, indices: Tensor, d_v: int) -> None:
    d = q.shape[-1]
    _check(0 < d_v <= d, f"{name}: d_v={d_v} must lie in (0, {d}]")
    _check_kv_cache(name, kv_cache, d_v, d - d_v)
    _check(indices.dtype == torch.int32 and indices.shape[:-1] == q.shape[:-2],
           f"{name}: indices must be int32 {tuple(q.shape[:-2])} + [K], got {indices.dtype} "
           f"{tuple(indices.shape)}")


# ------------------------------------------------------------------------------- the ops
@custom_op("dsa::rope", mutates_args=())
def rope(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, backend: str) -> Tensor:
    """Rotary embedding (DSA_SPEC §3) of the first 2n channels of x's last dim, the rest passed
    through: x [T, d] or [T, H, d] (every head alike), cos / sin float32 [T, n] (the angles of
    each token's position). Pairs (x_2i, x_2i+1) when ``interleaved`` (MLA), else (x_i, x_i+n)
    (the indexer): (a, b) -> (a cos - b sin, a sin + b cos) in float32, returned in x's dtype
    as a new tensor."""
    _check_rope(x, cos, sin)
    return _impl(backend, "rope")(x, cos, sin, interleaved)


@rope.register_fake
def _(x, cos, sin, interleaved, backend):
    _check_rope(x, cos, sin)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@custom_op("dsa::hadamard_rotate", mutates_args=())
def hadamard_rotate(x: Tensor, backend: str) -> Tensor:
    """Walsh-Hadamard transform (Sylvester order) of the last dim, scaled by n^-0.5."""
    _check_hadamard(x)
    return _impl(backend, "hadamard_rotate")(x)


@hadamard_rotate.register_fake
def _(x, backend):
    _check_hadamard(x)
    return torch.empty_like(x)


@custom_op("dsa::quantize_fp8", mutates_args=())
def quantize_fp8(x: Tensor, block_size: int, ue8m0: bool, backend: str) -> tuple[Tensor, Tensor]:
    """Per-token FP8 e4m3 quantization in blocks of ``block_size`` channels (DSA_SPEC §2).

    scale = max(amax, 1e-4) / 448 (rounded up to a power of two when ``ue8m0``), q = x / scale.
    Returns (q float8_e4m3fn, shape of x; scale float32 [..., D / block_size]).
    """
    _check_quantize(x, block_size)
    return _impl(backend, "quantize_fp8")(x, block_size, ue8m0)


@quantize_fp8.register_fake
def _(x, block_size, ue8m0, backend):
    _check_quantize(x, block_size)
    return (torch.empty_like(x, dtype=FP8_DTYPE),
            x.new_empty((*x.shape[:-1], x.shape[-1] // block_size), dtype=torch.float32))


def _check_quantize_int8(x: Tensor) -> None:
    _check(x.dim() >= 1 and x.is_floating_point() and x.dtype != FP8_DTYPE,
           f"quantize_int8: x must be a float tensor of rank >= 1, got {x.dtype} {tuple(x.shape)}")


@custom_op("dsa::quantize_int8", mutates_args=())
def quantize_int8(x: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """Symmetric int8 quantization of each row of the last dim: scale = amax / 127,
    q = round_half_even(x / scale). Returns (q int8, shape of x; scale float32 x.shape[:-1])."""
    _check_quantize_int8(x)
    return _impl(backend, "quantize_int8")(x)


@quantize_int8.register_fake
def _(x, backend):
    _check_quantize_int8(x)
    return torch.empty_like(x, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


@custom_op("dsa::fp8_linear", mutates_args=())
def fp8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, act_quant: bool, ue8m0: bool,
               backend: str) -> Tensor:
    """y = x @ dequant(weight)^T for an FP8 weight with 128x128 block scales (``weight_scale_inv``).

    With ``act_quant`` the input is first quantized per token per 128 channels, as the official
    fp8_gemm path does. Output in x's dtype.
    """
    _check_fp8_linear(x, weight, weight_scale)
    return _impl(backend, "fp8_linear")(x, weight, weight_scale, act_quant, ue8m0)


@fp8_linear.register_fake
def _(x, weight, weight_scale, act_quant, ue8m0, backend):
    _check_fp8_linear(x, weight, weight_scale)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@custom_op("dsa::int8_linear", mutates_args=())
def int8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, backend: str) -> Tensor:
    """W8A8: y = dequant(quant(x)) @ dequant(weight)^T for a symmetric int8 weight [out, in] with
    one float32 scale per output channel (``weight_scale`` [out]).

    x is quantized per token to symmetric int8 (scale = amax / 127, round to nearest); the
    product is the exact integer dot product (int32 accumulation), times both scales.
    Output in x's dtype.
    """
    _check_int8_linear(x, weight, weight_scale)
    return _impl(backend, "int8_linear")(x, weight, weight_scale)


@int8_linear.register_fake
def _(x, weight, weight_scale, backend):
    _check_int8_linear(x, weight, weight_scale)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@custom_op("dsa::indexer_topk", mutates_args=())
def indexer_topk(q: Tensor, weights: Tensor, k_cache: Tensor, k_scale: Optional[Tensor],
                 block_table: Tensor, cu_seqlens_q: Tensor, seqlens_k: Tensor, topk: int,
                 backend: str, max_seqlen_k: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Lightning indexer scores + causal top-k (DSA_SPEC §5).

    I(t, s) = k_scale(s) * sum_h weights(t, h) * ReLU(q(t, h) . k(s)) for s <= pos(t).
    q [T, H, D] (FP8 or int8 with k_scale, or float); weights [T, H] float32 (already holding
    the per-head q scales and softmax scale); k_cache [blocks, block_size, D] of q's dtype;
    k_scale [blocks, block_size] float32 or None. int8 dot products of D <= 1040 are exact in
    float32 (127^2 D < 2^24), as in an int8 x int8 -> int32 matrix unit. Returns (indices int32
    [T, topk], scores float32 [T, topk], -inf where padded).
    ``max_seqlen_k``: max(seqlens_k) as the host already knows it (the step's metadata), so that
    a backend can size its launch without reading seqlens_k back (a host sync, which also rules
    out CUDA-graph capture); None = the backend reads it. It must not be below max(seqlens_k).
    """
    _check_indexer(q, weights, k_cache, k_scale, block_table, cu_seqlens_q, seqlens_k, topk,
                   max_seqlen_k)
    return _impl(backend, "indexer_topk")(q, weights, k_cache, k_scale, block_table, cu_seqlens_q,
                                          seqlens_k, topk, max_seqlen_k=max_seqlen_k)


@indexer_topk.register_fake
def _(q, weights, k_cache, k_scale, block_table, cu_seqlens_q, seqlens_k, topk, backend,
      max_seqlen_k=None):
    _check_indexer(q, weights, k_cache, k_scale, block_table, cu_seqlens_q, seqlens_k, topk,
                   max_seqlen_k)
    t = q.shape[0]
    return (q.new_empty((t, topk), dtype=torch.int32), q.new_empty((t, topk), dtype=torch.float32))


@custom_op("dsa::sparse_mla_prefill", mutates_args=())
def sparse_mla_prefill(q: Tensor, kv_cache: Tensor, indices: Tensor, block_table: Tensor,
                       cu_seqlens_q: Tensor, seqlens_k: Tensor, scale: float, d_v: int,
                       backend: str) -> tuple[Tensor, Tensor]:
    """Sparse MLA (absorbed form) for ragged prefill.

    q [T, H, D] (D = 576: 512 absorbed nope + 64 rope); kv_cache [blocks, block_size, D] float,
    or uint8 [blocks, block_size, 656] in the FP8 format of ``dsa_ascend.kv_fp8``; one KV head
    shared by all H heads, value = its first ``d_v`` channels (dequantized); indices [T, K]
    positions within the token's sequence, -1 = none.
    Returns (out [T, H, d_v] in q's dtype, lse [T, H] float32, natural log).
    """
    _check_sparse_mla("sparse_mla_prefill", q, kv_cache, indices, d_v)
    _check_paged("sparse_mla_prefill", block_table, cu_seqlens_q, seqlens_k)
    return _impl(backend, "sparse_mla_prefill")(q, kv_cache, indices, block_table, cu_seqlens_q,
                                                seqlens_k, scale, d_v)


@sparse_mla_prefill.register_fake
def _(q, kv_cache, indices, block_table, cu_seqlens_q, seqlens_k, scale, d_v, backend):
    _check_sparse_mla("sparse_mla_prefill", q, kv_cache, indices, d_v)
    return q.new_empty((*q.shape[:-1], d_v)), q.new_empty(q.shape[:-1], dtype=torch.float32)


@custom_op("dsa::sparse_mla_decode", mutates_args=())
def sparse_mla_decode(q: Tensor, kv_cache: Tensor, indices: Tensor, block_table: Tensor,
                      seqlens_k: Tensor, scale: float, d_v: int,
                      backend: str) -> tuple[Tensor, Tensor]:
    """Sparse MLA (absorbed form) for decode: q [B, S_q, H, D] (S_q = 1 or 2, the last S_q
    positions of each sequence), indices [B, S_q, K]. Returns (out [B, S_q, H, d_v],
    lse [B, S_q, H] float32)."""
    _check(q.dim() == 4, f"sparse_mla_decode: q must be [B, S_q, H, D], got {tuple(q.shape)}")
    _check_sparse_mla("sparse_mla_decode", q, kv_cache, indices, d_v)
    _check_paged("sparse_mla_decode", block_table, None, seqlens_k)
    return _impl(backend, "sparse_mla_decode")(q, kv_cache, indices, block_table, seqlens_k,
                                               scale, d_v)


@sparse_mla_decode.register_fake
def _(q, kv_cache, indices, block_table, seqlens_k, scale, d_v, backend):
    _check_sparse_mla("sparse_mla_decode", q, kv_cache, indices, d_v)
    return q.new_empty((*q.shape[:-1], d_v)), q.new_empty(q.shape[:-1], dtype=torch.float32)


def _check_store_kv(kv_cache: Tensor, slot_mapping: Tensor, latent: Tensor, rope: Tensor) -> None:
    _check(latent.dim() == 2 and rope.dim() == 2 and latent.shape[0] == rope.shape[0],
           f"store_kv: latent and rope must be [T, d_v] and [T, d_rope], got "
           f"{tuple(latent.shape)} and {tuple(rope.shape)}")
    for name, x in (("latent", latent), ("rope", rope)):
        _check(x.is_floating_point() and x.dtype != FP8_DTYPE,
               f"store_kv: {name} must be a float tensor, got {x.dtype}")
    t, d_v, d_rope = latent.shape[0], latent.shape[1], rope.shape[1]
    _check(slot_mapping.dtype == torch.int64 and tuple(slot_mapping.shape) == (t,),
           f"store_kv: slot_mapping must be int64 [{t}], got {slot_mapping.dtype} "
           f"{tuple(slot_mapping.shape)}")
    _check_kv_cache("store_kv", kv_cache, d_v, d_rope)
    _check(kv_cache.is_contiguous(), "store_kv: kv_cache must be contiguous")


@custom_op("dsa::store_kv", mutates_args=("kv_cache",))
def store_kv(kv_cache: Tensor, slot_mapping: Tensor, latent: Tensor, rope: Tensor, ue8m0: bool,
             backend: str) -> None:
    """Write T new MLA cache entries in place: entry slot_mapping[t] (a row of the flattened
    [blocks * block_size] cache) becomes (latent[t], rope[t]): in the cache's float dtype, or
    for the uint8 FP8 cache packed as ``dsa_ascend.kv_fp8.pack(latent, rope, ue8m0)``. Slots
    must be distinct and in range; the other entries are left as they are."""
    _check_store_kv(kv_cache, slot_mapping, latent, rope)
    _impl(backend, "store_kv")(kv_cache, slot_mapping, latent, rope, ue8m0)


@store_kv.register_fake
def _(kv_cache, slot_mapping, latent, rope, ue8m0, backend):
    _check_store_kv(kv_cache, slot_mapping, latent, rope)


class Ops:
    """The ``dsa`` ops bound to one backend: the only handle model code holds."""

    def __init__(self, backend: str):
        from .backends import implementations

        implementations(backend)  # fail now, with the reason, not at the first forward
        self.backend = backend

    def indexer_dtype(self, requested: str) -> str:
        """The indexer mode this backend runs for RunConfig.indexer_dtype ("auto" = its
        preferred one); a mode it lacks raises BackendUnavailable naming the option."""
        from .backends import indexer_dtype

        return indexer_dtype(self.backend, requested)

    def rope(self, x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
        return torch.ops.dsa.rope(x, cos, sin, interleaved, self.backend)

    def hadamard_rotate(self, x: Tensor) -> Tensor:
        return torch.ops.dsa.hadamard_rotate(x, self.backend)

    def quantize_fp8(self, x: Tensor, block_size: int = 128,
                     ue8m0: bool = False) -> tuple[Tensor, Tensor]:
        return torch.ops.dsa.quantize_fp8(x, block_size, ue8m0, self.backend)

    def quantize_int8(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ops.dsa.quantize_int8(x, self.backend)

    def fp8_linear(self, x: Tensor, weight: Tensor, weight_scale: Tensor, act_quant: bool,
                   ue8m0: bool) -> Tensor:
        return torch.ops.dsa.fp8_linear(x, weight, weight_scale, act_quant, ue8m0, self.backend)

    def int8_linear(self, x: Tensor, weight: Tensor, weight_scale: Tensor) -> Tensor:
        return torch.ops.dsa.int8_linear(x, weight, weight_scale, self.backend)

    def indexer_topk(self, q, weights, k_cache, k_scale, block_table, cu_seqlens_q, seqlens_k,
                     topk: int, max_seqlen_k: Optional[int] = None) -> tuple[Tensor, Tensor]:
        return torch.ops.dsa.indexer_topk(q, weights, k_cache, k_scale, block_table, cu_seqlens_q,
                                          seqlens_k, topk, self.backend, max_seqlen_k)

    def sparse_mla_prefill(self, q, kv_cache, indices, block_table, cu_seqlens_q, seqlens_k,
                           scale: float, d_v: int) -> tuple[Tensor, Tensor]:
        return torch.ops.dsa.sparse_mla_prefill(q, kv_cache, indices, block_table, cu_seqlens_q,
                                                seqlens_k, scale, d_v, self.backend)

    def sparse_mla_decode(self, q, kv_cache, indices, block_table, seqlens_k, scale: float,
                          d_v: int) -> tuple[Tensor, Tensor]:
        return torch.ops.dsa.sparse_mla_decode(q, kv_cache, indices, block_table, seqlens_k,
                                               scale, d_v, self.backend)

    def store_kv(self, kv_cache: Tensor, slot_mapping: Tensor, latent: Tensor, rope: Tensor,
                 ue8m0: bool = False) -> None:
        torch.ops.dsa.store_kv(kv_cache, slot_mapping, latent, rope, ue8m0, self.backend)
