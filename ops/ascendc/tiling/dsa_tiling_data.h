// The TilingData structs of the DSA operators: the only host-to-device contract (standard C++
// tiling structs: fixed-size, trivially copyable, no pointers). Included by the host tiling
// (tiling_common.h and the op tilers) and by the kernels (op_kernel/*.cpp), so nothing here may
// need the C++ library beyond <cstdint>.
//
// Shared helpers that the kernels also run (work enumeration) are marked DSA_TILING_FN: plain
// `inline` on the host; a kernel defines DSA_TILING_FN as `__aicore__ inline` before including.
#pragma once
#include <cstdint>

#ifndef DSA_TILING_FN
#define DSA_TILING_FN inline
#endif

namespace dsa_tiling {

constexpr uint32_t kMaxCores = 64;  // upper bound on AIC cores of any supported SKU

// Layout codes (the operators' layout_query / layout_key / layout_kv strings).
constexpr uint32_t kLayoutBSND = 0;
constexpr uint32_t kLayoutTND = 1;
constexpr uint32_t kLayoutPABSND = 2;

// Linear work: units numbered 0..totalUnits-1; core c owns [coreStart[c], coreStart[c+1]).
struct CoreSplit {
  uint32_t usedCores;
  uint32_t pad0;
  uint64_t coreStart[kMaxCores + 1];
};

// What both operators need to address their inputs, filled from shapes and attributes.
struct DsaProblem {
  uint32_t batch;          // B (number of sequences)
  uint32_t layoutQuery;    // kLayoutBSND | kLayoutTND
  uint32_t layoutKey;      // kLayoutBSND | kLayoutTND | kLayoutPABSND
  uint32_t querySeq;       // S1 of a BSND query (rows per sequence), 0 for TND
  uint32_t keySeq;         // S2 of a BSND key, 0 otherwise
  uint32_t blockSize;      // PA_BSND block size, 0 otherwise
  uint32_t maxBlocks;      // block_table row length (PA_BSND)
  uint32_t hasQueryLens;   // actual_seq_lengths_query given (else S1 per sequence)
  uint32_t hasKeyLens;     // actual_seq_lengths_key / _kv given (else S2 per sequence)
  uint32_t sparseMode;     // 0 | 3 (rightDownCausal)
  uint64_t queryRows;      // T (TND) or B * S1 (BSND)
};

struct LightningIndexerTilingData {
  DsaProblem problem;
  uint32_t batch, heads, headDim, sparseCount, sparseMode, blockSize;
  uint32_t quantized;     // int8 q/k with dequant scales (else bf16/fp16)
  uint32_t returnValue;   // write the scores output too
  uint32_t rowTile;       // query rows per unit
  uint32_t keyTile;       // keys per AIC tile (multiple of 64: two AIVs x Sort's 32)
  uint32_t halfKey;       // keys per AIV (keyTile / 2)
  uint32_t baseN;         // keys per matmul (L0B / L0C bound)
  uint32_t chunkTiles;    // key tiles per unit
  uint32_t mAligned;      // rowTile * heads rounded up to the cube's 16 rows
  uint64_t totalUnits;
  CoreSplit split;
  // Unified Buffer (per AIV) and L1/L0 sizes in bytes, each a multiple of 32
  uint64_t ubScoreBuf, ubWeightBuf, ubReduceBuf, ubTopkState, ubMergeTmp, ubSortTmp, ubIndexBuf;
  uint64_t ubScaleBuf, ubUsed;
  uint64_t l1Used, l0aUsed, l0bUsed, l0cUsed;
  // workspace (after the system workspace): offsets and per-core strides, bytes
  uint64_t wsScoreOffset, wsScoreCoreBytes;      // AIC -> AIV score tiles, 2 slots per core
  uint64_t wsPairOffset, wsPairCoreBytes;        // AIV1 -> AIV0 top-k lists of one row tile
  uint64_t wsPartialOffset, wsPartialCoreBytes;  // split row tiles: head and tail lists
  uint64_t workspaceBytes;
};

struct SparseMlaTilingData {
  DsaProblem problem;
  uint64_t tokens;
  uint32_t heads, dNope, dRope, sparseCount;
  uint32_t sparseMode;
  uint32_t returnLse;   // write softmax_max / softmax_sum
  float scaleValue;
  uint32_t keyCombined;  // key rows hold [latent | rope] (key_rope absent), else rope separate
  uint32_t keyRowElems;  // elements per key row: dNope, or dNope + dRope when combined
  uint32_t gTile;       // heads per unit (AIC M)
  uint32_t gAligned;    // gTile rounded up to 16
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
  uint64_t wsScoreOffset, wsScoreCoreBytes;      // AIC -> AIV scores S, 2 slots
  uint64_t wsProbOffset, wsProbCoreBytes;        // AIV -> AIC probabilities P (q dtype), 2 slots
  uint64_t wsOutOffset, wsOutCoreBytes;          // AIC -> AIV P.V tiles, 2 slots
  uint64_t wsPartialOffset, wsPartialCoreBytes;  // split groups: (O, max, sum), 2 per core
  uint64_t workspaceBytes;
};

// ---------------------------------------------------------------------------- shared helpers
// Exclusive end of the keys visible to query row i of a sequence (q queries, kv keys).
DSA_TILING_FN uint64_t IndexerVisible(uint32_t mode, uint64_t q, uint64_t kv, uint64_t i) {
  if (mode != 3) return kv;
  const int64_t v = static_cast<int64_t>(kv) - static_cast<int64_t>(q) + static_cast<int64_t>(i) + 1;
  return v < 0 ? 0 : (static_cast<uint64_t>(v) > kv ? kv : static_cast<uint64_t>(v));
}

struct IndexerUnit { uint32_t seq, rowStart, rowEnd, keyStart, keyEnd; };

// Walks the indexer's units in their linear order: for sequence b (query length q, key length
// kv) its row tiles, and for each the key chunks of the row tile's visible keys. Host and kernel
// both enumerate with this, so their numbering cannot drift apart. Lengths come from a callable
// (host: vectors; kernel: the actual_seq_lengths tensors); f(unit, index) returns false to stop.
template <class Lens, class F>
DSA_TILING_FN uint64_t WalkIndexerUnits(uint32_t batch, uint32_t mode, uint32_t rowTile,
                                        uint32_t keyTile, uint32_t chunkTiles, Lens&& lens, F&& f) {
  uint64_t n = 0;
  const uint64_t span = static_cast<uint64_t>(keyTile) * chunkTiles;
  for (uint32_t b = 0; b < batch; ++b) {
    uint32_t q = 0, kv = 0;
    lens(b, q, kv);
    for (uint32_t r0 = 0; r0 < q; r0 += rowTile) {
      const uint32_t r1 = r0 + rowTile < q ? r0 + rowTile : q;
      const uint64_t vis = IndexerVisible(mode, q, kv, r1 - 1);
      for (uint64_t k0 = 0; k0 < vis; k0 += span) {
        const uint64_t k1 = k0 + span < vis ? k0 + span : vis;
        IndexerUnit u{b, r0, r1, static_cast<uint32_t>(k0), static_cast<uint32_t>(k1)};
        if (!f(u, n)) return n + 1;
        ++n;
      }
    }
  }
  return n;
}

struct MlaUnit { uint64_t token; uint32_t headStart, headEnd, kvStart, kvEnd, chunk; };

DSA_TILING_FN void MlaUnitAt(const SparseMlaTilingData& t, uint64_t u, MlaUnit& out) {
  const uint64_t perToken = static_cast<uint64_t>(t.headGroups) * t.chunksPerToken;
  out.token = u / perToken;
  const uint64_t r = u % perToken;
  const uint32_t g = static_cast<uint32_t>(r / t.chunksPerToken);
  const uint32_t c = static_cast<uint32_t>(r % t.chunksPerToken);
  out.chunk = c;
  out.headStart = g * t.gTile;
  out.headEnd = out.headStart + t.gTile < t.heads ? out.headStart + t.gTile : t.heads;
  out.kvStart = c * t.chunkKv * t.kvTile;
  const uint32_t end = out.kvStart + t.chunkKv * t.kvTile;
  out.kvEnd = end < t.sparseCount ? end : t.sparseCount;
}

}  // namespace dsa_tiling
