// DsaSparseFlashAttention: op definition, shape/dtype inference and host tiling.
//
// Contract: torch_npu's npu_sparse_flash_attention in its MLA-absorbed use (attention_mode 2,
// NPU_NOTES.md): one KV head shared by all N1 query heads;
//   s_j = (query . key[j] + query_rope . key_rope[j]) * scale_value over the selected positions
//   j of sparse_indices (valid first, -1 after; in sparse_mode 3 also j < causal limit),
//   out = softmax(s) . value[j] with value = key[..., :Dv] (the latent),
//   softmax_max = max_j s_j, softmax_sum = sum_j exp(s_j - max) (lse = max + log(sum)).
// Layouts: query BSND [B, S1, N1, 512] | TND [T, N1, 512] (cumulative lengths); key / value /
// key_rope PA_BSND [blocks, block_size, 1, D] + block_table, or BSND / TND like the query.
// Extension: key may carry the rope part itself ([.., 576] = [latent 512 | rope 64], key_rope
// absent): the zero-copy form of our paged latent cache (the torch binding passes it so).
//
// The tiling arithmetic is the plain-C++ sparse_mla_tiling.h (g++-tested in ops/ascendc/tests).
// It depends on shapes only (units are (token, head group, index chunk)): no host sync on
// sequence lengths, which the kernel reads from the device.
#include <cstring>
#include <vector>

#include "register/op_def_registry.h"
#include "op_host_common.h"
#include "sparse_mla_tiling.h"

namespace {
enum InputIndex : size_t {
  kQuery = 0, kKey, kValue, kIndices, kBlockTable, kQueryLens, kKvLens, kQueryRope, kKeyRope,
};
enum AttrIndex : size_t {
  kScale = 0, kSparseBlockSize, kLayoutQuery, kLayoutKv, kSparseMode, kPreTokens, kNextTokens,
  kAttentionMode, kReturnLse,
};
constexpr int64_t kMaxInt64 = INT64_MAX;

using dsa_tiling::LayoutCode;
}  // namespace

