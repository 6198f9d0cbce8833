"""The DeepSeek-V3.2-Exp transformer (DSA_SPEC §7): embed -> blocks -> norm -> float32 head.

The model owns its paged cache like DeepSeek's reference owns its buffers: ``forward(tokens,
start_pos)`` appends to the cache rows 0..B-1 and ``reset()`` clears them. ``forward_ragged``
is the engine's entry: sequences of different lengths in one packed step.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..cache import PagedCache, Step
from ..config import ModelConfig, RunConfig
from ..ops import Ops
from ..parallel import SINGLE, Parallel
from .layers import MLP, Context, Embedding, Linear, RMSNorm
from .mla import MLA
from .moe import MoE
from .rope import rope_tables


class Block(nn.Module):
    def __init__(self, ctx: Context, layer_id: int):
        super().__init__()
        c = ctx.config
        self.input_layernorm = RMSNorm(c.dim, c.rms_norm_eps)
        self.self_attn = MLA(ctx, layer_id)
        self.post_attention_layernorm = RMSNorm(c.dim, c.rms_norm_eps)
        self.mlp = (MLP(ctx, c.dim, c.inter_dim, tp_split=True) if layer_id < c.n_dense_layers
                    else MoE(ctx))

    def forward(self, x: Tensor, residual: Optional[Tensor], step: Step, cache: PagedCache,
                cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, step, cache, cos, sin)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Backbone(nn.Module):
    """Everything under the checkpoint's ``model.`` prefix."""

    def __init__(self, ctx: Context):
        super().__init__()
        c = ctx.config
        self.embed_tokens = Embedding(ctx, c.vocab_size, c.dim)
        self.layers = nn.ModuleList(Block(ctx, i) for i in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.rms_norm_eps)


TokenSeq = Union[Tensor, Sequence[int]]


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, run: RunConfig, backend: str, dtype: torch.dtype,
                 parallel: Parallel = SINGLE):
        super().__init__()
        ops = Ops(backend)
        run = dataclasses.replace(run, indexer_dtype=ops.indexer_dtype(run.indexer_dtype))
        self.config, self.run = config, run
        self.ctx = Context(config=config, run=run, ops=ops, dtype=dtype, parallel=parallel)
        self.model = Backbone(self.ctx)
        # Vocab-parallel: this rank's rows of the head; the logits are gathered in _logits.
        vocab = parallel.tp_part(config.vocab_size, "vocab_size")
        self.lm_head = Linear(self.ctx, config.dim, vocab, quantizable=False,
                              dtype=torch.float32)
        self.cache: Optional[PagedCache] = None
        self.tokenizer = None  # set by dsa_ascend.load when the checkpoint ships tokenizer.json

    @property
    def parallel(self) -> Parallel:
        return self.ctx.parallel

    @property
    def backend(self) -> str:
        return self.ctx.ops.backend

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def init_runtime(self) -> None:
        """Allocate the rope tables and the paged cache on the weights' device."""
        c, run, device = self.config, self.run, self.device
        self.cos, self.sin = rope_tables(c, run.max_seq_len, device)
        self.cache = PagedCache(
            n_layers=c.n_layers, max_batch_size=run.max_batch_size, max_seq_len=run.max_seq_len,
            block_size=run.block_size, kv_dim=c.kv_cache_dim, index_dim=c.index_head_dim,
            dtype=self.ctx.dtype, index_fp8=run.indexer_dtype == "fp8", device=device,
            index_int8=run.indexer_dtype == "int8",
            kv_fp8=(c.kv_lora_rank, c.ue8m0) if run.kv_cache_dtype == "fp8" else None)

    def reset(self, rows: Optional[Sequence[int]] = None) -> None:
        """Forget the cached tokens of ``rows`` (default: all)."""
        self.cache.reset(rows)

    # -------------------------------------------------------------------------- forward
    def _check_tokens(self, tokens: Tensor, name: str = "tokens") -> None:
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be int64 (or int32) token ids, got {tokens.dtype}")
        if tokens.numel():
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"{name}: token id {bad} is outside the vocabulary "
                                 f"[0, {self.config.vocab_size})")

    def _hidden(self, tokens: Tensor, step: Step) -> Tensor:
        """tokens [T] -> final-norm hidden states [T, dim] (model dtype)."""
        cos, sin = self.cos[step.positions], self.sin[step.positions]
        h, residual = self.model.embed_tokens(tokens), None
        for layer in self.model.layers:
            h, residual = layer(h, residual, step, self.cache, cos, sin)
        h, _ = self.model.norm(h, residual)
        return h

    @torch.inference_mode()
    def forward(self, tokens: Tensor, start_pos: Union[int, Sequence[int]] = 0) -> Tensor:
        """tokens int64 [B, S] -> logits float32 [B, S, vocab]; row b continues cache row b from
        ``start_pos`` (an int, or one per row: the tokens already cached for that row)."""
        if not isinstance(tokens, Tensor) or tokens.dim() != 2:
            raise ValueError(f"tokens must be a [batch, seq_len] tensor, got "
                             f"{getattr(tokens, 'shape', type(tokens).__name__)}")
        b, s = tokens.shape
        if b > self.run.max_batch_size:
            raise ValueError(f"tokens: batch {b} exceeds max_batch_size={self.run.max_batch_size}")
        starts = [start_pos] * b if isinstance(start_pos, int) else [int(p) for p in start_pos]
        if len(starts) != b:
            raise ValueError(f"start_pos has {len(starts)} entries for a batch of {b}")
        logits = self.forward_ragged(list(tokens), list(range(b)), starts)
        return torch.stack(logits)

    @torch.inference_mode()
    def forward_ragged(self, seqs: Sequence[TokenSeq], rows: Sequence[int],
                       start_pos: Sequence[int], last_only: bool = False) -> list[Tensor]:
        """One packed step over sequences of different lengths. ``seqs[i]`` continues cache row
        ``rows[i]`` at ``start_pos[i]``. Returns per sequence float32 logits [len, vocab], or
        [vocab] for its last token with ``last_only``."""
        if self.cache is None:
            raise RuntimeError("init_runtime() has not been called (use dsa_ascend.load)")
        seqs = [torch.as_tensor(s, dtype=torch.int64) if not isinstance(s, Tensor) else s
                for s in seqs]
        for i, s in enumerate(seqs):
            if s.dim() != 1:
                raise ValueError(f"sequence {i} must be 1-D token ids, got shape {tuple(s.shape)}")
        tokens = torch.cat(seqs)
        self._check_tokens(tokens)  # before the copy: host token lists cost no device sync
        tokens = tokens.to(self.device, torch.int64)
        step = self.cache.prepare(rows, start_pos, [len(s) for s in seqs])
        h = self._hidden(tokens, step)
        if last_only:
            h = h[step.cu_seqlens_q[1:].long() - 1]
            return list(self._logits(h))
        return list(self._logits(h).split(step.q_lens))

    def _logits(self, h: Tensor) -> Tensor:
        """Final hidden states [T, dim] -> float32 logits [T, vocab] on every rank."""
        return self.ctx.parallel.all_gather_tp(self.lm_head(h.float()))
