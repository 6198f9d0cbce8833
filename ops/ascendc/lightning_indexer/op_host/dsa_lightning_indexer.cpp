// DsaLightningIndexer: op definition, shape/dtype inference and host tiling.
//
// Contract: torch_npu's npu_lightning_indexer / npu_quant_lightning_indexer (NPU_NOTES.md):
//   score(t, s) = sum_n weights[t, n] * ReLU(qs[t, n] * ks[s] * (query[t, n] . key[s]))
// (qs = ks = 1 for bf16/fp16 inputs), then the top sparse_count keys per query row, int32
// positions within the sequence, ties to the lower position, -1 after the valid ones.
// Layouts: query BSND [B, S1, N1, D] | TND [T, N1, D] (cumulative actual_seq_lengths_query);
// key BSND [B, S2, 1, D] | TND [T2, 1, D] | PA_BSND [blocks, block_size, 1, D] + block_table.
// Outputs: sparse_indices int32 [.., 1, K]; sparse_values float32 [.., 1, K] (written when
// return_value; -inf where padded).
//
// The tiling arithmetic is the plain-C++ lightning_indexer_tiling.h (g++-tested in
// ops/ascendc/tests); this file only reads shapes, attributes and platform sizes into it.
#include <cstring>
#include <string>
#include <vector>

#include "register/op_def_registry.h"
#include "op_host_common.h"
#include "lightning_indexer_tiling.h"

namespace {
enum InputIndex : size_t {
  kQuery = 0, kKey, kWeights, kQueryScale, kKeyScale, kQueryLens, kKeyLens, kBlockTable,
};
enum AttrIndex : size_t {
  kLayoutQuery = 0, kLayoutKey, kSparseCount, kSparseMode, kPreTokens, kNextTokens, kReturnValue,
};
constexpr int64_t kMaxInt64 = INT64_MAX;

using dsa_tiling::LayoutCode;
// Host values of an int32 1-D length tensor (a tiling data dependency: ValueDepend).
bool HostInts(const gert::Tensor* t, std::vector<int64_t>& out) {
  if (t == nullptr || t->GetData<int32_t>() == nullptr) return false;
  const int64_t n = t->GetShapeSize();
  out.assign(t->GetData<int32_t>(), t->GetData<int32_t>() + n);
  return true;
}
}  // namespace

