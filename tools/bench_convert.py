#!/usr/bin/env python3
"""Converter benchmark: peak resident memory and throughput of ``dsa-ascend convert``.

Builds a synthetic multi-GB FP8 checkpoint with the release's structure (random FP8 e4m3 bytes
with power-of-two 128x128 block scales, bf16 embeddings and LM head, the MTP layer), converts it
to each target in a subprocess (as a user would run it) while sampling the resident memory of
that process and of its workers from /proc, prints a table, writes JSON and deletes everything.

    python tools/bench_convert.py [--out results.json] [--workdir DIR] [--vocab 65536]
        [--experts 32] [--workers 2] [--targets fp8 bf16 int8] [--tp 1]

Throughput = source bytes / wall time of the whole command (Python start, planning, conversion,
checksums, finalization included); "durable" adds the ``sync`` that flushes its output to disk.
CPU = user + system seconds of the command and its workers. Memory: the peak of the sampled sum
of VmRSS over the process tree, and each process's own VmHWM (kernel-tracked peak). The disk's
own write speed is measured first (1 GiB written with fsync).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import torch
from safetensors.torch import save_file

from dsa_ascend.checkpoint import INDEX_FILE, SCALE_SUFFIX
from dsa_ascend.config import PRESETS, ModelConfig
from dsa_ascend.convert import expected_tensors

SHARD_BYTES = 256 << 20


def bench_config(vocab: int, experts: int) -> ModelConfig:
    hf = json.loads(json.dumps(PRESETS["tiny"]))
    hf.update(vocab_size=vocab, hidden_size=4096, intermediate_size=12288,
              moe_intermediate_size=2048, num_hidden_layers=4, first_k_dense_replace=1,
              num_attention_heads=32, n_routed_experts=experts, num_experts_per_tok=4, n_group=4,
              topk_group=2, q_lora_rank=1536, index_n_heads=16)
    return ModelConfig.from_hf(hf, source="bench config")


def random_fp8(shape, gen) -> torch.Tensor:
    """Uniform over every finite e4m3 byte (0x7F / 0xFF are NaN)."""
    b = torch.randint(0, 0x7F, shape, dtype=torch.uint8, generator=gen)
    b |= torch.randint(0, 2, shape, dtype=torch.uint8, generator=gen) << 7
    return b.view(torch.float8_e4m3fn)


def make_checkpoint(path: str, config: ModelConfig) -> dict:
    """Shards of <= SHARD_BYTES, written one at a time; returns sizes."""
    os.makedirs(path)
    gen = torch.Generator().manual_seed(0)
    params, quantizable = expected_tensors(config)
    mtp = config.n_layers
    params = {**params, f"model.layers.{mtp}.enorm.weight": (config.dim,),
              f"model.layers.{mtp}.hnorm.weight": (config.dim,),
              f"model.layers.{mtp}.eh_proj.weight": (config.dim, 2 * config.dim)}
    quantizable = quantizable | {f"model.layers.{mtp}.eh_proj.weight"}
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    names: list[str] = []
    total = largest = 0

    def flush():
        nonlocal shard
        if shard:
            name = f"model-{len(names) + 1:05d}.safetensors"
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            names.append(name)
            shard = {}

    size = 0
    for key, shape in params.items():
        if key in quantizable:
            t = {key: random_fp8(shape, gen),
                 key + SCALE_SUFFIX: 2.0 ** -torch.randint(6, 12, (-(-shape[0] // 128),
                                                                  -(-shape[1] // 128)),
                                                           generator=gen).float()}
        elif key.endswith("e_score_correction_bias"):
            t = {key: torch.randn(shape, generator=gen) * 0.05}
        else:
            t = {key: torch.randn(shape, generator=gen).to(torch.bfloat16)}
        n = sum(v.numel() * v.element_size() for v in t.values())
        largest = max(largest, max(v.numel() * v.element_size() for v in t.values()))
        if size + n > SHARD_BYTES:
            flush()
            size = 0
        shard.update(t)
        size += n
        total += n
    flush()
    # Real shard names carry the count: rename now that it is known.
    final = {}
    for i, name in enumerate(names):
        new = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        os.replace(os.path.join(path, name), os.path.join(path, new))
        final[name] = new
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total},
                   "weight_map": {k: final[v] for k, v in weight_map.items()}}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config.to_hf(), f, indent=2)
    return {"bytes": total, "shards": len(names), "largest_tensor_bytes": largest}


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _status(pid: int) -> dict[str, int]:
    vals = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":")
                    vals[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return vals


def run_measured(cmd: list[str]) -> dict:
    """Run ``cmd``; sample its process tree's memory every 10 ms; then ``sync`` (timed apart)."""
    os.sync()  # earlier runs' dirty pages must not be flushed on this run's clock
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_sum, hwm = 0, {}
    stop = threading.Event()

    def sample():
        nonlocal peak_sum
        while not stop.is_set():
            pids, todo = [], [proc.pid]
            while todo:
                p = todo.pop()
                pids.append(p)
                todo += _children(p)
            total = 0
            for p in pids:
                s = _status(p)
                total += s.get("VmRSS", 0)
                if "VmHWM" in s:
                    hwm[p] = max(hwm.get(p, 0), s["VmHWM"])
            peak_sum = max(peak_sum, total)
            time.sleep(0.01)

    t0 = time.perf_counter()
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed ({proc.returncode}):\n{err}")
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # workers included (waited for)
    t1 = time.perf_counter()
    os.sync()
    return {"wall_s": wall, "sync_s": time.perf_counter() - t1,
            "cpu_s": ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime,
            "peak_tree_rss": peak_sum, "process_hwm": sorted(hwm.values()), "stdout": out.strip()}


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(path) for n in ns)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write results JSON here")
    ap.add_argument("--workdir", default=None, help="where the synthetic checkpoint goes (deleted)")
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--targets", nargs="+", default=["fp8", "bf16", "int8"])
    ap.add_argument("--verify", action="store_true", help="also time dsa-ascend verify")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="bench-convert-", dir=args.workdir)
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "torch": torch.__version__, "python": platform.python_version()},
               "runs": []}
    try:
        config = bench_config(args.vocab, args.experts)
        src = os.path.join(work, "src")
        t0 = time.perf_counter()
        info = make_checkpoint(src, config)
        info["make_s"] = time.perf_counter() - t0
        results["checkpoint"] = info
        results["config"] = config.to_hf()
        print(f"synthetic FP8 checkpoint: {info['bytes'] / 1e9:.2f} GB in {info['shards']} shards, "
              f"largest tensor {info['largest_tensor_bytes'] / 2**20:.0f} MiB "
              f"(built in {info['make_s']:.0f}s)", flush=True)
        os.sync()
        probe = os.path.join(work, "disk-probe")
        t0 = time.perf_counter()
        with open(probe, "wb") as f:
            block = os.urandom(8 << 20)
            for _ in range(128):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        results["disk_write_gbps"] = (1 << 30) / 1e9 / (time.perf_counter() - t0)
        os.remove(probe)
        print(f"disk: 1 GiB written + fsync at {results['disk_write_gbps']:.2f} GB/s", flush=True)
        base = run_measured([sys.executable, "-c", "import dsa_ascend.convert, time; time.sleep(0.5)"])
        results["baseline_process_rss"] = base["process_hwm"][-1]
        print(f"baseline: one Python process with torch + dsa_ascend imported: "
              f"{base['process_hwm'][-1] / 2**20:.0f} MiB", flush=True)

        head = (f"{'target':7s} {'tp':>3s} {'in GB':>6s} {'out GB':>7s} {'wall s':>7s} {'in GB/s':>8s} "
                f"{'durable':>8s} {'CPU s':>6s} {'peak tree RSS':>14s} {'max proc HWM':>13s} "
                f"{'tree/largest':>12s}")
        print(head)
        for target in args.targets:
            out = os.path.join(work, f"out-{target}")
            r = run_measured([sys.executable, "-m", "dsa_ascend.cli", "convert", src, "--out", out,
                              "--dtype", target, "--tp", str(args.tp), "--workers",
                              str(args.workers), "--no-progress"])
            out_bytes = dir_bytes(out)
            row = {"target": target, "tp": args.tp, "workers": args.workers,
                   "bytes_in": info["bytes"], "bytes_out": out_bytes, **r,
                   "gbps_in": info["bytes"] / 1e9 / r["wall_s"],
                   "gbps_out": out_bytes / 1e9 / r["wall_s"],
                   "gbps_in_durable": info["bytes"] / 1e9 / (r["wall_s"] + r["sync_s"]),
                   "peak_over_largest": r["peak_tree_rss"] / info["largest_tensor_bytes"]}
            if args.verify:
                v = run_measured([sys.executable, "-m", "dsa_ascend.cli", "verify", out,
                                  "--no-progress"])
                row["verify_s"], row["verify_peak_tree_rss"] = v["wall_s"], v["peak_tree_rss"]
            results["runs"].append(row)
            print(f"{target:7s} {args.tp:3d} {info['bytes'] / 1e9:6.2f} {out_bytes / 1e9:7.2f} "
                  f"{r['wall_s']:7.1f} {row['gbps_in']:8.3f} {row['gbps_in_durable']:8.3f} "
                  f"{r['cpu_s']:6.1f} "
                  f"{r['peak_tree_rss'] / 2**20:10.0f} MiB {r['process_hwm'][-1] / 2**20:9.0f} MiB "
                  f"{row['peak_over_largest']:12.2f}"
                  + (f"   verify {row['verify_s']:.1f}s" if args.verify else ""), flush=True)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
