"""The ``cuda`` backend: Triton kernels from ``ops/triton`` (see the CUDA issue).

Until those kernels land this module only reports why it cannot run, so that asking for it gives
a clear error and ``backend=None`` falls back to the reference backend.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

IMPLS: dict = {}


def unavailable_reason(device: Optional[torch.device]) -> Optional[str]:
    if device is not None and device.type != "cuda":
        return f"it runs on CUDA devices only (got {device.type!r})"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (torch.cuda.is_available() is False)"
    if importlib.util.find_spec("triton") is None:
        return "the 'triton' package is not installed"
    return "its Triton kernels are not part of this build yet (ops/triton is empty)"