namespace optiling {

static ge::graphStatus DsaLightningIndexerTiling(gert::TilingContext* context) {
  using namespace dsa_tiling;
  const gert::RuntimeAttrs* attrs = context->GetAttrs();
  if (attrs == nullptr) return ge::GRAPH_FAILED;
  DsaProblem problem{};
  if (!LayoutCode(attrs->GetStr(kLayoutQuery), false, problem.layoutQuery) ||
      !LayoutCode(attrs->GetStr(kLayoutKey), true, problem.layoutKey))
    return ge::GRAPH_FAILED;
  const int64_t sparseCount = *attrs->GetInt(kSparseCount);
  const int64_t sparseMode = *attrs->GetInt(kSparseMode);
  if (*attrs->GetInt(kPreTokens) != kMaxInt64 || *attrs->GetInt(kNextTokens) != kMaxInt64)
    return ge::GRAPH_FAILED;  // only the default window, as documented for the built-in
  if (sparseCount < 1 || sparseCount > 2048 || (sparseMode != 0 && sparseMode != 3))
    return ge::GRAPH_FAILED;
  const bool* returnValue = attrs->GetBool(kReturnValue);

  const gert::Shape& q = context->GetInputShape(kQuery)->GetStorageShape();
  const gert::Shape& k = context->GetInputShape(kKey)->GetStorageShape();
  const size_t qDims = q.GetDimNum();
  if (qDims != (problem.layoutQuery == kLayoutTND ? 3u : 4u)) return ge::GRAPH_FAILED;
  const uint32_t heads = static_cast<uint32_t>(q.GetDim(qDims - 2));
  const uint32_t headDim = static_cast<uint32_t>(q.GetDim(qDims - 1));
  if (k.GetDim(k.GetDimNum() - 1) != headDim || k.GetDim(k.GetDimNum() - 2) != 1)
    return ge::GRAPH_FAILED;  // N2 = 1, same D

  // Per-sequence query and key lengths, on the host (actual_seq_lengths are ValueDepend).
  std::vector<int64_t> qAct, kAct;
  const bool hasQ = HostInts(context->GetOptionalInputTensor(kQueryLens), qAct);
  const bool hasK = HostInts(context->GetOptionalInputTensor(kKeyLens), kAct);
  LightningIndexerShape s{};
  if (problem.layoutQuery == kLayoutTND) {
    if (!hasQ) return ge::GRAPH_FAILED;  // TND needs its cumulative lengths
    int64_t prev = 0;
    for (int64_t end : qAct) {
      if (end < prev || end > q.GetDim(0)) return ge::GRAPH_FAILED;
      s.qLens.push_back(static_cast<uint32_t>(end - prev));
      prev = end;
    }
    problem.queryRows = static_cast<uint64_t>(q.GetDim(0));
  } else {
    const int64_t b = q.GetDim(0), s1 = q.GetDim(1);
    for (int64_t i = 0; i < b; ++i) s.qLens.push_back(static_cast<uint32_t>(hasQ ? qAct.at(i) : s1));
    problem.querySeq = static_cast<uint32_t>(s1);
    problem.queryRows = static_cast<uint64_t>(b * s1);
  }
  const size_t batch = s.qLens.size();
  if (problem.layoutKey == kLayoutPABSND) {
    const gert::StorageShape* table = context->GetOptionalInputShape(kBlockTable);
    if (table == nullptr || !hasK || kAct.size() != batch || k.GetDimNum() != 4) return ge::GRAPH_FAILED;
    problem.blockSize = static_cast<uint32_t>(k.GetDim(1));
    problem.maxBlocks = static_cast<uint32_t>(table->GetStorageShape().GetDim(1));
    if (problem.blockSize == 0 || problem.blockSize % 16) return ge::GRAPH_FAILED;  // as torch_npu
    for (int64_t v : kAct) {
      if (v < 0 || v > static_cast<int64_t>(problem.maxBlocks) * problem.blockSize) return ge::GRAPH_FAILED;
      s.kvLens.push_back(static_cast<uint32_t>(v));
    }
  } else if (problem.layoutKey == kLayoutTND) {
    if (!hasK || kAct.size() != batch) return ge::GRAPH_FAILED;
    int64_t prev = 0;
    for (int64_t end : kAct) {
      if (end < prev || end > k.GetDim(0)) return ge::GRAPH_FAILED;
      s.kvLens.push_back(static_cast<uint32_t>(end - prev));
      prev = end;
    }
  } else {
    const int64_t s2 = k.GetDim(1);
    problem.keySeq = static_cast<uint32_t>(s2);
    for (size_t i = 0; i < batch; ++i) s.kvLens.push_back(static_cast<uint32_t>(hasK ? kAct.at(i) : s2));
  }
  problem.batch = static_cast<uint32_t>(batch);
  problem.hasQueryLens = hasQ;
  problem.hasKeyLens = hasK;
  problem.sparseMode = static_cast<uint32_t>(sparseMode);

  // dtype combination -> tiling key (the kernel's template instance)
  const ge::DataType qType = context->GetInputDesc(kQuery)->GetDataType();
  const ge::DataType wType = context->GetInputDesc(kWeights)->GetDataType();
  uint64_t tilingKey;
  if (qType == ge::DT_BF16) tilingKey = 0;
  else if (qType == ge::DT_FLOAT16) tilingKey = 1;
  else if (qType == ge::DT_INT8 && wType == ge::DT_FLOAT) tilingKey = 2;
  else if (qType == ge::DT_INT8 && wType == ge::DT_FLOAT16) tilingKey = 3;
  else return ge::GRAPH_FAILED;
  const bool quantized = qType == ge::DT_INT8;
  if (quantized && (context->GetOptionalInputShape(kQueryScale) == nullptr ||
                    context->GetOptionalInputShape(kKeyScale) == nullptr))
    return ge::GRAPH_FAILED;  // int8 needs both dequant scales
  s.heads = heads;
  s.headDim = headDim;
  s.sparseCount = static_cast<uint32_t>(sparseCount);
  s.sparseMode = static_cast<uint32_t>(sparseMode);
  s.blockSize = problem.blockSize;
  s.dtypeBytes = quantized ? 1 : 2;

  const PlatformSizes p = dsa_host::ReadPlatformSizes(context->GetPlatformInfo());

  LightningIndexerTilingData* t = context->GetTilingData<LightningIndexerTilingData>();
  if (t == nullptr) return ge::GRAPH_FAILED;
  t->problem = problem;
  if (!TileLightningIndexer(s, p, *t)) return ge::GRAPH_FAILED;
  t->returnValue = returnValue != nullptr && *returnValue;

  // A MIX (1 AIC : 2 AIV) kernel: block dim counts AI cores. At least one, which also writes
  // the -1 padding when no row has a visible key.
  context->SetBlockDim(t->split.usedCores > 0 ? t->split.usedCores : 1);
  context->SetTilingKey(tilingKey);
  // Cross-core sync (SyncAll) needs every core co-resident: batch scheduling mode.
  context->SetScheduleMode(1);
  return dsa_host::SetWorkspace(context, t->workspaceBytes) ? ge::GRAPH_SUCCESS : ge::GRAPH_FAILED;
}

}  // namespace optiling

