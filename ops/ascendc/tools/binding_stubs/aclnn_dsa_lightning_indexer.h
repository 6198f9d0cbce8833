// What the custom-op build generates from DsaLightningIndexer's OpDef (inputs in order, optional
// ones with the Optional suffix; attributes char* / int64_t / bool; outputs with Out), written
// out by hand for a syntax check of the binding. The build's generated header is the real one.
#pragma once
#include "aclnn/aclnn_base.h"
extern "C" {
aclnnStatus aclnnDsaLightningIndexerGetWorkspaceSize(
    const aclTensor* query, const aclTensor* key, const aclTensor* weights,
    const aclTensor* queryDequantScaleOptional, const aclTensor* keyDequantScaleOptional,
    const aclTensor* actualSeqLengthsQueryOptional, const aclTensor* actualSeqLengthsKeyOptional,
    const aclTensor* blockTableOptional, char* layoutQueryOptional, char* layoutKeyOptional,
    int64_t sparseCountOptional, int64_t sparseModeOptional, int64_t preTokensOptional,
    int64_t nextTokensOptional, bool returnValueOptional, const aclTensor* sparseIndicesOut,
    const aclTensor* sparseValuesOut, uint64_t* workspaceSize, aclOpExecutor** executor);
aclnnStatus aclnnDsaLightningIndexer(void* workspace, uint64_t workspaceSize, aclOpExecutor* executor,
                                     aclrtStream stream);
}
