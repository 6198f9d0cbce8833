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
  uint32_t dtypeBytes;    // 2 (bf16/fp16)
  std::vector<uint32_t> qLens, kvLens;  // per sequence (host values of actual_seq_lengths)
};

struct LightningIndexerTilingData {
  uint32_t batch, heads, headDim, sparseCount, sparseMode, blockSize;
  uint32_t rowTile;       // query rows per unit
  uint32_t keyTile;       // keys per AIC tile (multiple of 32 for Sort; aligned reads)
  uint32_t halfKey;       // keys per AIV (keyTile / 2)
  uint32_t baseN;         // keys per matmul (L0B / L0C bound)
  uint32_t chunkTiles;    // key tiles per unit
  uint64_t totalUnits;
  CoreSplit split;
  // buffer sizes (bytes), every one a multiple of 32
  uint64_t ubScoreBuf, ubWeightBuf, ubReduceBuf, ubTopkState, ubMergeTmp, ubUsed;
  uint64_t l1Used, l0aUsed, l0bUsed, l0cUsed;
  uint64_t workspaceBytes;  // partial top-k lists (score f32 + index i32 pairs)
};

struct IndexerUnit { uint32_t seq, rowStart, rowEnd, keyStart, keyEnd; };

// Exclusive end of the keys visible to query row i of a sequence.
inline uint64_t IndexerVisible(uint32_t mode, uint64_t q, uint64_t kv, uint64_t i) {
  if (mode != 3) return kv;
  const int64_t v = static_cast<int64_t>(kv) - static_cast<int64_t>(q) + static_cast<int64_t>(i) + 1;
  return v < 0 ? 0 : (static_cast<uint64_t>(v) > kv ? kv : static_cast<uint64_t>(v));
}

// Calls f(unit) for every unit in linear order; returns the number of units.
template <class F>
uint64_t ForEachIndexerUnit(const LightningIndexerShape& s, uint32_t rowTile, uint32_t keyTile,
                            uint32_t chunkTiles, F&& f) {
  uint64_t n = 0;
  for (uint32_t b = 0; b < s.qLens.size(); ++b) {
    const uint32_t q = s.qLens[b], kv = s.kvLens[b];
    for (uint32_t r0 = 0; r0 < q; r0 += rowTile) {
      const uint32_t r1 = r0 + rowTile < q ? r0 + rowTile : q;
      const uint64_t vis = IndexerVisible(s.sparseMode, q, kv, r1 - 1);
      const uint64_t span = static_cast<uint64_t>(keyTile) * chunkTiles;
      for (uint64_t k0 = 0; k0 < vis; k0 += span) {
        const uint64_t k1 = k0 + span < vis ? k0 + span : vis;
        f(IndexerUnit{b, r0, r1, static_cast<uint32_t>(k0), static_cast<uint32_t>(k1)});
        ++n;
      }
    }
  }
  return n;
}

// Fills t; returns false (with t untouched beyond shapes) when no tile fits the platform.
inline bool TileLightningIndexer(const LightningIndexerShape& s, const PlatformSizes& p,
                                 LightningIndexerTilingData& t) {
  if (s.heads == 0 || s.heads > 128 || s.headDim == 0 || s.sparseCount == 0 ||
      s.sparseCount > 2048 || s.qLens.size() != s.kvLens.size() || s.qLens.empty())
    return false;
  t = LightningIndexerTilingData{};
  t.batch = static_cast<uint32_t>(s.qLens.size());
  t.heads = s.heads; t.headDim = s.headDim; t.sparseCount = s.sparseCount;
  t.sparseMode = s.sparseMode; t.blockSize = s.blockSize;
  const uint64_t db = s.dtypeBytes, d = s.headDim;
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
      const uint64_t ub = score + weight + reduce + state + merge;
      if (2 * l0a > p.l0aBytes || 2 * l0b > p.l0bBytes || 2 * l0c > p.l0cBytes ||
          l1 > p.l1Bytes || ub > p.ubBytes)
        continue;
      t.rowTile = rowTile; t.keyTile = keyTile; t.halfKey = half; t.baseN = baseN;
      t.ubScoreBuf = score; t.ubWeightBuf = weight; t.ubReduceBuf = reduce;
      t.ubTopkState = state; t.ubMergeTmp = merge; t.ubUsed = ub;
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
  // per core: 2 partial row tiles x 2 AIVs x rowTile rows x sparseCount (f32, i32) pairs
  t.workspaceBytes = AlignUp(static_cast<uint64_t>(t.split.usedCores) * 2 * 2 * t.rowTile *
                             s.sparseCount * 8, kUbAlign);
  return true;
}

}  // namespace dsa_tiling
