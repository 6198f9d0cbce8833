"""The whole graph: its equivalent forms and schedules agree, and attention with a covering
top-k is exactly dense causal MLA (checked against a float64 MLA written here from DSA_SPEC §4)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import EXACT, require_indexer_dtype, seeded

# Float32 logits of two orderings of the same float32 math differ by accumulated rounding:
# ~1e3 reductions of ~1e-7 relative error each, so 1e-4 of the logit scale bounds it.
REL = 1e-4


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = REL) -> None:
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3e} > {rel:.0e} x {scale:.3f}"


def _tokens(b: int, s: int, seed: int, vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=seeded(seed))


@pytest.mark.parametrize("indexer_dtype", ["fp8", "bf16", "int8"])
def test_absorbed_and_mha_forms_agree(load_tiny, backend, indexer_dtype):
    require_indexer_dtype(backend, indexer_dtype)
    tokens = _tokens(2, 48, seed=1)  # 48 > index_topk = 16: attention is really sparse
    absorbed = load_tiny(mla_form="absorbed", indexer_dtype=indexer_dtype, **EXACT)(tokens)
    mha = load_tiny(mla_form="mha", indexer_dtype=indexer_dtype, **EXACT)(tokens)
    _close(mha, absorbed)


def test_chunked_prefill_equals_one_shot(load_tiny):
    tokens = _tokens(2, 50, seed=2)
    model = load_tiny(**EXACT)
    full = model(tokens)
    model.reset()
    parts, pos = [], 0
    for n in (7, 20, 1, 22):  # chunks straddling block boundaries of the paged cache
        parts.append(model(tokens[:, pos:pos + n], start_pos=pos))
        pos += n
    _close(torch.cat(parts, dim=1), full)


@pytest.mark.parametrize("step", [1, 2])  # 2 = two query tokens per decode step (MTP-style)
def test_decode_equals_full_forward(load_tiny, step):
    tokens = _tokens(2, 40, seed=3)
    model = load_tiny(**EXACT, indexer_dtype="bf16", block_size=16)  # FP8 near-ties: see EXACT
    full = model(tokens)
    model.reset()
    outs = [model(tokens[:, :4])]
    for pos in range(4, 40, step):
        outs.append(model(tokens[:, pos:pos + step], start_pos=pos))
    _close(torch.cat(outs, dim=1), full)


def test_rows_with_different_start_positions(load_tiny):
    """start_pos per row: row 1 is 10 tokens ahead of row 0 in one step."""
    a, b = _tokens(1, 30, seed=4)[0], _tokens(1, 30, seed=5)[0]
    model = load_tiny(**EXACT)
    ref_a, ref_b = model(a[None])[0], None
    model.reset()
    ref_b = model(b[None])[0]
    model.reset()
    model.forward_ragged([a[:10], b[:20]], rows=[0, 1], start_pos=[0, 0])
    out = model(torch.stack([a[10:20], b[20:30]]), start_pos=[10, 20])
    _close(out[0], ref_a[10:20])
    _close(out[1], ref_b[20:30])


def test_fp8_linear_follows_the_official_fp8_gemm(load_tiny):
    """By default FP8 weights stay FP8 and their linears quantize the input per token per 128
    channels (ue8m0 scales), as DeepSeek's fp8_gemm path: checked against a float64 emulation
    built from the checkpoint's raw FP8 values and scales."""
    from dsa_ascend.quant import FP8_DTYPE

    model = load_tiny()
    lin = model.model.layers[0].self_attn.q_b_proj
    assert lin.weight.dtype == FP8_DTYPE and lin.act_quant
    x = (torch.randn(5, lin.in_features, generator=seeded(6)) * 3).to(lin.weight.device)
    with torch.inference_mode():
        got = lin(x).cpu()
    d = torch.float64
    xb = x.to(d).view(5, -1, 128)
    scale = xb.abs().amax(-1, keepdim=True).clamp_min(1e-4) / 448
    scale = torch.exp2(torch.ceil(torch.log2(scale)))  # ue8m0: up to a power of two
    xq = (xb / scale).float().to(FP8_DTYPE).to(d) * scale  # the FP8 rounding itself
    s = lin.weight_scale_inv.cpu().to(d).repeat_interleave(128, 0)[: lin.out_features]
    w = lin.weight.cpu().to(d) * s.repeat_interleave(128, 1)[:, : lin.in_features]
    ref = xq.cpu().view(5, -1) @ w.T
    assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    # Off switch: the same weights without activation quantization.
    plain = load_tiny(fp8_act_quant=False).model.layers[0].self_attn.q_b_proj
    assert not plain.act_quant
    with torch.inference_mode():
        assert (plain(x).cpu().double() - x.cpu().to(d) @ w.T).abs().max() <= 1e-5 * ref.abs().max()


