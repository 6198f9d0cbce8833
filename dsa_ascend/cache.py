"""Paged KV cache: per layer, per token, the MLA latent + rope key (576 values in the model dtype,
or 656 bytes in the FP8 format of ``kv_fp8.py``) and the indexer key (FP8 + float32 scale, or the
model dtype; int8 + float32 scale for indexer_dtype="int8"), in pages of ``block_size`` tokens.

Sequences live in rows (0 .. max_batch_size-1); each row owns a block table of page ids taken
from a shared free list on demand. ``prepare`` turns one step's (rows, start positions, query
lengths) into a ``Step``: the small context object every layer reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import Tensor

from . import kv_fp8 as kv_fp8_format
from .quant import FP8_DTYPE

if TYPE_CHECKING:  # the cache stands below the seam: it is handed the model's Ops
    from .ops import Ops


class CacheError(ValueError):
    """A step that the cache cannot serve (gap in a row, row or length out of range)."""


@dataclass
class Step:
    """One forward step over R sequences with T packed query tokens (the attention metadata)."""

    rows: list[int]
    start_pos: list[int]
    q_lens: list[int]
    cu_seqlens_q: Tensor  # int32 [R+1]
    seqlens_k: Tensor  # int32 [R]: cached tokens after this step
    block_table: Tensor  # int32 [R, max_blocks]
    positions: Tensor  # int64 [T]
    slot_mapping: Tensor  # int64 [T]: where each new token is written
    max_seqlen_k: int

    @property
    def num_tokens(self) -> int:
        return sum(self.q_lens)

    @property
    def decode_q_len(self) -> int:
        """S_q when every sequence brings the same 1 or 2 new tokens (decode, MTP), else 0."""
        q = self.q_lens[0]
        return q if q <= 2 and all(n == q for n in self.q_lens) else 0


@dataclass
class LayerCache:
    kv: Tensor  # [blocks, block_size, kv_lora_rank + qk_rope_head_dim]
    index_k: Tensor  # [blocks, block_size, index_head_dim] FP8, int8 or model dtype
    index_scale: Optional[Tensor]  # [blocks, block_size] float32 (FP8 / int8 keys only)


class PagedCache:
    def __init__(self, *, n_layers: int, max_batch_size: int, max_seq_len: int, block_size: int,
                 kv_dim: int, index_dim: int, dtype: torch.dtype, index_fp8: bool,
                 device: torch.device, kv_fp8: Optional[tuple[int, bool]] = None,
                 index_int8: bool = False):
        # kv_fp8 = (latent width, ue8m0): hold the latent cache in the FP8 format of kv_fp8.py
        self.kv_fp8 = kv_fp8
        kv_width = kv_fp8_format.entry_bytes(kv_fp8[0], kv_dim - kv_fp8[0]) if kv_fp8 else kv_dim
        self.max_batch_size, self.max_seq_len, self.block_size = max_batch_size, max_seq_len, block_size
        self.max_blocks = -(-max_seq_len // block_size)
        num_blocks = max_batch_size * self.max_blocks
        self.device = device
        self._pinned = torch.device(device).type == "cuda"
        self.layers = [
            LayerCache(
                kv=torch.zeros(num_blocks, block_size, kv_width,
                               dtype=torch.uint8 if kv_fp8 else dtype, device=device),
                index_k=torch.zeros(num_blocks, block_size, index_dim, device=device,
                                    dtype=FP8_DTYPE if index_fp8 else
                                    torch.int8 if index_int8 else dtype),
                index_scale=(torch.zeros(num_blocks, block_size, dtype=torch.float32,
                                         device=device) if index_fp8 or index_int8 else None))
            for _ in range(n_layers)
        ]
        self._free = list(range(num_blocks - 1, -1, -1))
        self._tables: list[list[int]] = [[] for _ in range(max_batch_size)]
        self.lengths = [0] * max_batch_size
        self.block_table = torch.zeros(max_batch_size, self.max_blocks, dtype=torch.int32,
                                       device=device)

    # ----------------------------------------------------------------------------- rows
    def reset(self, rows: Optional[Sequence[int]] = None) -> None:
        for r in range(self.max_batch_size) if rows is None else rows:
            self._free.extend(reversed(self._tables[r]))
            self._tables[r] = []
            self.lengths[r] = 0

    def _grow(self, row: int, length: int) -> bool:
        need = -(-length // self.block_size) - len(self._tables[row])
        if need <= 0:
            return False
        if need > len(self._free):
            raise CacheError(f"paged cache is out of blocks (row {row} needs {need} more)")
        self._tables[row].extend(self._free.pop() for _ in range(need))
        return True

    def prepare(self, rows: Sequence[int], start_pos: Sequence[int],
                q_lens: Sequence[int]) -> Step:
        rows, start_pos, q_lens = list(rows), list(start_pos), list(q_lens)
        if len(set(rows)) != len(rows):
            raise CacheError(f"rows must be distinct, got {rows}")
        grown = []
        for r, s, n in zip(rows, start_pos, q_lens):
            if not 0 <= r < self.max_batch_size:
                raise CacheError(f"row {r} is outside the cache's max_batch_size="
                                 f"{self.max_batch_size}")
            if n <= 0:
                raise CacheError(f"row {r}: a step needs at least one token, got {n}")
            if not 0 <= s <= self.lengths[r]:
                raise CacheError(f"row {r}: start_pos={s} but the cache holds {self.lengths[r]} "
                                 "tokens of it (start_pos must not leave a gap)")
            if s + n > self.max_seq_len:
                raise CacheError(f"row {r}: start_pos {s} + {n} tokens exceeds max_seq_len="
                                 f"{self.max_seq_len}")
            if self._grow(r, s + n):
                grown.append(r)
        for r in grown:
            table = self._tables[r]
            self.block_table[r, : len(table)].copy_(self._staged(torch.tensor(table, dtype=torch.int32)),
                                                    non_blocking=self._pinned)
        for r, s, n in zip(rows, start_pos, q_lens):
            self.lengths[r] = s + n

        # All of the step's metadata goes to the device in one copy from pinned memory, queued
        # behind the work already in flight: no host sync, so a chunked prefill keeps the device
        # busy while the host prepares the next chunk.
        bs = self.block_size
        positions, slots = [], []
        for r, s, n in zip(rows, start_pos, q_lens):
            pos = torch.arange(s, s + n)
            first = s // bs
            pages = torch.tensor(self._tables[r][first: (s + n - 1) // bs + 1], dtype=torch.int64)
            positions.append(pos)
            slots.append(pages[pos // bs - first] * bs + pos % bs)
        cu = [0]
        for n in q_lens:
            cu.append(cu[-1] + n)
        seqlens_k = [s + n for s, n in zip(start_pos, q_lens)]
        small = torch.tensor(cu + seqlens_k + rows, dtype=torch.int64)
        meta = self._staged(torch.cat(positions + slots + [small]))
        meta = meta.to(self.device, non_blocking=self._pinned)
        t, nr = sum(q_lens), len(rows)  # meta = [positions (t) | slots (t) | cu, seqlens, rows]
        positions_d, slots_d, small_d = meta[:t], meta[t: 2 * t], meta[2 * t:]
        return Step(
            rows=rows, start_pos=start_pos, q_lens=q_lens,
            cu_seqlens_q=small_d[: nr + 1].to(torch.int32),
            seqlens_k=small_d[nr + 1: 2 * nr + 1].to(torch.int32),
            block_table=self.block_table[small_d[2 * nr + 1:]],
            positions=positions_d,
            slot_mapping=slots_d,
            max_seqlen_k=max(seqlens_k),
        )

    def _staged(self, host: Tensor) -> Tensor:
        """``host`` in pinned memory where the cache lives on a CUDA device (so that a
        non_blocking copy of it is truly asynchronous); unchanged elsewhere."""
        return host.pin_memory() if self._pinned else host

    # ---------------------------------------------------------------------------- writes
    def store_kv(self, layer: int, step: Step, latent: Tensor, rope: Tensor, ops: Ops) -> None:
        """Write this step's MLA entries (latent [T, d_v], rope key [T, d_rope]) into their
        slots, in the cache's format, through ``ops`` (``dsa.store_kv``)."""
        ue8m0 = bool(self.kv_fp8 and self.kv_fp8[1])
        ops.store_kv(self.layers[layer].kv, step.slot_mapping, latent, rope, ue8m0)

    def store_index(self, layer: int, step: Step, key: Tensor, scale: Optional[Tensor]) -> None:
        """Write this step's indexer keys ([T, D], FP8 with scale [T], or float) into their slots."""
        c = self.layers[layer]
        dst, src = c.index_k.view(-1, c.index_k.shape[-1]), key.to(c.index_k.dtype)
        if dst.dtype == FP8_DTYPE:  # index_copy_ has no float8 kernel on every device: copy bytes
            dst, src = dst.view(torch.uint8), src.view(torch.uint8)
        dst.index_copy_(0, step.slot_mapping, src)
        if c.index_scale is not None:
            c.index_scale.view(-1).index_copy_(0, step.slot_mapping, scale.float())
