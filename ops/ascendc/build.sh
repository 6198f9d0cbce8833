#!/usr/bin/env bash
# Builds and installs our AscendC DSA operators and their torch binding, on an Ascend machine:
#
#   source /usr/local/Ascend/ascend-toolkit/set_env.sh     # CANN >= 8.3 (or .../cann/set_env.sh)
#   pip install '.[npu]'                                   # torch + the matching torch_npu
#   ops/ascendc/build.sh [--soc Ascend910B1] [--install-path DIR] [--all-socs]
#
# 1. msOpGen generates a custom-op project from ops/ascendc/dsa_ops.json (CANN's own CMake
#    templates, so they match the installed CANN); our op_host / op_kernel sources and the
#    plain-C++ tiling headers replace its skeleton files; vendor name "dsa_ascend".
# 2. The project's build.sh compiles the kernels (binary package: the aclnn API
#    aclnnDsaLightningIndexer / aclnnDsaSparseFlashAttention + libcust_opapi.so) into
#    custom_opp_<os>_<arch>.run, installed under --install-path (default
#    ~/.local/share/dsa_ascend/opp) as vendors/dsa_ascend.
# 3. pip builds and installs ops/ascendc/torch_binding (package dsa_ascend_npu_ops), which
#    registers torch.ops.custom.dsa_lightning_indexer / dsa_quant_lightning_indexer /
#    dsa_sparse_flash_attention for PrivateUse1 (NPU) and points ASCEND_CUSTOM_OPP_PATH at the
#    installed package when imported.
# Then: DSA_NPU_KERNELS=custom python -m pytest -q --backend npu   (see README "Running on Ascend")
#
# Never run on an NPU by its author: written against the documented CANN workflow.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BUILD="${DSA_BUILD_DIR:-$HERE/build}"
INSTALL="${DSA_OPP_INSTALL:-$HOME/.local/share/dsa_ascend/opp}"
SOC="${DSA_SOC:-}"
ALL_SOCS=0
PYTHON="${PYTHON:-python3}"
while [ $# -gt 0 ]; do
  case "$1" in
    --soc) SOC="$2"; shift 2 ;;
    --install-path) INSTALL="$2"; shift 2 ;;
    --all-socs) ALL_SOCS=1; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

die() { echo "build.sh: $*" >&2; exit 1; }
[ -n "${ASCEND_HOME_PATH:-${ASCEND_TOOLKIT_HOME:-}}" ] || die "CANN is not sourced (source <CANN>/set_env.sh; CANN >= 8.3)"
command -v msopgen >/dev/null || die "msopgen not found: it ships with the CANN toolkit (>= 8.3)"
command -v cmake >/dev/null || die "cmake not found (>= 3.19)"
"$PYTHON" -c "import torch_npu" 2>/dev/null || die "torch_npu does not import in $PYTHON (pip install '.[npu]')"
if [ -z "$SOC" ]; then  # the local NPU's SoC name, e.g. Ascend910B1 / Ascend910_9391
  SOC="$("$PYTHON" -c "import torch, torch_npu; print(torch.npu.get_device_name(0))" 2>/dev/null)" ||
    die "no NPU visible to read the SoC name from: pass --soc (e.g. Ascend910B1)"
fi
echo "== SoC $SOC, build in $BUILD, install under $INSTALL"

# 1. project skeleton from the op description, then our sources in place of its files
PROJECT="$BUILD/project"
rm -rf "$PROJECT"
mkdir -p "$BUILD"
msopgen gen -i "$HERE/dsa_ops.json" -c "ai_core-$SOC" -lan cpp -out "$PROJECT"
rm -f "$PROJECT"/op_host/*.cpp "$PROJECT"/op_host/*.h "$PROJECT"/op_kernel/*.cpp "$PROJECT"/op_kernel/*.h
for op in lightning_indexer sparse_mla; do
  cp "$HERE/$op"/op_host/*.cpp "$PROJECT/op_host/"
  cp "$HERE/$op"/op_kernel/*.cpp "$PROJECT/op_kernel/"
done
cp "$HERE"/tiling/*.h "$HERE"/common/op_host_common.h "$PROJECT/op_host/"
cp "$HERE"/tiling/dsa_tiling_data.h "$HERE"/common/dsa_kernel_common.h "$PROJECT/op_kernel/"
"$PYTHON" - "$PROJECT/CMakePresets.json" "$ALL_SOCS" <<'EOF'
import json, sys
path, all_socs = sys.argv[1], sys.argv[2] == "1"
presets = json.load(open(path))
cache = presets["configurePresets"][0]["cacheVariables"]
cache["vendor_name"]["value"] = "dsa_ascend"
if all_socs:  # Atlas A2 and A3 in one package
    cache["ASCEND_COMPUTE_UNIT"]["value"] = "ascend910b;ascend910_93"
json.dump(presets, open(path, "w"), indent=4)
EOF

# 2. compile the operator package and install it
(cd "$PROJECT" && bash ./build.sh)
RUN="$(ls "$PROJECT"/build_out/custom_opp_*.run 2>/dev/null | head -1)"
[ -n "$RUN" ] || die "the operator build produced no custom_opp_*.run (see $PROJECT/build_out)"
mkdir -p "$INSTALL"
"$RUN" --install-path="$INSTALL"
VENDOR="$INSTALL/vendors/dsa_ascend"
[ -f "$VENDOR/op_api/include/aclnn_dsa_lightning_indexer.h" ] || die "no aclnn header under $VENDOR/op_api"

# 3. the torch binding against the installed aclnn API
DSA_ASCEND_VENDOR="$VENDOR" "$PYTHON" -m pip install --no-build-isolation "$HERE/torch_binding"
"$PYTHON" -c "import dsa_ascend_npu_ops, torch; print('registered:', torch.ops.custom.dsa_lightning_indexer, torch.ops.custom.dsa_quant_lightning_indexer, torch.ops.custom.dsa_sparse_flash_attention)"
echo "== done. Check against the reference: DSA_NPU_KERNELS=custom $PYTHON -m pytest -q --backend npu"
