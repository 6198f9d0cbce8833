#!/usr/bin/env python3
"""One full-size DSA attention layer (DeepSeek-V3.2 dimensions: dim 7168, 128 heads, latent 512 +
rope 64, indexer 64 x 128, top-2048) against the same layer with dense attention, at growing
context lengths: time and peak memory of prefill and of one decode step.

    python tools/bench_long_context.py [--contexts 8192,32768,65536,131072] [--batch 1]
                                       [--dense auto|ours|flashmla] [--flashmla-dir DIR]
                                       [--out results.json] [--plot plot.png]

DSA = the model's own MLA module (``dsa_ascend.model.mla.MLA``) on the ``cuda`` backend: the
projections, the FP8 lightning indexer + top-k (Triton), sparse MLA (Triton), the paged cache.
Weights are random bf16 (the projections are the same GEMMs on both sides).
Dense prefill = the same projections + the MHA form (per-head k_nope / v expanded from the
latent) through torch SDPA (flash / memory-efficient kernels), causal. Dense decode = the same
projections + absorbed MLA over every cached entry: FlashMLA's dense decode kernel
(``flash_mla_with_kvcache`` on the paged bf16 cache, the strong baseline the CUDA issue asks for)
where the ``flash_mla`` package imports (``--dense auto``, the default), else our Triton MLA kernel
(indices = all positions, split over the keys). The dense attention's bandwidth and TFLOPS are
reported so that the baseline's strength is visible, and with FlashMLA our kernel's dense
attention is timed beside it. Both decode sides read the same bf16 latent cache. Decode steps
are timed as CUDA-graph replays (as a serving engine runs decode; the eager time is reported
beside them), prefill eagerly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from triton.testing import do_bench  # noqa: E402

from dsa_ascend.backends.cuda import graph_replay, kernels  # noqa: E402
from dsa_ascend.cache import PagedCache  # noqa: E402
from dsa_ascend.config import RunConfig, preset  # noqa: E402
from dsa_ascend.model.layers import Context  # noqa: E402
from dsa_ascend.model.mla import MLA  # noqa: E402
from dsa_ascend.model.rope import rope_tables  # noqa: E402
from dsa_ascend.ops import Ops  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_peer import flash_mla  # noqa: E402  (the peer's import, its failure noted once)

DEV = torch.device("cuda")
BF16 = torch.bfloat16


def build_layer(max_seq_len: int, batch: int, kv_cache_dtype: str = "auto"):
    cfg = preset("671b")
    run = RunConfig(backend="cuda", device="cuda", dtype=BF16, max_seq_len=max_seq_len,
                    max_batch_size=batch, block_size=64, kv_cache_dtype=kv_cache_dtype,
                    indexer_dtype="fp8",
                    prefill_chunk_size=4096)
    run.validate()
    ctx = Context(config=cfg, run=run, ops=Ops("cuda"), dtype=BF16)
    layer = MLA(ctx, 0).to_empty(device=DEV)
    g = torch.Generator(device=DEV).manual_seed(0)
    for name, p in layer.named_parameters():
        if "norm" in name:
            p.data.fill_(1.0) if name.endswith("weight") else p.data.zero_()
        else:
            p.data.normal_(0.0, p.shape[-1] ** -0.5, generator=g)
    cache = PagedCache(n_layers=1, max_batch_size=batch, max_seq_len=max_seq_len, block_size=64,
                       kv_dim=cfg.kv_cache_dim, index_dim=cfg.index_head_dim, dtype=BF16,
                       index_fp8=True, device=DEV,
                       kv_fp8=(cfg.kv_lora_rank, cfg.ue8m0) if kv_cache_dtype == "fp8" else None)
    cos, sin = rope_tables(cfg, max_seq_len, DEV)
    return cfg, layer, cache, cos, sin


def timed(fn, rep_ms=300):
    """Median ms (CUDA events) and the peak memory allocated above the starting point."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return do_bench(fn, warmup=10, rep=rep_ms, return_mode="median"), peak


@torch.inference_mode()
def dsa_prefill(layer, cache, cos, sin, ctx_len, chunk=4096):
    """Prefill ctx_len tokens of row 0 in chunks (the engine's schedule)."""
    x = torch.randn(ctx_len, layer.q_a_proj.weight.shape[1], device=DEV, dtype=BF16)

    def run():
        cache.reset()
        for s in range(0, ctx_len, chunk):
            n = min(chunk, ctx_len - s)
            step = cache.prepare([0], [s], [n])
            layer(x[s:s + n], step, cache, cos[step.positions], sin[step.positions])
    return run


