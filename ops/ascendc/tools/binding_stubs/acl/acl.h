// Declarations (not CANN's header) of the few ACL runtime names dsa_ops.cpp uses, as documented
// in the CANN API reference, for a syntax check of the torch binding without CANN.
#pragma once
#include <cstdint>
typedef enum { ACL_DT_UNDEFINED = -1, ACL_FLOAT = 0, ACL_FLOAT16 = 1, ACL_INT8 = 2, ACL_INT32 = 3,
               ACL_BF16 = 27 } aclDataType;
typedef enum { ACL_FORMAT_ND = 2 } aclFormat;
typedef void* aclrtStream;
const char* aclGetRecentErrMsg();
