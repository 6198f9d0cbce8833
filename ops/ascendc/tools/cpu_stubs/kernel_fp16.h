#pragma once
// Storage-and-conversion stand-in for the device type (tikicpulib provides the real one).
// CPU stand-in for the device half type (storage + conversions only).
struct half {
  _Float16 v;
  half() = default;
  template <class T, class = typename std::enable_if<std::is_arithmetic<T>::value>::type>
  half(T x) : v(static_cast<_Float16>(x)) {}
  operator float() const { return static_cast<float>(v); }
  float ToFloat() const { return static_cast<float>(v); }
};
