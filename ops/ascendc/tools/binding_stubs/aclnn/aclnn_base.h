// Declarations (not CANN's header) of the aclnn base API dsa_ops.cpp uses (CANN API reference:
// aclCreateTensor / aclDestroyTensor, the two-phase call types), for a syntax check only.
#pragma once
#include <cstdint>
#include "acl/acl.h"
typedef int32_t aclnnStatus;
typedef struct aclTensor aclTensor;
typedef struct aclOpExecutor aclOpExecutor;
aclTensor* aclCreateTensor(const int64_t* viewDims, uint64_t viewDimsNum, aclDataType dataType,
                           const int64_t* stride, int64_t offset, aclFormat format,
                           const int64_t* storageDims, uint64_t storageDimsNum, void* tensorData);
aclnnStatus aclDestroyTensor(const aclTensor* tensor);
