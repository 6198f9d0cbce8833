#!/usr/bin/env python3
"""Our CUDA kernels side by side with the peer the CUDA issue names (TileLang's public
DeepSeek-V3.2 examples), on the SAME input tensors, in one process, timed the same way
(``triton.testing.do_bench``, CUDA events, median). Prints a table and writes JSON (``--out``).

    python tools/bench_peer.py [--peer-dir PATH] [--flashmla-dir DIR] [--out results.json]
                               [--only mla,decode,fp8decode,indexer,topk]

PATH holds the peer's example files (``sparse_mla_fwd_pipelined.py``, ``sparse_mla_fwd_seesaw.py``,
``fp8_lighting_indexer.py``, ``topk_selector.py``, ``utils.py`` from ``examples/deepseek_v32`` of
tile-ai/tilelang) with the ``tilelang`` package importable; neither is part of this repository.
FlashMLA (deepseek-ai/FlashMLA, built for sm90, ``flash_mla`` importable or in ``--flashmla-dir``)
is the second peer: its sparse prefill kernel in ``mla`` and ``decode``, its sparse FP8 decode in
``fp8decode``. Either peer is left out when it is not there (a row says so).
Each section first checks that the two implementations compute the same function on these inputs
(relative error against a float64 evaluation from the spec, the overlap of the selected sets with
torch.topk's; a row beyond the inputs' rounding is marked MISMATCH), then times them:

- ``mla``: sparse MLA prefill, B=1, 4096 queries over 8192 keys, h=128, topk=2048 (the peer's
  own benchmark inputs: query t sees the first t + 1024 keys, -1 / out-of-range padding where
  fewer than topk are visible). TFLOPS count 2 * h * topk * (576 + 512) per query, as the peer's.
- ``decode``: the same kernels on decode shapes (B = 64 and 128 sequences, one query each, 32K
  context), against the roofline of ``tools/bench_kernels.py``.
- ``fp8decode``: sparse MLA decode on the FP8 latent cache (our format, ``dsa_ascend/kv_fp8.py``,
  is FlashMLA's V3.2 format byte for byte: 512 FP8 values, 4 float32 scales, 64 bf16 rope values),
  B = 64 and 128, 32K context: ours (one CTA a head block; the cluster pair) against FlashMLA's
  ``flash_mla_with_kvcache(..., is_fp8_kvcache=True, indices=...)`` on the same cache bytes.
- ``indexer``: FP8 indexer logits, 64 heads x 128, 4096 queries over 8192 keys, causal; and the
  peer's own ragged context-parallel windows, expressed in our paged API (block size 1: every
  window is its own sequence's block table). TFLOPS count 2 * h * d per visible (query, key) pair.
- ``topk``: top-2048 of 32K for 64 rows (the peer's size) and of 128K for 32 rows, N(0, 1).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import triton  # noqa: E402
from bench_kernels import DEV, K, _env, bench, ceilings, report, run_steps  # noqa: E402

from dsa_ascend import paging  # noqa: E402
from dsa_ascend.backends.cuda import graph_replay  # noqa: E402

SCALE = 576 ** -0.5


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def flag(bad):
    """Marks a row whose outputs disagree with the float64 reference (or torch.topk's sets)
    beyond the inputs' own rounding: its timing compares different functions."""
    return " MISMATCH" if bad else ""


def peer_module(name):
    try:
        return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"peer example {name!r} did not import: {type(e).__name__}: {e}") from e


def flash_mla():
    """The ``flash_mla`` module, or None with the reason noted once (it is optional)."""
    global _FLASH_MLA
    if _FLASH_MLA is None:
        try:
            _FLASH_MLA = importlib.import_module("flash_mla")
        except Exception as e:  # noqa: BLE001
            _FLASH_MLA = f"{type(e).__name__}: {e}"
    return _FLASH_MLA if not isinstance(_FLASH_MLA, str) else None


_FLASH_MLA = None
PEER_DIR = None  # --peer-dir: the TileLang examples (None: that peer is left out)


