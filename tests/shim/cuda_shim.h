// Enough of CUDA, as C++, to run mlxtune's kernels on the CPU (see shim_runtime.h):
// __shared__ declarations become `static`, threadIdx / blockIdx come from the emulated
// thread being run, __syncthreads and __shfl_xor_sync synchronize the emulated threads.
#pragma once
#include "shim_runtime.h"

#define __global__
#define __device__
#define __forceinline__
#define __grid_constant__
#define __shared__ static

typedef unsigned int uint;
typedef _Float16 __half;

struct __nv_bfloat16 {
  uint16_t bits;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
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
  unsigned x, y, z;
};
namespace cooperative_groups {}

namespace shim {
inline dim3u& block_dim() {
  static dim3u d;
  return d;
}
inline dim3u& block_idx() {
  static dim3u b;
  return b;
}
inline uint3 thread_idx() {
  unsigned lid = current_lid();
  dim3u d = block_dim();
  return uint3{lid % d.x, lid / d.x % d.y, lid / (d.x * d.y)};
}
}  // namespace shim

#define threadIdx (shim::thread_idx())
#define blockIdx (shim::block_idx())
#define blockDim (shim::block_dim())

inline void __syncthreads() { shim::barrier(); }
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  return shim::shfl_xor(v, unsigned(lane_mask));
}
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
