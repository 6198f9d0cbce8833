"""The backend seam's invariants: model code names no device and imports no backend; every
dsa op has a fake kernel (torch.compile traces it) and a reference implementation; asking for
a backend that cannot run says what is missing; importing never touches torch_npu."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest
import torch

import dsa_ascend
from dsa_ascend.backends import BACKENDS, BackendUnavailable, implementations, resolve
from dsa_ascend.ops import OP_NAMES, Ops

MODEL_DIR = pathlib.Path(dsa_ascend.__file__).parent / "model"


@pytest.mark.parametrize("path", sorted(MODEL_DIR.glob("*.py")), ids=lambda p: p.name)
def test_model_code_names_no_device_and_imports_no_backend(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not any("backends" in n or n in ("triton", "torch_npu") for n in names), \
                f"{path.name}:{node.lineno} imports {names}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            assert node.value.lower() not in ("cuda", "npu", "cpu"), f"{path.name}:{node.lineno}"
        if isinstance(node, ast.Attribute):
            assert node.attr not in ("cuda", "npu"), f"{path.name}:{node.lineno} .{node.attr}"


def test_reference_implements_every_op_and_each_op_is_declared():
    assert set(implementations("reference")) == set(OP_NAMES)
    for name in OP_NAMES:
        assert hasattr(torch.ops.dsa, name)


def test_ops_trace_under_torch_compile(backend, device):
    """Fake kernels let dynamo/AOT trace a whole decode-attention step without graph breaks."""
    ops = Ops(backend)

    def step(q, kv, idx, table, lens, x, new, slots):
        xq, xs = ops.quantize_fp8(ops.hadamard_rotate(x), 128, True)
        ops.store_kv(kv, slots, new[:, :512], new[:, 512:], False)  # mutates kv, read below
        out, lse = ops.sparse_mla_decode(q, kv, idx, table, lens, 0.1, 512)
        return out.float().sum() + lse.sum() + xs.sum() + xq.float().sum()

    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 1, 4, 576, generator=g), torch.randn(4, 16, 576, generator=g),
            torch.randint(0, 20, (2, 1, 8), generator=g).int(),
            torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), torch.tensor([20, 30], dtype=torch.int32),
            torch.randn(3, 128, generator=g), torch.randn(2, 576, generator=g),
            torch.tensor([19, 61]))  # the last positions of both sequences
    args = tuple(a.to(device) for a in args)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(*args), step(*args))


def test_unavailable_backends_say_what_is_missing(tiny_dir, monkeypatch):
    monkeypatch.delenv("DSA_NPU_KERNELS", raising=False)  # the emulator would run npu on CPU
    cpu = torch.device("cpu")
    assert resolve(None, cpu) == "reference"
    with pytest.raises(BackendUnavailable, match="unknown backend 'tpu'"):
        resolve("tpu", cpu)
    for name in ("cuda", "npu"):
        with pytest.raises(BackendUnavailable, match=name):
            resolve(name, cpu)  # wrong device at least; the message names the backend
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="CUDA"):
            dsa_ascend.load(tiny_dir, backend="cuda", device="cpu")
    assert set(BACKENDS) == {"reference", "cuda", "npu"}


def test_import_does_not_touch_torch_npu():
    code = "import sys, dsa_ascend; assert 'torch_npu' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
