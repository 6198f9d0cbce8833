"""``tools/kernel_sass.py`` (sm90 SASS reports, compiled on any machine): every preset still
matches its kernel's signature (a renamed argument or constexpr fails the compile), and a report
shows what it promises (run as a subprocess: the kernel tests on a CPU import the kernels
interpreted)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")
TOOL = pathlib.Path(__file__).resolve().parents[2] / "tools" / "kernel_sass.py"


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_kernel_sass_compiles_every_preset():
    r = _run()
    if r.returncode and "is not in this Triton wheel" in r.stderr:
        pytest.skip("this Triton wheel has no cuobjdump")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    head = [ln for ln in lines if ln.startswith("indexer_decode ")]
    assert head and re.search(r": \d+ registers, \d+ B stack", head[0]), r.stdout
    assert re.search(r"wgmma [1-9]\d*", head[0]), head[0]  # the FP8 product is a wgmma
    # the key-tile loops (unmasked and masked bodies), with the epilogue's FMNMX in their mix
    loop_lines = [ln for ln in lines if ln.startswith("  loop ")]
    assert len(loop_lines) >= 2 and all("FMNMX" in ln for ln in loop_lines[:2]), r.stdout
    names = re.findall(r"^(\w+) \(_\w+\): \d+ registers", r.stdout, re.M)
    assert {"indexer_prefill", "indexer_decode", "topk_compact", "sparse_mla_triton_fp8",
            "rope_q_pe", "kv_store_fp8", "kv_store_bf16", "topk_radix_gluon", "topk_radix_cluster4",
            "topk_radix_cluster8", "sparse_mla_sm90_fp8_pair"} <= set(names), r.stdout
    # the radix select's inline PTX (and its cluster form's) addresses its bins at global_smem + 0
    for name in ("topk_radix_gluon", "topk_radix_cluster4", "topk_radix_cluster8"):
        radix = r.stdout.split(f"{name} (", 1)[1].splitlines()
        assert "  first allocation at global_smem + 0: yes" in radix[1:3], (name, r.stdout)
    # the cluster form's launcher check: no scratch of Triton's inside the bins, which the
    # partners read through DSMEM (the allocator, blind to inline PTX, once overlapped them)
    for name in ("topk_radix_cluster4", "topk_radix_cluster8"):
        radix = r.stdout.split(f"{name} (", 1)[1].splitlines()
        assert radix[1] == "  the launcher's check: passed", (name, r.stdout)
    # the sparse MLA cluster pair's PTX offsets come from the allocator, once per compile
    pair = r.stdout.split("sparse_mla_sm90_fp8_pair (", 1)[1].splitlines()
    offs = dict(re.findall(r"(\w+) (\d+)", pair[1].split(": ", 1)[1]))
    assert pair[1].startswith("  inline PTX addresses") and set(offs) == {"k_nope_s", "k_ready",
                                                                          "k_free"}, r.stdout
    assert len({int(o) for o in offs.values()}) == 3 and all(int(o) % 8 == 0 for o in offs.values())


def test_kernel_sass_names_an_unknown_preset():
    r = _run("--kernel", "no_such_kernel")
    assert r.returncode == 2 and "no_such_kernel" in r.stderr
