"""Shared test machinery: ``--backend`` selection, the tiny checkpoint, tolerances.

One suite for every backend: ``pytest --backend reference`` (default), ``--backend cuda``,
``--backend npu``. A backend that cannot run here skips its tests with the reason.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels then run under the interpreter; set before
    os.environ.setdefault("TRITON_INTERPRET", "1")  # triton is first imported

import dsa_ascend
from dsa_ascend.backends import BackendUnavailable, indexer_dtype, unavailable_reason
from dsa_ascend.backends import _module as backend_module
from dsa_ascend.tiny import make_tiny_checkpoint

DEVICE_OF = {"reference": "cpu", "cuda": "cuda", "npu": "npu"}


def pytest_addoption(parser):
    parser.addoption("--backend", default="reference", choices=sorted(DEVICE_OF),
                     help="which dsa backend the suite runs (default: reference)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (still part of CI)")


def _device_of(name: str) -> torch.device:
    """The device the suite runs ``name`` on. ``--backend npu`` with DSA_NPU_KERNELS=emulator runs
    the npu glue through the CPU contract emulator (no NPU involved)."""
    if name == "npu" and os.environ.get("DSA_NPU_KERNELS", "").strip().lower() == "emulator":
        return torch.device("cpu")
    return torch.device(DEVICE_OF[name])


@pytest.fixture(scope="session")
def backend(request) -> str:
    name = request.config.getoption("--backend")
    # Ask before building the device: torch.device("npu") itself fails where torch_npu is absent.
    reason = unavailable_reason(name)
    if reason is None:
        reason = unavailable_reason(name, _device_of(name))
    if reason is not None:
        pytest.skip(f"backend {name!r} unavailable here: {reason}")
    return name


@pytest.fixture(scope="session")
def device(backend) -> torch.device:
    return _device_of(backend)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    """The tiny preset's FP8 checkpoint (seed 0), made once per session."""
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny"), seed=0)


# Modes in which two ways of computing the same thing must agree to float32 rounding: FP8
# activation quantization and the FP8 latent round trip turn 1-ulp float32 differences (from a
# different batching of the same math) into whole FP8 steps, which is the official semantics but
# not a test of the graph's wiring. Tests of those modes compare against their own references.
EXACT = dict(fp8_act_quant=False, simulate_fp8_latent=False)


@pytest.fixture
def load_tiny(tiny_dir, backend, device):
    """load_tiny(**run_options) -> the tiny model on the suite's backend, float32."""

    def load(path: str = None, **options):
        options.setdefault("max_seq_len", 512)
        options.setdefault("max_batch_size", 4)
        return dsa_ascend.load(path or tiny_dir, backend=backend, device=device,
                               dtype=torch.float32, **options)

    return load


def require_indexer_dtype(backend: str, mode: str) -> None:
    """Skip, with the backend's reason, a test of an indexer mode (RunConfig.indexer_dtype)
    that ``backend`` legitimately lacks -- e.g. "fp8" on npu (the 910B/C have no FP8 units).
    Backends that run the mode are unaffected."""
    try:
        indexer_dtype(backend, mode)
    except BackendUnavailable as e:
        pytest.skip(str(e))


def require_kv_cache_dtype(backend: str, mode: str) -> None:
    """Skip, with the reason, a test whose sparse attention ops read a latent cache format
    (RunConfig.kv_cache_dtype) that ``backend``'s operators cannot read: a backend module
    lists the ones it can in ``KV_CACHE_DTYPES`` (default: all)."""
    supported = getattr(backend_module(backend), "KV_CACHE_DTYPES", None)
    if supported is not None and mode not in supported:
        pytest.skip(f"backend {backend!r} does not read kv_cache_dtype={mode!r} "
                    f"(its operators read {'|'.join(supported)})")


def assert_close_to_ref(got: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor = None,
                        factor: float = 4.0, floor: float = 1e-6) -> None:
    """|got - ref64| within ``factor`` x the reference's own low-precision error (|ref_lowp - ref64|,
    elementwise max), the Liger/flash-attention way; ``floor`` covers exact references."""
    err = (got.double() - ref64.double()).abs().max().item()
    if ref_lowp is not None:
        budget = factor * (ref_lowp.double() - ref64.double()).abs().max().item() + floor
    else:
        budget = floor
    assert err <= budget, f"max error {err:.3e} exceeds {budget:.3e}"


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed + int(os.environ.get("DSA_TEST_SEED", "0")))


def rewrite_shard(path: str, key: str, fn) -> None:
    """Rewrite the safetensors shard of checkpoint ``path`` that holds ``key`` with fn(tensors)
    applied (fn edits the dict in place); the index json follows the shard's new key set."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from dsa_ascend.checkpoint import INDEX_FILE

    with open(os.path.join(path, INDEX_FILE)) as f:
        index = json.load(f)
    shard = os.path.join(path, index["weight_map"][key])
    with safe_open(shard, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    fn(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    name = os.path.basename(shard)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != name}
    index["weight_map"].update(dict.fromkeys(tensors, name))
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump(index, f)