@torch.inference_mode()
def dense_prefill(layer, cos, sin, ctx_len):
    """Same projections; dense causal attention in the MHA form through SDPA."""
    K = kernels()
    c = layer.ctx.config
    x = torch.randn(ctx_len, c.dim, device=DEV, dtype=BF16)
    w = layer.kv_b_heads(BF16)  # [H, nope + v, latent]
    h, nope, rope, vd = layer.n_heads, layer.nope, layer.rope_dim, layer.v_dim
    cs, sn = cos[:ctx_len], sin[:ctx_len]

    def run():
        q = layer.q_b_proj(layer.q_a_layernorm(layer.q_a_proj(x))).view(ctx_len, h, nope + rope)
        q_nope, q_pe = q.split([nope, rope], -1)
        q_pe = K.rope.rope(q_pe, cs, sn, True)  # the DSA layer's RoPE kernel, both sides
        latent, k_pe = layer.kv_a_proj_with_mqa(x).split([layer.latent, rope], -1)
        latent = layer.kv_a_layernorm(latent)
        k_pe = K.rope.rope(k_pe, cs, sn, True)
        kv = torch.einsum("sc,hdc->hsd", latent.to(BF16), w)  # [H, S, nope + v]
        k = torch.cat([kv[..., :nope], k_pe.to(BF16)[None].expand(h, -1, -1)], -1)
        qq = torch.cat([q_nope, q_pe.to(BF16)], -1).transpose(0, 1)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                          SDPBackend.EFFICIENT_ATTENTION]):  # never the O(S^2)-memory math path
            o = F.scaled_dot_product_attention(qq[None], k[None], kv[None, :, :, nope:],
                                               is_causal=True, scale=layer.softmax_scale)
        return layer.o_proj(o[0].transpose(0, 1).reshape(ctx_len, h * vd))
    return run


def fill_cache(cache, batch, ctx_len):
    """Rows 0..batch-1 hold ctx_len random entries (latent cache and FP8 index keys)."""
    cache.reset()
    cache.prepare(list(range(batch)), [0] * batch, [ctx_len] * batch)
    lc = cache.layers[0]
    if lc.kv.dtype == torch.uint8:
        from dsa_ascend import kv_fp8
        for b in range(lc.kv.shape[0]):  # page by page: bounded temporaries
            e = torch.randn(lc.kv.shape[1], 576, device=DEV)
            lc.kv[b] = kv_fp8.pack(e[:, :512], e[:, 512:], True)
    else:
        lc.kv.normal_()
    lc.index_k.view(torch.uint8).copy_(
        torch.randn(lc.index_k.shape, device=DEV).clamp(-400, 400).to(lc.index_k.dtype).view(torch.uint8))
    lc.index_scale.uniform_(0.5, 1.5)


@torch.inference_mode()
def dsa_decode(layer, cache, cos, sin, batch, ctx_len, graph=False):
    x = torch.randn(batch, layer.ctx.config.dim, device=DEV, dtype=BF16)
    fill_cache(cache, batch, ctx_len - 1)
    rows = list(range(batch))

    def prepare():
        for r in rows:  # back to ctx_len - 1 cached tokens (the blocks stay allocated)
            cache.lengths[r] = ctx_len - 1
        return cache.prepare(rows, [ctx_len - 1] * batch, [1] * batch)

    if graph:  # one step's metadata, captured once; each replay rewrites the same new entry
        step = prepare()
        cs, sn = cos[step.positions], sin[step.positions]
        with torch.inference_mode():
            return graph_replay(lambda: layer(x, step, cache, cs, sn))

    def run():
        step = prepare()
        layer(x, step, cache, cos[step.positions], sin[step.positions])
    return run