namespace optiling {

static ge::graphStatus DsaSparseFlashAttentionTiling(gert::TilingContext* context) {
  using namespace dsa_tiling;
  const gert::RuntimeAttrs* attrs = context->GetAttrs();
  if (attrs == nullptr) return ge::GRAPH_FAILED;
  DsaProblem problem{};
  if (!LayoutCode(attrs->GetStr(kLayoutQuery), false, problem.layoutQuery) ||
      !LayoutCode(attrs->GetStr(kLayoutKv), true, problem.layoutKey))
    return ge::GRAPH_FAILED;
  if (problem.layoutKey != kLayoutPABSND && problem.layoutKey != problem.layoutQuery)
    return ge::GRAPH_FAILED;  // non-paged KV follows the query's layout
  const int64_t sparseMode = *attrs->GetInt(kSparseMode);
  if (*attrs->GetInt(kSparseBlockSize) != 1 || (sparseMode != 0 && sparseMode != 3) ||
      *attrs->GetInt(kPreTokens) != kMaxInt64 || *attrs->GetInt(kNextTokens) != kMaxInt64 ||
      *attrs->GetInt(kAttentionMode) != 2)
    return ge::GRAPH_FAILED;  // MLA-absorbed, token-level sparsity, default window only
  const bool* returnLse = attrs->GetBool(kReturnLse);

  const gert::Shape& q = context->GetInputShape(kQuery)->GetStorageShape();
  const gert::Shape& k = context->GetInputShape(kKey)->GetStorageShape();
  const gert::Shape& idx = context->GetInputShape(kIndices)->GetStorageShape();
  const size_t qDims = q.GetDimNum();
  if (qDims != (problem.layoutQuery == kLayoutTND ? 3u : 4u) || idx.GetDimNum() != qDims ||
      idx.GetDim(qDims - 2) != 1)
    return ge::GRAPH_FAILED;
  const uint32_t heads = static_cast<uint32_t>(q.GetDim(qDims - 2));
  const uint32_t dNope = static_cast<uint32_t>(q.GetDim(qDims - 1));
  const gert::StorageShape* qRope = context->GetOptionalInputShape(kQueryRope);
  const gert::StorageShape* kRope = context->GetOptionalInputShape(kKeyRope);
  const uint32_t dRope = qRope == nullptr ? 0u
      : static_cast<uint32_t>(qRope->GetStorageShape().GetDim(qDims - 1));
  const int64_t keyD = k.GetDim(k.GetDimNum() - 1);
  if (k.GetDim(k.GetDimNum() - 2) != 1) return ge::GRAPH_FAILED;  // one KV head
  // key is the latent (rope separate) or [latent | rope] (the combined cache row)
  const bool combined = kRope == nullptr && dRope > 0;
  if (combined ? keyD != dNope + dRope : keyD != dNope) return ge::GRAPH_FAILED;

  SparseMlaShape s{};
  if (problem.layoutQuery == kLayoutTND) {
    const gert::StorageShape* lens = context->GetOptionalInputShape(kQueryLens);
    if (lens == nullptr) return ge::GRAPH_FAILED;  // TND needs cumulative lengths
    problem.batch = static_cast<uint32_t>(lens->GetStorageShape().GetDim(0));
    s.tokens = static_cast<uint64_t>(q.GetDim(0));
  } else {
    problem.batch = static_cast<uint32_t>(q.GetDim(0));
    problem.querySeq = static_cast<uint32_t>(q.GetDim(1));
    s.tokens = static_cast<uint64_t>(q.GetDim(0) * q.GetDim(1));
  }
  problem.queryRows = s.tokens;
  problem.hasQueryLens = context->GetOptionalInputShape(kQueryLens) != nullptr;
  problem.hasKeyLens = context->GetOptionalInputShape(kKvLens) != nullptr;
  if (problem.layoutKey == kLayoutPABSND) {
    const gert::StorageShape* table = context->GetOptionalInputShape(kBlockTable);
    if (table == nullptr || !problem.hasKeyLens || k.GetDimNum() != 4) return ge::GRAPH_FAILED;
    problem.blockSize = static_cast<uint32_t>(k.GetDim(1));
    problem.maxBlocks = static_cast<uint32_t>(table->GetStorageShape().GetDim(1));
  } else if (problem.layoutKey == kLayoutBSND) {
    problem.keySeq = static_cast<uint32_t>(k.GetDim(1));
  } else if (!problem.hasKeyLens) {
    return ge::GRAPH_FAILED;  // TND keys need cumulative lengths
  }
  problem.sparseMode = static_cast<uint32_t>(sparseMode);
  s.heads = heads;
  s.dNope = dNope;
  s.dRope = dRope;
  s.sparseCount = static_cast<uint32_t>(idx.GetDim(qDims - 1));
  s.dtypeBytes = 2;

  const ge::DataType qType = context->GetInputDesc(kQuery)->GetDataType();
  uint64_t tilingKey;
  if (qType == ge::DT_BF16) tilingKey = 0;
  else if (qType == ge::DT_FLOAT16) tilingKey = 1;
  else return ge::GRAPH_FAILED;

  const PlatformSizes p = dsa_host::ReadPlatformSizes(context->GetPlatformInfo());

  SparseMlaTilingData* t = context->GetTilingData<SparseMlaTilingData>();
  if (t == nullptr) return ge::GRAPH_FAILED;
  t->problem = problem;
  if (!TileSparseMla(s, p, *t)) return ge::GRAPH_FAILED;
  t->sparseMode = problem.sparseMode;
  t->returnLse = returnLse != nullptr && *returnLse;
  t->scaleValue = *attrs->GetFloat(kScale);
  t->keyCombined = combined;
  t->keyRowElems = static_cast<uint32_t>(keyD);

  context->SetBlockDim(t->split.usedCores);
  context->SetTilingKey(tilingKey);
  context->SetScheduleMode(1);  // SyncAll for split index lists: all cores co-resident
  return dsa_host::SetWorkspace(context, t->workspaceBytes) ? ge::GRAPH_SUCCESS : ge::GRAPH_FAILED;
}

}  // namespace optiling

