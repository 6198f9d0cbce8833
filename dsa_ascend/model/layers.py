"""Building blocks: Linear (float, FP8-block or int8-channel weights), RMSNorm, LayerNorm, SwiGLU MLP.

Module attribute names follow the HF checkpoint keys one to one, so a state-dict key *is* the
checkpoint key (DSA_SPEC §8).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig, RunConfig
from ..ops import Ops
from ..parallel import SINGLE, Parallel
from ..quant import FP8_DTYPE, dequantize_int8_rows, dequantize_weight


@dataclass
class Context:
    """What every layer may consult: the seam (ops), the model and run configs, the dtype, and
    this rank's share of a multi-device run (``parallel``: its splits and collectives)."""

    config: ModelConfig
    run: RunConfig
    ops: Ops
    dtype: torch.dtype
    parallel: Parallel = SINGLE


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device="meta"), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T without bias.

    ``quantizable`` weights come as the checkpoint stores them: float (cast to the model dtype);
    FP8 e4m3 with a ``weight_scale_inv`` of 128x128 block scales, kept in FP8 and dequantized
    on the fly by ``dsa.fp8_linear`` (with the official per-token activation quantization when
    ``act_quant``); or int8 with a float32 ``weight_scale`` per output channel (W8A8, written by
    ``dsa_ascend.convert``), kept int8 and run by ``dsa.int8_linear``, which quantizes the input
    per token. Others (router, indexer weights_proj, LM head) hold a float ``dtype``.
    """

    def __init__(self, ctx: Context, in_features: int, out_features: int, *,
                 quantizable: bool = True, dtype: torch.dtype | None = None):
        super().__init__()
        self.ctx = ctx
        self.in_features, self.out_features = in_features, out_features
        self.quantizable = quantizable
        self.weight = _param(out_features, in_features, dtype=dtype or ctx.dtype)
        self.register_parameter("weight_scale_inv", None)  # set by the loader for FP8 weights
        self.register_parameter("weight_scale", None)  # set by the loader for int8 weights
        self.act_quant = False

    def set_fp8_weight(self, weight: Tensor, scale_inv: Tensor, act_quant: bool) -> None:
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale_inv = nn.Parameter(scale_inv, requires_grad=False)
        self.act_quant = act_quant

    def set_int8_weight(self, weight: Tensor, scale: Tensor) -> None:
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)

    def dense_weight(self) -> Tensor:
        """The weight in float32 (dequantized when FP8 or int8)."""
        if self.weight.dtype == FP8_DTYPE:
            return dequantize_weight(self.weight, self.weight_scale_inv)
        if self.weight.dtype == torch.int8:
            return dequantize_int8_rows(self.weight, self.weight_scale)
        return self.weight.float()

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.dtype == FP8_DTYPE:
            return self.ctx.ops.fp8_linear(x, self.weight, self.weight_scale_inv, self.act_quant,
                                           self.ctx.config.ue8m0)
        if self.weight.dtype == torch.int8:
            return self.ctx.ops.int8_linear(x, self.weight, self.weight_scale)
        return F.linear(x.to(self.weight.dtype), self.weight)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}"


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * w in float32; with ``residual`` the add is fused and done in
    float32 too, and the new residual is returned (DSA_SPEC §2)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = _param(dim, dtype=torch.float32)

    def forward(self, x: Tensor, residual: Tensor | None = None):
        dtype = x.dtype
        xf = x.float() if residual is None else x.float() + residual.float()
        # the same formula; CUDA torch runs it as one kernel (aten::_fused_rms_norm) where the
        # unfused form took five, each a launch's latency at a decode step's small batches
        # (not yet timed here: BENCHMARKS.md session 20)
        y = F.rms_norm(xf, (xf.shape[-1],), self.weight, self.eps)
        if residual is None:
            return y.to(dtype)
        return y.to(dtype), xf.to(dtype)


class LayerNorm(nn.Module):
    """The indexer's key norm: LayerNorm with weight and bias in float32 (DSA_SPEC §2)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = _param(dim, dtype=torch.float32)
        self.bias = _param(dim, dtype=torch.float32)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), (x.shape[-1],), self.weight, self.bias, self.eps).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x), the product in float32 (DSA_SPEC §6).

    ``tp_split``: the hidden dim is split over the tensor-parallel ranks (gate/up column-,
    down row-parallel); the output is then this rank's partial sum, summed over the ranks here
    when ``reduce``, else by the caller (the MoE folds it into its own reduction).
    """

    def __init__(self, ctx: Context, dim: int, inter_dim: int, tp_split: bool = False,
                 reduce: bool = True, what: str = "intermediate_size"):
        super().__init__()
        self.parallel = ctx.parallel
        self.reduce = tp_split and reduce
        if tp_split:
            inter_dim = ctx.parallel.tp_part(inter_dim, what)
        self.gate_proj = Linear(ctx, dim, inter_dim)
        self.up_proj = Linear(ctx, dim, inter_dim)
        self.down_proj = Linear(ctx, inter_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = F.silu(self.gate_proj(x).float()) * self.up_proj(x).float()
        y = self.down_proj(h.to(x.dtype))
        return self.parallel.all_reduce_tp(y) if self.reduce else y


class Embedding(nn.Module):
    """Vocab-parallel over the TP ranks: each holds a contiguous range of rows, looks up the
    tokens in it (zeros elsewhere) and the sum over the ranks is the embedding."""

    def __init__(self, ctx: Context, vocab_size: int, dim: int):
        super().__init__()
        self.parallel = ctx.parallel
        rows = ctx.parallel.tp_part(vocab_size, "vocab_size")
        self.first = ctx.parallel.tp_rank * rows
        self.weight = _param(rows, dim, dtype=ctx.dtype)

    def forward(self, tokens: Tensor) -> Tensor:
        if self.parallel.tp == 1:
            return F.embedding(tokens, self.weight)
        local = tokens - self.first
        outside = (local < 0) | (local >= self.weight.shape[0])
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.parallel.all_reduce_tp(y.masked_fill(outside[..., None], 0))
