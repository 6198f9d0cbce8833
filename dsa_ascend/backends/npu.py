"""The ``npu`` backend: our AscendC operators or torch_npu's built-ins (see the CANN issue).

Probing never imports torch_npu eagerly: without the CANN toolkit its import fails and, through
torch's device-backend autoload, would take ``import torch`` down with it.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Optional

import torch

IMPLS: dict = {}


def _torch_npu_reason() -> Optional[str]:
    if importlib.util.find_spec("torch_npu") is None:
        return "torch_npu is not installed (pip install '.[npu]' on a machine with CANN)"
    try:
        importlib.import_module("torch_npu")
    except Exception as e:  # noqa: BLE001 - any import failure is a reason to report
        return f"torch_npu failed to import ({type(e).__name__}: {e}); is CANN installed/sourced?"
    if not (hasattr(torch, "npu") and torch.npu.is_available()):
        return "torch_npu sees no NPU (torch.npu.is_available() is False)"
    return None


def unavailable_reason(device: Optional[torch.device]) -> Optional[str]:
    if device is not None and device.type != "npu":
        return f"it runs on Ascend NPUs only (got {device.type!r})"
    reason = _torch_npu_reason()
    if reason is not None:
        return reason
    return "its operators are not part of this build yet (ops/ascendc is empty)"
