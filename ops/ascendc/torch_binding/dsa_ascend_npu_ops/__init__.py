"""dsa_ascend_npu_ops: our AscendC DSA operators as ``torch.ops.custom.dsa_lightning_indexer``,
``dsa_quant_lightning_indexer`` and ``dsa_sparse_flash_attention`` (NPU kernels through the
aclnn API of the custom-op package that ops/ascendc/build.sh builds and installs).

Importing it needs torch_npu and the installed custom-op package; the npu backend imports it
lazily (DSA_NPU_KERNELS=custom|auto) and reports any failure as the reason it is unavailable.
"""

from __future__ import annotations

import os

import torch_npu  # noqa: F401  (registers the npu device before our kernels load)

from . import _schema
from ._build_info import VENDOR_DIR

# The operator binaries and tiling library are found through ASCEND_CUSTOM_OPP_PATH.
if VENDOR_DIR and VENDOR_DIR not in os.environ.get("ASCEND_CUSTOM_OPP_PATH", "").split(":"):
    os.environ["ASCEND_CUSTOM_OPP_PATH"] = ":".join(
        p for p in (VENDOR_DIR, os.environ.get("ASCEND_CUSTOM_OPP_PATH", "")) if p)

_schema.define()
from . import _C  # noqa: E402,F401  (PrivateUse1 kernels of the schemas above)

__all__ = ["VENDOR_DIR"]
