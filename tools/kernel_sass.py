#!/usr/bin/env python3
"""Compile the cuda backend's Triton kernels for sm90 on any machine (no GPU needed) and report
what the hardware will run: registers, shared memory, stack (spills), wgmma waits, and the
instruction mix of every loop. The method behind BENCHMARKS.md's sessions 5 and 10: a loop of
450 instructions a tile with ~250 integer ones (the indexer logits, session 9) is bound by
instruction issue, not by its MMA, and that is visible here before any GPU time is spent.

    python tools/kernel_sass.py [--kernel NAME[,NAME...]] [--sass DIR]

Each preset compiles a kernel with the constexprs, warps and stages its launcher uses by default
at the benchmark sizes, and with the pointer / stride divisibility the JIT would infer there.
The SASS depends on the Triton version (the device image runs 3.6; the report names the one
used). ``--sass DIR`` also writes each kernel's full SASS and PTX there.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# compiled, never interpreted (the interpreter's kernels have no compiler inputs); the CPU
# test setup sets TRITON_INTERPRET=1 for the kernel tests
os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dsa_ascend.backends.cuda import kernels  # noqa: E402

try:  # Gluon kernels compile from their own source type
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon._runtime import GluonJITFunction as _GluonJIT
except ImportError:  # pragma: no cover - depends on the Triton build
    GluonASTSource = _GluonJIT = None

K = kernels()


def _preset(fn, types, constexprs, num_warps, num_stages=1, divisible=(), maxnreg=None,
            smem_base=False, smem_offsets=None, check=None):
    """A kernel, the types of its runtime arguments (the rest are constexprs), its constexprs,
    launch options, and the arguments known to be multiples of 16 (all pointers always are).
    ``smem_base``: the kernel's inline PTX addresses its first shared-memory allocation as
    offset 0 of ``global_smem``; the report checks that (``first_store_at_smem_base``).
    ``smem_offsets``: {constexpr: allocation name} that the kernel's inline PTX addresses (the sparse
    MLA cluster pair's); they are set from a first compile's allocation and checked on the second
    (``cluster.smem_offsets``, ``sparse_mla_sm90.check_pair_offsets``), as its launcher does.
    ``check``: the launcher's own check of the compiled kernel (it raises to refuse it), reported
    as passed or failed."""
    return dict(fn=fn, types=types, constexprs=constexprs, num_warps=num_warps,
                num_stages=num_stages, divisible=divisible, maxnreg=maxnreg, smem_base=smem_base,
                smem_offsets=smem_offsets, check=check)


def first_store_at_smem_base(ptx: str) -> bool:
    """Whether the kernel's first shared-memory store (in program order: the clearing of its
    first allocation) addresses ``global_smem`` plus a per-thread register and no constant, i.e.
    whether Triton placed that allocation at offset 0."""
    m = re.search(r"^\s*(?:st\.shared|stmatrix)[^\[]*\[(%r\d+)(\+\d+)?\]", ptx, re.M)
    if not m or m.group(2):
        return False
    base = re.search(rf"add\.s32\s+{re.escape(m.group(1))},\s*(%r\d+),\s*%r\d+;", ptx)
    regs = [base.group(1)] if base else [m.group(1)]
    return any(re.search(rf"mov\.(?:b|u)32\s+{re.escape(r)},\s*global_smem;", ptx) for r in regs)


def presets() -> dict:
    ix, tk, sm, rp = K.indexer, K.topk, K.sparse_mla, K.rope
    logits_types = dict(Q="*fp8e4nv", W="*fp32", KC="*fp8e4nv", KS="*fp32", BT="*i32",
                        PROG="*i32", OUT="*fp32", HIST="*i32", stride_qt="i32", stride_wt="i32",
                        stride_bt="i32", width="i32", t0="i32", tiles_per_prog="i32")
    logits_div = ("stride_qt", "stride_wt", "stride_bt", "width")
    # PDL=2: both griddepcontrol instructions (pdl.pdl_level; grids of more than one wave run
    # level 1, without the early release)
    logits = dict(H=64, H_PAD=64, D=128, HAS_SCALE=True, IEEE=False, BLOCK_SIZE=64, PDL=2)
    topk_types = dict(S="*fp32", LEN="*i32", HIST="*i32", SEL="*i32", COUNTS="*i32",
                      NCAND="*i32", CAND_S="*fp32", CAND_P="*i32", NSEL="*i32", SEL_P="*i32",
                      THRESH="*i32", OUT="*i32", VALS="*fp32", stride_s="i32", stride_c="i32",
                      stride_o="i32", k="i32", n_chunks="i32", n_cols="i32")
    topk_div = ("stride_s", "stride_c", "stride_o", "n_cols")
    mla_types = dict(Q="*bf16", KV="*bf16", SLOT="*i32", OUT="*bf16", LSE="*fp32",
                     **{n: "i32" for n in ("stride_qt", "stride_qh", "stride_os", "stride_ot",
                                           "stride_oh", "stride_ls", "stride_lt", "H", "K",
                                           "k_per_split")}, scale_log2="fp32")
    mla_div = ("stride_qt", "stride_qh", "stride_os", "stride_ot", "stride_oh", "stride_ls",
               "stride_lt")
    mla = dict(D_NOPE=512, D_ROPE=64, BLOCK_H=64, BLOCK_K=64, IEEE=False)
    sm90 = dict(D_NOPE=512, D_ROPE=64, BLOCK_H=64, BLOCK_K=64, PAIR=False, K_OFF=0, READY_OFF=0,
                FREE_OFF=0)
    return {
        # prefill: runs of PREFILL_BLOCK_M tokens, 64-key FP8 tiles (indexer_topk's defaults)
        "indexer_prefill": _preset(
            ix._indexer_logits_kernel, logits_types,
            dict(logits, BLOCK_M=ix.PREFILL_BLOCK_M, BLOCK_N=64, DO_HIST=False, HI=12, SPLIT=1),
            8, 3, logits_div),
        # decode: one token a program, 128-key tiles, the fused pass-1 histogram (13 bits, 4 parts)
        "indexer_decode": _preset(
            ix._indexer_logits_kernel, logits_types,
            dict(logits, BLOCK_M=1, BLOCK_N=128, DO_HIST=True, HI=13, SPLIT=4), 4, 2, logits_div),
        "topk_hist": _preset(tk._hi_hist_kernel, topk_types,
                             dict(HI=12, CHUNK=tk.CHUNK, WARP_AGG=True, SPLIT=1,
                                  WINDOW=tk.HIST_WINDOW, PDL=2), 4, divisible=topk_div),
        "topk_compact": _preset(tk._compact_kernel, topk_types, dict(HI=12, CHUNK=tk.CHUNK, PDL=2), 4,
                                divisible=topk_div),
        "topk_compact_gluon": _preset(K.topk_sm90._compact_kernel_gl, topk_types,
                                      dict(HI=12, CHUNK=tk.CHUNK, WARPS=tk.COMPACT_WARPS, PDL=2),
                                      tk.COMPACT_WARPS, divisible=topk_div),
        "topk_hist_gluon": _preset(K.topk_sm90._hi_hist_kernel_gl, topk_types,
                                   dict(HI=12, CHUNK=tk.CHUNK, SPLIT=1, WINDOW=tk.HIST_WINDOW,
                                        WARPS=4, PDL=2), 4, divisible=topk_div),
        "topk_finish": _preset(tk._finish_kernel, topk_types,
                               dict(HI=12, CHUNK=tk.CHUNK, BLOCK=2048, DIGIT=4, PDL=2), 8,
                               divisible=topk_div),
        "topk_write": _preset(tk._write_kernel, topk_types,
                              dict(CHUNK=tk.CHUNK, MAX_CHUNKS=128, PAD=16, BLOCK=64,
                                   WITH_VALS=True, PDL=2), 1, divisible=topk_div),
        # one program a row, 32K keys in registers: Triton and Gluon at 32 warps (the default
        # from 16K keys), and Triton at 16 warps with the scores written too
        "topk_resident": _preset(tk._resident_kernel, topk_types,
                                 dict(BLOCK=32768, KPAD=2048, WITH_VALS=False, ASM=True), 32,
                                 divisible=topk_div),
        "topk_resident_gluon": _preset(K.topk_sm90._resident2d_kernel_gl, topk_types,
                                       dict(BLOCK=32768, KPAD=2048, WITH_VALS=False, WARPS=32),
                                       32, divisible=topk_div),
        **{f"topk_radix_gluon{suffix}": _preset(
            K.topk_sm90._radix_kernel_gl, topk_types,
            dict(BLOCK=32768, KPAD=2048, WITH_VALS=vals, WARPS=32, D0=11, D1=11, CLUSTER=1), 32,
            divisible=topk_div, smem_base=True)
           for suffix, vals in (("", True), ("_idx", False))},
        # the same kernel on a cluster of CTAs a row (topk_cluster: 128K keys, 4 x 32K or 8 x 16K)
        **{f"topk_radix_cluster{size}": _preset(
            K.topk_sm90._radix_kernel_gl, topk_types,
            dict(BLOCK=131072 // size, KPAD=2048, WITH_VALS=True, WARPS=32, D0=11, D1=11,
                 CLUSTER=size), 32, divisible=topk_div, smem_base=True,
            check=K.topk_sm90._bins_alone_at_zero(K.topk_sm90.radix_bins_bytes(11, 11)))
           for size in (4, 8)},
        # the 1-D form, with its reload, for more than 32 keys a thread (8K keys on 4 warps)
        "topk_resident_gluon_1d": _preset(K.topk_sm90._resident_kernel_gl, topk_types,
                                          dict(BLOCK=8192, KPAD=2048, WITH_VALS=False, WARPS=4),
                                          4, divisible=topk_div),
        "topk_resident_w16": _preset(tk._resident_kernel, topk_types,
                                     dict(BLOCK=32768, KPAD=2048, WITH_VALS=True, ASM=True), 16,
                                     divisible=topk_div),
        "sparse_mla_triton_bf16": _preset(sm._sparse_mla_fwd_kernel, mla_types,
                                          dict(mla, KV_FP8=False, ROW_WIDTH=576), 8, 2, mla_div),
        "sparse_mla_triton_fp8": _preset(sm._sparse_mla_fwd_kernel, dict(mla_types, KV="*u8"),
                                         dict(mla, KV_FP8=True, ROW_WIDTH=656), 8, 2, mla_div),
        # the warp-specialized Gluon kernel (decode and prefill), bf16 and FP8 caches
        "sparse_mla_sm90": _preset(K.sparse_mla_sm90._sparse_mla_fwd_sm90, mla_types,
                                   dict(sm90, ROW_WIDTH=576, KV_FP8=False), 4, 1, mla_div,
                                   maxnreg=K.sparse_mla_sm90.KERNEL_REGS),
        "sparse_mla_sm90_fp8": _preset(K.sparse_mla_sm90._sparse_mla_fwd_sm90,
                                       dict(mla_types, KV="*u8"),
                                       dict(sm90, ROW_WIDTH=656, KV_FP8=True), 4, 1, mla_div,
                                       maxnreg=K.sparse_mla_sm90.KERNEL_REGS),
        # the FP8 cache as a cluster pair (two head blocks of a token share the dequantization)
        "sparse_mla_sm90_fp8_pair": _preset(K.sparse_mla_sm90._sparse_mla_fwd_sm90,
                                            dict(mla_types, KV="*u8"),
                                            dict(sm90, ROW_WIDTH=656, KV_FP8=True, PAIR=True), 4, 1,
                                            mla_div, maxnreg=K.sparse_mla_sm90.KERNEL_REGS,
                                            smem_offsets=K.sparse_mla_sm90.PAIR_ALLOCS),
        # the MLA cache write (512 latent + 64 rope): into 656-byte FP8 entries, into bf16 rows
        **{f"kv_store_{name}": _preset(
            K.kv_store._store_kv_kernel,
            dict(LAT="*bf16", ROPE="*bf16", SLOT="*i64", stride_lt="i32", stride_rt="i32",
                 width="i32", **views),
            dict(D_V=512, D_ROPE=64, TILES_P2=4, ROPE_P2=64, FP8=name == "fp8",
                 UE8M0=name == "fp8"), K.kv_store.NUM_WARPS,
            divisible=("stride_lt", "stride_rt", "width"))
           for name, views in (("fp8", dict(C8="*u8", C32="*fp32", C16="*i16")),
                               ("bf16", dict(C8="*bf16", C32="*bf16", C16="*bf16")))},
        # MLA's q_pe: [T, 128, 64] of 192 channels, interleaved pairs
        "rope_q_pe": _preset(rp._rope_kernel,
                             dict(X="*bf16", COS="*fp32", SIN="*fp32", Y="*bf16",
                                  **{n: "i32" for n in ("n_heads", "sx_t", "sx_h", "sc_t", "ss_t",
                                                        "sy_t", "sy_h")}),
                             dict(HALF=32, REST=0, REST_P2=1, INTERLEAVED=True, BLOCK_H=64), 4,
                             divisible=("sx_t", "sx_h", "sc_t", "ss_t", "sy_t", "sy_h")),
    }


def _nvidia_tool(name: str) -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"kernel_sass: {name} is not in this Triton wheel ({path})")
    return path


def compile_sm90(p: dict):
    """The kernel compiled for sm90 (``types`` may name arguments of other kernels too: a
    preset's constexprs must all be the kernel's)."""
    fn = p["fn"]
    names = fn.arg_names
    stray = sorted(set(p["constexprs"]) - set(names))
    if stray:
        raise ValueError(f"kernel_sass: {fn.__name__} has no argument(s) {stray}")
    sig = {n: p["types"].get(n, "constexpr") for n in names}
    missing = [n for n in names if sig[n] == "constexpr" and n not in p["constexprs"]]
    if missing:
        raise ValueError(f"kernel_sass: {fn.__name__}: no value for constexpr(s) {missing}")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if sig[n].startswith("*") or n in p["divisible"]}
    source = ASTSource
    if _GluonJIT is not None and isinstance(fn, _GluonJIT):
        source = GluonASTSource
    options = dict(num_warps=p["num_warps"], num_stages=p["num_stages"],
                   **({"maxnreg": p["maxnreg"]} if p.get("maxnreg") else {}))
    kernel = triton.compile(source(fn=fn, signature=sig, constexprs=p["constexprs"], attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options=options)
    if not p.get("smem_offsets"):
        return kernel
    found = K.cluster.smem_offsets(kernel)
    consts = dict(p["constexprs"], **{c: found[n] for c, n in p["smem_offsets"].items()})
    kernel = triton.compile(source(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options=options)
    K.sparse_mla_sm90.check_pair_offsets(kernel, consts)  # the launcher's check
    return kernel


def _cuobjdump(kernel, flag: str) -> str:
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        return subprocess.run([_nvidia_tool("cuobjdump"), flag, f.name], capture_output=True,
                              text=True, check=True).stdout
    finally:
        os.unlink(f.name)


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]+);")


def loops(sass: str) -> list[dict]:
    """Every backward branch's body: its address range, size and opcode histogram."""
    instrs = [(int(a, 16), text.strip()) for a, text in _INSTR.findall(sass)]
    out = []
    for addr, text in instrs:
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            lo = int(m.group(1), 16)
            body = [t for a, t in instrs if lo <= a <= addr]
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0]
                                      for t in body)
            out.append(dict(start=lo, end=addr, n=len(body), ops=ops))
    return out


