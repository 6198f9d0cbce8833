// Plain C++ (no CANN includes): platform sizes and the work partition shared by the DSA
// operators' host tiling (the TilingData structs themselves: dsa_tiling_data.h). On an NPU the op_host tiling fills PlatformSizes from
// platform_ascendc::PlatformAscendC (core counts, GetCoreMemSize); tests pass SKU values.
#pragma once
#include <cstdint>
#include <cstring>
#include "dsa_tiling_data.h"

namespace dsa_tiling {

constexpr uint32_t kUbAlign = 32;      // Unified Buffer / L1 / DataCopy granularity (bytes)
constexpr uint32_t kL0Align = 512;     // L0A / L0B fractal granularity (bytes)
constexpr uint32_t kCubeBlock = 16;    // rows/cols of a cube fractal

struct PlatformSizes {
  uint32_t aicCores;   // Cube cores
  uint32_t aivCores;   // Vector cores (2 per Cube core on Atlas A2/A3)
  uint64_t ubBytes;    // Unified Buffer per AIV
  uint64_t l1Bytes;    // L1 per AIC
  uint64_t l0aBytes;
  uint64_t l0bBytes;
  uint64_t l0cBytes;
};

inline uint64_t CeilDiv(uint64_t a, uint64_t b) { return (a + b - 1) / b; }
inline uint64_t AlignUp(uint64_t a, uint64_t b) { return CeilDiv(a, b) * b; }

// CoreSplit (dsa_tiling_data.h): units numbered 0..totalUnits-1 (the op defines what a unit
// is and its cost); core c owns the contiguous range [coreStart[c], coreStart[c+1]). Ranges are
// balanced by cost prefix sums, so a long sequence's units spread over several cores (split-K)
// and the op merges partial results of a row group that straddles a range boundary.

// costPrefix[i] = total cost of units [0, i), i = 0..n. Balanced contiguous split.
inline CoreSplit SplitByCost(const uint64_t* costPrefix, uint64_t n, uint32_t cores) {
  CoreSplit s{};
  if (cores > kMaxCores) cores = kMaxCores;
  if (cores == 0) cores = 1;
  const uint64_t total = costPrefix[n];
  uint32_t used = n == 0 ? 0 : (n < cores ? static_cast<uint32_t>(n) : cores);
  s.usedCores = used;
  uint64_t u = 0;
  s.coreStart[0] = 0;
  for (uint32_t c = 1; c <= used; ++c) {
    // first unit whose start cost reaches c/used of the total
    const uint64_t target = c == used ? total : CeilDiv(total * c, used);
    while (u < n && costPrefix[u] < target) ++u;
    // keep at least one unit per core and leave enough for the others
    const uint64_t lo = s.coreStart[c - 1] + 1, hi = n - (used - c);
    if (u < lo) u = lo;
    if (u > hi) u = hi;
    s.coreStart[c] = c == used ? n : u;
  }
  for (uint32_t c = used + 1; c <= kMaxCores; ++c) s.coreStart[c] = n;
  return s;
}

// A layout attribute ("BSND", "TND", or "PA_BSND" where paged keys are allowed) -> its code.
inline bool LayoutCode(const char* s, bool allowPaged, uint32_t& code) {
  if (s == nullptr) return false;
  if (std::strcmp(s, "BSND") == 0) { code = kLayoutBSND; return true; }
  if (std::strcmp(s, "TND") == 0) { code = kLayoutTND; return true; }
  if (allowPaged && std::strcmp(s, "PA_BSND") == 0) { code = kLayoutPABSND; return true; }
  return false;
}

}  // namespace dsa_tiling
