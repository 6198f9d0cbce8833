"""Backend registry: name -> implementations of every ``dsa`` op, with availability reasons.

A backend is a module here exposing ``unavailable_reason(device) -> str | None`` and ``IMPLS``
(op name -> function). Adding one touches only this table and its own module.
"""

from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch

BACKENDS = {
    "reference": "dsa_ascend.backends.reference",
    "cuda": "dsa_ascend.backends.cuda",
    "npu": "dsa_ascend.backends.npu",
}
# Best-available order per device type (reference always works).
_PREFERENCE = {"cuda": ("cuda", "reference"), "npu": ("npu", "reference")}


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says what is missing."""


_cache: dict[str, dict[str, Callable]] = {}


def _module(name: str):
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])


def unavailable_reason(name: str, device: Optional[torch.device] = None) -> Optional[str]:
    """None when ``name`` can run on ``device`` (default: the backend's own device), else why not."""
    try:
        mod = _module(name)
    except BackendUnavailable as e:
        return str(e)
    return mod.unavailable_reason(device)


def implementations(name: str) -> dict[str, Callable]:
    """The op table of backend ``name``; raises BackendUnavailable with the reason."""
    if name not in _cache:
        mod = _module(name)
        reason = mod.unavailable_reason(None)
        if reason is not None:
            raise BackendUnavailable(f"backend {name!r} is unavailable: {reason}")
        from ..ops import OP_NAMES

        lacking = [op for op in OP_NAMES if op not in mod.IMPLS]
        if lacking:
            raise BackendUnavailable(f"backend {name!r} lacks implementations of {lacking}")
        _cache[name] = dict(mod.IMPLS)
    return _cache[name]


# Indexer modes of a backend module that declares no INDEXER_DTYPES (preferred first).
_DEFAULT_INDEXER_DTYPES = ("fp8", "bf16")


def indexer_dtype(name: str, requested: str) -> str:
    """The indexer mode backend ``name`` runs for ``requested`` (RunConfig.indexer_dtype): the
    backend's preferred mode for "auto" (the first of its module's ``INDEXER_DTYPES``), else
    ``requested`` if the backend has it; a mode it lacks is an error naming the option."""
    supported = tuple(getattr(_module(name), "INDEXER_DTYPES", _DEFAULT_INDEXER_DTYPES))
    if requested == "auto":
        return supported[0]
    if requested not in supported:
        raise BackendUnavailable(
            f"backend {name!r} does not run indexer_dtype={requested!r}: choose one of "
            f"{'|'.join(supported)} (or 'auto' = {supported[0]!r})")
    return requested


def resolve(name: Optional[str], device: torch.device) -> str:
    """The backend to use: ``name`` if it can run on ``device`` (else a clear error), or the best
    available one for the device when ``name`` is None."""
    if name is None:
        for candidate in _PREFERENCE.get(device.type, ("reference",)):
            if unavailable_reason(candidate, device) is None:
                return candidate
        return "reference"
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} cannot run on device {str(device)!r}: {reason}")
    return name
