"""dsa_ascend: DeepSeek-V3.2-Exp inference with DeepSeek Sparse Attention on CUDA and Ascend
from one model graph; the backend (reference | cuda | npu) is a config switch."""

from __future__ import annotations

import logging
import os
from typing import Optional, Union

import torch

from . import ops  # noqa: F401  (registers the dsa:: custom ops)
from .backends import BackendUnavailable, resolve
from .checkpoint import CheckpointError, load_weights
from .config import ConfigError, ModelConfig, RunConfig, model_config_from_dir, preset
from .engine import Completion, generate
from .model.transformer import Transformer
from .parallel import load_slices, plan_load

__all__ = ["load", "generate", "Completion", "Transformer", "ModelConfig", "RunConfig", "preset",
           "ConfigError", "CheckpointError", "BackendUnavailable"]
__version__ = "0.1.0"
log = logging.getLogger("dsa_ascend")


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load(path: str, backend: Optional[str] = None, device: Union[str, torch.device, None] = None,
         dtype: torch.dtype = torch.bfloat16, max_seq_len: Optional[int] = None,
         max_batch_size: int = 8, tp: Optional[int] = None, ep: Optional[int] = None,
         **run_options) -> Transformer:
    """Load an HF-format DeepSeek-V3.2-Exp directory (config.json + safetensors) for inference.

    backend: "reference" | "cuda" | "npu" | None (best available for ``device``).
    tp, ep: tensor- and expert-parallel degrees of a multi-device run (one process per device,
    started by torchrun; see ``dsa_ascend.parallel``). Default: every process of the job for
    both, or the layout of a converter output split over ranks (``dsa_manifest.json``), whose
    rank directories each rank then reads; an HF directory is read in per-rank slices. An
    accelerator ``device`` without an index becomes the rank's LOCAL_RANK device.
    run_options: the other ``RunConfig`` fields (block_size, indexer_dtype, mla_form, ...).
    The returned model's ``forward(tokens [B, S], start_pos)`` gives float32 logits and keeps
    its cache between calls; ``reset()`` clears it.
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    config = model_config_from_dir(path)
    device = torch.device(device) if device is not None else _default_device()
    if max_seq_len is None:
        max_seq_len = min(config.max_position_embeddings, 4096)
    if isinstance(max_seq_len, int) and max_seq_len > config.max_position_embeddings:
        log.warning("max_seq_len=%d exceeds the model's max_position_embeddings=%d: positions "
                    "beyond it were never trained", max_seq_len, config.max_position_embeddings)
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ConfigError(f"dtype must be torch.bfloat16, float16 or float32, got {dtype}")
    unknown = set(run_options) - {f for f in RunConfig.__dataclass_fields__}
    if unknown:
        raise ConfigError(f"unknown run option(s) {sorted(unknown)}")
    run = RunConfig(backend=backend, device=str(device), dtype=dtype, max_seq_len=max_seq_len,
                    max_batch_size=max_batch_size, **run_options)
    run.validate()
    name = resolve(backend, device)
    parallel, device, rank_dir = plan_load(path, config, tp, ep, device, run.debug_parallel)
    run.device = str(device)
    model = Transformer(config, run, backend=name, dtype=dtype, parallel=parallel)
    if parallel.world_size > 1 and rank_dir is None:
        load_slices(model, path, device, run.fp8_act_quant)
    else:
        load_weights(model, rank_dir or path, device, run.fp8_act_quant)
    model.init_runtime()
    model.eval()
    tok = os.path.join(path, "tokenizer.json")
    if os.path.exists(tok):
        from tokenizers import Tokenizer

        model.tokenizer = Tokenizer.from_file(tok)
    return model
