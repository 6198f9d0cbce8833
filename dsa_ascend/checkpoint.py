"""HF checkpoint directory -> model weights, with errors that name the file and the tensor.

Layout: ``config.json`` + ``model.safetensors``, or shards listed by
``model.safetensors.index.json``. Every header is read and checked (coverage, shapes, dtypes,
FP8 / int8 scales) before any tensor is loaded; tensors are then read one at a time.
FP8 weights stay FP8 in memory and are dequantized on the fly by ``dsa.fp8_linear``; int8
weights (W8A8 conversions, ``<linear>.weight_scale`` float32 [out] beside them) stay int8 and
run through ``dsa.int8_linear``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .quant import FP8_DTYPE

log = logging.getLogger("dsa_ascend")

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"  # "<linear>.weight_scale_inv" sits beside an FP8 "<linear>.weight"
INT8_SCALE_SUFFIX = "_scale"  # "<linear>.weight_scale" float32 [out] beside an int8 "<linear>.weight"

SAFETENSORS_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BF16": torch.bfloat16,
    "F16": torch.float16, "F32": torch.float32, "F64": torch.float64, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
QUANTIZED_DTYPES = (torch.float8_e4m3fn, torch.int8)


class CheckpointError(ValueError):
    """A checkpoint directory that does not hold what config.json describes."""


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def _open(path: str):
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def read_headers(path: str) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint directory ``path``: key -> (file, dtype, shape)."""
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{index_path}: not valid JSON ({e})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise CheckpointError(f"{index_path}: needs a 'weight_map' object of key -> file name")
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(path, SINGLE_FILE)):
        index_path, weight_map, files = None, None, [SINGLE_FILE]
    else:
        raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")

    infos: dict[str, TensorInfo] = {}
    for name in files:
        file = os.path.join(path, name)
        if os.path.sep in os.path.normpath(name) or not os.path.exists(file):
            raise CheckpointError(f"{index_path}: lists shard {name!r}, which is not in {path}")
        with _open(file) as f:
            for key in f.keys():
                sl = f.get_slice(key)
                dtype = SAFETENSORS_DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise CheckpointError(f"{file}: tensor {key!r} has unsupported dtype "
                                          f"{sl.get_dtype()}")
                if key in infos:
                    raise CheckpointError(f"tensor {key!r} appears in both {infos[key].file} and "
                                          f"{file}")
                infos[key] = TensorInfo(file, dtype, tuple(sl.get_shape()))
    if weight_map is not None:
        for key, name in weight_map.items():
            info = infos.get(key)
            if info is None or os.path.basename(info.file) != name:
                where = f"it is in {info.file}" if info else "no shard holds it"
                raise CheckpointError(f"{index_path}: maps {key!r} to {name!r}, but {where}")
        stray = sorted(set(infos) - set(weight_map))
        if stray:
            raise CheckpointError(f"{infos[stray[0]].file}: holds {stray[:3]} (and "
                                  f"{max(0, len(stray) - 3)} more) not listed in {index_path}")
    return infos


def _is_ignored_layer(key: str, n_layers: int) -> bool:
    m = re.match(r"model\.layers\.(\d+)\.", key)
    return m is not None and int(m.group(1)) >= n_layers


