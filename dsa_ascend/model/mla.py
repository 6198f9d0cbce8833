"""Multi-head Latent Attention with DeepSeek Sparse Attention (DSA_SPEC §4-5).

Each token caches one 576-wide entry (RMSNorm'd latent c: 512 | RoPE'd k_pe: 64) shared by all
heads. Two equivalent forms:
- absorbed (MQA): q_abs = q_nope @ W_uk per head, score = (q_abs . c + q_pe . k_pe) * scale,
  o = (softmax @ c) @ W_uv^T: what sparse MLA kernels compute (d_qk 576, d_v 512);
- MHA: per-head k_nope = W_uk c and v = W_uv c expanded for the selected entries (testing, and
  the form of DeepSeek's reference prefill).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import kv_fp8, paging
from ..cache import PagedCache, Step
from ..quant import dequantize_fp8_blocks
from .indexer import Indexer
from .layers import Context, Linear, RMSNorm

# Bound on one query chunk's float32 intermediate in the MHA form (64 MiB).
_MHA_CHUNK_ELEMENTS = 1 << 24


class MLA(nn.Module):
    def __init__(self, ctx: Context, layer_id: int):
        super().__init__()
        c = ctx.config
        self.ctx, self.layer_id = ctx, layer_id
        # Tensor parallelism splits the heads (this rank's n_heads / tp); the latent is shared.
        self.n_heads = ctx.parallel.tp_part(c.n_heads, "num_attention_heads")
        self.nope, self.rope_dim = c.qk_nope_head_dim, c.qk_rope_head_dim
        self.v_dim, self.latent = c.v_head_dim, c.kv_lora_rank
        self.q_a_proj = Linear(ctx, c.dim, c.q_lora_rank)
        self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
        self.q_b_proj = Linear(ctx, c.q_lora_rank, self.n_heads * c.qk_head_dim)
        self.kv_a_proj_with_mqa = Linear(ctx, c.dim, c.kv_lora_rank + c.qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = Linear(ctx, c.kv_lora_rank, self.n_heads * (c.qk_nope_head_dim + c.v_head_dim))
        self.o_proj = Linear(ctx, self.n_heads * c.v_head_dim, c.dim)
        self.indexer = Indexer(ctx, layer_id)
        self.softmax_scale = c.softmax_scale()
        self._kv_b: tuple[tuple[int, torch.dtype], Tensor] | None = None

    def kv_b_heads(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """kv_b_proj as [H, nope + v, latent] in ``dtype``, dequantized once per weight."""
        w = self.kv_b_proj.weight
        key = (w.data_ptr(), dtype)
        if self._kv_b is None or self._kv_b[0] != key:
            dense = self.kv_b_proj.dense_weight().view(self.n_heads, self.nope + self.v_dim, self.latent)
            self._kv_b = (key, dense.to(dtype))
        return self._kv_b[1]

    def forward(self, x: Tensor, step: Step, cache: PagedCache, cos: Tensor, sin: Tensor) -> Tensor:
        ops, t = self.ctx.ops, x.shape[0]
        qr = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(qr).view(t, self.n_heads, self.nope + self.rope_dim)
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        q_pe = ops.rope(q_pe, cos, sin, interleaved=True)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.latent, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_pe = ops.rope(k_pe, cos, sin, interleaved=True)
        if self.ctx.run.simulate_fp8_latent and self.ctx.run.kv_cache_dtype != "fp8":
            # DeepSeek's reference rounds the latent through FP8 (128-blocks) to mimic the FP8
            # cache it deploys; the rope part stays unquantized.
            q8, s8 = ops.quantize_fp8(latent, 128, self.ctx.config.ue8m0)
            latent = dequantize_fp8_blocks(q8, s8).to(latent.dtype)
        cache.store_kv(self.layer_id, step, latent, k_pe, ops)

        indices = self.indexer(x, qr, step, cache, cos, sin)
        kv_cache = cache.layers[self.layer_id].kv
        if self.ctx.run.mla_form == "mha":
            o = self._mha(q_nope, q_pe, indices, step, kv_cache, self.kv_b_heads())
        else:
            # Absorbed form in the activations' dtype, as DeepSeek's reference does (bf16 inputs,
            # float32 accumulation in the matmul); a float32 model stays float32 throughout.
            # (In float32 these two einsums and their casts were 21% of a 128K prefill on an H100.)
            w = self.kv_b_heads(x.dtype)
            # q_full [T, H, latent + rope]: the absorbed q_nope written in place by a batched
            # matmul over heads, the rope part copied next to it (an einsum's output, then a
            # cat: aten::cat alone was 8% of a 128K prefill's GPU time on an H100)
            q_full = q_nope.new_empty(t, self.n_heads, self.latent + self.rope_dim)
            torch.bmm(q_nope.transpose(0, 1), w[:, : self.nope],
                      out=q_full[..., : self.latent].transpose(0, 1))
            q_full[..., self.latent:] = q_pe
            sq = step.decode_q_len
            if sq:
                r = len(step.rows)
                o, _ = ops.sparse_mla_decode(q_full.view(r, sq, self.n_heads, -1), kv_cache,
                                             indices.view(r, sq, -1), step.block_table,
                                             step.seqlens_k, self.softmax_scale, self.latent)
                o = o.view(t, self.n_heads, self.latent)
            else:
                o, _ = ops.sparse_mla_prefill(q_full, kv_cache, indices, step.block_table,
                                              step.cu_seqlens_q, step.seqlens_k,
                                              self.softmax_scale, self.latent)
            o_v = o.new_empty(t, self.n_heads, self.v_dim, dtype=w.dtype)
            torch.bmm(o.to(w.dtype).transpose(0, 1), w[:, self.nope:].transpose(1, 2),
                      out=o_v.transpose(0, 1))
            o = o_v
        return self.ctx.parallel.all_reduce_tp(self.o_proj(o.flatten(1).to(x.dtype)))

    def _mha(self, q_nope: Tensor, q_pe: Tensor, indices: Tensor, step: Step, kv_cache: Tensor,
             w: Tensor) -> Tensor:
        """MHA form over the selected entries, chunked over queries so memory stays bounded."""
        t, h = q_nope.shape[:2]
        k = indices.shape[-1]
        rows = paging.token_rows(step.cu_seqlens_q)
        flat = kv_cache.view(-1, kv_cache.shape[-1])
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope:]
        out = torch.empty(t, h, self.v_dim, dtype=torch.float32, device=q_nope.device)
        chunk = max(1, _MHA_CHUNK_ELEMENTS // (k * h * (self.nope + self.v_dim)))
        for c0 in range(0, t, chunk):
            c1 = min(c0 + chunk, t)
            idx = indices[c0:c1].long()
            entries = flat[paging.slots(step.block_table, rows[c0:c1, None], idx,
                                        kv_cache.shape[1])]
            entries = (kv_fp8.unpack(entries, self.latent) if entries.dtype == torch.uint8
                       else entries.float())
            latent, k_pe = entries.split([self.latent, self.rope_dim], dim=-1)
            k_nope = torch.einsum("skc,hdc->skhd", latent, w_uk)
            v = torch.einsum("skc,hdc->skhd", latent, w_uv)
            s = (torch.einsum("shd,skhd->shk", q_nope[c0:c1].float(), k_nope)
                 + torch.einsum("shr,skr->shk", q_pe[c0:c1].float(), k_pe)) * self.softmax_scale
            s = s.masked_fill((idx < 0)[:, None, :], float("-inf"))
            out[c0:c1] = torch.einsum("shk,skhd->shd", s.softmax(dim=-1), v)
        return out
