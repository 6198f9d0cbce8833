#!/usr/bin/env python3
"""Multi-device benchmark: tokens/s of TP=1 vs TP=2 (and any tp x ep layout), and TP=2 logits
against TP=1 logits on the same device type. Run under torchrun, one process per device:

    torchrun --standalone --nproc-per-node 2 tools/bench_distributed.py --out results.json

Defaults: the ``medium`` preset (release widths, 4 layers, 8 experts, bf16; a random checkpoint
is written to --ckpt once, by rank 0), the best backend for the device (cuda on GPUs, with
NCCL), bf16, layouts 1x1 (rank 0 alone, the others wait), 2x1 and 2x2 (tp x ep).

Per layout: prefill tokens/s (``--decode-batch`` prompts of ``--prompt-len`` random tokens, in
packed steps of ``--prefill-batch`` prompts), then decode tokens/s (``--decode-steps`` steps of
all ``--decode-batch`` rows, one token each); medians of ``--repeat`` runs after one warm-up.
Prompts longer than index_topk (2048) make the attention really sparse. Logits check: a
``--check-len`` batch of 2 through each layout; max |logits - TP=1 logits| and argmax agreement,
next to the bf16 model's own error (TP=1 bf16 vs TP=1 float32, same device) as the yardstick.

Writes JSON to --out and a markdown table next to it (.md); prints the table. On CPU (gloo):

    python -m torch.distributed.run --standalone --nproc-per-node 2 tools/bench_distributed.py \\
        --preset tiny --device cpu --backend reference --prompt-len 40 --decode-batch 4 \\
        --prefill-batch 2 --decode-steps 4 --check-len 24 --out /tmp/bench.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # uninstalled tree

import dsa_ascend  # noqa: E402
from dsa_ascend import parallel  # noqa: E402
from dsa_ascend.config import preset  # noqa: E402
from dsa_ascend.tiny import make_tiny_checkpoint  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON results (a .md table is written beside it)")
    p.add_argument("--preset", default="medium")
    p.add_argument("--ckpt", default=None, help="checkpoint dir (default: /tmp/dsa_bench_<preset>; "
                   "made by rank 0 when absent)")
    p.add_argument("--device", default=None, help="cuda | npu | cpu (default: cuda if present)")
    p.add_argument("--backend", default=None, help="reference | cuda | npu (default: best)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--layouts", default="1x1,2x1,2x2", help="comma-separated TPxEP; 1x1 runs on "
                   "rank 0 alone (the first is the baseline)")
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--prefill-batch", type=int, default=4)
    p.add_argument("--decode-batch", type=int, default=16)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--check-len", type=int, default=512)
    p.add_argument("--no-fp32-check", action="store_true", help="skip the float32 TP=1 yardstick")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def agree(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def log(msg: str) -> None:
    if parallel.rank() == 0:
        print(msg, flush=True)


def random_tokens(n: int, length: int, vocab: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return list(torch.randint(2, vocab, (n, length), generator=gen))


def measure(model, args, device) -> dict:
    """Prefill then decode timings of one loaded model (every rank of its layout runs this)."""
    vocab = model.config.vocab_size
    prompts = random_tokens(args.decode_batch, args.prompt_len, vocab, seed=1)
    nexts = random_tokens(args.decode_batch, args.decode_steps, vocab, seed=2)
    rows = list(range(args.decode_batch))

    def prefill() -> float:
        model.reset()
        sync(device)
        t0 = time.perf_counter()
        for i in range(0, len(rows), args.prefill_batch):
            part = rows[i:i + args.prefill_batch]
            model.forward_ragged([prompts[r] for r in part], part, [0] * len(part), last_only=True)
        sync(device)
        return time.perf_counter() - t0

    def decode() -> float:
        sync(device)
        t0 = time.perf_counter()
        for s in range(args.decode_steps):
            model.forward_ragged([nexts[r][s:s + 1] for r in rows], rows,
                                 [args.prompt_len + s] * len(rows), last_only=True)
        sync(device)
        return time.perf_counter() - t0

    prefill(), decode()  # warm-up: kernels compiled / autotuned, allocator primed
    pre, dec = [], []
    for _ in range(args.repeat):
        pre.append(prefill())
        dec.append(decode())
    p, d = statistics.median(pre), statistics.median(dec)
    out = {"prefill_s": p, "prefill_tok_s": args.decode_batch * args.prompt_len / p,
           "decode_s": d, "decode_tok_s": args.decode_batch * args.decode_steps / d,
           "decode_ms_per_step": 1e3 * d / args.decode_steps, "prefill_runs_s": pre,
           "decode_runs_s": dec}
    if device.type == "cuda":
        out["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def check_logits(model, args) -> torch.Tensor:
    model.reset()
    tokens = torch.stack(random_tokens(2, args.check_len, model.config.vocab_size, seed=3))
    logits = model(tokens).float().cpu()
    model.reset()
    return logits


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    world = parallel.world_size()
    if world > 1:
        device = parallel.init_distributed(device)
    rank = parallel.rank()
    ckpt = args.ckpt or f"/tmp/dsa_bench_{args.preset}"
    if rank == 0 and not os.path.exists(os.path.join(ckpt, "config.json")):
        t0 = time.perf_counter()
        make_tiny_checkpoint(ckpt, preset_name=args.preset, seed=0, shards=8)
        log(f"wrote the random {args.preset} checkpoint to {ckpt} in {time.perf_counter() - t0:.0f}s")
    barrier()
    layouts = [tuple(int(v) for v in s.lower().split("x")) for s in args.layouts.split(",")]
    max_len = args.prompt_len + args.decode_steps
    options = dict(backend=args.backend, device=device, max_seq_len=max(max_len, args.check_len),
                   max_batch_size=max(args.decode_batch, 2),
                   # No FP8 rounding of the latent: 1-ulp differences between layouts would
                   # become whole FP8 steps in the logits check (the official semantics, but
                   # not a test of the split). Deployments use kv_cache_dtype="fp8" instead.
                   simulate_fp8_latent=False)
    results, reference, reference32, yardstick = [], None, None, None
    fp32_check = not args.no_fp32_check
    for i, (tp, ep) in enumerate(layouts):
        lw = max(tp, ep)
        if lw not in (1, world):
            raise SystemExit(f"layout {tp}x{ep} needs {lw} processes, the job has {world}")
        entry = {"tp": tp, "ep": ep, "ranks": lw}
        results.append(entry)
        if lw == 1 and rank != 0:  # rank 0 runs it alone
            barrier()
            if i == 0:
                fp32_check = agree(fp32_check, device)
            continue
        t0 = time.perf_counter()
        model = dsa_ascend.load(ckpt, dtype=DTYPES[args.dtype], tp=tp, ep=ep, **options)
        entry["load_s"] = time.perf_counter() - t0
        entry["backend"], entry["device"] = model.backend, str(model.device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(model.device)
        log(f"{tp}x{ep}: loaded in {entry['load_s']:.1f}s; measuring")
        entry.update(measure(model, args, model.device))
        logits = check_logits(model, args)
        model = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        logits32 = None
        if fp32_check:  # the same layout in float32: the yardstick, and a tighter comparison
            try:
                m32 = dsa_ascend.load(ckpt, dtype=torch.float32, tp=tp, ep=ep, **options)
                logits32 = check_logits(m32, args)
            except Exception as e:  # e.g. kernels without float32: report it, go on without
                entry["fp32_check_error"] = f"{type(e).__name__}: {e}"
                if lw > 1:
                    raise
            m32 = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if i == 0:  # the baseline (the same branch on every rank that runs this layout)
            reference, reference32, entry["baseline"] = logits, logits32, True
            if logits32 is not None:
                yardstick = (logits - logits32).abs().max().item()
        elif reference is not None:
            diff = (logits - reference).abs()
            entry["logits_max_abs_diff"] = diff.max().item()
            entry["logits_scale"] = reference.abs().max().item()
            entry["argmax_agreement"] = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
            if logits32 is not None and reference32 is not None:
                entry["fp32_logits_max_abs_diff"] = (logits32 - reference32).abs().max().item()
        if lw == 1:
            barrier()
        if i == 0:  # rank 0 alone knows whether the float32 model ran: tell every rank
            fp32_check = agree(fp32_check and "fp32_check_error" not in entry, device)
        log(f"{tp}x{ep}: prefill {entry['prefill_tok_s']:.0f} tok/s, decode "
            f"{entry['decode_tok_s']:.0f} tok/s")
    barrier()
    if rank == 0:
        report(args, results, yardstick, device, world, ckpt)
    return 0


def report(args, results, yardstick, device, world, ckpt) -> None:
    cfg = preset(args.preset)
    meta = {
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "python": platform.python_version(), "device_type": device.type, "world_size": world,
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "nccl": (".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None),
        "process_group": dist.get_backend() if dist.is_initialized() else None,
        "preset": args.preset, "checkpoint": ckpt, "dtype": args.dtype,
        "model": {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                  "n_routed_experts": cfg.n_routed_experts, "vocab_size": cfg.vocab_size,
                  "index_topk": cfg.index_topk},
        "workload": {"prompt_len": args.prompt_len, "prefill_batch": args.prefill_batch,
                     "decode_batch": args.decode_batch, "decode_steps": args.decode_steps,
                     "repeat": args.repeat, "check_len": args.check_len},
        "bf16_vs_fp32_max_abs_diff_tp1": yardstick,
    }
    base = results[0]
    lines = [f"{meta['device_name']} x{world}, {meta['process_group'] or 'no process group'}, "
             f"backend {base.get('backend')}, torch {meta['torch']}, {meta['date']}; preset "
             f"{args.preset} ({cfg.n_layers} layers, dim {cfg.dim}, {cfg.n_heads} heads, "
             f"{cfg.n_routed_experts} experts), {args.dtype}",
             f"prefill: {args.decode_batch} x {args.prompt_len} tokens in steps of "
             f"{args.prefill_batch} prompts; decode: {args.decode_batch} rows x "
             f"{args.decode_steps} steps; medians of {args.repeat}",
             "",
             f"| tp x ep | prefill tok/s | decode tok/s | decode ms/step | vs first: prefill / decode "
             f"| max GiB | {args.dtype} logits max abs diff vs first (scale) | argmax agree "
             "| fp32 logits max abs diff vs first |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in results:
        diff = ("baseline" if e.get("baseline") else
                f"{e['logits_max_abs_diff']:.3g} ({e['logits_scale']:.3g})")
        same = "" if e.get("baseline") else f"{100 * e['argmax_agreement']:.1f}%"
        d32 = f"{e['fp32_logits_max_abs_diff']:.3g}" if "fp32_logits_max_abs_diff" in e else "-"
        mem = f"{e['max_memory_gib']:.1f}" if "max_memory_gib" in e else "-"
        lines.append(f"| {e['tp']}x{e['ep']} | {e['prefill_tok_s']:.0f} | {e['decode_tok_s']:.0f} | "
                     f"{e['decode_ms_per_step']:.2f} | {e['prefill_tok_s'] / base['prefill_tok_s']:.2f}x / "
                     f"{e['decode_tok_s'] / base['decode_tok_s']:.2f}x | {mem} | {diff} | {same} | {d32} |")
    if "fp32_check_error" in base:
        lines += ["", f"float32 yardstick failed: {base['fp32_check_error']}"]
    if yardstick is not None:
        lines.append("")
        lines.append(f"yardstick: the first layout's {args.dtype} logits differ from its float32 "
                     f"logits by up to {yardstick:.3g} (same device)")
    table = "\n".join(lines)
    print(table)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w", encoding="utf-8") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    sys.exit(main())
