// g++ -std=c++17 -O2 -I ops/ascendc/tiling ops/ascendc/tests/tiling_sweep.cc: sweeps shapes
// through both tilers and checks budgets, alignment, exact coverage and tails. Prints
// "OK <cases>" or the first failures; exit status 1 on failure.
#include <cstdio>
#include <map>
#include <vector>
#include "lightning_indexer_tiling.h"
#include "sparse_mla_tiling.h"

using namespace dsa_tiling;
static int failures = 0;
#define CHECK(c, ...) do { if (!(c)) { if (failures++ < 20) { std::printf("FAIL %s: ", #c); std::printf(__VA_ARGS__); std::printf("\n"); } } } while (0)

static const PlatformSizes kSkus[] = {
  {24, 48, 192 * 1024, 512 * 1024, 64 * 1024, 64 * 1024, 128 * 1024},  // Atlas A2 (910B1-like)
  {20, 40, 192 * 1024, 512 * 1024, 64 * 1024, 64 * 1024, 128 * 1024},  // fewer cores
  {1, 2, 192 * 1024, 512 * 1024, 64 * 1024, 64 * 1024, 128 * 1024},    // single core
};

static bool Aligned(uint64_t v) { return v % kUbAlign == 0; }

static void CheckSplit(const CoreSplit& s, uint64_t total, uint32_t cores, const char* what) {
  CHECK(s.usedCores <= cores && s.usedCores <= kMaxCores, "%s used %u", what, s.usedCores);
  CHECK(s.coreStart[0] == 0 && s.coreStart[s.usedCores] == total, "%s ends", what);
  for (uint32_t c = 0; c < s.usedCores; ++c)
    CHECK(s.coreStart[c] < s.coreStart[c + 1], "%s core %u empty or reversed", what, c);
}

