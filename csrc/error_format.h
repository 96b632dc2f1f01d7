// Pieces of TORCH_CHECK messages, formatted with snprintf instead of std::ostream's numeric
// insertion. On the GPU image (g++ 13.3, libstdc++ 6.0.33, torch 2.11.0+cu130; 2026-11-23) every
// TORCH_CHECK of this extension whose message streamed a number (a shape, gamma) segfaulted, CPU
// and CUDA ops alike, while one streaming only strings and a ScalarType raised as it should. The
// root cause is not known yet; these helpers keep number formatting out of our ostream calls.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <cstdio>
#include <string>

namespace rlhf_fast {

inline std::string fmt_float(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

inline std::string fmt_int(int64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%lld", static_cast<long long>(v));
  return buf;
}

inline std::string fmt_shape(c10::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) out += ", ";
    out += fmt_int(sizes[i]);
  }
  return out + "]";
}

// Device::str() formats inside libc10 (whose own messages were fine there).
inline std::string fmt_device(const c10::Device& device) { return device.str(); }

}  // namespace rlhf_fast
