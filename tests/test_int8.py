"""int8 W8A8: the dsa.int8_linear op (hand-computed values, the activation-quantization error
bound, argument checks, fake kernel), int8 weights in Linear and the loader (named errors), and
the w8a8_int8 quantization_config."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from conftest import rewrite_shard, seeded

import dsa_ascend
from dsa_ascend.checkpoint import CheckpointError
from dsa_ascend.config import PRESETS, ConfigError, ModelConfig
from dsa_ascend.convert import convert_checkpoint
from dsa_ascend.ops import Ops
from dsa_ascend.quant import dequantize_int8_rows, quantize_int8_rows

KEY = "model.layers.1.self_attn.q_b_proj.weight"


def test_int8_linear_by_hand(backend, device):
    x = torch.tensor([[1.0, -2.0, 0.5, 4.0], [0.0, 0.0, 0.0, 0.0]])
    w = torch.tensor([[1, 2, 3, 4], [-127, 0, 5, 1]], dtype=torch.int8)
    ws = torch.tensor([0.5, 0.25])
    # Row 0: amax 4 -> x * 127 / 4 = [31.75, -63.5, 15.875, 127] -> [32, -64, 16, 127] (-63.5
    # rounds half to even); integer dots: 32 + -128 + 48 + 508 = 460 and -4064 + 80 + 127 = -3857.
    # Row 1 is all zeros: zero output, no NaN.
    want = torch.tensor([[460 * (4 / 127) * 0.5, -3857 * (4 / 127) * 0.25], [0.0, 0.0]])
    got = Ops(backend).int8_linear(x.to(device), w.to(device), ws.to(device)).cpu()
    assert torch.allclose(got, want, rtol=2e-7, atol=0)
    q, s = quantize_int8_rows(x)
    assert q[0].tolist() == [32, -64, 16, 127] and q[1].tolist() == [0, 0, 0, 0]
    assert s[0].item() == pytest.approx(4 / 127, rel=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_error_is_bounded_by_half_an_activation_step(backend, device, dtype):
    """Against x @ W^T with W = q_w * s_w (the stored weight, exact), the only error is the
    per-token activation rounding: |dy_i| <= sum_j |W_ij| * s_x / 2, plus float32 rounding
    (and the bf16 output's own rounding)."""
    g = seeded(3)
    x = (torch.randn(5, 7, 256, generator=g) * torch.logspace(-2, 1, 256)).to(dtype)
    w = torch.randn(96, 256, generator=g) * 0.05
    qw, sw = quantize_int8_rows(w)
    got = Ops(backend).int8_linear(x.to(device), qw.to(device), sw.to(device)).cpu().double()
    assert got.shape == (5, 7, 96)
    wd = dequantize_int8_rows(qw, sw).double()
    exact = x.double() @ wd.t()
    _, sx = quantize_int8_rows(x)
    bound = (wd.abs().sum(1) * sx.double()[..., None] / 2) * (1 + 1e-5) + 1e-6 * exact.abs()
    if dtype == torch.bfloat16:
        bound = bound + exact.abs() * 2.0 ** -8
    assert ((got - exact).abs() <= bound).all()


def test_int8_linear_checks_and_fake_kernel():
    ops = Ops("reference")
    x, w, s = torch.randn(3, 8), torch.zeros(4, 8, dtype=torch.int8), torch.ones(4)
    with pytest.raises(ValueError, match="int8_linear: weight must be 2-D int8"):
        ops.int8_linear(x, w.float(), s)
    with pytest.raises(ValueError, match=r"int8_linear: weight_scale must be float32 \(4,\)"):
        ops.int8_linear(x, w, torch.ones(4, 1))
    with pytest.raises(ValueError, match="x's last dim 7 != weight in_features 8"):
        ops.int8_linear(torch.randn(3, 7), w, s)
    with pytest.raises(ValueError, match="x must be a float tensor"):
        ops.int8_linear(x.long(), w, s)
    meta = torch.ops.dsa.int8_linear(x.to("meta"), w.to("meta"), s.to("meta"), "reference")
    assert meta.shape == (3, 4) and meta.device.type == "meta"
    compiled = torch.compile(lambda a, b, c: ops.int8_linear(a, b, c) * 2, backend="aot_eager",
                             fullgraph=True)
    assert torch.equal(compiled(x, w, s), ops.int8_linear(x, w, s) * 2)


# ---------------------------------------------------------------------------------- loader
@pytest.fixture(scope="module")
def int8_dir(tiny_dir, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("int8") / "int8"
    return convert_checkpoint(tiny_dir, str(out), "int8", workers=0, progress=False)["out"]


def _load(path):
    return dsa_ascend.load(path, backend="reference", device="cpu", dtype=torch.float32,
                           max_seq_len=64, max_batch_size=2)


def test_int8_checkpoint_loads_with_int8_linears(int8_dir):
    model = _load(int8_dir)
    lin = model.model.layers[1].self_attn.q_b_proj
    assert lin.weight.dtype == torch.int8 and lin.weight_scale.shape == (lin.out_features,)
    assert torch.equal(lin.dense_weight(), lin.weight.float() * lin.weight_scale[:, None])
    assert model.lm_head.weight.dtype == torch.float32  # not quantizable: float
    assert model.config.quant.method == "w8a8_int8" and model.config.ue8m0
    assert torch.isfinite(model(torch.arange(1, 20)[None])).all()


def _edit(src, tmp_path, key, fn) -> str:
    path = str(tmp_path / "ckpt")
    shutil.copytree(src, path)
    rewrite_shard(path, key, fn)
    return path


@pytest.mark.parametrize("fn,match", [
    (lambda t: t.pop(KEY + "_scale"), r"int8 tensor 'model\.layers\.1\.self_attn\.q_b_proj\.weight' "
                                      r"has no '.*q_b_proj\.weight_scale'"),
    (lambda t: t.__setitem__(KEY + "_scale", torch.ones(6, 128)),
     r"q_b_proj\.weight_scale' must be float32 \[768\], got torch\.float32 \[6, 128\]"),
    (lambda t: t.__setitem__(KEY + "_scale", t[KEY + "_scale"].bfloat16()),
     r"q_b_proj\.weight_scale' must be float32"),
    (lambda t: t.__setitem__("model.layers.0.input_layernorm.weight_scale", torch.ones(256)),
     r"scale tensor\(s\) \['model\.layers\.0\.input_layernorm\.weight_scale'\] belong to no"),
    (lambda t: t.__setitem__("model.layers.1.input_layernorm.weight",
                             torch.ones(256, dtype=torch.int8)),
     r"input_layernorm\.weight' has dtype torch\.int8, expected bfloat16"),
])
def test_int8_checkpoint_damage_is_named(int8_dir, tmp_path, fn, match):
    with pytest.raises(CheckpointError, match=match):
        _load(_edit(int8_dir, tmp_path, KEY, fn))


# ---------------------------------------------------------------------------------- config
def test_w8a8_quantization_config_and_top_level_scale_fmt():
    hf = copy.deepcopy(PRESETS["tiny"])
    hf["quantization_config"] = {"quant_method": "w8a8_int8", "weight_dtype": "int8",
                                 "weight_granularity": "per_channel",
                                 "activation_scheme": "dynamic",
                                 "activation_granularity": "per_token", "scale_fmt": "ue8m0"}
    c = ModelConfig.from_hf(hf)
    assert c.quant.method == "w8a8_int8" and c.ue8m0
    assert ModelConfig.from_hf(json.loads(json.dumps(c.to_hf()))) == c
    bad = copy.deepcopy(hf)
    bad["quantization_config"]["weight_granularity"] = "per_group"
    with pytest.raises(ConfigError, match="weight_granularity = 'per_group' is not supported"):
        ModelConfig.from_hf(bad)

    bf16 = copy.deepcopy(PRESETS["tiny"])
    del bf16["quantization_config"]
    assert ModelConfig.from_hf(bf16).ue8m0 is False
    bf16["scale_fmt"] = "ue8m0"  # a bf16 conversion keeps the activation scale format here
    c = ModelConfig.from_hf(bf16)
    assert c.quant is None and c.ue8m0
    assert ModelConfig.from_hf(json.loads(json.dumps(c.to_hf()))) == c
    with pytest.raises(ConfigError, match="scale_fmt = 'e8m0' is not supported"):
        ModelConfig.from_hf({**bf16, "scale_fmt": "e8m0"})
    mixed = copy.deepcopy(PRESETS["tiny"])
    del mixed["quantization_config"]["scale_fmt"]
    with pytest.raises(ConfigError, match="disagrees with quantization_config"):
        ModelConfig.from_hf({**mixed, "scale_fmt": "ue8m0"})
