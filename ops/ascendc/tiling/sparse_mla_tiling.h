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

struct SparseMlaTilingData {
  uint64_t tokens;
  uint32_t heads, dNope, dRope, sparseCount;
  uint32_t gTile;       // heads per unit (AIC M)
  uint32_t rowsPerVec;  // heads per AIV (gTile / 2, at least 1)
  uint32_t kvTile;      // selected entries gathered per tile
  uint32_t kvTail;      // entries in the last tile of a token's list (1..kvTile)
  uint32_t baseK;       // D slice per QK^T matmul
  uint32_t dvChunk;     // Dv slice per PV matmul
  uint32_t chunkKv;     // kv tiles per unit
  uint32_t headGroups, kvTilesPerToken, chunksPerToken;
  uint64_t totalUnits;
  CoreSplit split;
  uint64_t ubScoreBuf, ubOutAcc, ubStats, ubIndexBuf, ubUsed;
  uint64_t l1Used, l0aUsed, l0bUsed, l0cUsed;
  uint64_t workspaceBytes;
};

struct MlaUnit { uint64_t token; uint32_t headStart, headEnd, kvStart, kvEnd; };

inline void MlaUnitAt(const SparseMlaTilingData& t, uint64_t u, MlaUnit& out) {
  const uint64_t perToken = static_cast<uint64_t>(t.headGroups) * t.chunksPerToken;
  out.token = u / perToken;
  const uint64_t r = u % perToken;
  const uint32_t g = static_cast<uint32_t>(r / t.chunksPerToken), c = static_cast<uint32_t>(r % t.chunksPerToken);
  out.headStart = g * t.gTile;
  out.headEnd = out.headStart + t.gTile < t.heads ? out.headStart + t.gTile : t.heads;
  out.kvStart = c * t.chunkKv * t.kvTile;
  const uint32_t end = out.kvStart + t.chunkKv * t.kvTile;
  out.kvEnd = end < t.sparseCount ? end : t.sparseCount;
}

inline bool TileSparseMla(const SparseMlaShape& s, const PlatformSizes& p, SparseMlaTilingData& t) {
  if (s.heads == 0 || s.heads > 128 || s.sparseCount == 0 || s.sparseCount > 2048 || s.tokens == 0)
    return false;
  t = SparseMlaTilingData{};
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
      const uint64_t l0a = 2 * AlignUp(m * baseK * db, kL0Align);
      const uint64_t l0b = 2 * AlignUp(static_cast<uint64_t>(kv) * (baseK > dvChunk ? baseK : dvChunk) * db, kL0Align);
      const uint64_t l0c = 2 * AlignUp(m * (kv > dvChunk ? kv : dvChunk) * 4, 64);
      const uint64_t l1 = AlignUp(m * d * db, kUbAlign) + 2 * AlignUp(static_cast<uint64_t>(kv) * d * db, kUbAlign);
      const uint64_t score = 2 * AlignUp(static_cast<uint64_t>(rows) * kv * 4, kUbAlign);
      const uint64_t acc = AlignUp(static_cast<uint64_t>(rows) * dv * 4, kUbAlign) +
                           AlignUp(static_cast<uint64_t>(rows) * dvChunk * 4, kUbAlign);
      const uint64_t stats = 4 * AlignUp(static_cast<uint64_t>(rows) * 4, kUbAlign);
      const uint64_t index = 2 * AlignUp(static_cast<uint64_t>(kv) * 4, kUbAlign);
      const uint64_t ub = score + acc + stats + index;
      if (l0a > p.l0aBytes || l0b > p.l0bBytes || l0c > p.l0cBytes || l1 > p.l1Bytes || ub > p.ubBytes)
        continue;
      t.gTile = g; t.rowsPerVec = rows; t.kvTile = kv; t.baseK = baseK; t.dvChunk = dvChunk;
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
  // partial (O f32 [gTile, Dv], max, sum) for <= 2 split groups per core
  t.workspaceBytes = AlignUp(static_cast<uint64_t>(used) * 2 * t.gTile * (dv + 2) * 4, kUbAlign);
  return true;
}

}  // namespace dsa_tiling
