// Host tiling of sparse MLA attention (MLA-absorbed, one KV head) -- plain C++, no CANN.
//
// Per query token: N1 heads x (512 nope + 64 rope) against K selected latent entries
// (value = the latent's 512). A unit = (token, head group of gTile heads, index chunk of
// chunkKv * kvTile selected entries). AIC: S = Q . K^T over D in baseK slices (L0A/L0B),
// then O += P . V over Dv in dvChunk slices (L0C); AIV pair: each takes half of the head
// group's rows: online softmax (running max / sum) and the O rescale in UB. Units split over
// cores by cost; index chunks of one (token, head group) on different cores are combined with
// their (max, sum) pairs (flash-decoding), <= 2 partial groups per core in the workspace.
#pragma once
#include <cstdint>
#include "tiling_common.h"

namespace dsa_tiling {

struct SparseMlaShape {
  uint64_t tokens;       // T (TND) or B*S1 (BSND)
  uint32_t heads;        // N1: 1..128
  uint32_t dNope;        // 512
  uint32_t dRope;        // 64
  uint32_t sparseCount;  // K: 1..2048 (entries per token, -1 padded)
  uint32_t dtypeBytes;   // 2
};

inline bool TileSparseMla(const SparseMlaShape& s, const PlatformSizes& p, SparseMlaTilingData& t) {
  if (s.heads == 0 || s.heads > 128 || s.sparseCount == 0 || s.sparseCount > 2048 || s.tokens == 0)
    return false;
  const DsaProblem problem = t.problem;  // filled by the caller (op_host) or zero
  t = SparseMlaTilingData{};
  t.problem = problem;
  t.tokens = s.tokens; t.heads = s.heads; t.dNope = s.dNope; t.dRope = s.dRope;
  t.sparseCount = s.sparseCount;
  const uint64_t db = s.dtypeBytes, d = s.dNope + s.dRope, dv = s.dNope;
  bool found = false;
  for (uint32_t g = s.heads < 128 ? s.heads : 128; g >= 1 && !found; g = g > 1 ? (g + 1) / 2 : 0) {
    for (uint32_t kv = 128; kv >= 16 && !found; kv /= 2) {
      const uint64_t m = AlignUp(g, kCubeBlock);
      const uint32_t rows = g > 1 ? (g + 1) / 2 : 1;
      uint32_t baseK = 256;
      while (baseK > 16 && 2 * AlignUp(m * baseK * db, kL0Align) > p.l0aBytes) baseK /= 2;
      while (baseK > 16 && 2 * AlignUp(static_cast<uint64_t>(kv) * baseK * db, kL0Align) > p.l0bBytes) baseK /= 2;
      uint32_t dvChunk = 512;
      while (dvChunk > 16 && (2 * AlignUp(m * dvChunk * 4, 64) > p.l0cBytes ||
                              2 * AlignUp(static_cast<uint64_t>(kv) * dvChunk * db, kL0Align) > p.l0bBytes)) dvChunk /= 2;
      // L0A holds a Q slice [m, baseK] for S = Q.K^T and all of P [m, kv] for O = P.V
      const uint64_t l0a = 2 * AlignUp(m * (baseK > kv ? baseK : kv) * db, kL0Align);
      const uint64_t l0b = 2 * AlignUp(static_cast<uint64_t>(kv) * (baseK > dvChunk ? baseK : dvChunk) * db, kL0Align);
      const uint64_t l0c = 2 * AlignUp(m * (kv > dvChunk ? kv : dvChunk) * 4, 64);
      // L1: Q [m, D], two gathered K/V tiles [kv, D], P [m, kv]
      const uint64_t l1 = AlignUp(m * d * db, kUbAlign) + 2 * AlignUp(static_cast<uint64_t>(kv) * d * db, kUbAlign) +
                          AlignUp(m * kv * db, kUbAlign);
      const uint64_t score = 2 * AlignUp(static_cast<uint64_t>(rows) * kv * 4, kUbAlign);
      const uint64_t acc = AlignUp(static_cast<uint64_t>(rows) * dv * 4, kUbAlign) +
                           AlignUp(static_cast<uint64_t>(rows) * dvChunk * 4, kUbAlign);
      const uint64_t stats = 4 * AlignUp(static_cast<uint64_t>(rows) * 4, kUbAlign);
      const uint64_t index = 2 * AlignUp(static_cast<uint64_t>(kv) * 4, kUbAlign);
      const uint64_t ub = score + acc + stats + index;
      if (l0a > p.l0aBytes || l0b > p.l0bBytes || l0c > p.l0cBytes || l1 > p.l1Bytes || ub > p.ubBytes)
        continue;
      t.gTile = g; t.gAligned = static_cast<uint32_t>(m); t.rowsPerVec = rows; t.kvTile = kv; t.baseK = baseK; t.dvChunk = dvChunk;
      t.ubScoreBuf = score; t.ubOutAcc = acc; t.ubStats = stats; t.ubIndexBuf = index; t.ubUsed = ub;
      t.l1Used = l1; t.l0aUsed = l0a; t.l0bUsed = l0b; t.l0cUsed = l0c;
      found = true;
    }
    if (g == 1) break;
  }
  if (!found) return false;
  t.headGroups = static_cast<uint32_t>(CeilDiv(s.heads, t.gTile));
  t.kvTilesPerToken = static_cast<uint32_t>(CeilDiv(s.sparseCount, t.kvTile));
  t.kvTail = s.sparseCount - (t.kvTilesPerToken - 1) * t.kvTile;
  // Split the index list only when tokens x head groups cannot fill the cores (decode).
  const uint64_t groups = s.tokens * t.headGroups;
  uint32_t chunks = 1;
  while (groups * chunks < p.aicCores && chunks < t.kvTilesPerToken) ++chunks;
  t.chunkKv = static_cast<uint32_t>(CeilDiv(t.kvTilesPerToken, chunks));
  t.chunksPerToken = static_cast<uint32_t>(CeilDiv(t.kvTilesPerToken, t.chunkKv));
  t.totalUnits = groups * t.chunksPerToken;
  // Uniform cost per unit except the last chunk: balance by unit count (prefix computed lazily
  // would need totalUnits entries; a uniform split is within one unit of the cost split).
  CoreSplit sp{};
  const uint64_t cores = p.aicCores < kMaxCores ? p.aicCores : kMaxCores;
  const uint32_t used = static_cast<uint32_t>(t.totalUnits < cores ? t.totalUnits : cores);
  sp.usedCores = used;
  for (uint32_t c = 0; c <= kMaxCores; ++c)
    sp.coreStart[c] = c <= used ? t.totalUnits * c / used : t.totalUnits;
  t.split = sp;
  // Workspace per used core: two slots each of S [gAligned, kvTile] f32 (AIC -> AIV),
  // P [gAligned, kvTile] in the q dtype (AIV -> AIC) and P.V [gAligned, Dv] f32 (AIC -> AIV);
  // partial (O f32 [gTile, Dv], max, sum) for <= 2 split groups.
  t.wsScoreCoreBytes = AlignUp(2ull * t.gAligned * t.kvTile * 4, kUbAlign);
  t.wsProbCoreBytes = AlignUp(2ull * t.gAligned * t.kvTile * db, kUbAlign);
  t.wsOutCoreBytes = AlignUp(2ull * t.gAligned * dv * 4, kUbAlign);
  t.wsPartialCoreBytes = AlignUp(2ull * t.gTile * (dv + 2) * 4, kUbAlign);
  t.wsScoreOffset = 0;
  t.wsProbOffset = t.wsScoreOffset + used * t.wsScoreCoreBytes;
  t.wsOutOffset = t.wsProbOffset + used * t.wsProbCoreBytes;
  t.wsPartialOffset = t.wsOutOffset + used * t.wsOutCoreBytes;
  t.workspaceBytes = t.wsPartialOffset + used * t.wsPartialCoreBytes;
  return true;
}

}  // namespace dsa_tiling
