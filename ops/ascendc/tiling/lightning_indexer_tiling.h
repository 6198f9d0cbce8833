// Host tiling of the lightning indexer with fused top-k (plain C++, no CANN includes).
//
// Work: query rows are grouped in tiles of rowTile rows (one sequence per tile); a row tile's
// visible keys [0, vis) (sparse_mode 3: vis of its last row; rows above it mask on the vector
// side) are cut into key tiles of keyTile keys, consecutive key tiles grouped into chunks of
// chunkTiles. A work unit = (row tile, key chunk). AIC: scores [rowTile*N1, keyTile] =
// q . k^T in L0C (baseN keys per matmul); AIV pair: each takes half of the key tile's columns,
// ReLU, x weights, sum over heads, Sort (32 per repeat) + MrgSort into a running top-k per row.
// Units are split over cores by cost (rows x keys); a row tile that straddles core ranges leaves
// partial top-k lists in the workspace, merged by a final pass (<= 2 partial row tiles per core).
#pragma once
#include <cstdint>
#include <vector>
#include "tiling_common.h"

namespace dsa_tiling {

struct LightningIndexerShape {
  uint32_t heads;         // N1 (1..128); N2 = 1
  uint32_t headDim;       // D = 128
  uint32_t sparseCount;   // 1..2048
  uint32_t sparseMode;    // 0 or 3 (rightDownCausal)
  uint32_t blockSize;     // PA_BSND block size (0 for BSND/TND keys)
  uint32_t dtypeBytes;    // 2 (bf16/fp16) or 1 (int8)
  std::vector<uint32_t> qLens, kvLens;  // per sequence (host values of actual_seq_lengths)
};

// Calls f(unit) for every unit in linear order; returns the number of units.
template <class F>
uint64_t ForEachIndexerUnit(const LightningIndexerShape& s, uint32_t rowTile, uint32_t keyTile,
                            uint32_t chunkTiles, F&& f) {
  return WalkIndexerUnits(
      static_cast<uint32_t>(s.qLens.size()), s.sparseMode, rowTile, keyTile, chunkTiles,
      [&](uint32_t b, uint32_t& q, uint32_t& kv) { q = s.qLens[b]; kv = s.kvLens[b]; },
      [&](const IndexerUnit& u, uint64_t) { f(u); return true; });
}

// Fills t; returns false (with t untouched beyond shapes) when no tile fits the platform.
inline bool TileLightningIndexer(const LightningIndexerShape& s, const PlatformSizes& p,
                                 LightningIndexerTilingData& t) {
  if (s.heads == 0 || s.heads > 128 || s.headDim == 0 || s.headDim % 32 || s.sparseCount == 0 ||
      s.sparseCount > 2048 || s.qLens.size() != s.kvLens.size() || s.qLens.empty() ||
      (s.dtypeBytes != 1 && s.dtypeBytes != 2))
    return false;
  const DsaProblem problem = t.problem;  // filled by the caller (op_host) or zero
  t = LightningIndexerTilingData{};
  t.problem = problem;
  t.batch = static_cast<uint32_t>(s.qLens.size());
  t.heads = s.heads; t.headDim = s.headDim; t.sparseCount = s.sparseCount;
  t.sparseMode = s.sparseMode; t.blockSize = s.blockSize;
  t.quantized = s.dtypeBytes == 1;
  const uint64_t db = s.dtypeBytes, d = s.headDim;
  // int8 scores leave L0C as int32 (4 bytes) like float ones.
  bool found = false;
  for (uint32_t rowTile = 128 / s.heads ? 128 / s.heads : 1; rowTile >= 1 && !found; rowTile /= 2) {
    for (uint32_t keyTile = 512; keyTile >= 64 && !found; keyTile /= 2) {
      const uint64_t m = AlignUp(static_cast<uint64_t>(rowTile) * s.heads, kCubeBlock);
      const uint32_t half = keyTile / 2;
      // L0: A = q tile, B = baseN keys, C = m x baseN fp32; each double-buffered.
      const uint64_t l0a = AlignUp(m * d * db, kL0Align);
      uint32_t baseN = keyTile;
      while (baseN > kCubeBlock && (2 * AlignUp(baseN * d * db, kL0Align) > p.l0bBytes ||
                                    2 * m * baseN * 4 > p.l0cBytes)) baseN /= 2;
      const uint64_t l0b = AlignUp(static_cast<uint64_t>(baseN) * d * db, kL0Align);
      const uint64_t l0c = AlignUp(m * baseN * 4, 64);
      const uint64_t l1 = AlignUp(m * d * db, kUbAlign) + 2 * AlignUp(keyTile * d * db, kUbAlign);
      const uint64_t score = 2 * AlignUp(static_cast<uint64_t>(rowTile) * s.heads * half * 4, kUbAlign);
      const uint64_t weight = AlignUp(static_cast<uint64_t>(rowTile) * s.heads * 4, kUbAlign);
      const uint64_t reduce = AlignUp(static_cast<uint64_t>(half) * 4, kUbAlign);
      const uint64_t state = static_cast<uint64_t>(rowTile) * AlignUp((s.sparseCount + half) * 8ull, kUbAlign);
      const uint64_t merge = 2 * AlignUp((s.sparseCount + half) * 8ull, kUbAlign);
      // Sort of one half tile: (score, index) pairs plus the same again as its scratch.
      const uint64_t sortTmp = 2 * AlignUp(static_cast<uint64_t>(half) * 8, kUbAlign);
      const uint64_t index = AlignUp(static_cast<uint64_t>(half) * 4, kUbAlign);
      const uint64_t scale = AlignUp(static_cast<uint64_t>(half) * 4, kUbAlign);
      const uint64_t ub = score + weight + reduce + state + merge + sortTmp + index + scale;
      if (2 * l0a > p.l0aBytes || 2 * l0b > p.l0bBytes || 2 * l0c > p.l0cBytes ||
          l1 > p.l1Bytes || ub > p.ubBytes)
        continue;
      t.rowTile = rowTile; t.keyTile = keyTile; t.halfKey = half; t.baseN = baseN;
      t.mAligned = static_cast<uint32_t>(m);
      t.ubScoreBuf = score; t.ubWeightBuf = weight; t.ubReduceBuf = reduce;
      t.ubTopkState = state; t.ubMergeTmp = merge; t.ubSortTmp = sortTmp; t.ubIndexBuf = index;
      t.ubScaleBuf = scale; t.ubUsed = ub;
      t.l1Used = l1; t.l0aUsed = 2 * l0a; t.l0bUsed = 2 * l0b; t.l0cUsed = 2 * l0c;
      found = true;
    }
    if (rowTile == 1) break;
  }
  if (!found) return false;
  // Key chunks: about 8 units per core over the whole batch, so long contexts spread out.
  uint64_t totalTiles = 0;
  ForEachIndexerUnit(s, t.rowTile, t.keyTile, 1, [&](const IndexerUnit&) { ++totalTiles; });
  const uint64_t want = 8ull * p.aicCores;
  t.chunkTiles = static_cast<uint32_t>(totalTiles > want ? CeilDiv(totalTiles, want) : 1);
  std::vector<uint64_t> prefix(1, 0);
  t.totalUnits = ForEachIndexerUnit(s, t.rowTile, t.keyTile, t.chunkTiles, [&](const IndexerUnit& u) {
    prefix.push_back(prefix.back() + static_cast<uint64_t>(u.rowEnd - u.rowStart) * (u.keyEnd - u.keyStart));
  });
  t.split = SplitByCost(prefix.data(), t.totalUnits, p.aicCores);
  // Workspace per used core: two score slots [mAligned, keyTile] f32/i32 (AIC -> AIV); one row
  // tile of AIV1's lists for AIV0 to merge; two partial row tiles (head, tail) of lists, each
  // list sparseCount (score f32, index u32) pairs.
  const uint64_t cores = t.split.usedCores;
  const uint64_t list = static_cast<uint64_t>(s.sparseCount) * 8;
  t.wsScoreCoreBytes = AlignUp(2ull * t.mAligned * t.keyTile * 4, kUbAlign);
  t.wsPairCoreBytes = AlignUp(t.rowTile * list, kUbAlign);
  t.wsPartialCoreBytes = AlignUp(2ull * t.rowTile * list, kUbAlign);
  t.wsScoreOffset = 0;
  t.wsPairOffset = t.wsScoreOffset + cores * t.wsScoreCoreBytes;
  t.wsPartialOffset = t.wsPairOffset + cores * t.wsPairCoreBytes;
  t.workspaceBytes = t.wsPartialOffset + cores * t.wsPartialCoreBytes;
  return true;
}

}  // namespace dsa_tiling
