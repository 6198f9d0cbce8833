"""Multi-device inference, 2 processes started by torchrun (gloo on CPU; with ``--backend cuda``
on 2 GPUs: NCCL and the Triton kernels): TP=2, EP=2 and TP=2+EP=2 give the single-process
logits (to float32 reduction order) and the same greedy continuations; the converter's rank
directories load like the HF directory, which each rank reads only its slice of; the debug mode
catches ranks whose top-k differ; the CLI prints on rank 0 only, and an error on one rank ends
both with its message.

One torchrun job (``python tests/test_distributed.py worker ...``, the bottom of this file)
computes every layout's results, so the processes start once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import EXACT, seeded

import dsa_ascend
from dsa_ascend import checkpoint
from dsa_ascend.config import RunConfig, model_config_from_dir, preset
from dsa_ascend.convert import (
    DIM0,
    DIM1,
    EXPERT,
    Layout,
    convert_checkpoint,
    expert_index,
    scale_piece,
    split_rule,
    weight_key,
    weight_piece,
)
from dsa_ascend.parallel import Parallel, ParallelError, make_parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Equality needs the same arithmetic up to summation order: no FP8 activation / latent rounding
# (EXACT) and the bf16 indexer (FP8 q/k quantization turns 1-ulp differences into near-tie flips).
OPTIONS = dict(EXACT, indexer_dtype="bf16", max_seq_len=64, max_batch_size=2)
LAYOUTS = {"tp2": (2, 1), "ep2": (1, 2), "tp2_ep2": (2, 2)}
SHARDS = {"shards_tp2_ep2": ("bf16", 2, 2, "tp2_ep2"), "shards_ep2": ("fp8", 1, 2, "ep2")}
PROMPTS = ["DeepSeek sparse attention on two ranks", "gloo"]  # the first is longer than top-k 16
NEW_TOKENS = 5


def _tokens() -> torch.Tensor:
    return torch.randint(0, 512, (2, 24), generator=seeded(11))  # 24 > index_topk: sparse


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", DSA_DIST_TIMEOUT="60", **extra)
    return env


@pytest.fixture(scope="module")
def on(backend, device) -> dict:
    """backend / device of the suite (the reference backend on CPU by default), for 2 ranks."""
    if device.type != "cpu" and getattr(torch, device.type).device_count() < 2:
        pytest.skip(f"needs 2 {device.type} devices, {getattr(torch, device.type).device_count()} "
                    "visible")
    return dict(backend=backend, device=device.type)


def _torchrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(),
                          cwd=ROOT)


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def shard_dirs(tiny_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("shards")
    out = {}
    for name, (dtype, tp, ep, _) in SHARDS.items():
        out[name] = convert_checkpoint(tiny_dir, str(root / name), dtype, tp=tp, ep=ep, workers=0,
                                       progress=False)["out"]
    return out


@pytest.fixture(scope="module")
def single(tiny_dir, on) -> dict:
    """The single-process results, and the spread of its float32 logits over other orders of
    the same math (chunked prefill; the MHA form of attention instead of the absorbed one)."""
    def load(**kw):
        return dsa_ascend.load(tiny_dir, dtype=torch.float32, **on, **OPTIONS, **kw)

    model, tokens = load(), _tokens()
    logits = model(tokens).cpu()
    model.reset()
    chunked = torch.cat([model(tokens[:, :10]), model(tokens[:, 10:], start_pos=10)], dim=1).cpu()
    mha = load(mla_form="mha")(tokens).cpu()
    spread = max((x - logits).abs().max().item() for x in (chunked, mha))
    generated = [c.tokens for c in dsa_ascend.generate(model, PROMPTS, max_new_tokens=NEW_TOKENS)]
    return dict(logits=logits, spread=spread, tokens=generated)


@pytest.fixture(scope="module")
def ranks(tiny_dir, shard_dirs, on, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    spec = dict(out=str(out), hf=tiny_dir, shards=shard_dirs, on=on)
    r = _torchrun(os.path.join(ROOT, "tests", "test_distributed.py"), "worker", json.dumps(spec))
    assert r.returncode == 0, r.stdout + r.stderr
    return [torch.load(out / f"rank{i}.pt") for i in range(2)]


# ------------------------------------------------------------------------ equality tests
def _budget(single: dict) -> float:
    """Float32 reduction-order tolerance. The parallel run sums the same float32 terms in other
    orders (o_proj / down_proj over two pieces, experts over two ranks), as the single process
    does when it chunks its prefill or takes the MHA form: 4x that spread. A wrong slice or a
    missing reduction is 4-5 orders of magnitude larger."""
    budget = 4 * single["spread"]
    scale = single["logits"].abs().max().item()
    assert 0 < budget < 1e-4 * scale, f"reference spread {single['spread']:.2e} (scale {scale:.2f})"
    return budget


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_parallel_logits_equal_single_process(single, ranks, layout):
    budget = _budget(single)
    for r, res in enumerate(ranks):
        got = res[layout]["logits"]
        err = (got.double() - single["logits"].double()).abs().max().item()
        assert err <= budget, f"{layout} rank {r}: max error {err:.3e} exceeds {budget:.3e}"
    # Every rank ends with the same (all-gathered) logits, bit for bit.
    assert torch.equal(ranks[0][layout]["logits"], ranks[1][layout]["logits"])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_greedy_continuations_are_identical(single, ranks, layout):
    assert all(len(t) == NEW_TOKENS for t in single["tokens"])
    for res in ranks:
        assert res[layout]["tokens"] == single["tokens"]


@pytest.mark.parametrize("name", sorted(SHARDS))
def test_converter_rank_directories_load_like_the_hf_directory(single, ranks, on, name):
    """bf16 shards hold the FP8 weights' exact values (power-of-two block scales), fp8 shards
    their bytes: the same layout from either source gives the same logits, bit for bit on CPU
    (elsewhere a bf16 and an FP8 linear may take different GEMM kernels: to float32 order)."""
    same_as = SHARDS[name][3]
    for res in ranks:
        got, want = res[name]["logits"], res[same_as]["logits"]
        if on["device"] == "cpu":
            assert torch.equal(got, want)
        else:
            assert (got - want).abs().max().item() <= _budget(single)


def test_each_rank_reads_only_its_slice_of_the_hf_directory(tiny_dir, ranks):
    """Every tensor read on a rank (TP=2+EP=2 from the FP8 HF directory) is this rank's piece:
    half the rows / columns of a split weight (its scale: the blocks under that half), its own
    routed experts only, replicated tensors whole."""
    full = checkpoint.read_headers(tiny_dir)
    n_experts, layout = model_config_from_dir(tiny_dir).n_routed_experts, Layout(2, 2)
    for r, res in enumerate(ranks):
        assert res["reads"], "the spy saw no reads"
        for key, shape in res["reads"]:
            weight = weight_key(key)
            piece = weight_piece(weight, full[weight].shape, layout, r, n_experts)
            assert piece is not None, f"rank {r} read {key!r}, which another rank holds"
            want = (piece.shape(full[key].shape) if key == weight
                    else scale_piece(piece, "fp8").shape(full[key].shape))
            assert shape == want, (key, shape, want)
            if key == weight and split_rule(key) in (DIM0, DIM1):
                assert shape != full[key].shape, key
        experts_read = {expert_index(k) for k, _ in res["reads"] if split_rule(k) == EXPERT}
        assert experts_read == set(layout.experts(r, n_experts))


def test_debug_mode_catches_ranks_whose_topk_differ(ranks):
    for res in ranks:
        msg = res["debug_error"]
        assert msg is not None, "the perturbed indexer went unnoticed"
        assert "layer 1: indexer top-k" in msg and "rank 1 differs from rank 0" in msg


# --------------------------------------------------------------------- CLI and failures
def test_torchrun_cli_generates_and_only_rank_0_prints(tiny_dir, on):
    r = _torchrun("-m", "dsa_ascend.cli", "generate", "--model", tiny_dir, "--prompt", PROMPTS[0],
                  "--prompt", PROMPTS[1], "--max-new-tokens", "3", "--dtype", "fp32",
                  "--backend", on["backend"], "--device", on["device"], "--indexer-dtype", "bf16",
                  "--debug-parallel")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("--- prompt:") == 2, r.stdout
    assert r.stdout.count("tp=2 ep=2 (2 ranks)") == 1, r.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_error_on_one_rank_ends_every_rank_with_its_message(shard_dirs, on, tmp_path):
    """Rank 1 fails while loading (a shard of its directory is missing); rank 0, already in the
    first collective, must not hang. Started without torchrun's agent (which would kill it), on
    CPU: gloo notices the closed connection. (NCCL / HCCL do not: a peer's death ends a rank
    blocked in a collective at the timeout, or when torchrun stops it, as it does at once.)"""
    if on["device"] != "cpu":
        pytest.skip("without torchrun, only gloo notices a dead peer before the timeout")
    bad = str(tmp_path / "bad")
    shutil.copytree(shard_dirs["shards_tp2_ep2"], bad)
    os.remove(os.path.join(bad, "rank-00001-of-00002", "model-00001-of-00002.safetensors"))
    env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    cmd = [sys.executable, "-m", "dsa_ascend.cli", "generate", "--model", bad, "--prompt", "x",
           "--dtype", "fp32", "--backend", on["backend"]]
    t0 = time.monotonic()
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(i), "LOCAL_RANK": str(i)}, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert time.monotonic() - t0 < 60
    assert procs[1].returncode == 2 and procs[0].returncode != 0
    missing = "lists shard 'model-00001-of-00002.safetensors'"
    assert "[rank 1] error:" in outs[1][1] and missing in outs[1][1], outs[1][1]
    assert "[rank 0] error:" in outs[0][1] and "another rank probably failed first" in outs[0][1], outs[0][1]
    # rank 0 also quotes rank 1's message when it reads it from the store in time: best effort
    # (under load rank 0 can see the closed connection before rank 1 has written it)
    assert "--- prompt" not in outs[0][0]


# ----------------------------------------------------------------- layouts without processes
def test_layouts_that_do_not_fit_name_the_dimension(tiny_dir, shard_dirs, monkeypatch):
    for k in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(k, raising=False)
    cfg, cpu = preset("tiny"), torch.device("cpu")
    with pytest.raises(ParallelError, match="num_attention_heads = 4"):
        make_parallel(cfg, 3, 1, cpu)
    with pytest.raises(ParallelError, match="n_routed_experts = 16"):
        make_parallel(cfg, 1, 3, cpu)
    with pytest.raises(ParallelError, match="vocab_size = 510"):
        make_parallel(preset_with(vocab_size=510), 4, 4, cpu)
    with pytest.raises(ParallelError, match="needs 2 processes, this job has 1"):
        make_parallel(cfg, 2, 2, cpu)
    load = dict(backend="reference", device="cpu", dtype=torch.float32)
    with pytest.raises(ParallelError, match="holds a tp=2 ep=2 conversion"):
        dsa_ascend.load(shard_dirs["shards_tp2_ep2"], tp=2, ep=1, **load)
    with pytest.raises(ParallelError, match="needs 2 processes"):
        dsa_ascend.load(shard_dirs["shards_tp2_ep2"], **load)
    rank_dir = os.path.join(shard_dirs["shards_tp2_ep2"], "rank-00001-of-00002")
    with pytest.raises(ParallelError, match="rank 1's directory .* load its parent"):
        dsa_ascend.load(rank_dir, **load)


def preset_with(**changes):
    return dataclasses.replace(preset("tiny"), **changes)


@pytest.mark.parametrize("tp,ep", [(2, 4), (4, 2), (4, 4), (4, 1), (1, 4)])
def test_every_rank_of_larger_layouts_holds_the_split_tables_slice(tp, ep):
    """Built on the meta device for each rank: parameter shapes are the converter's pieces,
    routed experts are covered once per token (the token split of replicated experts tiles the
    batch), and the shared expert is added by exactly one replica."""
    from dsa_ascend.model.transformer import Transformer

    cfg = preset("tiny")
    full = {k: tuple(p.shape) for k, p in
            Transformer(cfg, RunConfig(), "reference", torch.bfloat16).named_parameters()}
    layout = Layout(tp, ep)
    n_tokens, cover, shared = 7, {}, 0
    for r in range(layout.world_size):
        p = Parallel(layout, r)
        model = Transformer(cfg, RunConfig(), "reference", torch.bfloat16, parallel=p)
        params = {k: tuple(v.shape) for k, v in model.named_parameters()}
        want = {}
        for k, shape in full.items():
            piece = weight_piece(k, shape, layout, r, cfg.n_routed_experts)
            if piece is not None:
                want[k] = piece.shape(shape)
        assert params == want
        first, last = p.routed_tokens(n_tokens)
        for e in p.local_experts(cfg.n_routed_experts):
            for t in range(first, last):
                cover[e, t] = cover.get((e, t), 0) + 1
        shared += p.adds_shared
    assert cover == {(e, t): 1 for e in range(cfg.n_routed_experts) for t in range(n_tokens)}
    assert shared == tp  # the TP pieces of one replica


# ----------------------------------------------------------------------- the torchrun job
class _ReadSpy:
    """Wraps a safetensors handle: records (key, shape) of every tensor actually read."""

    def __init__(self, opened, reads: list):
        self.opened, self.reads = opened, reads

    def __enter__(self):
        self.handle = self.opened.__enter__()
        return self

    def __exit__(self, *exc):
        return self.opened.__exit__(*exc)

    def keys(self):
        return self.handle.keys()

    def get_tensor(self, key):
        t = self.handle.get_tensor(key)
        self.reads.append((key, tuple(t.shape)))
        return t

    def get_slice(self, key):
        spy, sl = self, self.handle.get_slice(key)

        class Slice:
            get_dtype, get_shape = sl.get_dtype, sl.get_shape

            def __getitem__(self, index):
                t = sl[index]
                spy.reads.append((key, tuple(t.shape)))
                return t

        return Slice()


def _worker(spec: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    results: dict = {}
    on = spec["on"]

    def run(path, tp=None, ep=None, generate=True):
        model = dsa_ascend.load(path, dtype=torch.float32, tp=tp, ep=ep, debug_parallel=True,
                                **on, **OPTIONS)
        out = dict(logits=model(_tokens()).cpu())
        if generate:
            out["tokens"] = [c.tokens for c in dsa_ascend.generate(model, PROMPTS,
                                                                   max_new_tokens=NEW_TOKENS)]
        return out

    reads: list = []
    opener = checkpoint._open
    checkpoint._open = lambda path: _ReadSpy(opener(path), reads)
    results["tp2_ep2"] = run(spec["hf"], 2, 2)
    checkpoint._open = opener
    results["reads"] = [r for r in reads]
    for name, (tp, ep) in LAYOUTS.items():
        if name != "tp2_ep2":
            results[name] = run(spec["hf"], tp, ep)
    for name, path in spec["shards"].items():
        results[name] = run(path, generate=False)

    # Debug mode: rank 1's layer-1 indexer weighs its heads the other way round.
    model = dsa_ascend.load(spec["hf"], dtype=torch.float32, tp=2, ep=2, debug_parallel=True,
                            **on, **OPTIONS)
    if dist.get_rank() == 1:
        with torch.no_grad():
            model.model.layers[1].self_attn.indexer.weights_proj.weight.neg_()
    results["debug_error"] = None
    try:
        model(_tokens())
    except ParallelError as e:
        results["debug_error"] = str(e)
    torch.save(results, os.path.join(spec["out"], f"rank{dist.get_rank()}.pt"))


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(json.loads(sys.argv[2]))
