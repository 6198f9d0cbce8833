"""dsa_ascend.convert on the tiny checkpoint: every target loads and gives the original's logits
(fp8: a byte copy, identical; bf16: identical, because power-of-two block scales make every
dequantized weight a bf16 number; int8 W8A8: no further from bf16 than the official FP8 W8A8
path), TP/EP shards reassemble bit for bit, a conversion killed midway resumes to the same bytes,
verify catches damage, and every kind of bad input is named."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import rewrite_shard, seeded
from safetensors import safe_open
from safetensors.torch import save_file

import dsa_ascend
from dsa_ascend.checkpoint import INDEX_FILE, CheckpointError, read_headers
from dsa_ascend.cli import main
from dsa_ascend.config import PRESETS, ModelConfig
from dsa_ascend.convert import (
    MANIFEST,
    PROGRESS,
    ConvertError,
    Layout,
    convert_checkpoint,
    expected_tensors,
    reassemble,
    split_rule,
    verify_checkpoint,
)
from dsa_ascend.quant import dequantize_weight
from dsa_ascend.tiny import make_tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "model.layers.1.self_attn.q_b_proj.weight"
MTP_KEY = "model.layers.3.eh_proj.weight"


def _convert(src, out, dtype, **kw):
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    return convert_checkpoint(src, str(out), dtype, **kw)


def _load(path, **kw):
    return dsa_ascend.load(str(path), backend="reference", device="cpu", dtype=torch.float32,
                           max_seq_len=128, max_batch_size=4, **kw)


def _tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for key, info in read_headers(str(path)).items():
        with safe_open(info.file, framework="pt") as f:
            out[key] = f.get_tensor(key)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _files(path) -> dict[str, bytes]:
    out = {}
    for root, _, names in os.walk(path):
        for n in names:
            p = os.path.join(root, n)
            out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


def _rel_rms(a, ref) -> float:
    return ((a - ref).norm() / ref.norm()).item()


TOKENS = torch.randint(0, 512, (4, 48), generator=seeded(0))  # 48 > index_topk: DSA selects


@pytest.fixture(scope="module")
def converted(tiny_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("converted")
    return {dt: _convert(tiny_dir, root / dt, dt)["out"] for dt in ("fp8", "bf16", "int8")}


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory) -> str:
    """The tiny model with FP8 block scales that are not powers of two (no scale_fmt)."""
    hf = json.loads(json.dumps(PRESETS["tiny"]))
    del hf["quantization_config"]["scale_fmt"]
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("plain") / "tiny"), seed=1,
                                config=ModelConfig.from_hf(hf))


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory) -> str:
    """moe_intermediate_size 256: every TP=2 piece is a whole number of 128-blocks (FP8 TP)."""
    hf = json.loads(json.dumps(PRESETS["tiny"]))
    hf["moe_intermediate_size"] = 256
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("wide") / "tiny"), seed=2,
                                config=ModelConfig.from_hf(hf))


# ------------------------------------------------------------------------------ numerics
def test_fp8_target_is_a_byte_copy_with_identical_logits(tiny_dir, converted):
    src, out = _tensors(tiny_dir), _tensors(converted["fp8"])
    n_layers = ModelConfig.from_file(os.path.join(tiny_dir, "config.json")).n_layers
    assert set(out) == {k for k in src if not k.startswith(f"model.layers.{n_layers}.")}
    assert all(_same(out[k], src[k]) for k in out)
    cfg = json.load(open(os.path.join(converted["fp8"], "config.json")))
    assert cfg["quantization_config"]["quant_method"] == "fp8"
    assert cfg["num_nextn_predict_layers"] == 0  # the MTP layer was dropped
    assert torch.equal(_load(converted["fp8"])(TOKENS), _load(tiny_dir)(TOKENS))


@pytest.mark.parametrize("which", ["tiny", "plain"])
def test_bf16_weights_are_the_dequantized_fp8_rounded_once(tiny_dir, plain_dir, tmp_path, which):
    src_dir = tiny_dir if which == "tiny" else plain_dir
    out_dir = _convert(src_dir, tmp_path / "bf16", "bf16")["out"]
    src, out = _tensors(src_dir), _tensors(out_dir)
    params, quantizable = expected_tensors(ModelConfig.from_file(os.path.join(src_dir, "config.json")))
    assert set(out) == set(params)  # no scales left, no MTP
    for key in params:
        if key in quantizable:
            w, s = src[key], src[key + "_scale_inv"]
            assert out[key].dtype == torch.bfloat16
            assert _same(out[key], dequantize_weight(w, s).to(torch.bfloat16)), key
        else:
            assert _same(out[key], src[key]), key
    # By hand: element (i, j) is the e4m3 value times the scale of block (i // 128, j // 128).
    w, s = src[KEY], src[KEY + "_scale_inv"]
    for i, j in [(0, 0), (127, 127), (128, 0), (5, 127), (767, 100), (300, 64)]:
        want = torch.tensor(float(w[i, j].float()) * float(s[i // 128, j // 128]))
        assert out[KEY][i, j].item() == want.to(torch.bfloat16).item()
    cfg = json.load(open(os.path.join(out_dir, "config.json")))
    assert "quantization_config" not in cfg
    ue8m0 = which == "tiny"
    assert cfg.get("scale_fmt") == ("ue8m0" if ue8m0 else None)
    assert ModelConfig.from_hf(cfg).ue8m0 is ue8m0  # the activation quantizations stay as they were
    if ue8m0:  # power-of-two scales: the bf16 weight is the dequantized weight, not rounded
        assert torch.equal(out[KEY].float(), dequantize_weight(w, s))


def test_bf16_logits_equal_the_original_without_activation_quantization(tiny_dir, converted):
    """Apples to apples: bf16 weights have no FP8 activation quantization, so the original runs
    with fp8_act_quant=False; everything else (indexer FP8 keys, FP8 latent round trip, ue8m0)
    is the same. With the release's power-of-two block scales every dequantized weight (4
    significant bits times 2^k) is a bf16 number, both models multiply by the same float32
    matrices, and the tolerance is zero."""
    want = _load(tiny_dir, fp8_act_quant=False)(TOKENS)
    got = _load(converted["bf16"])(TOKENS)
    assert torch.equal(got, want)


def test_int8_w8a8_weights_and_logits(tiny_dir, converted, capsys):
    src, out = _tensors(tiny_dir), _tensors(converted["int8"])
    _, quantizable = expected_tensors(ModelConfig.from_file(os.path.join(tiny_dir, "config.json")))
    for key in quantizable:
        q, scale = out[key], out[key + "_scale"]
        w = dequantize_weight(src[key], src[key + "_scale_inv"])
        assert q.dtype == torch.int8 and scale.dtype == torch.float32
        assert scale.shape == (w.shape[0],) and (key + "_scale_inv") not in out
        assert torch.equal(scale, w.abs().amax(1) / 127)
        assert int(q.abs().amax()) == 127 and int(q.min()) >= -127
        err = (q.float() * scale[:, None] - w).abs()
        assert (err <= scale[:, None] * (0.5 + 1e-5)).all(), key  # round to nearest
    assert json.load(open(os.path.join(converted["int8"], "config.json")))[
        "quantization_config"]["quant_method"] == "w8a8_int8"

    # 12 prompts of 16 tokens (<= index_topk: every key is selected, so only expert choices
    # can flip); the official FP8 W8A8 path has the same weights as bf16.
    g = seeded(1)
    batches = [torch.randint(0, 512, (4, 16), generator=g) for _ in range(3)]

    def logits(path):
        model = _load(path)
        out = []
        for t in batches:
            model.reset()
            out.append(model(t))
        return torch.cat(out)

    bf16, int8, fp8 = logits(converted["bf16"]), logits(converted["int8"]), logits(tiny_dir)
    e_int8, e_fp8 = _rel_rms(int8, bf16), _rel_rms(fp8, bf16)
    agree = (int8.argmax(-1) == bf16.argmax(-1)).float().mean().item()
    with capsys.disabled():
        print(f"\nint8 W8A8 vs bf16 logits: relative RMS {e_int8:.3f}, max |d| / max |logit| "
              f"{((int8 - bf16).abs().max() / bf16.abs().max()).item():.3f}, top-1 agreement "
              f"{agree:.3f}; official FP8 W8A8 vs bf16: relative RMS {e_fp8:.3f}")
    # Each int8 linear errs by ~1% (half a step of amax/127 on weights and on activations);
    # the tiny random model turns that into larger logit changes where a perturbation flips an
    # expert choice (16 experts, top-4): the same amplification hits the official FP8
    # activation quantization (3 mantissa bits), which is the budget.
    assert e_int8 <= e_fp8
    assert agree >= 0.75


# ------------------------------------------------------------------------------ TP / EP
def test_split_table_follows_the_spec():
    rules = {
        "model.embed_tokens.weight": "dim0", "lm_head.weight": "dim0",
        "model.layers.0.self_attn.q_b_proj.weight": "dim0",
        "model.layers.0.self_attn.kv_b_proj.weight_scale_inv": "dim0",
        "model.layers.0.self_attn.o_proj.weight": "dim1",
        "model.layers.0.mlp.gate_proj.weight": "dim0", "model.layers.0.mlp.up_proj.weight": "dim0",
        "model.layers.0.mlp.down_proj.weight": "dim1",
        "model.layers.1.mlp.shared_experts.up_proj.weight": "dim0",
        "model.layers.1.mlp.shared_experts.down_proj.weight_scale": "dim1",
        "model.layers.1.mlp.experts.7.down_proj.weight": "expert",
        "model.layers.1.mlp.gate.weight": "replicated",
        "model.layers.1.mlp.gate.e_score_correction_bias": "replicated",
        "model.layers.0.self_attn.q_a_proj.weight": "replicated",
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": "replicated",
        "model.layers.0.self_attn.indexer.wq_b.weight": "replicated",
        "model.layers.0.self_attn.indexer.k_norm.bias": "replicated",
        "model.layers.0.input_layernorm.weight": "replicated", "model.norm.weight": "replicated",
        "model.layers.61.eh_proj.weight": "replicated",
        "model.layers.61.shared_head.head.weight": "dim0",
    }
    assert {k: split_rule(k) for k in rules} == rules
    layout = Layout(tp=2, ep=4)
    assert [(layout.tp_rank(r), layout.ep_rank(r)) for r in range(4)] == [(0, 0), (1, 1), (0, 2), (1, 3)]
    layout = Layout(tp=4, ep=2)
    assert [layout.experts(r, 16) for r in range(4)] == [range(0, 8)] * 2 + [range(8, 16)] * 2


@pytest.mark.parametrize("dtype,tp,ep", [("bf16", 2, 2), ("int8", 2, 4), ("int8", 4, 2),
                                         ("bf16", 1, 4), ("fp8", 2, 4)])
def test_tp_ep_shards_reassemble_bit_exactly(tiny_dir, converted, wide_dir, tmp_path, dtype, tp,
                                             ep):
    if dtype == "fp8":  # the tiny preset's 128-wide shared expert cannot be cut in FP8 blocks
        src, full = wide_dir, _convert(wide_dir, tmp_path / "full", dtype)["out"]
    else:
        src, full = tiny_dir, converted[dtype]
    out = _convert(src, tmp_path / "split", dtype, tp=tp, ep=ep)["out"]
    world = max(tp, ep)
    ranks = sorted(d for d in os.listdir(out) if d.startswith("rank-"))
    assert ranks == [f"rank-{r:05d}-of-{world:05d}" for r in range(world)]
    want = _tensors(full)
    got = reassemble(out)
    assert set(got) == set(want)
    assert all(_same(got[k], want[k]) for k in want), [k for k in want if not _same(got[k], want[k])]
    layout = Layout(tp, ep)
    for r, d in enumerate(ranks):
        part = _tensors(os.path.join(out, d))
        experts = {int(k.split(".")[5]) for k in part if ".mlp.experts." in k}
        assert experts == set(layout.experts(r, 16))
        assert part[KEY].shape == (want[KEY].shape[0] // tp, want[KEY].shape[1])
        o_proj = "model.layers.0.self_attn.o_proj.weight"
        assert part[o_proj].shape == (want[o_proj].shape[0], want[o_proj].shape[1] // tp)
        verify_checkpoint(os.path.join(out, d), progress=False)
    verify_checkpoint(out, progress=False)


def test_fp8_split_inside_a_scale_block_is_refused(tiny_dir, tmp_path):
    with pytest.raises(ConvertError, match=r"shared_experts\.(gate|up|down)_proj\.weight.*128x128"):
        _convert(tiny_dir, tmp_path / "o", "fp8", tp=2)
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("tp,ep,match", [
    (3, 1, "--tp 3 does not divide num_attention_heads = 4"),
    (8, 1, "--tp 8 does not divide num_attention_heads = 4"),
    (1, 3, "--ep 3 does not divide n_routed_experts = 16"),
    (2, 3, "one must divide the other"),
    (0, 1, "--tp must be a positive integer"),
])
def test_tp_ep_degrees_that_do_not_divide_are_named(tiny_dir, tmp_path, tp, ep, match):
    with pytest.raises(ConvertError, match=match):
        _convert(tiny_dir, tmp_path / "o", "bf16", tp=tp, ep=ep)


def test_keep_mtp_keeps_and_converts_the_mtp_layer(tiny_dir, tmp_path):
    out = _convert(tiny_dir, tmp_path / "mtp", "int8", tp=2, keep_mtp=True)["out"]
    full = reassemble(out)
    assert full[MTP_KEY].dtype == torch.int8 and full[MTP_KEY + "_scale"].shape == (256,)
    assert "model.layers.3.enorm.weight" in full
    assert json.load(open(os.path.join(out, "config.json")))["num_nextn_predict_layers"] == 1
    verify_checkpoint(out, progress=False)
    single = _convert(tiny_dir, tmp_path / "mtp1", "bf16", keep_mtp=True)["out"]
    assert _tensors(single)[MTP_KEY].dtype == torch.bfloat16
    _load(single)  # the loader skips the MTP layer


# ------------------------------------------------------------------- resume, verify, manifest
def _recorded(out: str) -> int:
    try:
        with open(os.path.join(out, PROGRESS)) as f:
            return len(json.load(f)["files"])
    except (OSError, ValueError, KeyError):  # not written yet, or replaced while read
        return 0


def test_killed_conversion_resumes_to_identical_bytes(tiny_dir, tmp_path):
    ref = _convert(tiny_dir, tmp_path / "ref", "int8", tp=2, workers=2)  # 2 processes
    assert ref["workers"] == 2 and ref["files_written"] == 4
    out = str(tmp_path / "out")
    env = {**os.environ, "DSA_CONVERT_TEST_DELAY": "0.01"}  # ~3 s of work: kill it midway
    proc = subprocess.Popen([sys.executable, "-m", "dsa_ascend.cli", "convert", tiny_dir, "--out",
                             out, "--dtype", "int8", "--tp", "2", "--workers", "0",
                             "--no-progress"], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120

    def mid_write() -> bool:  # a finished file is recorded while another is still being written
        names = [n for _, _, ns in os.walk(out) for n in ns] if os.path.exists(out) else []
        return any(n.endswith(".tmp") for n in names) and _recorded(out) > 0

    try:
        while time.monotonic() < deadline and proc.poll() is None:
            # (renamed files are recorded when their shard's group completes). Seen, the process
            # is frozen and looked at again, so the .tmp cannot be finished between the look and
            # the kill (that race failed this test once on a loaded CI machine)
            if mid_write():
                proc.send_signal(signal.SIGSTOP)
                if mid_write():
                    break
                proc.send_signal(signal.SIGCONT)
            time.sleep(0.01)
        assert proc.poll() is None, "the conversion finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    partial = _files(out)
    assert PROGRESS in partial and MANIFEST not in partial
    assert any(n.endswith(".tmp") for n in partial)
    with pytest.raises(ConvertError, match="no dsa_manifest.json"):
        verify_checkpoint(out, progress=False)

    again = _convert(tiny_dir, out, "int8", tp=2)
    assert again["files_skipped"] >= 1 and again["files_written"] >= 1
    assert again["files_skipped"] + again["files_written"] == 4
    assert _files(out) == _files(ref["out"])  # every file, byte for byte
    assert _convert(tiny_dir, out, "int8", tp=2)["files_written"] == 0  # complete: all skipped


def test_a_damaged_file_fails_verify_and_is_redone(tiny_dir, tmp_path):
    out = _convert(tiny_dir, tmp_path / "o", "bf16")["out"]
    shard = os.path.join(out, "model-00001-of-00002.safetensors")
    good = open(shard, "rb").read()
    data = bytearray(good)
    data[-10] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    with pytest.raises(ConvertError, match=r"model-00001-of-00002\.safetensors: sha256"):
        verify_checkpoint(out, progress=False)
    r = _convert(tiny_dir, out, "bf16")
    assert (r["files_written"], r["files_skipped"]) == (1, 1)
    assert open(shard, "rb").read() == good
    verify_checkpoint(out, progress=False)


def test_verify_checks_coverage_and_shapes_against_config(tiny_dir, tmp_path):
    out = _convert(tiny_dir, tmp_path / "o", "int8")["out"]
    cfg_path = os.path.join(out, "config.json")
    cfg = json.load(open(cfg_path))
    json.dump({**cfg, "q_lora_rank": 96}, open(cfg_path, "w"))
    with pytest.raises(ConvertError) as e:
        verify_checkpoint(out, progress=False)
    assert "config.json: differs" in str(e.value)
    assert "q_a_proj.weight' has shape [128, 256], config.json and the layout imply [96, 256]" in str(e.value)
    json.dump(cfg, open(cfg_path, "w"), indent=2)

    # A shard rewritten without one tensor, its manifest entry and checksum updated to match:
    # only the coverage check against config.json can notice.
    man = json.load(open(os.path.join(out, MANIFEST)))
    rel = next(r for r, f in man["files"].items() if KEY in f["tensors"])
    path = os.path.join(out, rel)
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != KEY}
    save_file(tensors, path, metadata={"format": "pt"})
    index = json.load(open(os.path.join(out, INDEX_FILE)))
    del index["weight_map"][KEY]
    json.dump(index, open(os.path.join(out, INDEX_FILE), "w"))
    entry = man["files"][rel]
    del entry["tensors"][KEY]
    entry["bytes"] = os.path.getsize(path)
    entry["sha256"] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    json.dump(man, open(os.path.join(out, MANIFEST), "w"))
    with pytest.raises(ConvertError,
                       match=r"missing tensor\(s\) \['model\.layers\.1\.self_attn\.q_b_proj\.weight'\]"):
        verify_checkpoint(out, progress=False)

    shutil.copy(path, os.path.join(out, "stray.safetensors"))
    os.remove(os.path.join(out, [r for r in man["files"] if r != rel][0]))
    with pytest.raises(ConvertError) as e:
        verify_checkpoint(out, progress=False)
    assert "stray.safetensors: not listed" in str(e.value) and ": missing" in str(e.value)
    with pytest.raises(ConvertError, match="no dsa_manifest.json"):
        verify_checkpoint(tiny_dir, progress=False)


def test_manifest_describes_source_layout_and_files(tiny_dir, tmp_path):
    out = _convert(tiny_dir, tmp_path / "o", "int8", tp=2, ep=2)["out"]
    man = json.load(open(os.path.join(out, MANIFEST)))
    assert man["format"] == "dsa_ascend.convert/1" and man["dtype"] == "int8"
    assert man["source"]["path"] == os.path.abspath(tiny_dir)
    assert [f["name"] for f in man["source"]["files"]] == sorted(
        n for n in os.listdir(tiny_dir) if n.endswith(".safetensors"))
    assert man["layout"]["world_size"] == 2 and man["layout"]["ranks"][1]["experts"] == [8, 16]
    assert man["config"] == json.load(open(os.path.join(out, "config.json")))
    for rel, f in man["files"].items():
        assert f["sha256"] == hashlib.sha256(open(os.path.join(out, rel), "rb").read()).hexdigest()
        assert rel.startswith(f"rank-{f['rank']:05d}-of-00002/")
    q_b = [f["tensors"][KEY] for f in man["files"].values() if KEY in f["tensors"]]
    assert sorted(t["slice"] for t in q_b) == [[0, 0, 384], [0, 384, 768]]
    assert all(t["full_shape"] == [768, 128] and t["split"] == "dim0" for t in q_b)
    rank_man = json.load(open(os.path.join(out, "rank-00001-of-00002", MANIFEST)))
    assert rank_man["rank"] == 1 and all(not r.startswith("rank-") for r in rank_man["files"])
    assert os.path.exists(os.path.join(out, "rank-00001-of-00002", "tokenizer.json"))


def test_an_out_dir_of_other_options_or_other_content_is_refused(tiny_dir, tmp_path):
    out = _convert(tiny_dir, tmp_path / "o", "bf16")["out"]
    with pytest.raises(ConvertError, match=r"other inputs or options \(\{'dtype': 'bf16'"):
        _convert(tiny_dir, out, "int8")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match="refusing to write into it"):
        _convert(tiny_dir, tmp_path / "foreign", "bf16")


# ---------------------------------------------------------------------------- bad input
def _copy(tiny_dir, tmp_path) -> str:
    dst = str(tmp_path / "src")
    shutil.copytree(tiny_dir, dst)
    return dst


def _index(path) -> dict:
    return json.load(open(os.path.join(path, INDEX_FILE)))



def _missing_shard(p):
    os.remove(os.path.join(p, _index(p)["weight_map"][KEY]))


def _truncated(p):
    shard = os.path.join(p, _index(p)["weight_map"][KEY])
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[:-1000])


def _index_disagrees(p):
    index = _index(p)
    wm = index["weight_map"]
    wm[KEY] = next(v for v in sorted(set(wm.values())) if v != wm[KEY])
    json.dump(index, open(os.path.join(p, INDEX_FILE), "w"))


def _shape_vs_config(p):
    cfg = json.load(open(os.path.join(p, "config.json")))
    json.dump({**cfg, "q_lora_rank": 96}, open(os.path.join(p, "config.json"), "w"))


@pytest.mark.parametrize("damage,match,kw", [
    (_missing_shard, r"lists shard 'model-0000\d-of-00002\.safetensors', which is not in", {}),
    (_truncated, r"model-0000\d-of-00002\.safetensors: not a readable safetensors file", {}),
    (_index_disagrees, r"maps 'model\.layers\.1\.self_attn\.q_b_proj\.weight' to "
                       r"'model-0000\d-of-00002\.safetensors', but it is in", {}),
    (lambda p: rewrite_shard(p, KEY, lambda t: t.pop(KEY + "_scale_inv")),
     r"FP8 tensor 'model\.layers\.1\.self_attn\.q_b_proj\.weight' has no "
     r"'model\.layers\.1\.self_attn\.q_b_proj\.weight_scale_inv'", {}),
    (lambda p: rewrite_shard(p, MTP_KEY, lambda t: t.pop(MTP_KEY + "_scale_inv")),
     r"FP8 tensor 'model\.layers\.3\.eh_proj\.weight' has no", {"keep_mtp": True}),
    (_shape_vs_config, r"tensor 'model\.layers\.\d\.self_attn\.q_a_proj\.weight' has shape "
                       r"\[128, 256\], config\.json implies \[96, 256\]", {}),
    (lambda p: rewrite_shard(p, KEY, lambda t: t.__setitem__(
        "model.layers.3.mystery.weight", torch.ones(2))),
     r"unknown tensor 'model\.layers\.3\.mystery\.weight' in the MTP layer", {"keep_mtp": True}),
], ids=["missing-shard", "truncated", "index-vs-header", "missing-scale", "missing-mtp-scale",
        "shape-vs-config", "unknown-mtp-tensor"])
def test_bad_input_is_named_and_nothing_is_written(tiny_dir, tmp_path, damage, match, kw):
    src = _copy(tiny_dir, tmp_path)
    damage(src)
    with pytest.raises(CheckpointError, match=match):
        _convert(src, tmp_path / "out", "bf16", **kw)
    assert not os.path.exists(tmp_path / "out")


def test_a_damaged_mtp_layer_is_fine_when_it_is_dropped(tiny_dir, tmp_path):
    src = _copy(tiny_dir, tmp_path)
    rewrite_shard(src, MTP_KEY, lambda t: t.pop(MTP_KEY + "_scale_inv"))
    _convert(src, tmp_path / "out", "bf16")


# ----------------------------------------------------------------------------------- CLI
def test_cli_convert_verify_and_tools_script(tiny_dir, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert main(["convert", tiny_dir, "--out", out, "--dtype", "bf16", "--tp", "2", "--workers",
                 "0", "--no-progress"]) == 0
    assert "2 ranks" in capsys.readouterr().out
    assert main(["verify", out, "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith(f"OK {out}")
    assert main(["convert", tiny_dir, "--out", str(tmp_path / "x"), "--dtype", "fp8", "--tp",
                 "3", "--no-progress"]) == 2
    assert "does not divide num_attention_heads" in capsys.readouterr().err
    assert main(["verify", tiny_dir, "--no-progress"]) == 2
    assert "no dsa_manifest.json" in capsys.readouterr().err
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"),
                        "verify", os.path.join(out, "rank-00001-of-00002"), "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stderr
