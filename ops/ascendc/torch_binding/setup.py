"""Builds the torch extension of our AscendC operators (package dsa_ascend_npu_ops).

Run by ops/ascendc/build.sh after the custom-op package is installed; by hand:
    DSA_ASCEND_VENDOR=<install path>/vendors/dsa_ascend pip install --no-build-isolation ops/ascendc/torch_binding
Needs CANN >= 8.3 sourced (ASCEND_HOME_PATH), torch and the matching torch_npu.
"""

from __future__ import annotations

import os
import pathlib

from setuptools import setup
from setuptools.command.build_py import build_py
from torch.utils.cpp_extension import BuildExtension
from torch_npu.utils.cpp_extension import NpuExtension

HERE = pathlib.Path(__file__).resolve().parent
VENDOR = os.environ.get("DSA_ASCEND_VENDOR", "")
ASCEND = os.environ.get("ASCEND_HOME_PATH", os.environ.get("ASCEND_TOOLKIT_HOME", ""))
if not VENDOR or not os.path.isdir(os.path.join(VENDOR, "op_api")):
    raise SystemExit("DSA_ASCEND_VENDOR must point at the installed custom-op package "
                     "(<install path>/vendors/dsa_ascend, with op_api/): run ops/ascendc/build.sh")
if not ASCEND:
    raise SystemExit("ASCEND_HOME_PATH is not set: source CANN's set_env.sh first")


class BuildPy(build_py):
    """Records where the operator package lives in the installed _build_info.py."""

    def run(self):
        super().run()
        info = pathlib.Path(self.build_lib) / "dsa_ascend_npu_ops" / "_build_info.py"
        info.write_text(f"VENDOR_DIR = {VENDOR!r}\n")


op_api = os.path.join(VENDOR, "op_api")
setup(
    name="dsa_ascend_npu_ops",
    version="0.1.0",
    packages=["dsa_ascend_npu_ops"],
    package_dir={"dsa_ascend_npu_ops": str(HERE / "dsa_ascend_npu_ops")},
    ext_modules=[NpuExtension(
        "dsa_ascend_npu_ops._C",
        sources=[str(HERE / "csrc" / "dsa_ops.cpp")],
        include_dirs=[os.path.join(op_api, "include"), os.path.join(ASCEND, "include")],
        library_dirs=[os.path.join(op_api, "lib"), os.path.join(ASCEND, "lib64")],
        libraries=["cust_opapi", "nnopbase", "ascendcl"],
        extra_compile_args=["-std=c++17"],
        extra_link_args=[f"-Wl,-rpath,{os.path.join(op_api, 'lib')}"],
    )],
    cmdclass={"build_ext": BuildExtension, "build_py": BuildPy},
)