namespace ge {

static graphStatus DsaLightningIndexerInferShape(gert::InferShapeContext* context) {
  const gert::Shape* q = context->GetInputShape(kQuery);
  const gert::RuntimeAttrs* attrs = context->GetAttrs();
  gert::Shape* indices = context->GetOutputShape(0);
  gert::Shape* values = context->GetOutputShape(1);
  if (q == nullptr || attrs == nullptr || indices == nullptr || values == nullptr) return GRAPH_FAILED;
  const int64_t sparseCount = *attrs->GetInt(kSparseCount);
  // [B, S1, N1, D] -> [B, S1, 1, K];  [T, N1, D] -> [T, 1, K]
  const size_t dims = q->GetDimNum();
  indices->SetDimNum(dims);
  for (size_t i = 0; i + 2 < dims; ++i) indices->SetDim(i, q->GetDim(i));
  indices->SetDim(dims - 2, 1);
  indices->SetDim(dims - 1, sparseCount);
  *values = *indices;
  return GRAPH_SUCCESS;
}

static graphStatus DsaLightningIndexerInferDataType(gert::InferDataTypeContext* context) {
  context->SetOutputDataType(0, DT_INT32);
  context->SetOutputDataType(1, DT_FLOAT);
  return GRAPH_SUCCESS;
}

}  // namespace ge

namespace ops {

class DsaLightningIndexer : public OpDef {
 public:
  explicit DsaLightningIndexer(const char* name) : OpDef(name) {
    // Four dtype combinations, column by column: bf16, fp16, int8 (float32 weights/scales,
    // ours), int8 (float16 weights/scales, as torch_npu's Atlas A3 quant indexer).
    const std::vector<ge::Format> nd(4, ge::FORMAT_ND);
    this->Input("query").ParamType(REQUIRED)
        .DataType({ge::DT_BF16, ge::DT_FLOAT16, ge::DT_INT8, ge::DT_INT8}).Format(nd);
    this->Input("key").ParamType(REQUIRED)
        .DataType({ge::DT_BF16, ge::DT_FLOAT16, ge::DT_INT8, ge::DT_INT8}).Format(nd);
    this->Input("weights").ParamType(REQUIRED)
        .DataType({ge::DT_BF16, ge::DT_FLOAT16, ge::DT_FLOAT, ge::DT_FLOAT16}).Format(nd);
    this->Input("query_dequant_scale").ParamType(OPTIONAL)
        .DataType({ge::DT_FLOAT, ge::DT_FLOAT, ge::DT_FLOAT, ge::DT_FLOAT16}).Format(nd);
    this->Input("key_dequant_scale").ParamType(OPTIONAL)
        .DataType({ge::DT_FLOAT, ge::DT_FLOAT, ge::DT_FLOAT, ge::DT_FLOAT16}).Format(nd);
    this->Input("actual_seq_lengths_query").ParamType(OPTIONAL)
        .DataType({ge::DT_INT32, ge::DT_INT32, ge::DT_INT32, ge::DT_INT32}).Format(nd)
        .ValueDepend(OPTIONAL);
    this->Input("actual_seq_lengths_key").ParamType(OPTIONAL)
        .DataType({ge::DT_INT32, ge::DT_INT32, ge::DT_INT32, ge::DT_INT32}).Format(nd)
        .ValueDepend(OPTIONAL);
    this->Input("block_table").ParamType(OPTIONAL)
        .DataType({ge::DT_INT32, ge::DT_INT32, ge::DT_INT32, ge::DT_INT32}).Format(nd);
    this->Output("sparse_indices").ParamType(REQUIRED)
        .DataType({ge::DT_INT32, ge::DT_INT32, ge::DT_INT32, ge::DT_INT32}).Format(nd);
    this->Output("sparse_values").ParamType(REQUIRED)
        .DataType({ge::DT_FLOAT, ge::DT_FLOAT, ge::DT_FLOAT, ge::DT_FLOAT}).Format(nd);
    this->Attr("layout_query").AttrType(OPTIONAL).String("BSND");
    this->Attr("layout_key").AttrType(OPTIONAL).String("BSND");
    this->Attr("sparse_count").AttrType(OPTIONAL).Int(2048);
    this->Attr("sparse_mode").AttrType(OPTIONAL).Int(3);
    this->Attr("pre_tokens").AttrType(OPTIONAL).Int(kMaxInt64);
    this->Attr("next_tokens").AttrType(OPTIONAL).Int(kMaxInt64);
    this->Attr("return_value").AttrType(OPTIONAL).Bool(false);

    this->SetInferShape(ge::DsaLightningIndexerInferShape)
        .SetInferDataType(ge::DsaLightningIndexerInferDataType);
    this->AICore().SetTiling(optiling::DsaLightningIndexerTiling);
    this->AICore().AddConfig("ascend910b");    // Atlas A2
    this->AICore().AddConfig("ascend910_93");  // Atlas A3
  }
};

OP_ADD(DsaLightningIndexer);

}  // namespace ops
