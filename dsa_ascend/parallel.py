"""Tensor and expert parallelism over torch.distributed: the layout, the process group, the
collectives the split needs, and loading each rank's slice of the weights.

The layout is the converter's (``convert.Layout``): ``tp`` x ``ep`` over max(tp, ep) ranks, rank
r has tensor-parallel rank r % tp and expert-parallel rank r // (world / ep); how each
checkpoint key is split is ``convert.SPLIT_TABLE`` (DSA_SPEC §8). The graph applies it:

- attention: heads split over the TP group (q_b_proj, kv_b_proj column-parallel; o_proj
  row-parallel, then an all-reduce). q_a / kv_a projections, their norms and the whole lightning
  indexer are replicated, so every rank computes the same top-k from the same hidden state (the
  debug mode checks it); the MLA latent cache is shared by all heads and so replicated too;
- dense MLP and shared expert: hidden dim split over TP (gate/up column-, down row-parallel);
- routed experts: whole experts per EP rank. Ranks holding the same experts (ep < world) split
  the tokens between them; one all-reduce over all ranks sums routed and shared partial outputs;
- embedding and LM head: vocab-parallel (masked lookup + all-reduce; all-gather of the logits).

Every rank sees the same tokens and ends every layer with the same hidden state (an all-reduce
leaves the same bits on every rank), so nothing else needs synchronising. With one rank every
collective returns its input unchanged: the single-device code path.

The process-group backend follows the device: nccl (cuda), hccl (npu), gloo (cpu); the group is
created from the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) with a
timeout (``DSA_DIST_TIMEOUT`` seconds), so a rank blocked in a collective on a dead peer ends.
``DSA_DEBUG_PARALLEL=1`` (or ``RunConfig.debug_parallel``) all-gathers every layer's top-k
indices and fails with the layer and ranks when they differ.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .checkpoint import check_tensors, read_headers, read_weights
from .config import ConfigError, ModelConfig, RunConfig
from .convert import MANIFEST, Layout, Piece, scale_piece, weight_piece
from .quant import FP8_DTYPE, WEIGHT_BLOCK

log = logging.getLogger("dsa_ascend")

BACKEND_OF_DEVICE = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}
DEBUG_ENV = "DSA_DEBUG_PARALLEL"
TIMEOUT_ENV = "DSA_DIST_TIMEOUT"
# Generous: ranks that finish loading first wait for the slowest in the first collective.
DEFAULT_TIMEOUT_S = 1800


class ParallelError(ConfigError):
    """A parallel layout that does not fit the model, the job or the checkpoint; or ranks that
    disagree where they must not."""


class CollectiveError(RuntimeError):
    """A collective failed: a peer rank died (most often after an error of its own) or timed out."""


def _collective(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except RuntimeError as e:
        raise CollectiveError(f"{fn.__name__} failed; another rank probably failed first "
                              f"({type(e).__name__}: {str(e).splitlines()[0]})") from None


@dataclass(frozen=True, eq=False)
class Parallel:
    """This rank's place in the layout and the collectives the split needs.

    The default instance is one device: every collective returns its input, every split is the
    whole. ``tp_group`` is the process group of this rank's tensor-parallel peers (None when
    tp == 1); expert reductions run over all ranks (the default group).
    """

    layout: Layout = Layout()
    rank: int = 0
    tp_group: Any = None
    debug: bool = False

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def ep(self) -> int:
        return self.layout.ep

    @property
    def tp_rank(self) -> int:
        return self.layout.tp_rank(self.rank)

    # ------------------------------------------------------------------------------- splits
    def tp_part(self, n: int, what: str) -> int:
        """This rank's share of a dimension split over the TP group."""
        if n % self.tp:
            raise ParallelError(f"tp={self.tp} does not divide {what} = {n}")
        return n // self.tp

    def local_experts(self, n_experts: int) -> range:
        if n_experts % self.ep:
            raise ParallelError(f"ep={self.ep} does not divide n_routed_experts = {n_experts}")
        return self.layout.experts(self.rank, n_experts)

    def routed_tokens(self, n_tokens: int) -> tuple[int, int]:
        """[first, last) of the tokens this rank routes through its experts: all of them, unless
        other ranks hold the same experts (ep < world), which then take the others."""
        replicas = self.world_size // self.ep
        if replicas == 1:
            return 0, n_tokens
        per = -(-n_tokens // replicas)
        first = min(n_tokens, (self.rank % replicas) * per)
        return first, min(n_tokens, first + per)

    @property
    def adds_shared(self) -> bool:
        """Whether this rank adds its shared-expert output to the expert all-reduce: the ranks
        of the first attention replica (rank < tp), whose TP slices make up the whole expert."""
        return self.rank < self.tp

    # -------------------------------------------------------------------------- collectives
    def all_reduce_tp(self, x: Tensor) -> Tensor:
        """Sum of ``x`` over the tensor-parallel group (row-parallel outputs)."""
        if self.tp == 1:
            return x
        _collective(dist.all_reduce, x, group=self.tp_group)
        return x

    def all_reduce(self, x: Tensor) -> Tensor:
        """Sum of ``x`` over all ranks (the expert partial outputs)."""
        if self.world_size == 1:
            return x
        _collective(dist.all_reduce, x)
        return x

    def all_gather_tp(self, x: Tensor) -> Tensor:
        """[..., n] on each TP rank -> [..., tp * n], in TP-rank order (vocab-parallel head)."""
        if self.tp == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp)]
        _collective(dist.all_gather, parts, x.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: Tensor) -> Tensor:
        """Rank 0's ``x`` on every rank (sampled tokens: one RNG decides)."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        _collective(dist.broadcast, x, src=0)
        return x

    def check_replicated(self, x: Tensor, what: str, as_set: bool = False) -> None:
        """Debug mode: ``x`` (the same shape on every rank) must be identical on every rank;
        ``as_set``: the rows of ``x`` compared as sets (top-k order is not part of its contract)."""
        if self.world_size == 1 or not self.debug:
            return
        x = (x.sort(dim=-1).values if as_set else x).contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        _collective(dist.all_gather, parts, x)
        for r, other in enumerate(parts):
            if not torch.equal(other, parts[0]):
                diff = (other != parts[0]).nonzero()
                raise ParallelError(
                    f"{what}: rank {r} differs from rank 0 in {len(diff)} of {x.numel()} entries "
                    f"(first at index {diff[0].tolist()}); replicated computations must agree on "
                    f"every rank (tp={self.tp}, ep={self.ep})")


SINGLE = Parallel()


# ------------------------------------------------------------------------- process group
def world_size() -> int:
    """Processes in this job: the default process group's, else torchrun's WORLD_SIZE, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def timeout_seconds() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ParallelError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise ParallelError(f"{TIMEOUT_ENV}={raw!r} must be positive")
    return value


