"""dsa_ascend: DeepSeek-V3.2-Exp with DeepSeek Sparse Attention on CUDA and Ascend."""

from setuptools import find_packages, setup

setup(
    name="dsa_ascend",
    version="0.1.0",
    description="DeepSeek-V3.2-Exp inference with DeepSeek Sparse Attention on NVIDIA GPUs and "
                "Huawei Ascend NPUs from one model graph",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Only the dsa_ascend package is installed: ops/ holds kernel sources, never a top-level
    # Python package named "ops".
    packages=find_packages(include=["dsa_ascend", "dsa_ascend.*"]) + ["dsa_ascend.ops_triton"],
    package_dir={"dsa_ascend.ops_triton": "ops/triton"},
    # Install the torch build for your device first (README); any torch >= 2.4 satisfies this,
    # so pip does not replace it.
    install_requires=["torch>=2.4", "safetensors>=0.4", "tokenizers>=0.15", "numpy"],
    extras_require={
        # triton runs the CUDA kernels' tests on a CPU under its interpreter
        "test": ["pytest>=7", "triton>=3.0; platform_system == 'Linux'"],
        "cuda": ["triton>=3.0"],
        # torch-npu pins an exact torch and needs the CANN toolkit; never install it elsewhere.
        "npu": ["torch-npu"],
    },
    entry_points={"console_scripts": ["dsa-ascend=dsa_ascend.cli:main"]},
)