static void Indexer(const LightningIndexerShape& s, const PlatformSizes& p, long& cases) {
  LightningIndexerTilingData t{};
  const bool ok = TileLightningIndexer(s, p, t);
  CHECK(ok, "indexer tiling failed heads=%u sc=%u", s.heads, s.sparseCount);
  if (!ok) return;
  ++cases;
  CHECK(t.ubUsed <= p.ubBytes && t.l1Used <= p.l1Bytes && t.l0aUsed <= p.l0aBytes &&
        t.l0bUsed <= p.l0bBytes && t.l0cUsed <= p.l0cBytes, "indexer budget ub=%llu", (unsigned long long)t.ubUsed);
  CHECK(Aligned(t.ubScoreBuf) && Aligned(t.ubWeightBuf) && Aligned(t.ubReduceBuf) &&
        Aligned(t.ubTopkState) && Aligned(t.ubMergeTmp) && Aligned(t.ubSortTmp) && Aligned(t.ubIndexBuf) &&
        Aligned(t.ubScaleBuf) && Aligned(t.l1Used) && Aligned(t.workspaceBytes), "indexer alignment");
  CHECK(t.ubUsed == t.ubScoreBuf + t.ubWeightBuf + t.ubReduceBuf + t.ubTopkState + t.ubMergeTmp +
        t.ubSortTmp + t.ubIndexBuf + t.ubScaleBuf, "indexer UB sum");
  CHECK(t.mAligned >= t.rowTile * t.heads && t.mAligned % 16 == 0 && t.keyTile % t.baseN == 0, "indexer M/N");
  CHECK(t.ubSortTmp >= 2 * t.halfKey * 8ull && t.ubMergeTmp >= 2 * (t.sparseCount + t.halfKey) * 8ull,
        "indexer sort buffers");
  CHECK(Aligned(t.wsScoreCoreBytes) && Aligned(t.wsPairCoreBytes) && Aligned(t.wsPartialCoreBytes) &&
        t.wsPairOffset == t.wsScoreOffset + t.split.usedCores * t.wsScoreCoreBytes &&
        t.wsPartialOffset == t.wsPairOffset + t.split.usedCores * t.wsPairCoreBytes &&
        t.workspaceBytes == t.wsPartialOffset + t.split.usedCores * t.wsPartialCoreBytes &&
        t.wsScoreCoreBytes >= 2ull * t.mAligned * t.keyTile * 4 &&
        t.wsPartialCoreBytes >= 2ull * t.rowTile * t.sparseCount * 8, "indexer workspace layout");
  CHECK(t.keyTile % 64 == 0 && t.halfKey % 32 == 0 && (t.halfKey * 4) % kUbAlign == 0, "Sort needs 32-multiples");
  CHECK(t.sparseCount + t.halfKey <= 4095, "MrgSort list length");
  CHECK(s.blockSize == 0 || t.keyTile % s.blockSize == 0 || s.blockSize % t.keyTile == 0, "key tile vs PA block");
  CheckSplit(t.split, t.totalUnits, p.aicCores, "indexer");
  // Coverage: each (row, key tile of the row's visible keys) exactly once; units inside the
  // row tile's visible range; at most 2 row tiles per core that straddle a core boundary.
  std::map<std::pair<uint64_t, uint64_t>, int> seen;  // (global row, key tile) -> count
  std::vector<uint64_t> rowBase(s.qLens.size() + 1, 0);
  for (size_t b = 0; b < s.qLens.size(); ++b) rowBase[b + 1] = rowBase[b] + s.qLens[b];
  std::vector<IndexerUnit> units;
  ForEachIndexerUnit(s, t.rowTile, t.keyTile, t.chunkTiles, [&](const IndexerUnit& u) { units.push_back(u); });
  CHECK(units.size() == t.totalUnits, "unit count");
  for (const auto& u : units) {
    CHECK(u.rowEnd - u.rowStart <= t.rowTile && u.rowEnd > u.rowStart, "row tail");
    CHECK(u.keyStart % t.keyTile == 0 && u.keyEnd > u.keyStart, "key tile start");
    const uint64_t visMax = IndexerVisible(s.sparseMode, s.qLens[u.seq], s.kvLens[u.seq], u.rowEnd - 1);
    CHECK(u.keyEnd <= visMax, "unit past visible keys");
    for (uint32_t r = u.rowStart; r < u.rowEnd; ++r) {
      const uint64_t vis = IndexerVisible(s.sparseMode, s.qLens[u.seq], s.kvLens[u.seq], r);
      for (uint64_t k = u.keyStart; k < u.keyEnd && k < vis; k += t.keyTile) seen[{rowBase[u.seq] + r, k / t.keyTile}]++;
    }
  }
  uint64_t expect = 0;
  for (size_t b = 0; b < s.qLens.size(); ++b)
    for (uint32_t r = 0; r < s.qLens[b]; ++r) {
      const uint64_t vis = IndexerVisible(s.sparseMode, s.qLens[b], s.kvLens[b], r);
      for (uint64_t kt = 0; kt < CeilDiv(vis, t.keyTile); ++kt) {
        ++expect;
        auto it = seen.find({rowBase[b] + r, kt});
        CHECK(it != seen.end() && it->second == 1, "row %u tile %llu covered %d times", r,
              (unsigned long long)kt, it == seen.end() ? 0 : it->second);
      }
    }
  CHECK(seen.size() == expect, "extra coverage");
  for (uint32_t c = 0; c < t.split.usedCores; ++c) {
    const uint64_t a = t.split.coreStart[c], e = t.split.coreStart[c + 1];
    int partial = 0;
    for (uint64_t i = a; i < e; ++i) {
      const bool first = i == a || units[i - 1].seq != units[i].seq || units[i - 1].rowStart != units[i].rowStart;
      if (!first) continue;
      const bool startsBefore = i == a && a > 0 && units[a - 1].seq == units[a].seq && units[a - 1].rowStart == units[a].rowStart;
      uint64_t j = i;
      while (j + 1 < units.size() && units[j + 1].seq == units[i].seq && units[j + 1].rowStart == units[i].rowStart) ++j;
      if (startsBefore || j >= e) ++partial;
    }
    CHECK(partial <= 2, "core %u has %d partial row tiles", c, partial);
  }
}

