"""Loading HF-format directories: the tiny checkpoint loads; every kind of damage is reported
with the name of the tensor or file at fault; nothing is half-loaded silently."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from conftest import rewrite_shard
from safetensors import safe_open

import dsa_ascend
from dsa_ascend.checkpoint import INDEX_FILE, CheckpointError
from dsa_ascend.config import ConfigError
from dsa_ascend.quant import FP8_DTYPE, dequantize_weight


def _copy(tiny_dir, tmp_path, name="ckpt") -> str:
    dst = tmp_path / name
    shutil.copytree(tiny_dir, dst)
    return str(dst)


def _index(path):
    with open(os.path.join(path, INDEX_FILE)) as f:
        return json.load(f)



def _load(path, **kw):
    return dsa_ascend.load(path, backend="reference", device="cpu", dtype=torch.float32,
                           max_seq_len=128, max_batch_size=2, **kw)


KEY = "model.layers.1.self_attn.q_b_proj.weight"


def test_tiny_checkpoint_loads_with_its_fp8_weights(tiny_dir):
    model = _load(tiny_dir)
    with safe_open(os.path.join(tiny_dir, _index(tiny_dir)["weight_map"][KEY]), "pt") as f:
        raw, scale = f.get_tensor(KEY), f.get_tensor(KEY + "_scale_inv")
    lin = model.model.layers[1].self_attn.q_b_proj
    assert raw.dtype == FP8_DTYPE and scale.dtype == torch.float32
    assert scale.shape == (-(-raw.shape[0] // 128), -(-raw.shape[1] // 128))
    assert torch.equal(lin.weight.view(torch.uint8), raw.view(torch.uint8))
    assert torch.equal(lin.dense_weight(), dequantize_weight(raw, scale))
    assert model.tokenizer is not None


def test_single_file_checkpoint_loads(tiny_dir, tmp_path):
    path = tmp_path / "single"
    dsa_ascend.tiny.make_tiny_checkpoint(str(path), shards=1)
    assert not os.path.exists(path / INDEX_FILE)
    a = _load(str(path))(torch.arange(20)[None])
    b = _load(tiny_dir)(torch.arange(20)[None])
    assert torch.equal(a, b)  # same seed, same tensors, same logits


def test_tiny_checkpoint_is_deterministic(tmp_path):
    a = dsa_ascend.tiny.make_tiny_checkpoint(str(tmp_path / "a"), seed=3)
    b = dsa_ascend.tiny.make_tiny_checkpoint(str(tmp_path / "b"), seed=3)
    for name in sorted(os.listdir(a)):
        assert open(os.path.join(a, name), "rb").read() == open(os.path.join(b, name), "rb").read()
    cfg = json.load(open(os.path.join(a, "config.json")))
    assert cfg["rope_scaling"]["original_max_position_embeddings"] < cfg["max_position_embeddings"]


def test_mtp_layer_is_ignored_with_a_log_line(tiny_dir, caplog):
    assert any(k.startswith("model.layers.3.") for k in _index(tiny_dir)["weight_map"])
    with caplog.at_level(logging.INFO, logger="dsa_ascend"):
        _load(tiny_dir)
    assert any("MTP" in r.message for r in caplog.records)


def test_missing_tensor_is_named(tiny_dir, tmp_path):
    path = _copy(tiny_dir, tmp_path)
    rewrite_shard(path, KEY, lambda t: t.pop(KEY))
    with pytest.raises(CheckpointError, match=KEY.replace(".", r"\.")):
        _load(path)


def test_extra_tensor_is_named(tiny_dir, tmp_path):
    path = _copy(tiny_dir, tmp_path)
    rewrite_shard(path, KEY, lambda t: t.__setitem__("model.layers.0.surprise.weight", torch.ones(3)))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.surprise\.weight"):
        _load(path)


def test_wrong_shape_is_named(tiny_dir, tmp_path):
    path = _copy(tiny_dir, tmp_path)
    key = "model.layers.0.input_layernorm.weight"
    rewrite_shard(path, key, lambda t: t.__setitem__(key, torch.ones(7, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError, match=r"input_layernorm\.weight.*\[7\]"):
        _load(path)


@pytest.mark.parametrize("key,dtype", [
    ("model.layers.0.input_layernorm.weight", torch.int32),
    ("model.layers.0.input_layernorm.weight", FP8_DTYPE),  # norms are never FP8
    (KEY + "_scale_inv", torch.bfloat16),  # scales are float32
])
def test_wrong_dtype_is_named(tiny_dir, tmp_path, key, dtype):
    path = _copy(tiny_dir, tmp_path)
    rewrite_shard(path, key, lambda t: t.__setitem__(key, t[key].float().to(dtype)))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        _load(path)


def test_fp8_weight_without_scale_is_named(tiny_dir, tmp_path):
    path = _copy(tiny_dir, tmp_path)
    rewrite_shard(path, KEY, lambda t: t.pop(KEY + "_scale_inv"))
    with pytest.raises(CheckpointError, match=r"q_b_proj\.weight_scale_inv"):
        _load(path)


@pytest.mark.parametrize("keep", [8, 5000, -100])  # header cut, data cut early, data cut late
def test_truncated_safetensors_file_is_named(tiny_dir, tmp_path, keep):
    path = _copy(tiny_dir, tmp_path)
    shard = os.path.join(path, _index(path)["weight_map"][KEY])
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[:keep])
    with pytest.raises(CheckpointError, match=os.path.basename(shard)):
        _load(path)


@pytest.mark.parametrize("damage,match", [
    (lambda p: open(p, "w").write("{not json"), "not valid JSON"),
    (lambda p: json.dump({"metadata": {}}, open(p, "w")), "weight_map"),
    (lambda p: json.dump({"weight_map": {**_index_at(p)["weight_map"], KEY: "nope.safetensors"}},
                         open(p, "w")), "nope.safetensors"),
    (lambda p: json.dump({"weight_map": {k: v for k, v in _index_at(p)["weight_map"].items()
                                         if k != KEY}}, open(p, "w")), "not listed"),
    (lambda p: json.dump({"weight_map": {**_index_at(p)["weight_map"], KEY: _other_shard(p)}},
                         open(p, "w")), KEY.replace(".", r"\.")),
])
def test_bad_index_json_is_named(tiny_dir, tmp_path, damage, match):
    path = _copy(tiny_dir, tmp_path)
    damage(os.path.join(path, INDEX_FILE))
    with pytest.raises(CheckpointError, match=match):
        _load(path)


def _index_at(index_path):
    with open(index_path) as f:
        return json.load(f)


def _other_shard(index_path):
    wm = _index_at(index_path)["weight_map"]
    return next(v for v in sorted(set(wm.values())) if v != wm[KEY])


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        _load(str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="config.json"):
        _load(str(tmp_path))


def test_config_inconsistent_with_tensors(tiny_dir, tmp_path):
    path = _copy(tiny_dir, tmp_path)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["q_lora_rank"] = 96
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"q_a_proj\.weight.*shape"):
        _load(path)


def test_tokens_outside_vocabulary_and_too_long_are_rejected(tiny_dir):
    model = _load(tiny_dir)
    with pytest.raises(ValueError, match="token id 512 is outside the vocabulary"):
        model(torch.tensor([[1, 2, 512]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="max_seq_len=128"):
        model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len=128"):
        dsa_ascend.generate(model, [list(range(1, 140))])
    with pytest.raises(ValueError, match="gap"):
        model(torch.zeros(1, 4, dtype=torch.long), start_pos=10)
    with pytest.raises(ValueError, match="max_batch_size"):
        model(torch.zeros(3, 4, dtype=torch.long))