# --------------------------------------------------------------------------- sparse MLA
def mla_inputs(b, s, skv, h, topk, q_start, seed=0):
    """The peer's benchmark inputs (its layout [B, S, H, 576] / [B, SKV, 1, 576], indices
    [B, S, 1, topk] padded with SKV) drawn without its per-token Python loop: query t of a
    sequence picks topk distinct random positions among its min(t + q_start, SKV) visible ones."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = (torch.randn(b, s, h, 576, device=DEV, generator=g) / 10).to(torch.bfloat16)
    kv = (torch.randn(b, skv, 1, 576, device=DEV, generator=g) / 10).to(torch.bfloat16)
    visible = (torch.arange(s, device=DEV) + q_start).clamp(1, skv)  # keys [0, visible)
    idx = torch.empty(b, s, topk, dtype=torch.int32, device=DEV)
    for bi in range(b):
        r = torch.rand(s, skv, device=DEV, generator=g)
        r = r.masked_fill(torch.arange(skv, device=DEV)[None] >= visible[:, None], -1.0)
        v, i = r.topk(topk, dim=-1)
        idx[bi] = torch.where(v < 0, skv, i).int()
    return q, kv, idx.unsqueeze(2).contiguous()


def ours_from_peer(q, kv, idx, block_size=64):
    """The same tensors in our layout: a paged cache (views of the peer's kv, identity block
    tables), indices [T, topk] with -1 padding, every query's cache row."""
    b, s, h, d = q.shape
    skv = kv.shape[1]
    assert skv % block_size == 0
    cache = kv.view(b * skv // block_size, block_size, d)
    table = torch.arange(b * skv // block_size, device=DEV, dtype=torch.int32).view(b, -1)
    ind = torch.where(idx == skv, -1, idx).view(b * s, -1).contiguous()
    rows_ = torch.arange(b, device=DEV, dtype=torch.int32).repeat_interleave(s)
    return q.view(b * s, h, d), cache, ind, table, rows_


def reference_rows(q, cache, ind, table, rows_, picks):
    """float64 sparse MLA of a few query tokens, written from the spec (DSA_SPEC.md)."""
    bs = cache.shape[1]
    outs = []
    for t in picks:
        sel = ind[t][ind[t] >= 0].long()
        slot = table[rows_[t]].long()[sel // bs] * bs + sel % bs
        kvr = cache.reshape(-1, cache.shape[-1])[slot].double()  # [k, 576]
        p = torch.softmax(q[t].double() @ kvr.T * SCALE, dim=-1)
        outs.append(p @ kvr[:, :512])
    return torch.stack(outs)


def flashmla_sparse_inputs(q, kv, idx):
    """The peer's tensors as FlashMLA's sparse prefill takes them: q [B*S, H, 576] and one flat kv
    [B*SKV, 1, 576] (views), indices [B*S, 1, topk] into that kv (offset by sequence), -1 where
    the peer pads with SKV."""
    b, s, h, d = q.shape
    skv, topk = kv.shape[1], idx.shape[-1]
    base = (torch.arange(b, device=idx.device, dtype=torch.int32) * skv).view(b, 1, 1, 1)
    find = torch.where(idx >= skv, -1, idx + base).view(b * s, 1, topk).contiguous()
    return q.view(b * s, h, d), kv.view(b * skv, 1, d), find


def flashmla_slots(pos, table, block_size):
    """Positions [B, topk] within each sequence (-1: none) as FlashMLA's decode indices: flat
    cache slots, page * block_size + offset through the block table (-1 stays -1)."""
    p = pos.long().clamp_min(0)
    slots = table.long().gather(1, p // block_size) * block_size + p % block_size
    return torch.where(pos < 0, -1, slots).int()


def mla_section(rows, peak, bw, b, s, skv, h=128, topk=2048, q_start=1024, decode=False):
    q, kv, idx = mla_inputs(b, s, skv, h, topk, q_start)
    oq, cache, ind, table, rows_ = ours_from_peer(q, kv, idx)
    flops = b * s * 2 * h * topk * (576 + 512)
    nbytes = ind.numel() * 1152 + oq.numel() * 2 + oq.shape[0] * h * 512 * 2 + ind.numel() * 4
    floor = max(flops / (peak * 1e9), nbytes / (bw * 1e6))
    label = f"B={b} S={s} SKV={skv} h={h} topk={topk}"
    kind = "decode" if decode else "prefill"
    picks = torch.randperm(oq.shape[0])[:16].tolist()
    ref = reference_rows(oq, cache, ind, table, rows_, picks)
    impls = {}
    for impl in (["sm90"] if K.sparse_mla.sparse_mla_sm90.available(oq, cache) else []) + ["triton"]:
        impls[f"ours ({impl})"] = lambda impl=impl: K.sparse_mla_fwd(oq, cache, ind, table, rows_, SCALE, 512,
                                                                     impl=impl)[0]
    q_start_t = torch.tensor([q_start], dtype=torch.int32, device=DEV)
    fm = flash_mla()
    if fm is not None:
        fq, fkv, find = flashmla_sparse_inputs(q, kv, idx)
        impls["FlashMLA (flash_mla_sparse_fwd)"] = lambda: fm.flash_mla_sparse_fwd(fq, fkv, find, SCALE, 512)[0]
    else:
        rows.append(dict(name=f"sparse MLA {kind} {label} FlashMLA left out: {_FLASH_MLA}"[:300]))
    for mod_name in (("sparse_mla_fwd_pipelined", "sparse_mla_fwd_seesaw") if PEER_DIR else ()):
        try:
            mod = peer_module(mod_name)
            kern = mod.sparse_mla_fwd_interface(q, kv, idx, q_start, 1, return_kernel=True)
            impls[f"peer ({mod_name})"] = lambda kern=kern: kern(q, kv, idx, q_start_t)[0].view(b * s, h, 512)
        except Exception as e:  # noqa: BLE001
            rows.append(dict(name=f"sparse MLA {kind} {label} peer {mod_name} FAILED: {e}"[:300]))
    base = None
    for name, fn in impls.items():
        try:
            out = fn()
            torch.cuda.synchronize()
            err = rel_err(out[picks].float(), ref)
            base = out if base is None else base
            vs_first = rel_err(out.float(), base.float())
            ms = bench(fn)
        except Exception as e:  # noqa: BLE001
            rows.append(dict(name=f"sparse MLA {kind} {label} {name} FAILED: {type(e).__name__}: {e}"[:300]))
            continue
        rows.append(dict(name=f"sparse MLA {kind} {label} {name}{flag(err > 1e-2)}", ms=ms,
                         tflops=flops / ms / 1e9, pct_roofline=100 * floor / ms, err_vs_f64=err,
                         err_vs_first=vs_first))
        try:  # a launch of ~0.1 ms is timed without its host-side launch cost only as a graph replay
            ms = bench(graph_replay(fn))
            rows.append(dict(name=f"sparse MLA {kind} {label} {name}, CUDA graph", ms=ms,
                             tflops=flops / ms / 1e9, pct_roofline=100 * floor / ms))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(name=f"sparse MLA {kind} {label} {name}, CUDA graph FAILED: {e}"[:300]))
    del q, kv, idx, cache


def fp8_decode_section(rows, peak, bw, b, ctx=32768, h=128, topk=2048, block_size=64):
    """Sparse MLA decode on the FP8 latent cache: ours and FlashMLA's on the same cache bytes,
    pages shuffled, one query a sequence, each checked against a float64 evaluation of a few
    tokens over the dequantized entries (``kv_fp8.unpack``)."""
    from dsa_ascend import kv_fp8
    g = torch.Generator(device=DEV).manual_seed(1)
    blocks = b * ctx // block_size
    table = torch.randperm(blocks, device=DEV, generator=g).int().view(b, -1)
    cache = torch.empty(blocks, block_size, 656, dtype=torch.uint8, device=DEV)
    for i in range(0, blocks, 256):  # bounded temporaries
        e = torch.randn(min(256, blocks - i), block_size, 576, device=DEV, generator=g) / 10
        cache[i:i + 256] = kv_fp8.pack(e[..., :512], e[..., 512:], True)
    q = (torch.randn(b, h, 576, device=DEV, generator=g) / 10).to(torch.bfloat16)
    pos = torch.stack([torch.randperm(ctx, device=DEV, generator=g)[:topk] for _ in range(b)]).int()
    rows_ = torch.arange(b, device=DEV, dtype=torch.int32)
    slots = flashmla_slots(pos, table, block_size)
    flops = b * 2 * h * topk * (576 + 512)
    nbytes = pos.numel() * 656 + q.numel() * 2 + b * h * 512 * 2 + pos.numel() * 4
    floor = max(flops / (peak * 1e9), nbytes / (bw * 1e6))
    picks = torch.randperm(b)[:8].tolist()
    ref = []
    for t in picks:  # float64 over the dequantized entries (their FP8 rounding is the input's)
        e = kv_fp8.unpack(cache.view(-1, 656)[slots[t].long()], 512).double()
        ref.append(torch.softmax(q[t].double() @ e.T * SCALE, -1) @ e[:, :512])
    ref = torch.stack(ref)
    sm90 = K.sparse_mla.sparse_mla_sm90
    impls = {}
    for name, pair in (("ours (sm90)", "0"), ("ours (sm90 cluster pair)", "1")):
        if sm90.available(q, cache):
            impls[name] = (pair, lambda: K.sparse_mla_fwd(q, cache, pos, table, rows_, SCALE, 512)[0])
    fm = flash_mla()
    if fm is not None:
        meta, _ = fm.get_mla_metadata()
        fq, fcache, fslots = q.view(b, 1, h, 576), cache.view(blocks, block_size, 1, 656), slots.view(b, 1, topk)
        impls["FlashMLA (flash_mla_with_kvcache, FP8)"] = (None, lambda: fm.flash_mla_with_kvcache(
            fq, fcache, None, None, 512, meta, None, softmax_scale=SCALE, is_fp8_kvcache=True,
            indices=fslots)[0].view(b, h, 512))
    else:
        rows.append(dict(name=f"sparse MLA decode FP8 cache B={b} FlashMLA left out: {_FLASH_MLA}"[:300]))
    label = f"sparse MLA decode FP8 cache B={b} ctx={ctx} h={h} topk={topk}"
    for name, (pair, fn) in impls.items():
        try:
            with (_env(K.sparse_mla.sparse_mla_sm90.PAIR_ENV, pair) if pair is not None
                  else contextlib.nullcontext()):
                out = fn()
                torch.cuda.synchronize()
                err = rel_err(out[picks].float(), ref)
                ms = bench(graph_replay(fn))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(name=f"{label} {name} FAILED: {type(e).__name__}: {e}"[:300]))
            continue
        # FP8 rounding of the entries is in the reference; what is left is bf16 P and output
        rows.append(dict(name=f"{label} {name}{flag(err > 1e-2)}, CUDA graph", ms=ms,
                         tflops=flops / ms / 1e9, pct_roofline=100 * floor / ms, err_vs_f64=err))
    del cache


# --------------------------------------------------------------------------- indexer logits
def windows_to_sequences(ks, ke):
    """Per-query key windows [ks, ke) (the peer's contract) as our sequences: a run of queries
    sharing ks whose ke grows by one each is one sequence over keys [ks, ks + len); returns
    cu_seqlens_q, seqlens_k and block tables at block size 1 (a window need not be aligned)."""
    ks, ke = ks.long().cpu(), ke.long().cpu()
    starts = [0]
    for t in range(1, ks.numel()):
        if ks[t] != ks[t - 1] or ke[t] != ke[t - 1] + 1:
            starts.append(t)
    starts.append(ks.numel())
    lens = [int(ke[e - 1] - ks[a]) for a, e in zip(starts[:-1], starts[1:])]
    width = max(lens)
    table = torch.zeros(len(lens), width, dtype=torch.int32)
    for r, (a, n) in enumerate(zip(starts[:-1], lens)):
        table[r, :n] = torch.arange(int(ks[a]), int(ks[a]) + n, dtype=torch.int32)
    return (torch.tensor(starts, dtype=torch.int32, device=DEV), torch.tensor(lens, dtype=torch.int32, device=DEV),
            table.to(DEV))


def indexer_section(rows, peak_fp8, s=4096, skv=8192, h=64, d=128, windows="causal"):
    idx_mod = peer_module("fp8_lighting_indexer")
    utils = peer_module("utils")
    torch.manual_seed(0)
    qb = torch.randn(s, h, d, device=DEV, dtype=torch.bfloat16)
    kvb = torch.randn(skv, d, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(s, h, device=DEV, dtype=torch.float32)
    q8 = qb.to(torch.float8_e4m3fn)
    kv8, kvs = utils.per_custom_dims_cast_to_fp8(kvb, (0,), False)
    kvs = kvs.float().contiguous()
    if windows == "causal":  # one sequence: query t at position skv - s + t sees keys [0, pos]
        ks = torch.zeros(s, dtype=torch.int32, device=DEV)
        ke = torch.arange(skv - s + 1, skv + 1, dtype=torch.int32, device=DEV)
        cu = torch.tensor([0, s], dtype=torch.int32, device=DEV)
        sk = torch.tensor([skv], dtype=torch.int32, device=DEV)
        table, block_size = torch.arange(skv // 64, dtype=torch.int32, device=DEV).view(1, -1), 64
    else:  # the peer's ragged windows (documents, context-parallel rank 3 of 4) over all 4 x s
        # keys (its own test clips them at skv = 8192, leaving many queries no keys)
        ks, ke = utils.generate_random_cu_seqlens(per_cp_seqlen=s, cp_size=4, cp_rank=3, kv_stride=1,
                                                  average_q_len=2048)
        ks, ke = ks.int().contiguous(), ke.int().contiguous()
        cu, sk, table = windows_to_sequences(ks, ke)
        block_size = 1
    pairs = int((ke.long() - ks.long()).clamp_min(0).sum())
    flops = 2 * h * d * pairs
    tok_rows = paging.token_rows(cu, s)
    pos = paging.query_positions(cu, sk, s, rows=tok_rows)
    block_m, block_n = 2, 128
    width = triton.cdiv(int(sk.max()), block_n) * block_n
    progs = K.indexer.programs(cu, tok_rows, pos, 0, s, block_m)
    ours = lambda: K.indexer.indexer_logits(q8, w, kv8, kvs, table, progs, 0, s, width,  # noqa: E731
                                            block_size, block_m, block_n)
    peer = lambda: idx_mod.mqa_attn_return_logits_interface(q8, kv8, kvs, w, ks, ke)  # noqa: E731
    peer_raw = lambda: idx_mod.mqa_attn_return_logits_interface(q8, kv8, kvs, w, ks, ke,  # noqa: E731
                                                                clean_logits=False)
    # the same logits? ours[t, j] is key ks[t] + j of the peer's [t, SKV] matrix
    got, want = ours(), peer()
    j = torch.arange(width, device=DEV)
    valid = j[None] < (ke - ks).long()[:, None]
    cols = (ks.long()[:, None] + j[None]).clamp_max(skv - 1)
    peer_mapped = torch.gather(want, 1, cols)
    err = rel_err(got[valid], peer_mapped[valid])
    # float64 reference on a few rows, from the spec
    picks = torch.randperm(s)[:8].tolist()
    kd = kv8.double() * kvs.double()[:, None]
    ref = []
    for t in picks:
        sc = (torch.relu(q8[t].double() @ kd.T) * w[t].double()[:, None]).sum(0)
        ref.append(sc[int(ks[t]):int(ke[t])])
    err_ours = max(rel_err(got[t, :int(ke[t] - ks[t])], r) for t, r in zip(picks, ref))
    err_peer = max(rel_err(want[t, int(ks[t]):int(ke[t])], r) for t, r in zip(picks, ref))
    label = f"FP8 indexer logits {s}x{skv} h={h} d={d} {windows} windows ({pairs / 1e6:.1f}M pairs)"
    for name, fn, e in (("ours", ours, err_ours), ("peer (+ its -inf clean pass)", peer, err_peer),
                        ("peer, no clean pass", peer_raw, err_peer)):
        ms = bench(fn)
        rows.append(dict(name=f"{label} {name}{flag(max(e, err) > 1e-3)}", ms=ms, tflops=flops / ms / 1e9,
                         pct_fp8_peak=100 * flops / ms / 1e9 / peak_fp8, err_vs_f64=e,
                         err_ours_vs_peer=err))


# --------------------------------------------------------------------------- top-k
def topk_section(rows, n, length, k=2048):
    tk = peer_module("topk_selector")
    s = torch.randn(n, length, device=DEV)
    lens = torch.full((n,), length, dtype=torch.int32, device=DEV)
    starts = torch.zeros(n, dtype=torch.int32, device=DEV)
    want = torch.topk(s, k, dim=-1).indices
    label = f"top-{k} of {length} x {n} rows"
    for name, fn in (("ours (select_topk)", lambda: K.select_topk(s, lens, k)),
                     ("ours (topk_multi)", lambda: K.topk.topk_multi(s, lens, k)),
                     ("ours (topk_resident)", lambda: K.topk.topk_resident(s, lens, k))
                     if length <= K.topk.RESIDENT_MAX else (None, None),
                     ("ours (topk_resident, bisection)",
                      lambda: K.topk.topk_resident(s, lens, k, radix=False))
                     if length <= K.topk.RESIDENT_MAX else (None, None),
                     ("peer (tl_topk)", lambda: tk.tl_topk(s, starts, lens, k))):
        if fn is None:
            continue
        try:
            got = fn()
            overlap = min(len(set(got[i].tolist()) & set(want[i].tolist())) for i in range(n)) / k
            rows.append(dict(name=f"{label} {name}{flag(overlap < 0.99)}", ms=bench(fn),
                             min_overlap_vs_torch=overlap))
            rows.append(dict(name=f"{label} {name}, CUDA graph", ms=bench(graph_replay(fn))))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(name=f"{label} {name} FAILED: {type(e).__name__}: {e}"[:300]))
    rows.append(dict(name=f"{label} torch.topk", ms=bench(lambda: torch.topk(s, k, dim=-1))))


def fp8_ceiling(rows):
    """FP8 e4m3 matmul rate (torch._scaled_mm, 8192^3, per-tensor scales)."""
    a = torch.randn(8192, 8192, device=DEV).to(torch.float8_e4m3fn)
    b = torch.randn(8192, 8192, device=DEV).to(torch.float8_e4m3fn).T
    one = torch.ones((), device=DEV)
    ms = bench(lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16))
    rows.append(dict(name="ceiling: fp8 e4m3 matmul 8192^3 (_scaled_mm)", ms=ms, tflops=2 * 8192 ** 3 / ms / 1e9))
    return 2 * 8192 ** 3 / ms / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer-dir", default=None,
                    help="folder with TileLang's example files (without it: FlashMLA only)")
    ap.add_argument("--flashmla-dir", default=None,
                    help="folder holding the built flash_mla package (else: as installed)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default=None, help="comma list: mla,decode,fp8decode,indexer,topk")
    args = ap.parse_args()
    global PEER_DIR
    if args.peer_dir is not None:
        if not os.path.isfile(os.path.join(args.peer_dir, "fp8_lighting_indexer.py")):
            sys.exit(f"--peer-dir {args.peer_dir!r}: no fp8_lighting_indexer.py there")
        PEER_DIR = os.path.abspath(args.peer_dir)
        sys.path.insert(0, PEER_DIR)
    if args.flashmla_dir is not None:
        if not os.path.isdir(os.path.join(args.flashmla_dir, "flash_mla")):
            sys.exit(f"--flashmla-dir {args.flashmla_dir!r}: no flash_mla package there")
        sys.path.insert(0, os.path.abspath(args.flashmla_dir))
    tilelang_only = {"indexer", "topk"}
    only_arg = set(args.only.split(",")) if args.only else None
    if PEER_DIR is None and only_arg and only_arg & tilelang_only:
        sys.exit(f"--only {sorted(only_arg & tilelang_only)}: TileLang's sections need --peer-dir")
    rows = []
    peak, bw = ceilings(rows)
    peak_fp8 = fp8_ceiling(rows)
    only = only_arg if only_arg else ({"mla", "decode", "fp8decode"} if PEER_DIR is None else None)
    steps = [("mla", lambda: mla_section(rows, peak, bw, 1, 4096, 8192)),
             ("decode", lambda: [mla_section(rows, peak, bw, b, 1, 32768, q_start=32767, decode=True)
                                 for b in (64, 128)]),
             ("fp8decode", lambda: [fp8_decode_section(rows, peak, bw, b) for b in (64, 128)]),
             ("indexer", lambda: [indexer_section(rows, peak_fp8), indexer_section(rows, peak_fp8, skv=16384, windows="cp")]),
             ("topk", lambda: [topk_section(rows, n, length) for n, length in ((64, 32768), (32, 131072))])]
    run_steps(rows, steps, only)
    tl, fm = sys.modules.get("tilelang"), sys.modules.get("flash_mla")
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                tilelang=getattr(tl, "__version__", None),
                flash_mla=getattr(fm, "__file__", None), date=time.strftime("%Y-%m-%d"))
    report(rows, meta, args.out, width=100, fmt=".4g")


if __name__ == "__main__":
    main()