def _covering_topk_checkpoint(tiny_dir: str, tmp_path) -> str:
    path = tmp_path / "tiny-dense"
    shutil.copytree(tiny_dir, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["index_topk"] = 4096
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize("quantized", ["fp8", "int8"])
def test_covering_topk_makes_the_indexer_irrelevant(load_tiny, backend, tiny_dir, tmp_path,
                                                    quantized):
    """With index_topk >= sequence length every causal key is selected, so the indexer's
    numerics (FP8, int8 or neither) cannot change the output."""
    require_indexer_dtype(backend, quantized)
    path = _covering_topk_checkpoint(tiny_dir, tmp_path)
    tokens = _tokens(2, 40, seed=7)
    quant = load_tiny(path, indexer_dtype=quantized, **EXACT)(tokens)
    plain = load_tiny(path, indexer_dtype="bf16", **EXACT)(tokens)
    _close(quant, plain, rel=1e-5)


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope_interleaved(x, cos, sin):
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


@pytest.mark.parametrize("form", ["absorbed", "mha"])
def test_dsa_with_covering_topk_is_dense_causal_mla(load_tiny, tiny_dir, tmp_path, form):
    """One MLA layer vs dense causal MLA in float64, written from DSA_SPEC §4 (MHA form)."""
    model = load_tiny(_covering_topk_checkpoint(tiny_dir, tmp_path), mla_form=form, **EXACT)
    attn = model.model.layers[0].self_attn
    c = model.config
    t = 37
    x = (torch.randn(t, c.dim, generator=seeded(8)) * 0.5).to(model.device)
    step = model.cache.prepare(rows=[0], start_pos=[0], q_lens=[t])
    cos, sin = model.cos[step.positions], model.sin[step.positions]
    with torch.inference_mode():
        got = attn(x, step, model.cache, cos, sin).cpu()
    x, cos, sin = x.cpu(), cos.cpu(), sin.cpu()

    d = torch.float64
    W = {n: getattr(attn, n).dense_weight().cpu().to(d) for n in
         ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")}
    xd, cosd, sind = x.to(d), cos.to(d), sin.to(d)
    h, nope, rope, v_dim = c.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    qr = _rms(xd @ W["q_a_proj"].T, attn.q_a_layernorm.weight.cpu().to(d), c.rms_norm_eps)
    q = (qr @ W["q_b_proj"].T).view(t, h, nope + rope)
    q_pe = _rope_interleaved(q[..., nope:], cosd[:, None], sind[:, None])
    kv = xd @ W["kv_a_proj_with_mqa"].T
    latent = _rms(kv[:, :c.kv_lora_rank], attn.kv_a_layernorm.weight.cpu().to(d), c.rms_norm_eps)
    k_pe = _rope_interleaved(kv[:, c.kv_lora_rank:], cosd, sind)
    kv_b = (latent @ W["kv_b_proj"].T).view(t, h, nope + v_dim)
    k = torch.cat([kv_b[..., :nope], k_pe[:, None].expand(t, h, rope)], dim=-1)
    qf = torch.cat([q[..., :nope], q_pe], dim=-1)
    scores = torch.einsum("thd,shd->hts", qf, k) * c.softmax_scale()
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("hts,shd->thd", F.softmax(scores, dim=-1), kv_b[..., nope:])
    ref = o.flatten(1) @ W["o_proj"].T
    _close(got, ref.float(), rel=1e-5)


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_the_spec(device, with_residual):
    """RMSNorm (DSA_SPEC §2: x * rsqrt(mean(x^2) + eps) * w in float32, the residual added in
    float32 first) on the suite's device against float64, for bf16 inputs: the only rounding
    past float32 (a few ulps over a 1536-term mean) is the final bf16 one, so the result is
    within half a bf16 ulp (at most 2^-8 relative, plus float32's ~1e-6) of the float64 value."""
    from dsa_ascend.model.layers import RMSNorm

    g = seeded(11)
    d, eps = 1536, 1e-6
    norm = RMSNorm(d, eps).to_empty(device=device)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(d, generator=g) + 0.5)
    x = (torch.randn(64, d, generator=g) * 3).to(torch.bfloat16)
    res = (torch.randn(64, d, generator=g) * 3).to(torch.bfloat16)
    xd = x.double() + (res.double() if with_residual else 0)
    want = _rms(xd, norm.weight.cpu().double(), eps)
    out = norm(x.to(device), res.to(device)) if with_residual else norm(x.to(device))
    y = (out[0] if with_residual else out).cpu()
    assert y.dtype == torch.bfloat16
    assert ((y.double() - want).abs() <= want.abs() * (2 ** -8 + 1e-5)).all()
    if with_residual:  # the new residual: the float32 sum, rounded to bf16 once
        assert torch.equal(out[1].cpu(), xd.float().to(torch.bfloat16))
