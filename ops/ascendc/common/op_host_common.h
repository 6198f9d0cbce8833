// Host-side helpers shared by our two op_host files (CANN graph/runtime headers required;
// the plain-C++ tiling itself lives in ops/ascendc/tiling). Type-checked only, never built.
#ifndef DSA_OP_HOST_COMMON_H_
#define DSA_OP_HOST_COMMON_H_

#include "register/op_def_registry.h"
#include "tiling/platform/platform_ascendc.h"
#include "tiling_common.h"

namespace dsa_host {

// This SKU's core counts and on-chip buffer sizes, read from the platform (never hard-coded).
inline dsa_tiling::PlatformSizes ReadPlatformSizes(fe::PlatFormInfos* info) {
  auto platform = platform_ascendc::PlatformAscendC(info);
  dsa_tiling::PlatformSizes p{};
  p.aicCores = platform.GetCoreNumAic();
  p.aivCores = platform.GetCoreNumAiv();
  platform.GetCoreMemSize(platform_ascendc::CoreMemType::UB, p.ubBytes);
  platform.GetCoreMemSize(platform_ascendc::CoreMemType::L1, p.l1Bytes);
  platform.GetCoreMemSize(platform_ascendc::CoreMemType::L0_A, p.l0aBytes);
  platform.GetCoreMemSize(platform_ascendc::CoreMemType::L0_B, p.l0bBytes);
  platform.GetCoreMemSize(platform_ascendc::CoreMemType::L0_C, p.l0cBytes);
  return p;
}

// One workspace: the Ascend C library's own share plus ours (``ourBytes``).
inline bool SetWorkspace(gert::TilingContext* context, size_t ourBytes) {
  size_t* workspace = context->GetWorkspaceSizes(1);
  if (workspace == nullptr) return false;
  workspace[0] = platform_ascendc::PlatformAscendC(context->GetPlatformInfo()).GetLibApiWorkSpaceSize() +
                 ourBytes;
  return true;
}

}  // namespace dsa_host

#endif  // DSA_OP_HOST_COMMON_H_
