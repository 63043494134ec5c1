// Enough of the Metal Shading Language, as C++ for clang++, to run mlxtune's kernels on
// the CPU (see shim_runtime.h), with Metal's address spaces kept:
//
//   device       __attribute__((address_space(1)))
//   constant     __attribute__((address_space(2)))
//   threadgroup  static __attribute__((address_space(3)))   (shared by the group's
//                coroutine threads; `static`, so only for declarations, see below)
//   thread       the generic (default) address space: in MSL an unqualified local
//                variable is in `thread` space, and so it is here
//
// clang refuses to convert a pointer or reference between two of these spaces (a `device`
// pointer passed to a `constant` or `thread` parameter, a threadgroup tile to a `device`
// one, ...), as the Metal compiler does. Limits: a `threadgroup T*` *parameter* does not
// compile here (the `static`): mlxtune's kernels take tiles as template parameters; and
// an object of class type cannot live in an address space in clang's C++ (its member
// functions expect the generic space), so half and bfloat16 are clang's own arithmetic
// types, _Float16 and __bf16 (clang 17+ on x86-64: kernel_shim.metal_compiler probes).
#pragma once
#include "shim_runtime.h"

#ifndef __clang__
#error "the Metal shim needs clang++ (address spaces); tests/kernel_shim.py picks one"
#endif

#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup static __attribute__((address_space(3)))
#define thread
#define kernel

typedef unsigned int uint;
typedef _Float16 half;
typedef half float16_t;
typedef __bf16 bfloat16_t;
typedef bfloat16_t bfloat;

// float -> bfloat16, round to nearest even (what Metal's conversion does). clang lowers the
// conversion to this libgcc / compiler-rt routine, which libgcc 12 lacks: defined here.
extern "C" __attribute__((weak)) __bf16 __truncsfbf2(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint16_t bits = (u & 0x7FFFFFFF) > 0x7F800000 ? uint16_t((u >> 16) | 0x40)  // quiet NaN
                                                 : uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
  __bf16 b;
  std::memcpy(&b, &bits, 2);
  return b;
}

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
