"""The FP8 latent cache (kv_cache_dtype="fp8", format in dsa_ascend/kv_fp8.py): the byte layout by
hand, the sparse MLA ops on it, and the whole model against the simulated-FP8 bf16 cache."""

from __future__ import annotations

import pytest
import torch
from conftest import require_kv_cache_dtype, seeded

import dsa_ascend
from dsa_ascend import kv_fp8
from dsa_ascend.ops import Ops


def test_entry_layout_by_hand():
    latent = torch.zeros(1, 256)
    latent[0, :128] = 0.5
    latent[0, 7] = -4.0  # tile 0: amax 4 -> scale 4/448 (1/112), 0.5 -> 56, -4 -> -448
    latent[0, 128:] = torch.linspace(-1, 1, 128)  # tile 1: amax 1 -> scale 1/448
    rope = torch.tensor([[1.0, -2.5, 3.0, 1 / 3]])
    e = kv_fp8.pack(latent, rope)
    assert e.dtype == torch.uint8 and e.shape == (1, kv_fp8.entry_bytes(256, 4)) == (1, 256 + 8 + 8)
    fp8 = e[0, :256].view(torch.float8_e4m3fn).float()
    assert fp8[0] == 56 and fp8[7] == -448 and fp8[128] == -448 and fp8[255] == 448
    scales = e[0, 256:264].view(torch.float32)
    assert torch.equal(scales, torch.tensor([4 / 448, 1 / 448], dtype=torch.float32))
    assert torch.equal(e[0, 264:].view(torch.bfloat16), rope[0].bfloat16())
    back = kv_fp8.unpack(e, 256)
    assert back[0, 7] == -4.0 and back[0, 0] == 56 * torch.tensor(4 / 448) and back[0, 259] == (
        torch.tensor(1 / 3).bfloat16().float())
    ue = kv_fp8.pack(latent, rope, ue8m0=True)[0, 256:264].view(torch.float32)
    assert torch.equal(ue, torch.tensor([2.0 ** -6, 2.0 ** -8]))  # 4/448 -> 1/64, 1/448 -> 1/256


def test_bad_widths_are_named():
    with pytest.raises(ValueError, match="d_v divisible by 128"):
        kv_fp8.entry_bytes(100, 64)
    with pytest.raises(ValueError, match="657 bytes does not fit d_v=512"):
        kv_fp8.d_rope_of(656 + 1, 512)
    ops = Ops("reference")
    q = torch.randn(2, 4, 576)
    bad = torch.zeros(3, 16, 600, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"uint8\) kv_cache must be \[blocks, block_size, 656\]"):
        ops.sparse_mla_prefill(q, bad, torch.zeros(2, 8, dtype=torch.int32),
                               torch.zeros(1, 1, dtype=torch.int32),
                               torch.tensor([0, 2], dtype=torch.int32),
                               torch.tensor([2], dtype=torch.int32), 0.1, 512)


@pytest.mark.parametrize("fmt", ["fp8", "fp8-ue8m0", "float"])
def test_store_kv_writes_entries_in_the_cache_format(backend, device, fmt):
    """``dsa.store_kv`` on every backend: the written rows are bit for bit ``kv_fp8.pack`` of
    (latent, rope) (or the float cast), from strided inputs; every other row is untouched."""
    g = seeded(31)
    blocks, bs, t = 5, 16, 29
    wide = torch.randn(t, 700, generator=g) * torch.exp(2 * torch.randn(t, 1, generator=g))
    wide[0, :128] *= 1e-7  # an all-tiny tile: the 1e-4 amax clamp
    wide[1, 300] = 3.0e4  # an outlier
    latent, rope = wide[:, 3:515], wide[:, 600:664]  # views with a row stride of 700
    slots = torch.randperm(blocks * bs, generator=g)[:t]
    ue8m0 = fmt == "fp8-ue8m0"
    if fmt == "float":
        cache = torch.randn(blocks, bs, 576, generator=g).bfloat16()
        want = cache.clone().view(-1, 576)
        want[slots] = torch.cat([latent, rope], -1).bfloat16()
    else:
        cache = torch.randint(0, 256, (blocks, bs, 656), generator=g, dtype=torch.uint8)
        want = cache.clone().view(-1, 656)
        want[slots] = kv_fp8.pack(latent, rope, ue8m0)
    got = cache.to(device)
    Ops(backend).store_kv(got, slots.to(device), latent.to(device), rope.to(device), ue8m0)
    assert torch.equal(got.cpu().view(want.shape), want)