@torch.inference_mode()
def dense_decode(layer, cache, cos, sin, batch, ctx_len, graph=False, impl="ours"):
    """Same projections; absorbed MLA over all ctx_len cached entries: ``impl`` "ours" (Triton
    kernel, split-K) or "flashmla" (FlashMLA's dense decode on the same paged cache)."""
    K = kernels()
    c = layer.ctx.config
    x = torch.randn(batch, c.dim, device=DEV, dtype=BF16)
    fill_cache(cache, batch, ctx_len)
    table = cache.block_table[:batch]
    idx = torch.arange(ctx_len, device=DEV, dtype=torch.int32)[None].expand(batch, -1).contiguous()
    rows = torch.arange(batch, device=DEV, dtype=torch.int32)
    w = layer.kv_b_heads(BF16)
    h, nope, rope = layer.n_heads, layer.nope, layer.rope_dim
    cs, sn = cos[ctx_len - 1:ctx_len].expand(batch, -1), sin[ctx_len - 1:ctx_len].expand(batch, -1)
    kv = cache.layers[0].kv
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    splits = max(1, min(64, sms // (batch * 2)))

    if impl == "flashmla":
        fm = flash_mla()
        meta, _ = fm.get_mla_metadata()  # filled by the first call, reused by the rest
        fkv = kv.view(kv.shape[0], kv.shape[1], 1, kv.shape[2])
        ftable = table.contiguous()
        seqlens = torch.full((batch,), ctx_len, device=DEV, dtype=torch.int32)

        def attention(q_full):
            return fm.flash_mla_with_kvcache(q_full.view(batch, 1, h, -1), fkv, ftable, seqlens,
                                             layer.latent, meta, None,
                                             softmax_scale=layer.softmax_scale,
                                             causal=False)[0].view(batch, h, -1)
    else:
        def attention(q_full):
            return K.sparse_mla_fwd(q_full, kv, idx, table, rows, layer.softmax_scale,
                                    layer.latent, num_splits=splits)[0]

    def run():
        q = layer.q_b_proj(layer.q_a_layernorm(layer.q_a_proj(x))).view(batch, h, nope + rope)
        q_nope, q_pe = q.split([nope, rope], -1)
        q_pe = K.rope.rope(q_pe, cs, sn, True)  # the DSA layer's RoPE kernel, both sides
        latent, k_pe = layer.kv_a_proj_with_mqa(x).split([layer.latent, rope], -1)
        layer.kv_a_layernorm(latent)  # the new entry (its write is not timed on either side)
        q_abs = torch.einsum("thd,hdc->thc", q_nope, w[:, :nope])  # as the layer does it
        o = attention(torch.cat([q_abs, q_pe], -1))
        o = torch.einsum("thc,hdc->thd", o, w[:, nope:])
        return layer.o_proj(o.flatten(1))

    q_only = torch.randn(batch, h, 576, device=DEV, dtype=BF16)
    if impl != "ours":  # the baseline computes what ours does (bf16 outputs of fp32 sums)
        want = K.sparse_mla_fwd(q_only, kv, idx, table, rows, layer.softmax_scale, layer.latent,
                                num_splits=splits)[0].float()
        err = ((attention(q_only).float() - want).norm() / want.norm()).item()
        if not err < 1e-2:
            raise RuntimeError(f"dense decode: {impl}'s attention differs from ours by {err:.3g} "
                               f"(relative) at context {ctx_len}")
    ms_attn = do_bench(lambda: attention(q_only), warmup=10, rep=200, return_mode="median")
    nbytes = batch * ctx_len * kv.shape[-1] * kv.element_size()
    flops = 2 * batch * h * ctx_len * (576 + 512)
    if graph:
        with torch.inference_mode():
            run = graph_replay(run)
    return run, ms_attn, nbytes, flops


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="8192,32768,65536,131072")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--dense", default="auto", choices=("auto", "ours", "flashmla"),
                    help="the dense decode attention: FlashMLA's where it imports (auto), or ours")
    ap.add_argument("--flashmla-dir", default=None, help="folder holding the built flash_mla package")
    ap.add_argument("--profile", action="store_true",
                    help="print torch.profiler tables of one DSA prefill and one decode step, "
                         "and every kernel of the decode step's CUDA graph")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.profile:
        return profile(int(args.contexts.split(",")[0]), args.batch)
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.flashmla_dir:
        sys.path.insert(0, os.path.abspath(args.flashmla_dir))
    dense = args.dense
    if dense == "auto":
        dense = "flashmla" if flash_mla() is not None else "ours"
    elif dense == "flashmla" and flash_mla() is None:
        sys.exit("--dense flashmla: the flash_mla package does not import (see --flashmla-dir)")
    results = []
    for L in contexts:
        row = dict(context=L, batch=args.batch)
        t0 = time.time()
        cfg, layer, cache, cos, sin = build_layer(L + 64, max(args.batch, 1))
        if not args.skip_prefill:
            row["dsa_prefill_ms"], row["dsa_prefill_peak_bytes"] = timed(
                dsa_prefill(layer, cache, cos, sin, L), rep_ms=1)
            try:
                row["dense_prefill_ms"], row["dense_prefill_peak_bytes"] = timed(
                    dense_prefill(layer, cos, sin, L), rep_ms=1)
            except torch.OutOfMemoryError:
                row["dense_prefill_ms"] = None
            torch.cuda.empty_cache()
        # decode: timed as CUDA-graph replays (peak memory from the eager run: a graph's
        # memory is allocated at capture)
        row["dsa_decode_eager_ms"], row["dsa_decode_peak_bytes"] = timed(
            dsa_decode(layer, cache, cos, sin, args.batch, L))
        row["dsa_decode_ms"], _ = timed(dsa_decode(layer, cache, cos, sin, args.batch, L, graph=True))
        run, _, _, _ = dense_decode(layer, cache, cos, sin, args.batch, L, impl=dense)
        row["dense_decode_eager_ms"], row["dense_decode_peak_bytes"] = timed(run)
        run, ms_attn, nbytes, flops = dense_decode(layer, cache, cos, sin, args.batch, L,
                                                   graph=True, impl=dense)
        row["dense_decode_ms"], _ = timed(run)
        row["dense_decode_impl"] = dense
        if dense != "ours":  # our own dense attention beside the baseline's
            _, ms_ours, _, _ = dense_decode(layer, cache, cos, sin, args.batch, L)
            row["dense_decode_attention_ours_ms"] = ms_ours
        row["dense_decode_attention_ms"] = ms_attn
        row["dense_decode_attention_gbps"] = nbytes / ms_attn / 1e6
        row["dense_decode_attention_tflops"] = flops / ms_attn / 1e9
        row["wall_s"] = time.time() - t0
        results.append(row)
        print(json.dumps(row), flush=True)
        del layer, cache
        torch.cuda.empty_cache()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                date=time.strftime("%Y-%m-%d"), layer="DeepSeek-V3.2 MLA+indexer, bf16 weights",
                dense_decode=dense)
    print(f"{'context':>8} {'DSA pre':>9} {'dense pre':>9} {'x':>5} {'DSA dec':>8} {'dense dec':>9} "
          f"{'x':>5} {'dense attn GB/s':>15}")
    for r in results:
        dp, sp = r.get("dense_prefill_ms"), r.get("dsa_prefill_ms")
        print(f"{r['context']:>8} {sp or 0:9.2f} {dp or 0:9.2f} {(dp or 0) / (sp or 1):5.2f} "
              f"{r['dsa_decode_ms']:8.3f} {r['dense_decode_ms']:9.3f} "
              f"{r['dense_decode_ms'] / r['dsa_decode_ms']:5.2f} {r['dense_decode_attention_gbps']:15.0f}"
              f"  (DSA decode without a graph: {r['dsa_decode_eager_ms']:.3f} ms)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)
    if args.plot:
        plot(results, meta, args.plot)


def profile(ctx_len, batch):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    _, layer, cache, cos, sin = build_layer(ctx_len + 64, max(batch, 1))
    for name, fn in (("DSA prefill", dsa_prefill(layer, cache, cos, sin, ctx_len)),
                     ("DSA decode", dsa_decode(layer, cache, cos, sin, batch, ctx_len))):
        fn()
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        print(f"=== {name}, context {ctx_len}, batch {batch}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    # the decode step as it is timed (a CUDA-graph replay: no metadata preparation, no host
    # work), every kernel of it: what a graph's time is made of
    replay = dsa_decode(layer, cache, cos, sin, batch, ctx_len, graph=True)
    replay()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            replay()
        torch.cuda.synchronize()
    print(f"=== DSA decode as a CUDA graph, context {ctx_len}, batch {batch}: its kernels, "
          f"5 replays (times are totals over the 5)")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=60,
                                    max_name_column_width=90))


