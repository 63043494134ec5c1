// Enough of the Metal Shading Language, as C++, to run mlxtune's kernels on the CPU: the
// address-space qualifiers vanish (threadgroup declarations become `static`, shared by
// the coroutine threads of a group, see shim_runtime.h), half is _Float16, bfloat16_t is
// emulated, and threadgroup_barrier / simd_sum synchronize the emulated threads.
#pragma once
#include "shim_runtime.h"

#define device
#define constant
#define thread
#define threadgroup static
#define kernel

typedef unsigned int uint;
typedef _Float16 half;
typedef half float16_t;

struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);  // round to nearest even
    bits = uint16_t(u >> 16);
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

struct uint3 {
  uint x, y, z;
};

namespace metal {
enum class mem_flags { mem_none, mem_device, mem_threadgroup };
}
using namespace metal;

template <typename To, typename From>
inline To as_type(From v) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs equal sizes");
  To t;
  std::memcpy(&t, &v, sizeof(To));
  return t;
}

inline void threadgroup_barrier(mem_flags) { shim::barrier(); }
inline float simd_sum(float v) { return shim::simd_sum(v); }
