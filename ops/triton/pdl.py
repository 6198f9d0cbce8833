"""Programmatic dependent launch (PDL, sm90+): a kernel launched with ``launch_pdl`` may be
scheduled while the kernel before it in the stream is still finishing; it waits at ``grid_dep``
(griddepcontrol.wait: the previous kernel done, its writes visible) before touching global
memory, and may then let the next kernel launch (griddepcontrol.launch_dependents). In a CUDA
graph the launches keep programmatic edges, so a chain of dependent kernels loses part of its
kernel-to-kernel gaps. Every kernel launched with PDL calls ``grid_dep`` first, so a chain stays
ordered through kernels that run without it.

H200, CUDA graphs, same process (BENCHMARKS.md, session 15): six dependent small kernels 12.5 ->
10.3 us with the early release (11.8 with the wait alone); the decode indexer + top-k at 128K
(plan, logits, four select kernels) B=1 36.0 -> 33.5 us, B=32 202.7 -> 201.3, B=64 367.1 ->
366.4, B=128 698 -> 697, outputs bit-identical. The early release on every kernel lost on large
grids (B=32 206.4, B=64 373.2 us), hence ``pdl_level``'s rule.
"""

from __future__ import annotations

import functools
import os

import torch

import triton
import triton.language as tl

try:  # Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    _GDC = True
except ImportError:  # pragma: no cover - depends on the Triton build
    _GDC = False


@functools.lru_cache(maxsize=None)
def _device_info(index: int) -> tuple[bool, int]:
    props = torch.cuda.get_device_properties(index)
    return props.major >= 9, props.multi_processor_count


def device_info(t: torch.Tensor) -> tuple[bool, int]:
    """(sm90 or newer, SM count) of the CUDA device ``t`` is on (cached per device)."""
    return _device_info(t.device.index if t.device.index is not None else torch.cuda.current_device())


def pdl_level(t: torch.Tensor, programs: int) -> int:
    """The PDL form of a launch of ``programs`` programs over ``t``: its ``PDL`` constexpr, with
    ``**launch_opts(level)``. 0: plain; 1: wait for the previous kernel at the top; 2: also
    release the next kernel at once, so its launch overlaps this kernel. PDL needs a CUDA tensor
    on sm90+ and no Triton interpreter. Default: 2 for a grid of at most one program a SM, else 1
    (the early release loses on large grids: the next kernel's programs wait in SM slots this
    one's programs need; H200, decode indexer + top-k at 128K, BENCHMARKS.md session 15).
    ``DSA_PDL`` overrides: 0 off, 1 wait only, 2 early release everywhere."""
    mode = os.environ.get("DSA_PDL", "auto")
    if not _GDC or t.device.type != "cuda" or mode == "0":
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return 0
    sm90, sms = device_info(t)
    if not sm90:
        return 0
    if mode in ("1", "2"):
        return int(mode)
    return 2 if programs <= sms else 1


def launch_opts(level: int) -> dict:
    """The launch keyword of a ``pdl_level``: none for 0, so Triton builds without PDL (before
    3.4) never see it."""
    return {"launch_pdl": True} if level > 0 else {}


if _GDC:
    @triton.jit
    def grid_dep(PDL: tl.constexpr):
        """First in a kernel launched with ``launch_pdl=PDL > 0``: wait for the previous kernel
        (PDL >= 1), then release the next (PDL == 2)."""
        if PDL >= 1:
            gdc_wait()
        if PDL >= 2:
            gdc_launch_dependents()
else:  # pragma: no cover
    @triton.jit
    def grid_dep(PDL: tl.constexpr):
        pass


__all__ = ["device_info", "grid_dep", "launch_opts", "pdl_level"]