def report(name: str, p: dict, sass_dir: str | None = None) -> dict:
    kernel = compile_sm90(p)
    usage = _cuobjdump(kernel, "-res-usage")
    reg = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    sass = _cuobjdump(kernel, "-sass")
    ptx = kernel.asm["ptx"]
    row = dict(name=name, kernel=p["fn"].__name__, registers=int(reg.group(1)) if reg else None,
               stack_bytes=int(stack.group(1)) if stack else None,
               shared_bytes=kernel.metadata.shared, warps=p["num_warps"], stages=p["num_stages"],
               wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
               wgmma_waits=re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx),
               instructions=len(_INSTR.findall(sass)), loops=loops(sass),
               # gathers that ask for an eviction policy carry it only if the lowering keeps it
               # (Triton 3.6 drops it from cp.async; 3.9 keeps it: BENCHMARKS.md session 19)
               cp_async=len(re.findall(r"^\s*(?:@%p\d+\s+)?cp\.async\.c[ag]\.shared\.global", ptx, re.M)),
               cp_async_hinted=len(re.findall(r"cp\.async\.c[ag]\.shared\.global[.\w:]*L2::cache_hint",
                                              ptx)),
               smem_base=first_store_at_smem_base(ptx) if p.get("smem_base") else None,
               smem_offsets=None, check=None)
    if p.get("check"):
        try:
            p["check"](kernel)
            row["check"] = "passed"
        except RuntimeError as e:
            row["check"] = f"FAILED: {e}"
    if p.get("smem_offsets"):
        found = K.cluster.smem_offsets(kernel)
        row["smem_offsets"] = {n: found[n] for n in p["smem_offsets"].values()}
    if sass_dir:
        os.makedirs(sass_dir, exist_ok=True)
        with open(os.path.join(sass_dir, f"{name}.sass"), "w") as f:
            f.write(sass)
        with open(os.path.join(sass_dir, f"{name}.ptx"), "w") as f:
            f.write(ptx)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", default=None, help="comma list of presets (default: all): "
                    + ", ".join(presets()))
    ap.add_argument("--sass", default=None, help="directory for each kernel's SASS and PTX")
    args = ap.parse_args(argv)
    table = presets()
    chosen = args.kernel.split(",") if args.kernel else list(table)
    bad = [c for c in chosen if c not in table]
    if bad:
        ap.error(f"unknown preset(s) {bad}; choose from {list(table)}")
    print(f"Triton {triton.__version__}, target sm90")
    failed = []
    for name in chosen:
        r = report(name, table[name], args.sass)
        print(f"{name} ({r['kernel']}): {r['registers']} registers, {r['stack_bytes']} B stack "
              f"(spills), {r['shared_bytes']} B shared, {r['warps']} warps, {r['stages']} stages, "
              f"{r['instructions']} instructions, wgmma {r['wgmma']} (waits {r['wgmma_waits']})")
        if r["smem_offsets"]:
            print("  inline PTX addresses (global_smem + offset): "
                  + ", ".join(f"{n} {o}" for n, o in r["smem_offsets"].items()))
        if r["cp_async"]:
            print(f"  cp.async gathers: {r['cp_async']}, with an L2 cache hint: {r['cp_async_hinted']}")
        if r["check"] is not None:
            print(f"  the launcher's check: {r['check']}")
            if r["check"] != "passed":
                failed.append(name)
        if r["smem_base"] is not None:
            print(f"  first allocation at global_smem + 0: {'yes' if r['smem_base'] else 'NO'}")
            if not r["smem_base"]:
                failed.append(name)
        for lp in r["loops"]:
            mix = " ".join(f"{k}:{v}" for k, v in lp["ops"].most_common(12))
            print(f"  loop 0x{lp['start']:x}-0x{lp['end']:x}: {lp['n']} instructions; {mix}")
    if failed:
        sys.exit(f"kernel_sass: {failed}: the first shared-memory allocation is not at offset 0 "
                 f"of global_smem, which their inline PTX assumes, or the launcher's check failed")


if __name__ == "__main__":
    main()
