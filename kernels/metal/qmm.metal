// Quantized matrix products over any decoder of formats.metal (`W::at`, `W::load8`).
//
//   qmv  y[m, n] = sum_k x[m, k] * W[n, k]  (+ lora_scale * sum_r xa[m, r] * lb[r, n])
//        for a few rows of x (M <= QMV_MAX_M: generation, evaluation). One simdgroup per
//        output column n: its 32 lanes split the row of W word by word, so each packed
//        word is read and decoded once for all M rows, then simd_sum reduces.
//   qmm  the same product for any M, tiled: a threadgroup of 256 threads computes a 32 x 32
//        block of y, stepping through k in tiles of 32; each step decodes a 32 x 32 tile
//        of W into threadgroup memory once for all 32 rows of x, and each thread
//        accumulates 2 x 2 outputs. TRANS computes x @ W instead (the backward pass:
//        dx = dy @ W), reading the tile W[k, n]. The LoRA term is added in the epilogue.
//
// Tile pointers are template parameters so the same text compiles with any address
// space qualifiers the caller's arrays carry.

namespace mlxtune {

static constant constexpr const uint QMV_MAX_M = 8;
static constant constexpr const uint QMV_ROWS = 4;     // simdgroups (output columns) per threadgroup
static constant constexpr const uint QMM_TILE = 32;
static constant constexpr const uint QMM_STRIDE = 33;  // padded row of a tile (fewer bank conflicts)

template <typename T, typename W, bool LORA>
void qmv(const device T* x, W w, device T* y, uint M, uint N, uint K,
         const device T* xa, const device T* lb, uint R, float lora_scale,
         uint n, uint lane) {
  if (n >= N) {
    return;  // the whole simdgroup leaves together: n is uniform across its lanes
  }
  float acc[QMV_MAX_M];
  for (uint m = 0; m < QMV_MAX_M; ++m) {
    acc[m] = 0.0f;
  }
  for (uint wi = lane; wi < K / 8; wi += 32) {
    float v[8];
    w.load8(n, wi, v);
    for (uint m = 0; m < M; ++m) {
      const device T* xr = x + m * K + wi * 8;
      float s = 0.0f;
      for (int i = 0; i < 8; ++i) {
        s += float(xr[i]) * v[i];
      }
      acc[m] += s;
    }
  }
  if (LORA) {
    for (uint r = lane; r < R; r += 32) {
      float b = float(lb[r * N + n]) * lora_scale;
      for (uint m = 0; m < M; ++m) {
        acc[m] += float(xa[m * R + r]) * b;
      }
    }
  }
  for (uint m = 0; m < QMV_MAX_M; ++m) {  // every lane runs the same reductions
    float total = simd_sum(acc[m]);
    if (lane == 0 && m < M) {
      y[m * N + n] = T(total);
    }
  }
}

template <typename T, typename W, bool TRANS, bool LORA, typename TILE>
void qmm(const device T* x, W w, device T* y, uint M, uint N, uint K,
         const device T* xa, const device T* lb, uint R, float lora_scale,
         TILE xs, TILE ws, uint3 group, uint lid) {
  const uint m0 = group.y * QMM_TILE;
  const uint n0 = group.x * QMM_TILE;
  const uint tm = (lid / 16) * 2;  // this thread's 2 x 2 outputs within the block
  const uint tn = (lid % 16) * 2;
  float acc00 = 0.0f, acc01 = 0.0f, acc10 = 0.0f, acc11 = 0.0f;
  for (uint k0 = 0; k0 < K; k0 += QMM_TILE) {
    for (uint i = lid; i < QMM_TILE * QMM_TILE; i += 256) {
      uint r = i / QMM_TILE, c = i % QMM_TILE;
      uint gm = m0 + r, gn = n0 + r, gk = k0 + c;
      xs[r * QMM_STRIDE + c] = (gm < M && gk < K) ? float(x[gm * K + gk]) : 0.0f;
      float wv = 0.0f;
      if (gn < N && gk < K) {
        wv = TRANS ? w.at(gk, gn) : w.at(gn, gk);
      }
      ws[r * QMM_STRIDE + c] = wv;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint k = 0; k < QMM_TILE; ++k) {
      float a0 = xs[tm * QMM_STRIDE + k], a1 = xs[(tm + 1) * QMM_STRIDE + k];
      float b0 = ws[tn * QMM_STRIDE + k], b1 = ws[(tn + 1) * QMM_STRIDE + k];
      acc00 += a0 * b0;
      acc01 += a0 * b1;
      acc10 += a1 * b0;
      acc11 += a1 * b1;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  float acc[2][2] = {{acc00, acc01}, {acc10, acc11}};
  for (uint i = 0; i < 2; ++i) {
    for (uint j = 0; j < 2; ++j) {
      uint gm = m0 + tm + i, gn = n0 + tn + j;
      if (gm >= M || gn >= N) {
        continue;
      }
      float v = acc[i][j];
      if (LORA) {  // fused epilogue: + lora_scale * xa[gm, :] . lb[:, gn]
        float l = 0.0f;
        for (uint r = 0; r < R; ++r) {
          l += float(xa[gm * R + r]) * float(lb[r * N + gn]);
        }
        v += lora_scale * l;
      }
      y[gm * N + gn] = T(v);
    }
  }
}

}  // namespace mlxtune