namespace ge {

static graphStatus DsaSparseFlashAttentionInferShape(gert::InferShapeContext* context) {
  const gert::Shape* q = context->GetInputShape(kQuery);
  gert::Shape* out = context->GetOutputShape(0);
  gert::Shape* smax = context->GetOutputShape(1);
  gert::Shape* ssum = context->GetOutputShape(2);
  if (q == nullptr || out == nullptr || smax == nullptr || ssum == nullptr) return GRAPH_FAILED;
  *out = *q;  // Dv = the query's 512 (value = the latent)
  // softmax_max / softmax_sum: [T, N2 = 1, N1] or [B, S1, 1, N1], float32
  const size_t dims = q->GetDimNum();
  smax->SetDimNum(dims);
  for (size_t i = 0; i + 2 < dims; ++i) smax->SetDim(i, q->GetDim(i));
  smax->SetDim(dims - 2, 1);
  smax->SetDim(dims - 1, q->GetDim(dims - 2));
  *ssum = *smax;
  return GRAPH_SUCCESS;
}

static graphStatus DsaSparseFlashAttentionInferDataType(gert::InferDataTypeContext* context) {
  context->SetOutputDataType(0, context->GetInputDataType(kQuery));
  context->SetOutputDataType(1, DT_FLOAT);
  context->SetOutputDataType(2, DT_FLOAT);
  return GRAPH_SUCCESS;
}

}  // namespace ge

namespace ops {

class DsaSparseFlashAttention : public OpDef {
 public:
  explicit DsaSparseFlashAttention(const char* name) : OpDef(name) {
    const std::vector<ge::Format> nd(2, ge::FORMAT_ND);
    const std::vector<ge::DataType> floats = {ge::DT_BF16, ge::DT_FLOAT16};
    const std::vector<ge::DataType> ints = {ge::DT_INT32, ge::DT_INT32};
    this->Input("query").ParamType(REQUIRED).DataType(floats).Format(nd);
    this->Input("key").ParamType(REQUIRED).DataType(floats).Format(nd);
    this->Input("value").ParamType(REQUIRED).DataType(floats).Format(nd);
    this->Input("sparse_indices").ParamType(REQUIRED).DataType(ints).Format(nd);
    this->Input("block_table").ParamType(OPTIONAL).DataType(ints).Format(nd);
    this->Input("actual_seq_lengths_query").ParamType(OPTIONAL).DataType(ints).Format(nd);
    this->Input("actual_seq_lengths_kv").ParamType(OPTIONAL).DataType(ints).Format(nd);
    this->Input("query_rope").ParamType(OPTIONAL).DataType(floats).Format(nd);
    this->Input("key_rope").ParamType(OPTIONAL).DataType(floats).Format(nd);
    this->Output("attention_out").ParamType(REQUIRED).DataType(floats).Format(nd);
    this->Output("softmax_max").ParamType(REQUIRED)
        .DataType({ge::DT_FLOAT, ge::DT_FLOAT}).Format(nd);
    this->Output("softmax_sum").ParamType(REQUIRED)
        .DataType({ge::DT_FLOAT, ge::DT_FLOAT}).Format(nd);
    this->Attr("scale_value").AttrType(REQUIRED).Float(1.0f);
    this->Attr("sparse_block_size").AttrType(OPTIONAL).Int(1);
    this->Attr("layout_query").AttrType(OPTIONAL).String("BSND");
    this->Attr("layout_kv").AttrType(OPTIONAL).String("BSND");
    this->Attr("sparse_mode").AttrType(OPTIONAL).Int(3);
    this->Attr("pre_tokens").AttrType(OPTIONAL).Int(kMaxInt64);
    this->Attr("next_tokens").AttrType(OPTIONAL).Int(kMaxInt64);
    this->Attr("attention_mode").AttrType(OPTIONAL).Int(2);
    this->Attr("return_softmax_lse").AttrType(OPTIONAL).Bool(false);

    this->SetInferShape(ge::DsaSparseFlashAttentionInferShape)
        .SetInferDataType(ge::DsaSparseFlashAttentionInferDataType);
    this->AICore().SetTiling(optiling::DsaSparseFlashAttentionTiling);
    this->AICore().AddConfig("ascend910b");    // Atlas A2
    this->AICore().AddConfig("ascend910_93");  // Atlas A3
  }
};

OP_ADD(DsaSparseFlashAttention);

}  // namespace ops
