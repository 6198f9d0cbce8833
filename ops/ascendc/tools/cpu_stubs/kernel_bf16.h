#pragma once
// Storage-and-conversion stand-in for the device type (tikicpulib provides the real one).
#include <cstdint>
#include <cstring>
namespace bfloat16 {
struct bfloat16_t {
  uint16_t bits = 0;
  bfloat16_t() = default;
  bfloat16_t(float f) { uint32_t u; std::memcpy(&u, &f, 4); bits = static_cast<uint16_t>(u >> 16); }
  float ToFloat() const { return float(*this); }
  operator float() const { uint32_t u = static_cast<uint32_t>(bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
};
}
using bfloat16_t = bfloat16::bfloat16_t;
