"""Our AscendC operators' four descriptions agree, and the npu backend calls their torch schemas
correctly -- checked on CPU, no NPU involved:

- the msOpGen description (ops/ascendc/dsa_ops.json), the OpDef in op_host, the kernel entry's
  parameters and the torch schema (dsa_ascend_npu_ops/_schema.py) name the same inputs,
  outputs and attributes in the same order;
- the schemas' fake kernels give the documented output shapes;
- the npu glue driven through ``torch.ops.custom.*`` (CPU kernels registered here from the
  contract emulator in place of the NPU ones) matches the reference backend, so every keyword
  the glue passes exists in our schemas.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from dsa_ascend.backends import npu, npu_contract, reference

ROOT = pathlib.Path(__file__).resolve().parents[2] / "ops" / "ascendc"
OPS = {"DsaLightningIndexer": ("lightning_indexer", "dsa_lightning_indexer"),
       "DsaSparseFlashAttention": ("sparse_mla", "dsa_sparse_flash_attention")}
SCHEMAS_OF = {"DsaLightningIndexer": ["dsa_lightning_indexer", "dsa_quant_lightning_indexer"],
              "DsaSparseFlashAttention": ["dsa_sparse_flash_attention"]}


def _schema_module():
    path = ROOT / "torch_binding" / "dsa_ascend_npu_ops" / "_schema.py"
    spec = importlib.util.spec_from_file_location("dsa_ascend_npu_ops_schema", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.define()
    return mod


SCHEMA = _schema_module()


def _opdef(op: str, folder: str, name: str) -> dict:
    src = (ROOT / folder / "op_host" / f"{name}.cpp").read_text()
    return {kind: re.findall(rf'this->{kind}\("(\w+)"\)', src) for kind in ("Input", "Output", "Attr")}


@pytest.mark.parametrize("op", sorted(OPS))
def test_json_opdef_kernel_and_schema_agree(op):
    folder, name = OPS[op]
    desc = {d["op"]: d for d in json.loads((ROOT / "dsa_ops.json").read_text())}[op]
    inputs = [d["name"] for d in desc["input_desc"]]
    outputs = [d["name"] for d in desc["output_desc"]]
    attrs = [d["name"] for d in desc["attr"]]
    opdef = _opdef(op, folder, name)
    assert (opdef["Input"], opdef["Output"], opdef["Attr"]) == (inputs, outputs, attrs)
    # every dtype column of the json is a combination the OpDef lists too (same count)
    assert all(len(d["type"]) == len(desc["input_desc"][0]["type"]) for d in desc["input_desc"])
    # the kernel entry: inputs, outputs, workspace, tiling -- in the OpDef's order
    kernel = (ROOT / folder / "op_kernel" / f"{name}.cpp").read_text()
    params = re.search(rf"void {name}\(([^)]*)\)", kernel).group(1)
    assert re.findall(r"GM_ADDR (\w+)", params) == inputs + outputs + ["workspace", "tiling"]
    # the generated aclnn prototype we bind against (binding_stubs): one parameter each, then
    # workspaceSize and executor
    stub = (ROOT / "tools" / "binding_stubs" / f"aclnn_{name}.h").read_text()
    proto = re.search(rf"aclnn{op}GetWorkspaceSize\(([^;]*)\);", stub).group(1)
    assert proto.count(",") + 1 == len(inputs) + len(attrs) + len(outputs) + 2
    # the torch schema(s): the attributes are keyword arguments of the same names (the quant
    # indexer adds its two quant modes; the plain one omits the dequant scales), tensors in order
    for schema_name in SCHEMAS_OF[op]:
        args = re.findall(r"(\w+)(?:=[^,)]*)?[,)]", SCHEMA.SCHEMAS[schema_name].split("->")[0])
        assert set(attrs) <= set(args), (schema_name, set(attrs) - set(args))
        assert [a for a in inputs if a in args] == [a for a in args if a in inputs], schema_name


def test_fake_kernels_give_the_documented_shapes():
    with FakeTensorMode():
        q = torch.empty(5, 8, 128, dtype=torch.bfloat16)
        k = torch.empty(4, 16, 1, 128, dtype=torch.bfloat16)
        idx, val = torch.ops.custom.dsa_lightning_indexer(q, k, torch.empty(5, 8), sparse_count=64,
                                                          layout_query="TND", return_value=True)
        assert idx.shape == val.shape == (5, 1, 64) and idx.dtype == torch.int32
        q8 = torch.empty(2, 3, 8, 128, dtype=torch.int8)
        idx, val = torch.ops.custom.dsa_quant_lightning_indexer(
            q8, k.to(torch.int8), torch.empty(2, 3, 8), torch.empty(2, 3, 8), torch.empty(4, 16, 1),
            sparse_count=32)
        assert idx.shape == (2, 3, 1, 32) and val.numel() == 0
        qa = torch.empty(3, 2, 16, 512, dtype=torch.bfloat16)
        out, smax, ssum = torch.ops.custom.dsa_sparse_flash_attention(
            qa, k, k, torch.empty(3, 2, 1, 24, dtype=torch.int32), 0.1, return_softmax_lse=True)
        assert out.shape == qa.shape and smax.shape == ssum.shape == (3, 2, 1, 16)


# ------------------------------------------------ the glue through the custom schemas, on CPU
def _indexer_cpu(query, key, weights, **kw):
    return npu_contract.emulated_npu_lightning_indexer(query, key, weights, **kw)


def _quant_cpu(query, key, weights, query_dequant_scale, key_dequant_scale, **kw):
    ret = kw.pop("return_value", False)
    out = npu_contract.emulated_npu_quant_lightning_indexer(
        query, key, weights, query_dequant_scale, key_dequant_scale, return_value=True, **kw)
    return out if ret else (out[0], out[1].new_empty(0))


def _attention_cpu(query, key, value, sparse_indices, scale_value, **kw):
    return npu_contract.emulated_npu_sparse_flash_attention(query, key, value, sparse_indices,
                                                            scale_value, **kw)


_CPU_LIB = torch.library.Library("custom", "IMPL")
for _name, _fn in (("dsa_lightning_indexer", _indexer_cpu),
                   ("dsa_quant_lightning_indexer", _quant_cpu),
                   ("dsa_sparse_flash_attention", _attention_cpu)):
    _CPU_LIB.impl(_name, _fn, "CPU")


@pytest.fixture
def custom_ops_on_cpu(monkeypatch):
    ops = torch.ops.custom
    p = npu.OperatorProvider("custom", ops.dsa_lightning_indexer, ops.dsa_sparse_flash_attention,
                             True, ops.dsa_quant_lightning_indexer, quant_values=True)
    monkeypatch.setattr(npu, "provider", lambda mode=None: p)


def _paged(g, lens, bs, width, dtype=torch.float32):
    blocks = sum(-(-n // bs) for n in lens) + 2
    cache = torch.randn(blocks, bs, width, generator=g).to(dtype)
    perm = torch.randperm(blocks, generator=g).to(torch.int32)
    table = torch.zeros(len(lens), max(-(-n // bs) for n in lens), dtype=torch.int32)
    used = 0
    for r, n in enumerate(lens):
        table[r, : -(-n // bs)] = perm[used:used + -(-n // bs)]
        used += -(-n // bs)
    return cache, table


def test_glue_through_the_custom_schemas_matches_reference(custom_ops_on_cpu):
    from dsa_ascend.quant import quantize_int8_rows

    g = torch.Generator().manual_seed(7)
    q_lens, kv_lens, bs = [3, 1, 5], [20, 9, 12], 16
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    lens = torch.tensor(kv_lens, dtype=torch.int32)
    k, table = _paged(g, kv_lens, bs, 128)
    q, w = torch.randn(9, 4, 128, generator=g), torch.randn(9, 4, generator=g)
    for args in ((q, w, k, None), (*quantize_int8_rows(q)[:1], w, *quantize_int8_rows(k))):
        got, _ = npu.indexer_topk(*args, table, cu, lens, 8)
        want, _ = reference.indexer_topk(*args, table, cu, lens, 8)
        assert all(set(a.tolist()) == set(b.tolist()) for a, b in zip(got, want))
    kv, _ = _paged(g, kv_lens, bs, 576)
    # positions every query row of its sequence may see (the emulator applies sparse_mode 3)
    idx = torch.stack([torch.randperm(n - m + 1, generator=g)[:6] for n, m in zip(kv_lens, q_lens)
                       for _ in range(m)]).to(torch.int32)
    idx = torch.cat([idx, torch.full((9, 2), -1, dtype=torch.int32)], 1)
    qa = torch.randn(9, 4, 576, generator=g)
    out, lse = npu.sparse_mla_prefill(qa, kv, idx, table, cu, lens, 0.05, 512)
    out_r, lse_r = reference.sparse_mla_prefill(qa, kv, idx, table, cu, lens, 0.05, 512)
    torch.testing.assert_close(out, out_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_r, atol=1e-5, rtol=1e-5)
