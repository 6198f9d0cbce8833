"""The ``dsa-ascend`` command: demo, generate, make-tiny, convert, verify, backends."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _default_demo_dir() -> str:
    root = os.environ.get("DSA_ASCEND_HOME", os.path.join(os.path.expanduser("~"), ".cache",
                                                          "dsa_ascend"))
    return os.path.join(root, "tiny-seed0")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["reference", "cuda", "npu"], default=None,
                   help="ops implementation (default: best available for the device)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--indexer-dtype", choices=["auto", "fp8", "bf16", "int8"], default="auto",
                   help="indexer q/k numerics (auto: the backend's preferred, fp8 on reference/cuda, "
                        "bf16 on npu)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                   help="latent cache: the model dtype (auto) or the FP8 format of kv_fp8.py")
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel degree under torchrun (default: the number of processes)")
    p.add_argument("--ep", type=int, default=None,
                   help="expert-parallel degree under torchrun (default: the number of processes)")
    p.add_argument("--debug-parallel", action="store_true",
                   help="check that every rank selects the same top-k in every layer")


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop-token-id", type=int, action="append", default=None,
                   help="stop token id (repeatable; default: the model's EOS)")
    p.add_argument("--seed", type=int, default=None)


def _run_generate(model_dir: str, args, prompts: list[str]) -> int:
    import dsa_ascend

    from .parallel import rank

    t0 = time.perf_counter()
    model = dsa_ascend.load(model_dir, backend=args.backend, device=args.device,
                            dtype=DTYPES[args.dtype], max_seq_len=args.max_seq_len,
                            max_batch_size=args.max_batch_size, indexer_dtype=args.indexer_dtype,
                            kv_cache_dtype=args.kv_cache_dtype,
                            tp=args.tp, ep=args.ep, debug_parallel=args.debug_parallel)
    t1 = time.perf_counter()
    results = dsa_ascend.generate(model, prompts, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_p=args.top_p,
                                  stop_token_ids=args.stop_token_id, seed=args.seed)
    t2 = time.perf_counter()
    p = model.parallel
    if rank() != 0:  # every rank holds the same results; one prints them
        return 0
    for prompt, res in zip(prompts, results):
        print(f"--- prompt: {prompt!r}")
        print(f"    tokens: {res.tokens}")
        print(f"    text:   {res.text!r}  [{res.finish_reason}]")
    n = sum(len(r.tokens) for r in results)
    where = f" tp={p.tp} ep={p.ep} ({p.world_size} ranks)" if p.world_size > 1 else ""
    print(f"backend={model.backend} device={model.device}{where} dtype={args.dtype}: loaded in "
          f"{t1 - t0:.2f}s, {n} tokens in {t2 - t1:.2f}s ({n / max(t2 - t1, 1e-9):.1f} tok/s)")
    return 0


def cmd_generate(args) -> int:
    if not args.prompt:
        raise SystemExit("error: give at least one --prompt")
    return _run_generate(args.model, args, args.prompt)


def cmd_demo(args) -> int:
    from .parallel import ParallelError, world_size
    from .tiny import make_tiny_checkpoint

    if world_size() > 1:
        raise ParallelError("demo runs in one process (it may write its checkpoint); under "
                            "torchrun use: generate --model DIR")

    path = args.dir or _default_demo_dir()
    if os.path.exists(os.path.join(path, "config.json")):
        print(f"reusing the tiny checkpoint in {path}")
    else:
        print(f"building the tiny checkpoint in {path}")
        make_tiny_checkpoint(path, seed=0)
    prompts = args.prompt or ["DeepSeek Sparse Attention picks", "Ascend and CUDA agree"]
    return _run_generate(path, args, prompts)


def cmd_make_tiny(args) -> int:
    from .tiny import make_tiny_checkpoint

    make_tiny_checkpoint(args.out, preset_name=args.preset, seed=args.seed, shards=args.shards,
                         overwrite=args.overwrite)
    print(f"wrote {args.out}")
    return 0


def cmd_convert(args) -> int:
    from .convert import convert_checkpoint

    r = convert_checkpoint(args.input, args.out, args.dtype, tp=args.tp, ep=args.ep,
                           keep_mtp=args.keep_mtp, workers=args.workers,
                           progress=not args.no_progress)
    gb = r["bytes_in"] / 1e9
    print(f"wrote {args.out}: dtype={r['dtype']} tp={r['tp']} ep={r['ep']} "
          f"({r['world_size']} rank{'s' if r['world_size'] > 1 else ''}); "
          f"{r['files_written']} file(s) written, {r['files_skipped']} already done; "
          f"{gb:.2f} GB in, {r['bytes_out'] / 1e9:.2f} GB out in {r['seconds']:.1f}s "
          f"({gb / max(r['seconds'], 1e-9):.2f} GB/s, "
          f"{r['workers'] or 'no'} worker process{'es' if r['workers'] != 1 else ''})")
    return 0


def cmd_verify(args) -> int:
    from .convert import verify_checkpoint

    r = verify_checkpoint(args.dir, progress=not args.no_progress)
    print(f"OK {args.dir}: {r['files']} file(s), {r['tensors']} tensors, {r['bytes'] / 1e9:.2f} GB; "
          f"dtype={r['dtype']} tp={r['tp']} ep={r['ep']}: checksums, headers, index, key coverage "
          "and shapes match")
    return 0


def cmd_backends(args) -> int:
    from .backends import BACKENDS, unavailable_reason

    for name in BACKENDS:
        reason = unavailable_reason(name)
        print(f"{name:10s} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsa-ascend", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate from an HF-format checkpoint directory")
    p.add_argument("--model", required=True, help="checkpoint directory")
    _add_model_options(p)
    _add_sampling_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="build (or reuse) the tiny checkpoint and generate")
    p.add_argument("--dir", default=None, help=f"checkpoint directory (default {_default_demo_dir()})")
    _add_model_options(p)
    _add_sampling_options(p)
    p.set_defaults(func=cmd_demo, max_new_tokens=16)

    p = sub.add_parser("make-tiny", help="write a deterministic tiny checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("convert", help="convert an HF checkpoint (e.g. the FP8 release) to fp8, "
                       "bf16 or int8 W8A8, optionally split for tensor/expert parallelism")
    p.add_argument("input", help="HF checkpoint directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output directory (rerun the same command to "
                   "resume an interrupted conversion)")
    p.add_argument("--dtype", required=True, choices=["fp8", "bf16", "int8"],
                   help="weights of the quantizable linears: FP8 blocks kept (CUDA), bf16 "
                   "(Ascend 910B/C), int8 W8A8 with per-channel scales (Ascend throughput)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel degree (default: --tp)")
    p.add_argument("--keep-mtp", action="store_true", help="keep the MTP layer (dropped by default)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes converting shards in parallel (default: CPU count; 0: "
                   "convert in this process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("verify", help="re-read a converted directory: checksums, headers, key "
                       "coverage and shapes against config.json")
    p.add_argument("dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("backends", help="list the backends and why one cannot run here")
    p.set_defaults(func=cmd_backends)
    return parser


def main(argv=None) -> int:
    from .backends import BackendUnavailable
    from .cache import CacheError
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .parallel import world_size

    args = build_parser().parse_args(argv)
    known = (BackendUnavailable, CheckpointError, ConfigError, CacheError, ValueError,
             FileExistsError)
    if world_size() > 1:
        return _run_rank(args, known)
    try:
        return args.func(args)
    except known as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run_rank(args, known: tuple) -> int:
    """One rank of a torchrun job. An error here must end every rank, and the others may be
    blocked in a collective waiting for this one: print it with the rank and leave at once,
    without the orderly shutdown that would wait for them. Their collective then fails (the
    connection closes; torchrun also stops the other workers), or times out (DSA_DIST_TIMEOUT)."""
    import traceback

    from .parallel import CollectiveError, peer_failure, rank, report_failure

    try:
        return args.func(args)
    except Exception as e:
        if isinstance(e, CollectiveError):
            cause = peer_failure()
            msg = f"[rank {rank()}] error: {e}" + (f"; it reported: {cause}" if cause else "")
        else:
            msg = f"[rank {rank()}] error: {e}"
            if not isinstance(e, known):
                msg = f"[rank {rank()}] error: {type(e).__name__}: {e}\n{traceback.format_exc()}"
            report_failure(msg.splitlines()[0])
        sys.stdout.flush()
        print(msg, file=sys.stderr, flush=True)
        os._exit(2 if isinstance(e, known) else 1)


if __name__ == "__main__":
    sys.exit(main())
