// What the custom-op build generates from DsaSparseFlashAttention's OpDef (see
// aclnn_dsa_lightning_indexer.h), written out by hand for a syntax check of the binding.
#pragma once
#include "aclnn/aclnn_base.h"
extern "C" {
aclnnStatus aclnnDsaSparseFlashAttentionGetWorkspaceSize(
    const aclTensor* query, const aclTensor* key, const aclTensor* value, const aclTensor* sparseIndices,
    const aclTensor* blockTableOptional, const aclTensor* actualSeqLengthsQueryOptional,
    const aclTensor* actualSeqLengthsKvOptional, const aclTensor* queryRopeOptional,
    const aclTensor* keyRopeOptional, double scaleValue, int64_t sparseBlockSizeOptional,
    char* layoutQueryOptional, char* layoutKvOptional, int64_t sparseModeOptional,
    int64_t preTokensOptional, int64_t nextTokensOptional, int64_t attentionModeOptional,
    bool returnSoftmaxLseOptional, const aclTensor* attentionOutOut, const aclTensor* softmaxMaxOut,
    const aclTensor* softmaxSumOut, uint64_t* workspaceSize, aclOpExecutor** executor);
aclnnStatus aclnnDsaSparseFlashAttention(void* workspace, uint64_t workspaceSize, aclOpExecutor* executor,
                                         aclrtStream stream);
}
