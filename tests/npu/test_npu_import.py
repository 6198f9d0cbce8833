"""Importing dsa_ascend with a broken torch_npu (installed, but no CANN) must work and the npu
backend must report the failure."""

from __future__ import annotations

import os
import subprocess
import sys

BROKEN = "raise ImportError('libhccl.so: cannot open shared object file: No such file or directory')\n"
CODE = ("import torch, dsa_ascend\n"
        "from dsa_ascend.backends import unavailable_reason\n"
        "print(unavailable_reason('npu'))\n"
        "print(unavailable_reason('reference'))\n")


def _run(tmp_path, env_extra):
    env = {**os.environ, "PYTHONPATH": str(tmp_path), **env_extra}
    env.pop("DSA_NPU_KERNELS", None)
    return subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env,
                          timeout=120)


def test_broken_torch_npu_package_is_reported(tmp_path):
    # A bare package (no distribution metadata, so no `torch.backends` entry point): torch's
    # device-backend autoload does not see it, so no TORCH_DEVICE_BACKEND_AUTOLOAD=0 is needed.
    (tmp_path / "torch_npu").mkdir()
    (tmp_path / "torch_npu" / "__init__.py").write_text(BROKEN)
    out = _run(tmp_path, {})
    assert out.returncode == 0, out.stderr
    npu_reason, ref_reason = out.stdout.strip().splitlines()
    assert "torch_npu failed to import" in npu_reason and "libhccl.so" in npu_reason
    assert ref_reason == "None"


def test_broken_torch_npu_with_autoload_entry_point(tmp_path):
    # A real torch-npu wheel registers a `torch.backends` entry point: then `import torch` itself
    # fails (torch's behaviour, before any of our code runs) unless TORCH_DEVICE_BACKEND_AUTOLOAD=0,
    # the documented workaround (README "Running on Ascend"). With it, we import and report.
    (tmp_path / "torch_npu").mkdir()
    (tmp_path / "torch_npu" / "__init__.py").write_text(BROKEN + "def _autoload():\n    pass\n")
    dist = tmp_path / "torch_npu-0.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torch_npu\nVersion: 0.0.0\n")
    (dist / "entry_points.txt").write_text("[torch.backends]\ntorch_npu = torch_npu:_autoload\n")
    out = _run(tmp_path, {})
    assert out.returncode != 0 and "TORCH_DEVICE_BACKEND_AUTOLOAD" in out.stderr
    out = _run(tmp_path, {"TORCH_DEVICE_BACKEND_AUTOLOAD": "0"})
    assert out.returncode == 0, out.stderr
    assert "libhccl.so" in out.stdout.splitlines()[0]
