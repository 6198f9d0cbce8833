"""The AscendC host tiling (ops/ascendc/tiling, plain C++) compiled with g++ and swept over
shapes by ops/ascendc/tests/tiling_sweep.cc: UB/L1/L0 budgets, 32-byte alignment, every
(row, key tile) and (token, head, kv tile) covered exactly once across cores, tails."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2] / "ops" / "ascendc"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
def test_tiling_sweep(tmp_path):
    exe = tmp_path / "tiling_sweep"
    build = subprocess.run(["g++", "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror",
                            f"-I{ROOT / 'tiling'}", str(ROOT / "tests" / "tiling_sweep.cc"),
                            "-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.startswith("OK"), run.stdout + run.stderr
