"""Thread-block clusters (sm90+) for Gluon kernels compiled for one CTA.

Gluon 3.6 has no cluster API: a kernel built with ``num_ctas > 1`` must give every layout a CTA
split, and its stores are deduplicated over replicated CTAs. So the kernels that cooperate in
clusters (``sparse_mla_sm90``'s pair, ``topk_sm90``'s cluster radix select) are compiled for
one CTA and reach their partners with inline PTX (``mapa``, ``ld.shared::cluster``, remote
mbarrier arrivals, ``barrier.cluster``). ``launch`` makes their launches clusters: Triton's
launcher multiplies grid axis 0 by the compiled kernel's packed ``num_ctas`` and sets the
cluster dimension to it, so that field of the one compiled kernel (its cluster size is one of
its constexprs, so it has its own cache entry) is set to the cluster size. A kernel reads its
rank as ``program_id(0) % size`` (``%cluster_ctarank`` for a cluster along axis 0).
"""

from __future__ import annotations

import gc
import os
import re
import tempfile
from typing import Callable

import torch

# PTX every thread of a cluster's CTAs runs together (released and acquired at cluster scope)
SYNC_PTX = "barrier.cluster.arrive.release; barrier.cluster.wait.acquire; mov.b32 $0, 0;"


def compiled(fn, args: tuple, kwargs: dict):
    """The kernel ``fn[grid](*args, **kwargs)`` would launch: compiled now if it is not cached."""
    kernel = fn.warmup(*args, grid=(1,), **kwargs)
    return kernel.result() if hasattr(kernel, "result") else kernel


def launch(fn, grid: tuple, size: int, args: tuple, kwargs: dict,
           check: Callable[[object], None] | None = None) -> None:
    """Launch ``fn`` over ``grid`` (axis 0 a multiple of ``size``) as clusters of ``size`` CTAs
    along axis 0, on ``args``' first tensor's device. ``check(kernel)`` runs once per compiled
    kernel, before its first launch (it raises to refuse the launch)."""
    if grid[0] % size:
        raise ValueError(f"cluster.launch: grid axis 0 ({grid[0]}) is not a multiple of the "
                         f"cluster size {size}")
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    with torch.cuda.device(device):  # the patched kernel is the one in this device's cache
        kernel = compiled(fn, args, kwargs)
        if kernel.packed_metadata[1] != size:
            # the launcher sizes a kernel's global and profile scratch by the grid it is given
            # times the compiled num_ctas read at load time (1), so a cluster launch would
            # overrun them: refuse kernels that have any (ours have none)
            scratch = {n: getattr(kernel.metadata, n, 0) or 0
                       for n in ("global_scratch_size", "profile_scratch_size")}
            if any(scratch.values()):
                raise RuntimeError(f"cluster.launch: {fn.__name__} uses global scratch "
                                   f"({scratch}), which a cluster launch would overrun")
            if check is not None:
                check(kernel)
            num_warps, _, shared = kernel.packed_metadata
            kernel.packed_metadata = (num_warps, size, shared)
        fn[(grid[0] // size, *grid[1:])](*args, **kwargs)


def smem_offsets(compiled) -> dict[str, int]:
    """Byte offsets from ``global_smem`` that Triton's allocator gives a compiled kernel's named
    shared-memory allocations (``smem_allocations``' first part)."""
    return smem_allocations(compiled)[0]


def smem_allocations(compiled) -> tuple[dict[str, int], list[int]]:
    """Where Triton's allocator put a compiled kernel's shared memory, as byte offsets from
    ``global_smem``: its named allocations, and the offsets of every scratch buffer (layout
    conversions, reductions, scans). Found by running its TTGIR again through the passes that
    precede the lowering to LLVM, up to the allocation (Triton 3.6's ``make_llir``). The
    allocator overlaps buffers whose live ranges it sees as disjoint, and it does not see inline
    PTX: a kernel whose PTX addresses an allocation checks that no scratch lands in it. Raises
    where this Triton's passes or IR differ, naming what is missing."""
    try:
        from triton._C.libtriton import ir, nvidia, passes
        from triton.backends.nvidia.compiler import get_ptx_version_from_options
    except ImportError as e:  # pragma: no cover - depends on the Triton build
        raise RuntimeError(f"smem_offsets: this Triton has no {e.name}") from e
    meta = compiled.metadata
    ctx = ir.context()
    ir.load_dialects(ctx)
    nvidia.load_dialects(ctx)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.ttgir")
        with open(path, "w") as f:
            f.write(compiled.asm["ttgir"])
        mod = ir.parse_mlir_module(path, ctx)
    mod.context = ctx
    pm = ir.pass_manager(ctx)
    passes.ttgpuir.add_combine_tensor_select_and_if(pm)
    passes.ttgpuir.add_allocate_warp_groups(pm)
    passes.convert.add_scf_to_cf(pm)
    passes.gluon.add_inliner(pm)
    nvidia.passes.ttgpuir.add_allocate_shared_memory_nv(
        pm, meta.target.arch, get_ptx_version_from_options(meta, meta.target.arch))
    pm.run(mod, "smem_offsets")
    text = str(mod)
    del pm, mod  # before their context (else nanobind reports them leaked at exit)
    gc.collect()
    named = {name: int(off) for name, off in re.findall(
        r"%(\w+) = ttg\.local_alloc[^\n]*allocation\.offset = (\d+)", text)}
    scratch = [int(off) for line in text.splitlines() if "ttg.local_alloc" not in line
               for off in re.findall(r"allocation\.offset = (\d+)", line)]
    return named, scratch