def init_distributed(device: torch.device) -> torch.device:
    """Join the default process group (creating it from the torchrun environment, with the
    backend of ``device``'s type) and return this rank's device: an accelerator without an
    index becomes ``<type>:LOCAL_RANK``."""
    if device.type != "cpu" and device.index is None:
        device = torch.device(device.type, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type != "cpu":
        getattr(torch, device.type).set_device(device)
    if dist.is_initialized():
        return device
    backend = BACKEND_OF_DEVICE.get(device.type)
    if backend is None:
        raise ParallelError(f"no process-group backend for device type {device.type!r} (known: "
                            f"{BACKEND_OF_DEVICE})")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")
               if k not in os.environ]
    if missing:
        raise ParallelError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but {missing} not set: "
                            "start the job with torchrun (python -m torch.distributed.run)")
    kwargs: dict = dict(backend=backend, timeout=timedelta(seconds=timeout_seconds()))
    if backend == "nccl":
        kwargs["device_id"] = device  # eager NCCL init, bound to this rank's GPU
    dist.init_process_group(**kwargs)
    atexit.register(_destroy)
    return device


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# A failing rank leaves its message in the process group's key-value store (torchrun's agent
# holds it, so it outlives any worker), where a peer whose collective then fails finds it.
_FAILURE_KEY = "dsa_ascend/first_failure"