static void Mla(const SparseMlaShape& s, const PlatformSizes& p, long& cases) {
  SparseMlaTilingData t{};
  const bool ok = TileSparseMla(s, p, t);
  CHECK(ok, "mla tiling failed heads=%u K=%u", s.heads, s.sparseCount);
  if (!ok) return;
  ++cases;
  CHECK(t.ubUsed <= p.ubBytes && t.l1Used <= p.l1Bytes && t.l0aUsed <= p.l0aBytes &&
        t.l0bUsed <= p.l0bBytes && t.l0cUsed <= p.l0cBytes, "mla budget");
  CHECK(Aligned(t.ubScoreBuf) && Aligned(t.ubOutAcc) && Aligned(t.ubStats) && Aligned(t.ubIndexBuf) &&
        Aligned(t.l1Used) && Aligned(t.workspaceBytes), "mla alignment");
  CHECK(t.gAligned >= t.gTile && t.gAligned % 16 == 0 && t.rowsPerVec * 2 >= t.gTile, "mla M");
  CHECK(Aligned(t.wsScoreCoreBytes) && Aligned(t.wsProbCoreBytes) && Aligned(t.wsOutCoreBytes) &&
        Aligned(t.wsPartialCoreBytes) && t.wsProbOffset >= t.wsScoreOffset + t.split.usedCores * t.wsScoreCoreBytes &&
        t.wsOutOffset >= t.wsProbOffset + t.split.usedCores * t.wsProbCoreBytes &&
        t.wsPartialOffset >= t.wsOutOffset + t.split.usedCores * t.wsOutCoreBytes &&
        t.workspaceBytes == t.wsPartialOffset + t.split.usedCores * t.wsPartialCoreBytes &&
        t.wsOutCoreBytes >= 2ull * t.gAligned * t.dNope * 4, "mla workspace layout");
  CHECK(t.kvTail >= 1 && t.kvTail <= t.kvTile && (t.kvTilesPerToken - 1) * t.kvTile + t.kvTail == s.sparseCount, "kv tail");
  CHECK(t.dNope % t.dvChunk == 0 && (t.dNope + t.dRope) % 16 == 0, "D slices");
  CheckSplit(t.split, t.totalUnits, p.aicCores, "mla");
  if (t.totalUnits > 2000000) return;  // coverage enumerated for the smaller cases only
  std::vector<uint8_t> cover(static_cast<size_t>(t.tokens) * s.heads * t.kvTilesPerToken, 0);
  for (uint32_t c = 0; c < t.split.usedCores; ++c)
    for (uint64_t u = t.split.coreStart[c]; u < t.split.coreStart[c + 1]; ++u) {
      MlaUnit m;
      MlaUnitAt(t, u, m);
      CHECK(m.token < t.tokens && m.headEnd > m.headStart && m.kvEnd > m.kvStart, "empty unit");
      for (uint32_t h = m.headStart; h < m.headEnd; ++h)
        for (uint32_t k = m.kvStart; k < m.kvEnd; k += t.kvTile)
          cover[(m.token * s.heads + h) * t.kvTilesPerToken + k / t.kvTile]++;
    }
  for (uint8_t v : cover) CHECK(v == 1, "mla (token, head, kv tile) covered %d times", v);
}

int main() {
  long cases = 0;
  uint32_t code = 99;  // the layout attribute parser the op_host files share
  CHECK(dsa_tiling::LayoutCode("TND", false, code) && code == dsa_tiling::kLayoutTND, "TND");
  CHECK(dsa_tiling::LayoutCode("PA_BSND", true, code) && code == dsa_tiling::kLayoutPABSND, "PA");
  CHECK(!dsa_tiling::LayoutCode("PA_BSND", false, code) && !dsa_tiling::LayoutCode("NTD", true, code) &&
        !dsa_tiling::LayoutCode(nullptr, true, code), "bad layouts refused");
  const uint32_t heads[] = {1, 2, 8, 16, 32, 64, 128};
  const uint32_t counts[] = {1, 16, 100, 512, 2048};
  for (const auto& p : kSkus) {
    for (uint32_t h : heads)
      for (uint32_t sc : counts) {
        // decode (1 query vs long context), chunked prefill, ragged batches, short prompts
        const std::vector<std::pair<std::vector<uint32_t>, std::vector<uint32_t>>> batches = {
          {{1}, {1}}, {{1}, {163840}}, {{1, 1, 1, 1}, {17, 4096, 1, 70000}}, {{2}, {9000}},
          {{64}, {160000}}, {{300, 7, 0, 33}, {300, 4000, 5, 33}}, {{1000}, {1000}}, {{5}, {3}},
        };
        for (const auto& [q, kv] : batches)
          for (uint32_t mode : {3u, 0u})
            for (uint32_t bs : {0u, 128u}) {
              if (mode == 0 && kv[0] > 100000) continue;
              Indexer({h, 128, sc, mode, bs, 2, q, kv}, p, cases);
              if (h == 64 && mode == 3) Indexer({h, 128, sc, mode, bs, 1, q, kv}, p, cases);  // int8
            }
        for (uint64_t tokens : {1ull, 2ull, 7ull, 64ull, 1000ull, 160000ull})
          Mla({tokens, h, 512, 64, sc, 2}, p, cases);
      }
  }
  if (failures) { std::printf("%d failures in %ld cases\n", failures, cases); return 1; }
  std::printf("OK %ld\n", cases);
  return 0;
}
