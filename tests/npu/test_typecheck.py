"""ops/ascendc/tools/typecheck.sh: our AscendC kernels, op_host code and torch binding compile
(g++ -fsyntax-only) against the open Ascend C / metadef / ge headers. The open sources are not
part of the repository: the test runs when ASC_DEVKIT, METADEF and GE name checkouts
(github.com/mirror-cann/asc-devkit, hicann/metadef, hicann/ge), and skips otherwise."""

from __future__ import annotations

import os
import pathlib
import subprocess

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "ops" / "ascendc" / "tools" / "typecheck.sh"
MISSING = [v for v in ("ASC_DEVKIT", "METADEF", "GE") if not os.path.isdir(os.environ.get(v, ""))]


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING), reason=f"open CANN sources not given ({', '.join(MISSING)} unset)")
def test_ascendc_sources_typecheck(tmp_path):
    run = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "DSA_TC_DIR": str(tmp_path)})
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("PASS") == 5, run.stdout