def plot(results, meta, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctx = [r["context"] // 1024 for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for key, label in (("dsa_prefill_ms", "DSA prefill"), ("dense_prefill_ms", "dense prefill (SDPA)")):
        if all(r.get(key) for r in results):
            axes[0].plot(ctx, [r[key] for r in results], "o-", label=label)
    axes[0].set(title="prefill time", xlabel="context (K tokens)", ylabel="ms", yscale="log")
    dense_label = "dense decode" + (" (FlashMLA)" if meta.get("dense_decode") == "flashmla" else "")
    for key, label in (("dsa_decode_ms", "DSA decode"), ("dense_decode_ms", dense_label)):
        axes[1].plot(ctx, [r[key] for r in results], "o-", label=label)
    axes[1].set(title=f"decode step, batch {results[0]['batch']}", xlabel="context (K tokens)",
                ylabel="ms", yscale="log")
    for key, label in (("dsa_prefill_peak_bytes", "DSA prefill"),
                       ("dense_prefill_peak_bytes", "dense prefill"),
                       ("dsa_decode_peak_bytes", "DSA decode"), ("dense_decode_peak_bytes", "dense decode")):
        if all(r.get(key) is not None for r in results):
            axes[2].plot(ctx, [r[key] / 2 ** 30 for r in results], "o-", label=label)
    axes[2].set(title="peak memory above the cache", xlabel="context (K tokens)", ylabel="GiB")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"One DeepSeek-V3.2 attention layer, DSA vs dense — {meta['gpu']}, {meta['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
