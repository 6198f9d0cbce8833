"""config.json parsing: the release's keys map to the paper's names; bad values are named."""

from __future__ import annotations

import copy
import json

import pytest

from dsa_ascend.config import PRESETS, ConfigError, ModelConfig, RunConfig, preset


def test_release_config_maps_to_spec_table():
    c = preset("671b")
    assert (c.dim, c.n_layers, c.n_dense_layers, c.n_heads, c.n_routed_experts) == (7168, 61, 3, 128, 256)
    assert (c.index_n_heads, c.index_head_dim, c.index_topk) == (64, 128, 2048)
    assert (c.q_lora_rank, c.kv_lora_rank, c.kv_cache_dim) == (1536, 512, 576)
    assert c.yarn.factor == 40 and c.yarn.original_seq_len == 4096 and c.yarn.mscale == 1.0
    assert c.quant is not None and c.quant.ue8m0
    assert c.indexer_rope_interleave is False


def test_round_trip_through_hf_json():
    for name in PRESETS:
        c = preset(name)
        assert ModelConfig.from_hf(json.loads(json.dumps(c.to_hf()))) == c


def test_indexer_rope_interleave_key_is_honoured():
    hf = copy.deepcopy(PRESETS["tiny"])
    hf["indexer_rope_interleave"] = True
    assert ModelConfig.from_hf(hf).indexer_rope_interleave is True


@pytest.mark.parametrize("edit,match", [
    (lambda h: h.pop("index_topk"), "index_topk"),
    (lambda h: h.update(scoring_func="softmax"), "scoring_func"),
    (lambda h: h.update(n_group=3), "n_routed_experts"),
    (lambda h: h.update(topk_group=9), "topk_group"),
    (lambda h: h.update(num_experts_per_tok=129), "num_experts_per_tok"),
    (lambda h: h.update(index_head_dim=96), "index_head_dim"),
    (lambda h: h.update(first_k_dense_replace=99), "first_k_dense_replace"),
    (lambda h: h.update(hidden_size="7168"), "hidden_size"),
    (lambda h: h.update(rope_scaling={"type": "linear", "factor": 2}), "rope_scaling.type"),
    (lambda h: h["rope_scaling"].update(mscale=0.5), "mscale"),
    (lambda h: h["quantization_config"].update(quant_method="awq"), "quant_method"),
    (lambda h: h["quantization_config"].update(weight_block_size=[64, 64]), "weight_block_size"),
    (lambda h: h.update(qk_rope_head_dim=63), "qk_rope_head_dim"),
])
def test_bad_config_values_are_named(edit, match):
    hf = copy.deepcopy(PRESETS["671b"])
    edit(hf)
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf(hf)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_file(str(tmp_path / "config.json"))
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(str(tmp_path / "config.json"))


def test_unknown_preset_and_run_options():
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("13b")
    for bad in (dict(indexer_dtype="int4"), dict(mla_form="dense"), dict(block_size=0)):
        with pytest.raises(ConfigError):
            RunConfig(**bad).validate()