def test_store_kv_names_bad_arguments():
    ops = Ops("reference")
    latent, rope = torch.randn(3, 512), torch.randn(3, 64)
    cache = torch.zeros(2, 16, 656, dtype=torch.uint8)
    slots = torch.tensor([0, 5, 9])
    with pytest.raises(ValueError, match=r"store_kv: an FP8 \(uint8\) kv_cache must be \[blocks, "
                                         r"block_size, 656\] \(d_v=512, d_rope=64\)"):
        ops.store_kv(torch.zeros(2, 16, 600, dtype=torch.uint8), slots, latent, rope)
    with pytest.raises(ValueError, match=r"slot_mapping must be int64 \[3\]"):
        ops.store_kv(cache, slots.int(), latent, rope)
    with pytest.raises(ValueError, match=r"latent and rope must be \[T, d_v\] and \[T, d_rope\]"):
        ops.store_kv(cache, slots, latent, rope[:2])
    with pytest.raises(ValueError, match=r"kv_cache must be \[blocks, block_size, 576\]"):
        ops.store_kv(torch.zeros(2, 16, 570), slots, latent, rope)
    with pytest.raises(ValueError, match="rope must be a float tensor"):
        ops.store_kv(cache, slots, latent, rope.to(torch.float8_e4m3fn))


def test_sparse_mla_ops_read_the_fp8_cache(backend, device):
    """Decode and prefill on the uint8 cache equal the same op on its float32 dequantization."""
    require_kv_cache_dtype(backend, "fp8")
    g = seeded(11)
    blocks, bs = 6, 16
    latent, rope = torch.randn(blocks, bs, 512, generator=g), torch.randn(blocks, bs, 64, generator=g)
    packed = kv_fp8.pack(latent, rope)
    dense = kv_fp8.unpack(packed, 512)
    table = torch.randperm(blocks, generator=g).int().view(2, 3)
    lens = torch.tensor([40, 33], dtype=torch.int32)
    q = torch.randn(2, 1, 16, 576, generator=g)
    idx = torch.stack([torch.randperm(40, generator=g)[:24], torch.randperm(33, generator=g)[:24]])
    idx = idx.int().view(2, 1, 24)
    idx[1, 0, 5:9] = -1
    ops = Ops(backend)
    args = [t.to(device) for t in (q, packed, idx, table, lens)]
    got, got_lse = ops.sparse_mla_decode(*args, 576 ** -0.5, 512)
    want, want_lse = ops.sparse_mla_decode(args[0], dense.to(device), *args[2:], 576 ** -0.5, 512)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_lse, want_lse, rtol=1e-5, atol=1e-5)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    pre, _ = ops.sparse_mla_prefill(args[0].view(2, 16, 576), args[1], args[2].view(2, 24),
                                    args[3], cu, args[4], 576 ** -0.5, 512)
    torch.testing.assert_close(pre, want.view(2, 16, 512), rtol=1e-5, atol=1e-5)


def _run(model, tokens):
    """Prefill 2/3 of the tokens in one call, then decode the rest one by one."""
    n = tokens.shape[1] * 2 // 3
    outs = [model(tokens[:, :n])]
    for p in range(n, tokens.shape[1]):
        outs.append(model(tokens[:, p:p + 1], start_pos=p))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("mla_form", ["absorbed", "mha"])
def test_fp8_cache_model_equals_the_simulated_fp8_latent(tiny_dir, backend, device, mla_form):
    """In bf16 with ue8m0 scales, FP8 value x scale is exact in bf16 and the rope key is bf16
    anyway: the FP8 cache holds exactly what the simulated path caches, so logits are equal."""
    if mla_form == "absorbed":  # the MHA form reads the cache in torch, not through the ops
        require_kv_cache_dtype(backend, "fp8")
    tokens = torch.randint(0, 512, (2, 30), generator=seeded(4))
    opts = dict(backend=backend, device=device, dtype=torch.bfloat16, max_seq_len=64,
                max_batch_size=2, indexer_dtype="bf16", fp8_act_quant=False, mla_form=mla_form)
    sim = dsa_ascend.load(tiny_dir, simulate_fp8_latent=True, **opts)
    assert sim.config.ue8m0
    fp8 = dsa_ascend.load(tiny_dir, kv_cache_dtype="fp8", **opts)
    assert fp8.cache.layers[0].kv.dtype == torch.uint8
    c = sim.config
    assert fp8.cache.layers[0].kv.shape[-1] == kv_fp8.entry_bytes(c.kv_lora_rank, c.qk_rope_head_dim)
    a, b = _run(sim, tokens), _run(fp8, tokens)
    if backend == "reference":
        assert torch.equal(a, b)
        return
    # A kernel may order its float32 sums differently for the two cache layouts; the next
    # layer's FP8 rounding of the latent turns such ulps into whole FP8 steps. Yardstick: the
    # same amplification between this backend and the reference on the simulated model.
    ref = _run(dsa_ascend.load(tiny_dir, simulate_fp8_latent=True,
                               **{**opts, "backend": "reference", "device": "cpu"}), tokens)
    yardstick = (a.cpu() - ref).abs().max().item()
    assert (a - b).abs().max().item() <= 4 * yardstick + 1e-3 * a.abs().max().item()
