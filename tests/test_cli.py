"""The dsa-ascend command: make-tiny, generate, demo, backends, and its error exit."""

from __future__ import annotations

import os
import subprocess
import sys

from dsa_ascend.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_make_tiny_then_generate(tmp_path, capsys):
    out = str(tmp_path / "tiny")
    assert main(["make-tiny", "--out", out, "--seed", "1"]) == 0
    assert main(["make-tiny", "--out", out]) == 2  # exists: refused, not overwritten
    assert "exists" in capsys.readouterr().err
    assert main(["generate", "--model", out, "--prompt", "hello", "--prompt", "sparse",
                 "--max-new-tokens", "3", "--dtype", "fp32", "--backend", "reference"]) == 0
    text = capsys.readouterr().out
    assert text.count("--- prompt:") == 2 and "backend=reference" in text


def test_demo_builds_then_reuses(tmp_path, capsys):
    d = str(tmp_path / "demo")
    assert main(["demo", "--dir", d, "--max-new-tokens", "2"]) == 0
    assert "building" in capsys.readouterr().out
    assert main(["demo", "--dir", d, "--max-new-tokens", "2"]) == 0
    assert "reusing" in capsys.readouterr().out


def test_errors_exit_2_with_the_reason(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_tools_script_and_module_entry(tmp_path):
    out = str(tmp_path / "t")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_tiny_checkpoint.py"),
                        "--out", out, "--shards", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.path.exists(os.path.join(out, "model.safetensors"))
    r = subprocess.run([sys.executable, "-m", "dsa_ascend.cli", "backends"], capture_output=True,
                       text=True)
    assert r.returncode == 0 and "reference  available" in r.stdout