def _resolve(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    module_path, _, attr = key.rpartition(".")
    return model.get_submodule(module_path), attr


def check_scale(infos: dict[str, TensorInfo], key: str, shape: tuple[int, ...]) -> str:
    """The scale tensor of the quantized weight ``key`` ([out, in], FP8 or int8), checked:
    FP8 needs ``<key>_scale_inv`` float32 [ceil(out/128), ceil(in/128)], int8 needs
    ``<key>_scale`` float32 [out]. Returns the scale's key."""
    info = infos[key]
    out_f, in_f = shape
    if info.dtype == FP8_DTYPE:
        kind, scale_key, want = "FP8", key + SCALE_SUFFIX, (-(-out_f // 128), -(-in_f // 128))
    else:
        kind, scale_key, want = "int8", key + INT8_SCALE_SUFFIX, (out_f,)
    if scale_key not in infos:
        raise CheckpointError(f"{info.file}: {kind} tensor {key!r} has no {scale_key!r}")
    s = infos[scale_key]
    if s.dtype != torch.float32 or s.shape != want:
        raise CheckpointError(f"{s.file}: tensor {scale_key!r} must be float32 "
                              f"{list(want)}, got {s.dtype} {list(s.shape)}")
    return scale_key


def is_scale_key(key: str) -> bool:
    """FP8 block scales (``*_scale_inv``) and int8 channel scales (``*_scale``); no parameter of
    the model ends so."""
    return key.endswith(SCALE_SUFFIX) or key.endswith(INT8_SCALE_SUFFIX)


def check_tensors(model: nn.Module, infos: dict[str, TensorInfo], path: str) -> dict[str, str]:
    """Check the headers ``infos`` (``read_headers``) against ``model``'s parameters: coverage,
    shapes, dtypes, scales. Tensors of layers >= n_layers (the MTP module) are not checked.
    Returns quantized weight key -> its scale key (FP8 ``weight_scale_inv`` or int8
    ``weight_scale``); every other parameter is float."""
    from .model.layers import Linear

    n_layers = model.config.n_layers
    ignored = {k for k in infos if _is_ignored_layer(k, n_layers)}
    expected = dict(model.named_parameters())
    linears = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, Linear)}

    missing = [k for k in expected if k not in infos]
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {missing[:5]}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    scales = {k for k in infos if is_scale_key(k) and k not in ignored and k not in expected}
    extra = [k for k in infos if k not in expected and k not in scales and k not in ignored]
    if extra:
        raise CheckpointError(f"{infos[extra[0]].file}: unexpected tensor(s) {extra[:5]}"
                              + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))

    quantized = {}
    for key, param in expected.items():
        info = infos[key]
        if info.shape != tuple(param.shape):
            raise CheckpointError(f"{info.file}: tensor {key!r} has shape {list(info.shape)}, "
                                  f"config.json implies {list(param.shape)}")
        linear = linears.get(key)
        if info.dtype in QUANTIZED_DTYPES and linear is not None and linear.quantizable:
            quantized[key] = check_scale(infos, key, tuple(param.shape))
        elif info.dtype not in FLOAT_DTYPES:
            allowed = ("float8_e4m3fn, int8 or " if linear is not None and linear.quantizable
                       else "")
            raise CheckpointError(f"{info.file}: tensor {key!r} has dtype {info.dtype}, expected "
                                  f"{allowed}bfloat16/float16/float32")
    orphans = sorted(scales - set(quantized.values()))
    if orphans:
        raise CheckpointError(f"{infos[orphans[0]].file}: scale tensor(s) {orphans[:3]} belong to "
                              "no FP8 or int8 weight")
    return quantized


def load_weights(model: nn.Module, path: str, device: torch.device,
                 fp8_act_quant: object = "auto") -> None:
    """Check every header against ``model``'s parameters, then load the tensors onto ``device``.

    ``model`` is built on the meta device; each parameter is replaced by its checkpoint tensor,
    cast to the parameter's dtype, except FP8 and int8 weights of quantizable linears, which are
    kept as stored with their scales (FP8 128x128 blocks; int8 one per output channel).
    """
    n_layers = model.config.n_layers
    infos = read_headers(path)
    ignored = sorted(k for k in infos if _is_ignored_layer(k, n_layers))
    if ignored:
        log.info("ignoring %d tensors of layer(s) >= %d (the MTP module): not used for inference",
                 len(ignored), n_layers)
    quantized = check_tensors(model, infos, path)
    read_weights(model, infos, quantized, device, fp8_act_quant)


def read_weights(model: nn.Module, infos: dict[str, TensorInfo], quantized: dict[str, str],
                 device: torch.device, fp8_act_quant: object = "auto",
                 slices: Optional[dict] = None) -> None:
    """Read every parameter of ``model`` (checked headers ``infos``, ``quantized`` weight key ->
    scale key from ``check_tensors``) onto ``device``. ``slices``: key -> piece (``.dim``,
    ``.start``, ``.stop``) of the stored tensor to read instead of all of it (tensor-parallel
    loading: safetensors ``get_slice`` reads only those bytes)."""
    expected = dict(model.named_parameters())
    slices = slices or {}
    act_quant = fp8_act_quant in ("auto", True)
    by_file: dict[str, list[str]] = {}
    for key in expected:
        by_file.setdefault(infos[key].file, []).append(key)
    for key in expected:
        if key in quantized:
            by_file.setdefault(infos[quantized[key]].file, [])
    handles = {}
    try:
        for file in by_file:
            handles[file] = _open(file).__enter__()

        def read(key: str) -> torch.Tensor:
            info, piece = infos[key], slices.get(key)
            try:
                if piece is None:
                    return handles[info.file].get_tensor(key)
                index = (slice(None),) * piece.dim + (slice(piece.start, piece.stop),)
                return handles[info.file].get_slice(key)[index].contiguous()
            except (SafetensorError, OSError, RuntimeError) as e:
                raise CheckpointError(f"{info.file}: cannot read tensor {key!r} ({e})") from None

        for keys in by_file.values():  # file by file: one shard's pages in flight at a time
            for key in keys:
                module, attr = _resolve(model, key)
                tensor = read(key)
                if key in quantized and tensor.dtype == FP8_DTYPE:
                    module.set_fp8_weight(tensor.to(device), read(quantized[key]).to(device),
                                          act_quant)
                elif key in quantized:
                    module.set_int8_weight(tensor.to(device), read(quantized[key]).to(device))
                else:
                    dtype = expected[key].dtype
                    setattr(module, attr, nn.Parameter(tensor.to(device=device, dtype=dtype),
                                                       requires_grad=False))
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
