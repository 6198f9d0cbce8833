"""Checkpoint conversion: an HF DeepSeek-V3.2-Exp directory (the official FP8 release) -> fp8,
bf16 or int8 W8A8, optionally split for tensor / expert parallelism; streaming, resumable,
verifiable. ``dsa-ascend convert`` / ``dsa-ascend verify`` and ``tools/convert_checkpoint.py``
call the functions here.

Targets (``--dtype``), applied to the weights of quantizable linears (``Linear.quantizable``:
attention, indexer and MLP/expert projections; the release stores them FP8); every other tensor
(norms, embeddings, LM head, router, score bias) is copied byte for byte:
- ``fp8``: FP8 e4m3 + ``weight_scale_inv`` 128x128 blocks kept as they are (CUDA);
- ``bf16``: dequantized (fp8 value * block scale in float32) and rounded to bf16 (Ascend 910B/C
  have no FP8 matrix units). ``quantization_config`` is removed; its ``scale_fmt`` moves to a
  top-level ``scale_fmt`` key, so the FP8 *activation* quantizations that remain (indexer q/k,
  simulated latent) keep the original's scale format;
- ``int8``: W8A8: symmetric int8 weights, one float32 scale per output channel stored as
  ``<linear>.weight_scale`` [out] (scale = row amax / 127 of the dequantized float32 weight;
  q = round-half-even(w / scale)); activations are quantized per token at run time by
  ``dsa.int8_linear``. ``quantization_config`` becomes ``INT8_QUANTIZATION_CONFIG`` (+ scale_fmt).

Parallel layout (``--tp N --ep M``, world size max(N, M); the smaller must divide the larger):
rank r has tensor-parallel rank r % N and expert-parallel rank r // (world / M). How each key is
split is ``SPLIT_TABLE`` (DSA_SPEC §8); scales follow their weight (FP8 block scales split along
the same dim in 128-blocks, so a split must fall on a block boundary; int8 channel scales split
with dim-0 splits and are replicated with dim-1 splits). Each rank gets its own HF-format
directory ``rank-RRRRR-of-WWWWW/`` (shards, index, config.json, tokenizer, manifest) whose keys
are the full model's keys with the rank's slice as the tensor. ``reassemble`` joins them back.

Streaming: each output file is planned (keys, dtypes, shapes, offsets) from the source headers
before any data moves, its safetensors header is written first, then the tensors are converted
in chunks of whole rows (a multiple of the 128-row FP8 blocks) read with ``pread`` and appended
while their sha256 is computed. Memory is a few chunks per worker, independent of tensor and
shard sizes. The unit of work is one source shard (-> one output file per rank holding some of
its tensors); ``workers`` processes convert shards in parallel.

Safety: files are written as ``NAME.tmp`` and renamed when complete; finished files and their
sha256 are recorded in ``.dsa_convert_progress.json`` (atomically replaced) and, at the end, in
``dsa_manifest.json``. A rerun with the same inputs and options re-hashes recorded files, skips
those that match and redoes the rest, so an interrupted conversion (killed at any point) resumes
to a byte-identical result. The output is deterministic: same inputs -> same bytes.

Manifest (``dsa_manifest.json``; one at the top, one per rank directory with only its files):
``format``, ``converter`` (version, ``plan_sha256``), ``source`` (path, config sha256, per-shard
bytes and header sha256), ``dtype``, ``keep_mtp``, ``config`` (the written config.json),
``layout`` (tp, ep, world_size, ranks: dir / tp_rank / ep_rank / experts, the split table),
``files``: relative path -> {sha256, bytes, tensors: key -> {dtype, shape, split, full_shape,
slice: [dim, start, stop] when split}}, and ``extra_files`` (config, tokenizer: sha256).

Test hook: ``DSA_CONVERT_TEST_DELAY`` (seconds) makes a worker sleep after each tensor, so tests
can kill a conversion midway.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import dataclasses
import fnmatch
import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from .checkpoint import (
    INDEX_FILE,
    INT8_SCALE_SUFFIX,
    SAFETENSORS_DTYPES,
    SCALE_SUFFIX,
    CheckpointError,
    check_scale,
    check_tensors,
    is_scale_key,
    read_headers,
)
from .config import INT8_QUANTIZATION_CONFIG, ModelConfig, RunConfig
from .quant import (
    WEIGHT_BLOCK,
    dequantize_int8_rows,
    dequantize_weight,
    quantize_int8_rows,
    quantize_weight,
)

log = logging.getLogger("dsa_ascend")

FORMAT = "dsa_ascend.convert/1"
MANIFEST = "dsa_manifest.json"
PROGRESS = ".dsa_convert_progress.json"
TARGETS = ("fp8", "bf16", "int8")
# Small files copied next to the shards (and into each rank directory).
COPIED_FILES = ("tokenizer*", "special_tokens_map.json", "generation_config.json", "chat_template*",
                "*.jinja")
# Elements per converted chunk: bounds each worker's float32 intermediates (16 MiB each). Kept
# under glibc's largest mmap threshold (32 MiB) so the buffers are reused from the heap: fresh
# mmap'd pages fault in one by one and made the arithmetic 5-8x slower on the 2-core box.
CHUNK_ELEMENTS = 1 << 22
TEST_DELAY_ENV = "DSA_CONVERT_TEST_DELAY"

ELEMENT_SIZE = {"F8_E4M3": 1, "F8_E5M2": 1, "BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8,
                "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FP8, INT8, BF16, F32 = "F8_E4M3", "I8", "BF16", "F32"
FLOAT_ST = ("BF16", "F16", "F32")


class ConvertError(CheckpointError):
    """Bad input to the converter, or a converted directory that fails verification."""


# ------------------------------------------------------------------------------ split table
DIM0, DIM1, EXPERT, REPLICATED = "dim0", "dim1", "expert", "replicated"

# How each checkpoint key is laid out across ranks (DSA_SPEC §8, DeepSeek's reference convert).
# First match wins; a scale follows its weight. dim0 = column-parallel (output rows split over
# TP ranks), dim1 = row-parallel (input columns split), expert = whole routed experts assigned to
# EP ranks by index range, replicated = every rank holds the whole tensor.
SPLIT_TABLE: tuple[tuple[str, str], ...] = (
    (r"^lm_head\.weight$", DIM0),
    (r"(^|\.)embed_tokens\.weight$", DIM0),           # also the MTP layer's own embedding
    (r"\.shared_head\.head\.weight$", DIM0),          # the MTP layer's LM head
    (r"\.mlp\.experts\.\d+\.", EXPERT),
    (r"\.self_attn\.(q_b_proj|kv_b_proj)\.", DIM0),   # heads
    (r"\.self_attn\.o_proj\.", DIM1),
    (r"\.mlp\.(shared_experts\.)?(gate_proj|up_proj)\.", DIM0),  # dense MLP and shared experts
    (r"\.mlp\.(shared_experts\.)?down_proj\.", DIM1),
    # Everything else: norms, q_a_proj / kv_a_proj_with_mqa (small, before the head split), the
    # indexer (one key head shared by all), the router and its bias, MTP's enorm/hnorm/eh_proj.
    (r"", REPLICATED),
)
_SPLIT_RES = tuple((re.compile(p), rule) for p, rule in SPLIT_TABLE)
_EXPERT_RE = re.compile(r"\.mlp\.experts\.(\d+)\.")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def weight_key(key: str) -> str:
    """The weight a scale belongs to (``x.weight_scale_inv`` / ``x.weight_scale`` -> ``x.weight``)."""
    for suffix in (SCALE_SUFFIX, INT8_SCALE_SUFFIX):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


def split_rule(key: str) -> str:
    """The SPLIT_TABLE rule of ``key`` (a scale gets its weight's rule)."""
    k = weight_key(key)
    for pattern, rule in _SPLIT_RES:
        if pattern.search(k):
            return rule
    raise AssertionError("the table ends with a catch-all")


def expert_index(key: str) -> int:
    m = _EXPERT_RE.search(key)
    return int(m.group(1)) if m else -1


@dataclass(frozen=True)
class Piece:
    """The part of a full tensor a rank holds: ``dim`` None = all of it, else [start, stop)."""

    dim: Optional[int]
    start: int = 0
    stop: int = 0

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        if self.dim is None:
            return tuple(full)
        return tuple(self.stop - self.start if d == self.dim else n for d, n in enumerate(full))

    def as_json(self) -> Optional[list[int]]:
        return None if self.dim is None else [self.dim, self.start, self.stop]


WHOLE = Piece(None)


@dataclass(frozen=True)
class Layout:
    """``tp`` x ``ep`` over max(tp, ep) ranks (the smaller divides the larger).

    tp == ep is DeepSeek's reference layout (experts split over the attention's TP ranks);
    ep > tp gives data-parallel attention replicas; ep == 1 replicates the experts.
    """

    tp: int = 1
    ep: int = 1

    @property
    def world_size(self) -> int:
        return max(self.tp, self.ep)

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    def ep_rank(self, rank: int) -> int:
        return rank // (self.world_size // self.ep)

    def experts(self, rank: int, n_experts: int) -> range:
        per = n_experts // self.ep
        e = self.ep_rank(rank)
        return range(e * per, (e + 1) * per)

    def rank_dir(self, rank: int) -> str:
        """Relative directory of ``rank`` ('' when there is one rank)."""
        return "" if self.world_size == 1 else f"rank-{rank:05d}-of-{self.world_size:05d}"

    def validate(self, config: ModelConfig) -> None:
        for name, v in (("--tp", self.tp), ("--ep", self.ep)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConvertError(f"{name} must be a positive integer, got {v!r}")
        if self.world_size % self.tp or self.world_size % self.ep:
            raise ConvertError(f"--tp {self.tp} and --ep {self.ep}: one must divide the other "
                               f"(the ranks are max(tp, ep) = {self.world_size})")
        c = config
        for what, n in (("num_attention_heads", c.n_heads), ("vocab_size", c.vocab_size),
                        ("intermediate_size", c.inter_dim),
                        ("n_shared_experts * moe_intermediate_size",
                         c.n_shared_experts * c.moe_inter_dim)):
            if n and n % self.tp:
                raise ConvertError(f"--tp {self.tp} does not divide {what} = {n}")
        if c.n_routed_experts % self.ep:
            raise ConvertError(f"--ep {self.ep} does not divide n_routed_experts = "
                               f"{c.n_routed_experts}")

    def as_json(self, config: ModelConfig) -> dict:
        return {
            "tp": self.tp, "ep": self.ep, "world_size": self.world_size,
            "rank_rule": "tp_rank = rank % tp; ep_rank = rank // (world_size // ep)",
            "ranks": [{"rank": r, "dir": self.rank_dir(r), "tp_rank": self.tp_rank(r),
                       "ep_rank": self.ep_rank(r),
                       "experts": [self.experts(r, config.n_routed_experts).start,
                                   self.experts(r, config.n_routed_experts).stop]}
                      for r in range(self.world_size)],
            "split_table": [list(x) for x in SPLIT_TABLE],
            "scales": "FP8 weight_scale_inv: split with the weight in 128-blocks; int8 "
                      "weight_scale: split with dim0 weights, replicated with dim1 weights",
        }


def weight_piece(key: str, shape: tuple[int, ...], layout: Layout, rank: int,
                 n_experts: int) -> Optional[Piece]:
    """The slice of the full tensor ``key`` that ``rank`` holds (None: not on this rank)."""
    rule = split_rule(key)
    if rule == EXPERT:
        return WHOLE if expert_index(key) in layout.experts(rank, n_experts) else None
    if rule == REPLICATED or layout.tp == 1:
        return WHOLE
    dim = 0 if rule == DIM0 else 1
    if len(shape) <= dim or shape[dim] % layout.tp:
        raise ConvertError(f"--tp {layout.tp} does not divide dim {dim} of tensor {key!r} "
                           f"{list(shape)}")
    size = shape[dim] // layout.tp
    t = layout.tp_rank(rank)
    return Piece(dim, t * size, (t + 1) * size)


def scale_piece(piece: Piece, fmt: str) -> Piece:
    """The slice of a weight's scale tensor that goes with the weight slice ``piece``."""
    if piece.dim is None:
        return WHOLE
    if fmt == "fp8":
        return Piece(piece.dim, piece.start // WEIGHT_BLOCK, -(-piece.stop // WEIGHT_BLOCK))
    return Piece(0, piece.start, piece.stop) if piece.dim == 0 else WHOLE


# ------------------------------------------------------------------------ the plan (no data)
@dataclass(frozen=True)
class SourceTensor:
    file: str          # shard name inside the source directory
    key: str
    dtype: str         # safetensors dtype string
    shape: tuple[int, ...]
    begin: int         # absolute byte offsets in the file
    end: int


@dataclass(frozen=True)
class Item:
    """One source tensor (with its scale, for a quantized weight) and how it is converted."""

    key: str
    src: SourceTensor
    scale: Optional[SourceTensor]
    src_fmt: str        # "fp8" | "int8" | "float"
    conv: str           # "copy" | "bf16" | "fp8" | "int8"
    out_fmt: str        # quantization of the output weight: "fp8" | "int8" | "" (none)

    @property
    def out_dtype(self) -> str:
        return {"copy": self.src.dtype, "bf16": BF16, "fp8": FP8, "int8": INT8}[self.conv]

    @property
    def scale_key(self) -> str:
        return self.key + (SCALE_SUFFIX if self.out_fmt == "fp8" else INT8_SCALE_SUFFIX)

    @property
    def scale_shape(self) -> tuple[int, ...]:
        out_f, in_f = self.src.shape
        if self.out_fmt == "fp8":
            return (-(-out_f // WEIGHT_BLOCK), -(-in_f // WEIGHT_BLOCK))
        return (out_f,)

    @property
    def nbytes(self) -> int:
        return self.src.end - self.src.begin + (self.scale.end - self.scale.begin if self.scale else 0)


@dataclass(frozen=True)
class OutTensor:
    key: str
    dtype: str
    shape: tuple[int, ...]
    split: str
    full_shape: tuple[int, ...]
    slice: Optional[tuple[int, int, int]]


@dataclass(frozen=True)
class OutFile:
    rank: int
    relpath: str        # relative to the output directory
    tensors: tuple[OutTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(math.prod(t.shape) * ELEMENT_SIZE[t.dtype] for t in self.tensors)


@dataclass(frozen=True)
class Group:
    """The unit of work and of resumption: one source shard -> one file per rank."""

    index: int
    source_file: str
    items: tuple[Item, ...]
    outputs: tuple[OutFile, ...]

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.items)


@dataclass(frozen=True)
class Plan:
    src: str
    dtype: str
    layout: Layout
    keep_mtp: bool
    n_experts: int
    ue8m0: bool
    source: dict
    config: dict        # the config.json written to the output
    groups: tuple[Group, ...]
    sha256: str = ""

    def files(self) -> list[OutFile]:
        return [f for g in self.groups for f in g.outputs]


def item_outputs(item: Item, layout: Layout, rank: int, n_experts: int) -> list[OutTensor]:
    piece = weight_piece(item.key, item.src.shape, layout, rank, n_experts)
    if piece is None:
        return []
    rule = split_rule(item.key)
    out = [OutTensor(item.key, item.out_dtype, piece.shape(item.src.shape), rule, item.src.shape,
                     tuple(piece.as_json()) if piece.dim is not None else None)]
    if item.out_fmt:
        sp = scale_piece(piece, item.out_fmt)
        out.append(OutTensor(item.scale_key, F32, sp.shape(item.scale_shape), rule,
                             item.scale_shape, tuple(sp.as_json()) if sp.dim is not None else None))
    return out


def _natural(key: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _read_layout(path: str) -> tuple[int, dict[str, tuple[str, tuple[int, ...], int, int]]]:
    """A safetensors file's header: (header bytes incl. the length prefix, key -> (dtype, shape,
    absolute begin, absolute end)); checks that the data lies inside the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConvertError(f"{path}: truncated (no safetensors header)")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8 or n > 1 << 30:
            raise ConvertError(f"{path}: truncated or not safetensors (header of {n} bytes in a "
                               f"{size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConvertError(f"{path}: unreadable safetensors header ({e})") from None
    start = 8 + n
    out = {}
    for key, v in header.items():
        if key == "__metadata__":
            continue
        b, e = v["data_offsets"]
        if start + e > size:
            raise ConvertError(f"{path}: truncated: tensor {key!r} ends at byte {start + e}, the "
                               f"file has {size}")
        out[key] = (v["dtype"], tuple(v["shape"]), start + b, start + e)
    return start, out


def _sha256_file(path: str, report: Optional[Callable[[int], None]] = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 << 20)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            if report:
                report(n)
    return h.hexdigest()


def _mtp_template(key: str, config: ModelConfig, params: dict[str, tuple[int, ...]],
                  quantizable: set[str]) -> Optional[tuple[tuple[int, ...], bool]]:
    """(shape, quantizable) of an MTP-layer key, from the last layer's twin or the MTP module's
    own tensors (DSA_SPEC §8); None when unknown."""
    m = _LAYER_RE.match(weight_key(key))
    if m is None:
        return None
    rest = m.group(2)
    twin = f"model.layers.{config.n_layers - 1}.{rest}"
    if twin in params:
        return params[twin], twin in quantizable
    d, v = config.dim, config.vocab_size
    own = {"enorm.weight": ((d,), False), "hnorm.weight": ((d,), False),
           "eh_proj.weight": ((d, 2 * d), True), "shared_head.norm.weight": ((d,), False),
           "shared_head.head.weight": ((v, d), False), "embed_tokens.weight": ((v, d), False)}
    return own.get(rest)


def _is_mtp(key: str, n_layers: int) -> bool:
    m = _LAYER_RE.match(key)
    return m is not None and int(m.group(1)) >= n_layers


def _meta_model(config: ModelConfig):
    from .model.transformer import Transformer

    return Transformer(config, RunConfig(), backend="reference", dtype=torch.bfloat16)


def expected_tensors(config: ModelConfig, model=None) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """The model's parameters (key -> shape) and the keys of quantizable linear weights, from
    the graph built on the meta device (so converter, loader and model cannot disagree)."""
    from .model.layers import Linear

    model = model if model is not None else _meta_model(config)
    params = {k: tuple(p.shape) for k, p in model.named_parameters()}
    quantizable = {f"{n}.weight" for n, m in model.named_modules()
                   if isinstance(m, Linear) and m.quantizable}
    return params, quantizable


def _src_fmt(dtype: str) -> str:
    return {FP8: "fp8", INT8: "int8"}.get(dtype, "float")


def _conv(target: str, src_fmt: str, src_dtype: str, quantizable: bool) -> str:
    if not quantizable:
        return "copy"
    if target == "bf16":
        return "copy" if src_dtype == BF16 else "bf16"
    return "copy" if src_fmt == target else target


def output_config(raw: dict, config: ModelConfig, dtype: str, keep_mtp: bool) -> dict:
    """The config.json of a conversion: the source's, with the quantization it now has."""
    out = copy.deepcopy(raw)
    qc = out.pop("quantization_config", None)
    out.pop("scale_fmt", None)
    fmt = {"scale_fmt": "ue8m0"} if config.ue8m0 else {}
    if dtype == "fp8":
        out["quantization_config"] = (qc if isinstance(qc, dict) and qc.get("quant_method") == "fp8"
                                      else {"quant_method": "fp8", "fmt": "e4m3",
                                            "activation_scheme": "dynamic",
                                            "weight_block_size": [128, 128], **fmt})
    elif dtype == "int8":
        out["quantization_config"] = {**INT8_QUANTIZATION_CONFIG, **fmt}
    else:
        out.update(fmt)
        out["torch_dtype"] = "bfloat16"
    if not keep_mtp and out.get("num_nextn_predict_layers"):
        out["num_nextn_predict_layers"] = 0
    return out


def plan_conversion(src: str, dtype: str, layout: Layout = Layout(), keep_mtp: bool = False) -> Plan:
    """Read and check every header of ``src`` and decide every output file, tensor and byte
    offset. Raises ConvertError / CheckpointError / ConfigError naming the file or tensor."""
    if dtype not in TARGETS:
        raise ConvertError(f"--dtype must be one of {list(TARGETS)}, got {dtype!r}")
    if not os.path.isdir(src):
        raise ConvertError(f"{src}: not a directory")
    config_path = os.path.join(src, "config.json")
    config = ModelConfig.from_file(config_path)
    with open(config_path, "rb") as f:
        config_bytes = f.read()
    raw_config = json.loads(config_bytes)
    layout.validate(config)
    infos = read_headers(src)
    meta = _meta_model(config)
    scales = check_tensors(meta, infos, src)  # coverage, shapes vs config.json, dtypes, scales
    params, quantizable = expected_tensors(config, meta)
    del meta

    mtp = sorted(k for k in infos if _is_mtp(k, config.n_layers))
    keys = [k for k in infos if not _is_mtp(k, config.n_layers) and k not in scales.values()]
    if keep_mtp:
        for key in mtp:
            if key in scales.values() or (is_scale_key(key) and weight_key(key) in infos):
                continue
            info = infos[key]
            tmpl = _mtp_template(key, config, params, quantizable)
            if tmpl is None:
                raise ConvertError(f"{info.file}: unknown tensor {key!r} in the MTP layer")
            shape, quant = tmpl
            if info.shape != shape:
                raise ConvertError(f"{info.file}: tensor {key!r} has shape {list(info.shape)}, "
                                   f"config.json implies {list(shape)}")
            if quant and info.dtype in (torch.float8_e4m3fn, torch.int8):
                scales[key] = check_scale(infos, key, shape)
            elif info.dtype not in (torch.bfloat16, torch.float16, torch.float32):
                raise ConvertError(f"{info.file}: tensor {key!r} has dtype {info.dtype}, "
                                   "expected a float dtype")
            if quant:
                quantizable.add(key)
            keys.append(key)
        stray = [k for k in mtp if is_scale_key(k) and k not in scales.values()]
        if stray:
            raise ConvertError(f"{infos[stray[0]].file}: scale tensor(s) {stray[:3]} belong to "
                               "no quantized weight")
    elif mtp:
        log.info("dropping %d tensors of the MTP layer(s) (pass keep_mtp / --keep-mtp to keep "
                 "them)", len(mtp))

    layouts: dict[str, tuple[int, dict]] = {}
    source_files = []
    for name in sorted({os.path.basename(i.file) for i in infos.values()}):
        path = os.path.join(src, name)
        start, tensors = _read_layout(path)
        layouts[name] = (start, tensors)
        with open(path, "rb") as f:
            header_sha = hashlib.sha256(f.read(start)).hexdigest()
        source_files.append({"name": name, "bytes": os.path.getsize(path),
                             "header_sha256": header_sha})

    def source_tensor(key: str) -> SourceTensor:
        name = os.path.basename(infos[key].file)
        dt, shape, b, e = layouts[name][1][key]
        return SourceTensor(name, key, dt, shape, b, e)

    by_file: dict[str, list[Item]] = {}
    for key in sorted(keys, key=_natural):
        src_t = source_tensor(key)
        fmt = _src_fmt(src_t.dtype)
        conv = _conv(dtype, fmt, src_t.dtype, key in quantizable)
        out_fmt = conv if conv in ("fp8", "int8") else (fmt if conv == "copy" and fmt != "float"
                                                         else "")
        item = Item(key, src_t, source_tensor(scales[key]) if key in scales else None, fmt, conv,
                    out_fmt)
        if out_fmt == "fp8" and layout.tp > 1 and split_rule(key) in (DIM0, DIM1):
            dim = 0 if split_rule(key) == DIM0 else 1
            size = src_t.shape[dim] // layout.tp
            if size % WEIGHT_BLOCK:
                raise ConvertError(
                    f"--tp {layout.tp} cuts {key!r} {list(src_t.shape)} along dim {dim} into "
                    f"{size}-wide pieces: FP8 128x128 scale blocks cannot be split (use --dtype "
                    f"bf16 or int8, or a --tp that leaves multiples of {WEIGHT_BLOCK})")
        by_file.setdefault(src_t.file, []).append(item)

    n_experts = config.n_routed_experts
    world = layout.world_size
    per_rank: list[list[tuple[int, list[OutTensor]]]] = [[] for _ in range(world)]
    group_items = [(name, tuple(items)) for name, items in sorted(by_file.items())]
    for g, (_, items) in enumerate(group_items):
        for r in range(world):
            tensors = [t for it in items for t in item_outputs(it, layout, r, n_experts)]
            if tensors:
                per_rank[r].append((g, tensors))
    outputs: dict[int, list[OutFile]] = {}
    for r in range(world):
        n = len(per_rank[r])
        for j, (g, tensors) in enumerate(per_rank[r]):
            rel = os.path.join(layout.rank_dir(r), f"model-{j + 1:05d}-of-{n:05d}.safetensors")
            outputs.setdefault(g, []).append(OutFile(r, rel, tuple(tensors)))
    groups = tuple(Group(g, name, items, tuple(outputs.get(g, ())))
                   for g, (name, items) in enumerate(group_items))

    index_path = os.path.join(src, INDEX_FILE)
    source = {"path": os.path.abspath(src),
              "config_sha256": hashlib.sha256(config_bytes).hexdigest(),
              "index_sha256": (_sha256_file(index_path) if os.path.exists(index_path) else None),
              "files": source_files}
    plan = Plan(src=src, dtype=dtype, layout=layout, keep_mtp=keep_mtp, n_experts=n_experts,
                ue8m0=config.ue8m0, source=source,
                config=output_config(raw_config, config, dtype, keep_mtp), groups=groups)
    ModelConfig.from_hf(plan.config, source="the converted config.json")  # must load back
    fingerprint = {"format": FORMAT, "dtype": dtype, "layout": dataclasses.asdict(layout),
                   "keep_mtp": keep_mtp, "config": plan.config,
                   "source": {k: v for k, v in source.items() if k != "path"},
                   "groups": [dataclasses.asdict(g) for g in groups]}
    sha = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
    return dataclasses.replace(plan, sha256=sha)


# --------------------------------------------------------------------------- reading, writing
class _Sources:
    """Unbuffered pread of byte ranges of the source shards into fresh tensors (no mmap: the
    pages read never count towards this process's resident memory beyond the chunk)."""

    def __init__(self, src: str):
        self.src, self.fds = src, {}

    def read(self, t: SourceTensor, lo: int = 0, hi: Optional[int] = None) -> Tensor:
        hi = t.end - t.begin if hi is None else hi
        path = os.path.join(self.src, t.file)
        if t.file not in self.fds:
            self.fds[t.file] = os.open(path, os.O_RDONLY)
        buf = torch.empty(hi - lo, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        while done < hi - lo:
            n = os.preadv(self.fds[t.file], [view[done:]], t.begin + lo + done)
            if n <= 0:
                raise ConvertError(f"{path}: truncated: tensor {t.key!r} ends before byte "
                                   f"{t.begin + hi}")
            done += n
        return buf

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _as_bytes(t: Tensor) -> memoryview:
    return memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())


class _ShardWriter:
    """Writes one safetensors file front to back: the header (all offsets known from the plan),
    then each tensor's bytes in plan order, hashing as it goes; ``NAME.tmp`` until ``close``."""

    def __init__(self, out_dir: str, f: OutFile):
        self.path = os.path.join(out_dir, f.relpath)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        header: dict = {"__metadata__": {"format": "pt"}}
        off = 0
        self.sizes = []
        for t in f.tensors:
            n = math.prod(t.shape) * ELEMENT_SIZE[t.dtype]
            header[t.key] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [off, off + n]}
            self.sizes.append((t.key, n))
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.hash = hashlib.sha256()
        self.file = open(self.path + ".tmp", "wb")
        self._put(struct.pack("<Q", len(raw)) + raw)
        self.next, self.left = 0, 0

    def _put(self, data) -> None:
        self.file.write(data)
        self.hash.update(data)

    def write(self, key: str, t: Tensor) -> None:
        if self.left == 0:
            want, self.left = self.sizes[self.next]
            self.next += 1
            if want != key:
                raise AssertionError(f"{self.path}: writing {key!r}, the plan expects {want!r}")
        data = _as_bytes(t)
        if data.nbytes > self.left:
            raise AssertionError(f"{self.path}: {key!r} overflows its planned size")
        self._put(data)
        self.left -= data.nbytes

    def close(self) -> dict:
        if self.left or self.next != len(self.sizes):
            raise AssertionError(f"{self.path}: closed before every planned tensor was written")
        # No fsync: durability is checked, not assumed; a rerun re-hashes every recorded file
        # (after a power loss too) and redoes those that do not match.
        self.file.flush()
        size = self.file.tell()
        self.file.close()
        os.replace(self.path + ".tmp", self.path)
        return {"sha256": self.hash.hexdigest(), "bytes": size}

    def abort(self) -> None:
        self.file.close()
        try:
            os.remove(self.path + ".tmp")
        except FileNotFoundError:
            pass


def _fp8_as_bf16(q: Tensor) -> Tensor:
    """e4m3fn bytes -> the bf16 with the same sign, exponent and mantissa bits: exactly the FP8
    value times 2^-120 (the biases are 7 and 127), normals and subnormals alike. Sign-extending
    the byte to int16 and shifting by 4 puts exponent and mantissa in place and the sign in bit
    15; the mask (0x87F0) drops the copies of the sign in between."""
    return ((q.view(torch.int8).to(torch.int16) << 4) & (0x87F0 - 0x10000)).view(torch.bfloat16)


_FP8_SHIFT = 2.0 ** 120
_FP8_MAGNITUDE = torch.arange(128, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


def _fast_fp8_exact() -> bool:
    """The bit trick relies on float32 subnormals (no flush-to-zero); check all 254 values."""
    every = torch.arange(256, dtype=torch.uint8)
    every = every[(every & 0x7F) != 0x7F].view(torch.float8_e4m3fn)
    return torch.equal(_fp8_as_bf16(every).float() * _FP8_SHIFT, every.float())


def dequantize_fp8_fast(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``quant.dequantize_weight(q, scale).to(dtype)`` bit for bit, ~3x faster on CPU, where
    torch's scalar e4m3 -> float32 conversion is the bottleneck: reinterpret the bytes as bf16
    (value * 2^-120, exact) and fold 2^120 into the scale. (v 2^-120)(s 2^120) = v s exactly
    before the product's one float32 rounding, whenever s 2^120 is finite; the cast to ``dtype``
    follows it, as in the reference. Falls back for partial blocks, large scales, NaN bytes or a
    flush-to-zero float mode."""
    out_f, in_f = q.shape
    u = q.view(torch.uint8)
    if (out_f % WEIGHT_BLOCK or in_f % WEIGHT_BLOCK or not bool((scale < 2.0 ** 7).all())
            or int((u & 0x7F).max()) == 0x7F or not _fast_fp8_exact()):
        return dequantize_weight(q, scale).to(dtype)
    b = WEIGHT_BLOCK
    # [row blocks, 128, in] x [row blocks, 1, in]: a contiguous inner loop against one scale row
    # (the 4-D block broadcast is several times slower on CPU).
    cols = (scale.float() * _FP8_SHIFT).repeat_interleave(b, dim=1).unsqueeze(1)
    out = torch.mul(_fp8_as_bf16(q).view(out_f // b, b, in_f), cols).view(out_f, in_f)
    return out if dtype == torch.float32 else out.to(dtype)


def fp8_row_amax(q: Tensor, scale: Tensor) -> Optional[Tensor]:
    """max_j |dequantize_weight(q, scale)[i, j]| per row, from the bytes: e4m3 magnitudes order
    like their 7 low bits and rounding is monotonic, so max |v s| = round(max|v| s) exactly.
    None for partial column blocks."""
    out_f, in_f = q.shape
    if in_f % WEIGHT_BLOCK:
        return None
    m = (q.view(torch.uint8) & 0x7F).view(out_f, in_f // WEIGHT_BLOCK, WEIGHT_BLOCK).amax(-1)
    s = scale.float().repeat_interleave(WEIGHT_BLOCK, 0)[:out_f]
    return (_FP8_MAGNITUDE[m.long()] * s).amax(-1)


def _rows_scale(item: Item, r0: int, r1: int, scale: Tensor) -> Tensor:
    return (scale[r0 // WEIGHT_BLOCK: -(-r1 // WEIGHT_BLOCK)] if item.src_fmt == "fp8"
            else scale[r0:r1])


def _decode(item: Item, raw: Tensor, r0: int, scale: Optional[Tensor],
            dtype: torch.dtype = torch.float32) -> Tensor:
    """Rows [r0, r0 + len) of the source tensor -> ``dtype`` (dequantized in float32)."""
    r1 = r0 + raw.shape[0]
    if item.src_fmt == "fp8":
        return dequantize_fp8_fast(raw, _rows_scale(item, r0, r1, scale), dtype)
    if item.src_fmt == "int8":
        return dequantize_int8_rows(raw, _rows_scale(item, r0, r1, scale)).to(dtype)
    return raw.to(dtype)


def _convert_item(item: Item, plan: Plan, sources: _Sources,
                  writers: dict[int, _ShardWriter]) -> None:
    holders = []
    for rank, w in writers.items():
        piece = weight_piece(item.key, item.src.shape, plan.layout, rank, plan.n_experts)
        if piece is not None:
            holders.append((rank, w, piece))
    src_dtype = SAFETENSORS_DTYPES[item.src.dtype]
    src_scale = (sources.read(item.scale).view(torch.float32).view(item.scale.shape)
                 if item.scale is not None else None)
    shape = item.src.shape
    if len(shape) == 2 and shape[0] and shape[1]:
        rows, cols = shape
        chunk = max(WEIGHT_BLOCK, CHUNK_ELEMENTS // cols // WEIGHT_BLOCK * WEIGHT_BLOCK)
    else:
        rows, cols, chunk = 1, math.prod(shape), 1
    row_bytes = cols * ELEMENT_SIZE[item.src.dtype]
    scale_parts = []
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        raw = sources.read(item.src, r0 * row_bytes, r1 * row_bytes).view(src_dtype)
        raw = raw.view((r1 - r0, cols) if len(shape) == 2 else shape)
        if item.conv == "copy":
            out = raw
        else:
            if item.conv == "bf16":
                out = _decode(item, raw, r0, src_scale, torch.bfloat16)
            elif item.conv == "int8":
                amax = (fp8_row_amax(raw, _rows_scale(item, r0, r1, src_scale))
                        if item.src_fmt == "fp8" else None)
                out, s = quantize_int8_rows(_decode(item, raw, r0, src_scale), amax)
                scale_parts.append(s)
            else:
                out, s = quantize_weight(_decode(item, raw, r0, src_scale), ue8m0=plan.ue8m0)
                scale_parts.append(s)
        for _, w, p in holders:
            if p.dim is None or len(shape) != 2:
                w.write(item.key, out if p.dim is None else out.narrow(p.dim, p.start, p.stop - p.start))
            elif p.dim == 1:
                w.write(item.key, out[:, p.start:p.stop])
            else:
                lo, hi = max(p.start, r0), min(p.stop, r1)
                if lo < hi:
                    w.write(item.key, out[lo - r0: hi - r0])
        del raw, out
    if item.out_fmt:
        scale = src_scale if item.conv == "copy" else torch.cat(scale_parts)
        for _, w, p in holders:
            sp = scale_piece(p, item.out_fmt)
            w.write(item.scale_key, scale if sp.dim is None
                    else scale.narrow(sp.dim, sp.start, sp.stop - sp.start))


def _file_matches(out_dir: str, relpath: str, record: Optional[dict]) -> bool:
    path = os.path.join(out_dir, relpath)
    if not record or not os.path.isfile(path) or os.path.getsize(path) != record["bytes"]:
        return False
    return _sha256_file(path) == record["sha256"]


def _run_group(plan: Plan, group: Group, out_dir: str, done: dict[str, dict],
               report: Callable[[int], None]) -> tuple[int, bool, dict[str, dict]]:
    """Convert one source shard into its output files (one per rank), unless every one of them
    is already there with its recorded sha256. Returns (index, skipped, records)."""
    records = {f.relpath: done.get(f.relpath) for f in group.outputs}
    if all(_file_matches(out_dir, rel, rec) for rel, rec in records.items()):
        report(group.nbytes)
        return group.index, True, records
    delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
    sources = _Sources(plan.src)
    writers = {}
    try:
        for f in group.outputs:
            writers[f.rank] = _ShardWriter(out_dir, f)
        for item in group.items:
            _convert_item(item, plan, sources, writers)
            report(item.nbytes)
            if delay:
                time.sleep(delay)
        records = {}
        for f in group.outputs:
            records[f.relpath] = writers.pop(f.rank).close()
    finally:
        for w in writers.values():
            w.abort()
        sources.close()
    return group.index, False, records


_worker_state: dict = {}


def _keep_heap_memory() -> None:
    """Worker processes only: let glibc serve the chunk buffers from its heap and keep them
    (M_MMAP_THRESHOLD = -3, M_TRIM_THRESHOLD = -1), so no chunk pays for fresh page faults."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 20)
        libc.mallopt(-1, 256 << 20)
    except (OSError, AttributeError):  # not glibc: only slower
        pass


def _init_worker(queue, threads: int, plan: Plan) -> None:
    # The plan travels once per worker, not once per task (it lists every tensor).
    _worker_state.update(queue=queue, plan=plan)
    torch.set_num_threads(threads)
    _keep_heap_memory()


def _worker_task(group_index: int, out_dir: str, done: dict):
    plan = _worker_state["plan"]
    return _run_group(plan, plan.groups[group_index], out_dir, done, _worker_state["queue"].put)


# ------------------------------------------------------------------------------- progress
class _Progress:
    """tqdm when installed, else a plain stderr line every second (only on a terminal)."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.n, self.desc, self.last = total, 0, desc, 0.0
        self.bar = None
        self.enabled = enabled
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            self.enabled = sys.stderr.isatty()
            return
        self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                        dynamic_ncols=True, file=sys.stderr, disable=None)  # None: off if no TTY

    def update(self, n: int) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last > 1.0:
            self.last = time.monotonic()
            print(f"\r{self.desc}: {self.n / 2**30:.2f} / {self.total / 2**30:.2f} GiB "
                  f"({100 * self.n / max(self.total, 1):.0f}%)", end="", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


# ---------------------------------------------------------------------------- orchestration
def _write_json(path: str, obj, indent: Optional[int] = 1) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove_tmp_files(out_dir: str) -> None:
    for root, _, files in os.walk(out_dir):
        for name in files:
            if name.endswith((".safetensors.tmp", ".json.tmp")) or name.startswith(".copy-"):
                os.remove(os.path.join(root, name))


def _resume_state(out_dir: str, plan: Plan) -> dict[str, dict]:
    """Finished files recorded by an earlier run of the same plan ({} for a fresh directory)."""
    if not os.path.exists(out_dir):
        return {}
    if not os.path.isdir(out_dir):
        raise ConvertError(f"{out_dir}: exists and is not a directory")
    progress, manifest = os.path.join(out_dir, PROGRESS), os.path.join(out_dir, MANIFEST)
    for path, sha_of in ((progress, lambda d: d.get("plan_sha256")),
                         (manifest, lambda d: d.get("converter", {}).get("plan_sha256"))):
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    state = json.load(f)
            except (json.JSONDecodeError, OSError) as e:
                raise ConvertError(f"{path}: unreadable ({e}); remove {out_dir} to start over") from None
            if sha_of(state) != plan.sha256:
                held = state.get("options") or {
                    "dtype": state.get("dtype"), "tp": state.get("layout", {}).get("tp"),
                    "ep": state.get("layout", {}).get("ep"), "keep_mtp": state.get("keep_mtp")}
                raise ConvertError(
                    f"{out_dir}: holds a conversion of other inputs or options ({held}, plan "
                    f"{str(sha_of(state))[:12]}; this one {plan.sha256[:12]}); remove it or "
                    "choose another --out")
            return {rel: {"sha256": rec["sha256"], "bytes": rec["bytes"]}
                    for rel, rec in state.get("files", {}).items()}
    if [n for n in os.listdir(out_dir) if not n.endswith(".tmp")]:
        raise ConvertError(f"{out_dir}: exists, is not empty and holds no conversion ({PROGRESS} "
                           f"or {MANIFEST}); refusing to write into it")
    return {}


def _copied_files(src: str) -> list[str]:
    return sorted(n for n in os.listdir(src) if os.path.isfile(os.path.join(src, n))
                  and any(fnmatch.fnmatch(n, p) for p in COPIED_FILES))


def _copy_file(src_path: str, dst_path: str) -> None:
    tmp = os.path.join(os.path.dirname(dst_path), ".copy-" + os.path.basename(dst_path))
    shutil.copyfile(src_path, tmp)
    os.replace(tmp, dst_path)


def _manifest(plan: Plan, records: dict[str, dict], extra: dict[str, str],
              rank: Optional[int]) -> dict:
    from . import __version__

    prefix = plan.layout.rank_dir(rank) if rank is not None else ""
    files = {}
    for f in plan.files():
        if rank is not None and f.rank != rank:
            continue
        rel = os.path.relpath(f.relpath, prefix) if prefix else f.relpath
        files[rel] = {**records[f.relpath], "rank": f.rank, "tensors": {
            t.key: {"dtype": t.dtype, "shape": list(t.shape), "split": t.split,
                    "full_shape": list(t.full_shape),
                    **({"slice": list(t.slice)} if t.slice is not None else {})}
            for t in f.tensors}}
    man = {"format": FORMAT,
           "converter": {"dsa_ascend": __version__, "plan_sha256": plan.sha256},
           "source": plan.source, "dtype": plan.dtype, "keep_mtp": plan.keep_mtp,
           "config": plan.config,
           "layout": plan.layout.as_json(ModelConfig.from_hf(plan.config))}
    if rank is not None:
        man["rank"] = rank
    man["extra_files"] = extra
    man["files"] = files
    return man


def _finalize(out_dir: str, plan: Plan, records: dict[str, dict]) -> None:
    """Index, config, tokenizer and manifests of every rank directory, then the top manifest."""
    world = plan.layout.world_size
    copied = _copied_files(plan.src)
    top_extra = {}
    for r in range(world) if world > 1 else [None]:
        d = os.path.join(out_dir, plan.layout.rank_dir(r)) if r is not None else out_dir
        os.makedirs(d, exist_ok=True)
        files = [f for f in plan.files() if r is None or f.rank == r]
        weight_map = {t.key: os.path.basename(f.relpath) for f in files for t in f.tensors}
        _write_json(os.path.join(d, INDEX_FILE),
                    {"metadata": {"total_size": sum(f.nbytes for f in files)},
                     "weight_map": weight_map}, indent=2)
        _write_json(os.path.join(d, "config.json"), plan.config, indent=2)
        for name in copied:
            _copy_file(os.path.join(plan.src, name), os.path.join(d, name))
        extra = {n: _sha256_file(os.path.join(d, n)) for n in ("config.json", INDEX_FILE, *copied)}
        if r is not None:
            _write_json(os.path.join(d, MANIFEST), _manifest(plan, records, extra, r))
        else:
            top_extra = extra
    if world > 1:
        _write_json(os.path.join(out_dir, "config.json"), plan.config, indent=2)
        for name in copied:
            _copy_file(os.path.join(plan.src, name), os.path.join(out_dir, name))
        top_extra = {n: _sha256_file(os.path.join(out_dir, n)) for n in ("config.json", *copied)}
    _write_json(os.path.join(out_dir, MANIFEST), _manifest(plan, records, top_extra, None))


def convert_checkpoint(src: str, out: str, dtype: str, tp: int = 1, ep: Optional[int] = None,
                       keep_mtp: bool = False, workers: Optional[int] = None,
                       progress: bool = True) -> dict:
    """Convert the HF directory ``src`` into ``out`` (see the module docstring).

    ``ep`` defaults to ``tp`` (DeepSeek's layout: experts split over the same ranks);
    ``workers``: processes converting shards in parallel, default the CPU count (capped by the
    shards to convert); 0 converts in this process (small checkpoints, tests). A rerun on the
    same ``out`` resumes. Returns a summary: files written / skipped, bytes in / out, seconds.
    """
    t0 = time.perf_counter()
    layout = Layout(tp, tp if ep is None else ep)
    plan = plan_conversion(src, dtype, layout, keep_mtp)
    done = _resume_state(out, plan)
    os.makedirs(out, exist_ok=True)
    _remove_tmp_files(out)
    progress_path = os.path.join(out, PROGRESS)
    options = {"dtype": dtype, "tp": layout.tp, "ep": layout.ep, "keep_mtp": keep_mtp}
    _write_json(progress_path, {"format": FORMAT, "plan_sha256": plan.sha256, "options": options,
                                "files": done})

    groups = [g for g in plan.groups if g.outputs]
    if workers is None:
        workers = os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConvertError(f"--workers must be a non-negative integer, got {workers!r}")
    workers = min(workers, len(groups))
    bar = _Progress(sum(g.nbytes for g in groups), f"convert -> {dtype}", progress)
    written = skipped = 0

    def finished(result) -> None:
        nonlocal written, skipped
        _, was_skipped, records = result
        done.update(records)
        if was_skipped:
            skipped += len(records)
        else:
            written += len(records)
        _write_json(progress_path, {"format": FORMAT, "plan_sha256": plan.sha256,
                                    "options": options, "files": done})

    try:
        if workers == 0:
            for g in groups:
                finished(_run_group(plan, g, out, done, bar.update))
        else:
            ctx = multiprocessing.get_context("spawn")
            queue = ctx.Queue()
            threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
            with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                        initargs=(queue, threads, plan)) as pool:
                pending = {pool.submit(_worker_task, g.index, out,
                                       {f.relpath: done.get(f.relpath) for f in g.outputs})
                           for g in groups}
                try:
                    while pending:
                        ready, pending = cf.wait(pending, timeout=0.2,
                                                 return_when=cf.FIRST_COMPLETED)
                        while not queue.empty():
                            bar.update(queue.get())
                        for fut in ready:
                            finished(fut.result())
                    while not queue.empty():
                        bar.update(queue.get())
                except BaseException:
                    for fut in pending:
                        fut.cancel()
                    raise
    finally:
        bar.close()
    _finalize(out, plan, done)
    os.remove(progress_path)
    seconds = time.perf_counter() - t0
    return {"out": out, "dtype": dtype, "tp": layout.tp, "ep": layout.ep,
            "world_size": layout.world_size, "files_written": written, "files_skipped": skipped,
            "bytes_in": sum(g.nbytes for g in groups),
            "bytes_out": sum(f.nbytes for f in plan.files()), "workers": workers,
            "seconds": seconds}


# ---------------------------------------------------------------------------------- verify
def _load_manifest(path: str) -> dict:
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise ConvertError(f"{path}: not a directory")
    if not os.path.exists(mpath):
        raise ConvertError(f"{path}: no {MANIFEST} (not written by dsa-ascend convert, or the "
                           "conversion did not finish: rerun it)")
    try:
        with open(mpath, encoding="utf-8") as f:
            man = json.load(f)
    except (json.JSONDecodeError, OSError) as e:
        raise ConvertError(f"{mpath}: unreadable ({e})") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise ConvertError(f"{mpath}: format {man.get('format') if isinstance(man, dict) else None!r}"
                           f" is not {FORMAT!r}")
    return man


def _expected_rank_tensors(config: ModelConfig, expected: tuple[dict, set], dtype: str,
                           layout: Layout, rank: int,
                           mtp_keys: list[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape on this rank, dtype class) implied by config.json, target and layout.
    dtype class: a safetensors dtype, or "float" (any float dtype: copied tensors)."""
    params, quantizable = dict(expected[0]), set(expected[1])
    for key in mtp_keys:
        tmpl = _mtp_template(key, config, params, quantizable)
        if tmpl is not None:
            params[key] = tmpl[0]
            if tmpl[1]:
                quantizable.add(key)
    out = {}
    fmt = {"fp8": "fp8", "int8": "int8"}.get(dtype, "")
    for key, shape in params.items():
        piece = weight_piece(key, shape, layout, rank, config.n_routed_experts)
        if piece is None:
            continue
        quant = key in quantizable
        out[key] = (piece.shape(shape), {"fp8": FP8, "int8": INT8, "bf16": BF16}[dtype]
                    if quant else "float")
        if quant and fmt:
            item_scale = ((-(-shape[0] // WEIGHT_BLOCK), -(-shape[1] // WEIGHT_BLOCK))
                          if fmt == "fp8" else (shape[0],))
            sk = key + (SCALE_SUFFIX if fmt == "fp8" else INT8_SCALE_SUFFIX)
            out[sk] = (scale_piece(piece, fmt).shape(item_scale), F32)
    return out


def verify_checkpoint(path: str, progress: bool = True) -> dict:
    """Re-read a converted directory (the top one, or one rank directory): every file's size and
    sha256, every header against the manifest, the index json against the shards, and key
    coverage, shapes and dtypes against config.json, the dtype and the layout. Raises
    ConvertError listing every problem; returns a summary."""
    man = _load_manifest(path)
    problems: list[str] = []
    layout_j = man["layout"]
    layout = Layout(layout_j["tp"], layout_j["ep"])
    rank_only = man.get("rank")
    try:
        config = ModelConfig.from_file(os.path.join(path, "config.json"))
    except CheckpointError:
        raise
    except ValueError as e:
        raise ConvertError(str(e)) from None
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        if json.load(f) != man["config"]:
            problems.append(f"{path}/config.json: differs from the config in {MANIFEST}")

    files = man["files"]
    present = set()
    for root, _, names in os.walk(path):
        for n in names:
            if n.endswith(".safetensors"):
                present.add(os.path.relpath(os.path.join(root, n), path))
    for rel in sorted(present - set(files)):
        problems.append(f"{os.path.join(path, rel)}: not listed in {MANIFEST}")

    total = sum(rec["bytes"] for rel, rec in files.items() if rel in present)
    bar = _Progress(total, "verify", progress)
    try:
        for rel, rec in files.items():
            fpath = os.path.join(path, rel)
            if rel not in present:
                problems.append(f"{fpath}: missing")
                continue
            size = os.path.getsize(fpath)
            if size != rec["bytes"]:
                problems.append(f"{fpath}: {size} bytes, the manifest says {rec['bytes']}")
                bar.update(size)
                continue
            try:
                _, header = _read_layout(fpath)
            except ConvertError as e:
                problems.append(str(e))
                continue
            got = {k: (v[0], list(v[1])) for k, v in header.items()}
            want = {k: (t["dtype"], t["shape"]) for k, t in rec["tensors"].items()}
            if got != want:
                diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
                problems.append(f"{fpath}: header disagrees with the manifest on {diff[:5]}")
            sha = _sha256_file(fpath, bar.update)
            if sha != rec["sha256"]:
                problems.append(f"{fpath}: sha256 {sha[:16]}... differs from the manifest's "
                                f"{rec['sha256'][:16]}... (corrupted or modified)")
    finally:
        bar.close()
    for name, sha in man.get("extra_files", {}).items():
        fpath = os.path.join(path, name)
        if not os.path.exists(fpath):
            problems.append(f"{fpath}: missing")
        elif name != "config.json" and _sha256_file(fpath) != sha:
            problems.append(f"{fpath}: sha256 differs from the manifest's")

    ranks = [rank_only] if rank_only is not None else list(range(layout.world_size))
    expected = expected_tensors(config)
    n_tensors = 0
    for r in ranks:
        d = path if rank_only is not None or layout.world_size == 1 else os.path.join(
            path, layout.rank_dir(r))
        try:
            infos = read_headers(d)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        mtp = [k for k in infos if _is_mtp(k, config.n_layers) and not is_scale_key(k)]
        if mtp and not man.get("keep_mtp"):
            problems.append(f"{d}: holds MTP tensors {mtp[:3]} but keep_mtp is false")
        want = _expected_rank_tensors(config, expected, man["dtype"], layout, r, mtp)
        missing = [k for k in want if k not in infos]
        extra = [k for k in infos if k not in want and not (_is_mtp(k, config.n_layers)
                                                          and man.get("keep_mtp"))]
        if missing:
            problems.append(f"{d}: missing tensor(s) {missing[:5]}"
                            + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        if extra:
            problems.append(f"{d}: unexpected tensor(s) {extra[:5]}")
        for key, (shape, dclass) in want.items():
            info = infos.get(key)
            if info is None:
                continue
            n_tensors += 1
            if info.shape != shape:
                problems.append(f"{info.file}: tensor {key!r} has shape {list(info.shape)}, "
                                f"config.json and the layout imply {list(shape)}")
            st = next(s for s, t in SAFETENSORS_DTYPES.items() if t == info.dtype)
            if (dclass == "float" and st not in FLOAT_ST) or (dclass != "float" and st != dclass):
                problems.append(f"{info.file}: tensor {key!r} has dtype {st}, expected "
                                f"{'a float dtype' if dclass == 'float' else dclass}")
    if problems:
        raise ConvertError(f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return {"path": path, "files": len(files), "tensors": n_tensors, "bytes": total,
            "dtype": man["dtype"], "tp": layout.tp, "ep": layout.ep}


# ------------------------------------------------------------------------------ reassemble
def iter_reassembled(path: str, keys: Optional[list[str]] = None) -> Iterator[tuple[str, Tensor]]:
    """The full (unsharded) tensors of the converted directory ``path``, one at a time, joined
    from the rank directories by each tensor's manifest ``slice``; replicated copies must agree
    bit for bit and the slices must cover the tensor. What a distributed loader inverts."""
    from safetensors import safe_open

    man = _load_manifest(path)
    if man.get("rank") is not None:
        raise ConvertError(f"{path}: a rank directory; reassemble its parent")
    where: dict[str, list[tuple[str, dict]]] = {}
    for rel, rec in man["files"].items():
        for key, t in rec["tensors"].items():
            where.setdefault(key, []).append((rel, t))
    handles: dict[str, object] = {}
    try:
        for key in sorted(where if keys is None else keys, key=_natural):
            if key not in where:
                raise ConvertError(f"{path}: no tensor {key!r}")
            full, covered = None, {}
            for rel, t in where[key]:
                if rel not in handles:
                    handles[rel] = safe_open(os.path.join(path, rel), framework="pt").__enter__()
                part = handles[rel].get_tensor(key)
                if full is None:
                    full = torch.empty(t["full_shape"], dtype=part.dtype)
                sl = t.get("slice")
                region = (full if sl is None else full.narrow(sl[0], sl[1], sl[2] - sl[1]))
                span = (None, 0, 0) if sl is None else tuple(sl)
                if span in covered:
                    if not _same_bits(covered[span], part):
                        raise ConvertError(f"{path}: copies of {key!r} {span} differ between "
                                           f"{rel} and another rank")
                    continue
                region.copy_(part)
                covered[span] = part
            spans = sorted(s for s in covered if s[0] is not None)
            if (None, 0, 0) not in covered:
                dim = spans[0][0]
                pos = 0
                for d, a, b in spans:
                    if d != dim or a != pos:
                        raise ConvertError(f"{path}: slices of {key!r} do not tile it: {spans}")
                    pos = b
                if pos != full.shape[dim]:
                    raise ConvertError(f"{path}: slices of {key!r} cover {pos} of "
                                       f"{full.shape[dim]}")
            yield key, full
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)


def _same_bits(a: Tensor, b: Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def reassemble(path: str, keys: Optional[list[str]] = None) -> dict[str, Tensor]:
    """``iter_reassembled`` into a dict (small checkpoints and tests)."""
    return dict(iter_reassembled(path, keys))