def _store():
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()  # no public accessor (torch 2.13)


def report_failure(message: str) -> None:
    """Best effort: record ``message`` as the job's first failure (no-op without a group)."""
    try:
        if dist.is_initialized():
            store = _store()
            if not store.check([_FAILURE_KEY]):
                store.set(_FAILURE_KEY, message)
    except Exception:  # the store may be gone with its host; the message is printed anyway
        pass


def peer_failure() -> Optional[str]:
    """The first failure another rank recorded with ``report_failure``, if it can be read: the
    store lives in torchrun's agent, or (plain env:// start) in rank 0, which is then this one
    (asking a dead rank 0 would only add a connection error to the log)."""
    try:
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        if dist.is_initialized() and (agent_store or dist.get_rank() == 0):
            store = _store()
            if store.check([_FAILURE_KEY]):
                return store.get(_FAILURE_KEY).decode("utf-8", "replace")
    except Exception:
        pass
    return None


def make_parallel(config: ModelConfig, tp: Optional[int], ep: Optional[int],
                  device: torch.device, debug: bool = False) -> tuple[Parallel, torch.device]:
    """The layout ``tp`` x ``ep`` (default: every rank of the job, DeepSeek's layout) checked
    against ``config`` and the job's world size, its process groups, and this rank's device.
    tp=1, ep=1 given explicitly: this process runs the whole model alone, whatever the job."""
    world = world_size()
    tp = world if tp is None else tp
    ep = world if ep is None else ep
    for name, v in (("tp", tp), ("ep", ep)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ParallelError(f"{name} must be a positive integer, got {v!r}")
    layout = Layout(tp, ep)
    if layout.world_size % tp or layout.world_size % ep:
        raise ParallelError(f"tp={tp} and ep={ep}: one must divide the other (the ranks are "
                            f"max(tp, ep) = {layout.world_size})")
    try:
        layout.validate(config)
    except ValueError as e:
        raise ParallelError(f"tp={tp} ep={ep}: {e}") from None
    debug = debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if layout.world_size == 1:
        return SINGLE, device
    if layout.world_size != world:
        raise ParallelError(f"tp={tp} ep={ep} needs {layout.world_size} processes, this job has "
                            f"{world} (torchrun --nproc-per-node {layout.world_size}, or choose "
                            f"tp/ep for {world})")
    device = init_distributed(device)
    me = dist.get_rank()
    tp_group = None
    if tp == world:
        tp_group = dist.group.WORLD
    elif tp > 1:
        for g in range(world // tp):  # every rank creates every group, in the same order
            group = dist.new_group(list(range(g * tp, (g + 1) * tp)))
            if me // tp == g:
                tp_group = group
    return Parallel(layout, me, tp_group, debug), device


# ------------------------------------------------------------------------------- loading
def read_manifest(path: str) -> Optional[dict]:
    """The converter's ``dsa_manifest.json`` of ``path``, None when there is none."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.exists(mpath):
        return None
    try:
        with open(mpath, encoding="utf-8") as f:
            man = json.load(f)
        man["layout"]["tp"], man["layout"]["ep"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ParallelError(f"{mpath}: unreadable converter manifest ({e!r})") from None
    return man


def converted_layout(path: str) -> Optional[Layout]:
    """The layout of a converter output split over several ranks (its top directory), None for
    any single-rank directory. A rank directory itself is refused: its parent is the model."""
    man = read_manifest(path)
    if man is None:
        return None
    tp, ep = man["layout"]["tp"], man["layout"]["ep"]
    if man.get("rank") is not None:
        raise ParallelError(f"{path}: rank {man['rank']}'s directory of a tp={tp} ep={ep} "
                            f"conversion; load its parent {os.path.dirname(os.path.abspath(path))} "
                            "(each rank then reads its own directory)")
    layout = Layout(tp, ep)
    return layout if layout.world_size > 1 else None


def plan_load(path: str, config: ModelConfig, tp: Optional[int], ep: Optional[int],
              device: torch.device, debug: bool) -> tuple[Parallel, torch.device, Optional[str]]:
    """(parallel, this rank's device, rank directory or None) for loading ``path``: a converter
    output split over ranks fixes the layout (each rank reads its ``rank-RRRRR-of-WWWWW/``);
    an HF directory is read in slices for the layout ``tp`` x ``ep``."""
    conv = converted_layout(path)
    if conv is None:
        parallel, device = make_parallel(config, tp, ep, device, debug)
        return parallel, device, None
    if (tp is not None and tp != conv.tp) or (ep is not None and ep != conv.ep):
        raise ParallelError(f"{path}: holds a tp={conv.tp} ep={conv.ep} conversion, tp={tp} "
                            f"ep={ep} was asked (load the original checkpoint for another "
                            "layout, or convert again)")
    parallel, device = make_parallel(config, conv.tp, conv.ep, device, debug)
    rank_dir = os.path.join(path, conv.rank_dir(parallel.rank))
    man = read_manifest(rank_dir)
    if man is None or man.get("rank") != parallel.rank:
        raise ParallelError(f"{rank_dir}: missing, or not rank {parallel.rank}'s directory of "
                            f"this conversion (no {MANIFEST} naming that rank)")
    return parallel, device, rank_dir


def load_slices(model, path: str, device: torch.device, fp8_act_quant: object = "auto") -> None:
    """Load this rank's slice of every parameter of ``model`` (built for its ``Parallel``) from
    the full HF checkpoint ``path``: the headers are checked against the unsplit graph, then
    only the rows / columns of this rank are read (safetensors ``get_slice``), and experts of
    other ranks are never touched."""
    from .model.layers import Linear
    from .model.transformer import Transformer

    p: Parallel = model.ctx.parallel
    config = model.config
    infos = read_headers(path)
    full = Transformer(config, RunConfig(), backend="reference", dtype=model.ctx.dtype)
    quantized = check_tensors(full, infos, path)  # coverage, shapes vs config.json, scales
    del full
    slices: dict[str, Piece] = {}
    narrow_fp8: list[str] = []
    for key, param in model.named_parameters():
        info = infos[key]
        piece = weight_piece(key, info.shape, p.layout, p.rank, config.n_routed_experts)
        if piece is None or piece.shape(info.shape) != tuple(param.shape):
            raise ParallelError(f"tensor {key!r}: rank {p.rank} holds {list(param.shape)} of "
                                f"{list(info.shape)}, the split table gives "
                                f"{None if piece is None else list(piece.shape(info.shape))}")
        if piece.dim is None:
            continue
        slices[key] = piece
        if key in quantized:
            fmt = "fp8" if info.dtype == FP8_DTYPE else "int8"
            if fmt == "fp8":
                b = WEIGHT_BLOCK
                if piece.start % b and piece.start // b != (piece.stop - 1) // b:
                    raise ParallelError(
                        f"tp={p.tp} cuts FP8 tensor {key!r} {list(info.shape)} along dim "
                        f"{piece.dim} at {piece.start}, inside a 128x128 scale block (convert it "
                        "to bf16 / int8, or choose a tp that leaves multiples of 128)")
                if piece.dim == 1 and (piece.stop - piece.start) % b:
                    narrow_fp8.append(key)
            slices[quantized[key]] = scale_piece(piece, fmt)
    read_weights(model, infos, quantized, device, fp8_act_quant, slices)
    narrowed = []
    for key in narrow_fp8:
        linear = model.get_submodule(key.rpartition(".")[0])
        if isinstance(linear, Linear) and linear.act_quant:
            # The single-device 128-channel activation groups straddle ranks here; quantizing the
            # piece per its own channels would be a different rounding: use the exact input.
            linear.act_quant = False
            narrowed.append(key)
    if narrowed and p.rank == 0:
        piece = slices[narrowed[0]]
        log.warning("tp=%d leaves %d input channels of %d row-parallel FP8 layer(s) per rank (not "
                    "a multiple of 128, e.g. %s): FP8 activation quantization is off for them",
                    p.tp, piece.stop - piece.start, len(narrowed), narrowed[0])
