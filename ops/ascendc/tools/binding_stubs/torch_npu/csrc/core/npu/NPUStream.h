// Declaration (not torch_npu's header) of the stream accessor dsa_ops.cpp uses, as in torch_npu's
// C++ API, for a syntax check of the binding without torch_npu.
#pragma once
#include <c10/core/Device.h>
#include "acl/acl.h"
namespace c10_npu {
class NPUStream {
 public:
  aclrtStream stream(bool need_empty = true) const;
};
NPUStream getCurrentNPUStream(c10::DeviceIndex device_index = -1);
}  // namespace c10_npu
