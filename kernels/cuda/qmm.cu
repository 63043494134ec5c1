// Quantized matrix products over any decoder of formats.cu: the CUDA twin of
// kernels/metal/qmm.metal (same algorithms, warps for simdgroups, blocks for
// threadgroups, __shared__ tiles). See that file for what qmv and qmm compute.

namespace mlxtune {

static constexpr uint32_t QMV_MAX_M = 8;
static constexpr uint32_t QMV_ROWS = 4;      // warps (output columns) per block
static constexpr uint32_t QMM_TILE = 32;
static constexpr uint32_t QMM_STRIDE = 33;   // padded row of a tile

__device__ inline float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffff, v, offset);
  }
  return v;
}

template <typename T, typename W, bool LORA>
__device__ void qmv(const T* x, W w, T* y, uint32_t M, uint32_t N, uint32_t K,
                    const T* xa, const T* lb, uint32_t R, float lora_scale,
                    uint32_t n, uint32_t lane) {
  if (n >= N) {
    return;  // the whole warp leaves together: n is uniform across its lanes
  }
  float acc[QMV_MAX_M];
  for (uint32_t m = 0; m < QMV_MAX_M; ++m) {
    acc[m] = 0.0f;
  }
  for (uint32_t wi = lane; wi < K / 8; wi += 32) {
    float v[8];
    w.load8(n, wi, v);
    for (uint32_t m = 0; m < M; ++m) {
      const T* xr = x + m * K + wi * 8;
      float s = 0.0f;
      for (int i = 0; i < 8; ++i) {
        s += static_cast<float>(xr[i]) * v[i];
      }
      acc[m] += s;
    }
  }
  if (LORA) {
    for (uint32_t r = lane; r < R; r += 32) {
      float b = static_cast<float>(lb[r * N + n]) * lora_scale;
      for (uint32_t m = 0; m < M; ++m) {
        acc[m] += static_cast<float>(xa[m * R + r]) * b;
      }
    }
  }
  for (uint32_t m = 0; m < QMV_MAX_M; ++m) {  // every lane runs the same reductions
    float total = warp_sum(acc[m]);
    if (lane == 0 && m < M) {
      y[m * N + n] = T(total);
    }
  }
}

template <typename T, typename W, bool TRANS, bool LORA>
__device__ void qmm(const T* x, W w, T* y, uint32_t M, uint32_t N, uint32_t K,
                    const T* xa, const T* lb, uint32_t R, float lora_scale,
                    float* xs, float* ws, uint3 group, uint32_t lid) {
  const uint32_t m0 = group.y * QMM_TILE;
  const uint32_t n0 = group.x * QMM_TILE;
  const uint32_t tm = (lid / 16) * 2;
  const uint32_t tn = (lid % 16) * 2;
  float acc00 = 0.0f, acc01 = 0.0f, acc10 = 0.0f, acc11 = 0.0f;
  for (uint32_t k0 = 0; k0 < K; k0 += QMM_TILE) {
    for (uint32_t i = lid; i < QMM_TILE * QMM_TILE; i += 256) {
      uint32_t r = i / QMM_TILE, c = i % QMM_TILE;
      uint32_t gm = m0 + r, gn = n0 + r, gk = k0 + c;
      xs[r * QMM_STRIDE + c] = (gm < M && gk < K) ? static_cast<float>(x[gm * K + gk]) : 0.0f;
      float wv = 0.0f;
      if (gn < N && gk < K) {
        wv = TRANS ? w.at(gk, gn) : w.at(gn, gk);
      }
      ws[r * QMM_STRIDE + c] = wv;
    }
    __syncthreads();
    for (uint32_t k = 0; k < QMM_TILE; ++k) {
      float a0 = xs[tm * QMM_STRIDE + k], a1 = xs[(tm + 1) * QMM_STRIDE + k];
      float b0 = ws[tn * QMM_STRIDE + k], b1 = ws[(tn + 1) * QMM_STRIDE + k];
      acc00 += a0 * b0;
      acc01 += a0 * b1;
      acc10 += a1 * b0;
      acc11 += a1 * b1;
    }
    __syncthreads();
  }
  float acc[2][2] = {{acc00, acc01}, {acc10, acc11}};
  for (uint32_t i = 0; i < 2; ++i) {
    for (uint32_t j = 0; j < 2; ++j) {
      uint32_t gm = m0 + tm + i, gn = n0 + tn + j;
      if (gm >= M || gn >= N) {
        continue;
      }
      float v = acc[i][j];
      if (LORA) {  // fused epilogue: + lora_scale * xa[gm, :] . lb[:, gn]
        float l = 0.0f;
        for (uint32_t r = 0; r < R; ++r) {
          l += static_cast<float>(xa[gm * R + r]) * static_cast<float>(lb[r * N + gn]);
        }
        v += lora_scale * l;
      }
      y[gm * N + gn] = T(v);
    }
  }
}

}  // namespace mlxtune
