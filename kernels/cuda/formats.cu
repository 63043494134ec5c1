// Weight decoders for mlxtune's own quantized formats (layouts: mlxtune/quant/layouts.py).
// The CUDA twin of kernels/metal/formats.metal, passed to mx.fast.cuda_kernel as part of
// the header, before qmm.cu.

namespace mlxtune {

// NF4 levels (QLoRA): quantiles of N(0, 1) scaled to [-1, 1].
__device__ static const float NF4_LEVELS[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// NF4 with double quantization: codes 8 per uint32 word (element i in bits 4i..4i+3),
// one int8 absmax code per 64 weights, one float scale per 256 absmax codes, one offset.
struct Nf4Weights {
  const uint32_t* words;
  const int8_t* absmax_q;
  const float* absmax_scale;
  float absmax_offset;
  uint32_t K;  // weights per row

  __device__ float absmax(uint32_t row, uint32_t col) const {
    uint32_t block = row * (K / 64) + col / 64;
    return float(absmax_q[block]) * absmax_scale[block / 256] + absmax_offset;
  }
  __device__ float at(uint32_t row, uint32_t col) const {
    uint32_t word = words[row * (K / 8) + col / 8];
    return NF4_LEVELS[(word >> (4 * (col % 8))) & 15] * absmax(row, col);
  }
  __device__ void load8(uint32_t row, uint32_t wi, float* out) const {
    uint32_t word = words[row * (K / 8) + wi];
    float a = absmax(row, wi * 8);
    for (int i = 0; i < 8; ++i) {
      out[i] = NF4_LEVELS[(word >> (4 * i)) & 15] * a;
    }
  }
};

// GGUF Q6_K in element order: low 4 bits 8 per word, top 2 bits 16 per word, an int8
// scale per 16 weights and a half d per 256; w = d * scale * (q - 32).
struct Q6kWeights {
  const uint32_t* low;
  const uint32_t* high;
  const int8_t* scales;
  const __half* d;
  uint32_t K;

  __device__ float scale(uint32_t row, uint32_t col) const {
    return static_cast<float>(d[row * (K / 256) + col / 256]) *
        float(scales[row * (K / 16) + col / 16]);
  }
  __device__ float at(uint32_t row, uint32_t col) const {
    uint32_t lo = (low[row * (K / 8) + col / 8] >> (4 * (col % 8))) & 15;
    uint32_t hi = (high[row * (K / 16) + col / 16] >> (2 * (col % 16))) & 3;
    return float(int(lo | (hi << 4)) - 32) * scale(row, col);
  }
  __device__ void load8(uint32_t row, uint32_t wi, float* out) const {
    uint32_t lo = low[row * (K / 8) + wi];
    uint32_t hi = high[row * (K / 16) + wi / 2] >> (16 * (wi % 2));
    float s = scale(row, wi * 8);
    for (int i = 0; i < 8; ++i) {
      uint32_t q = ((lo >> (4 * i)) & 15) | (((hi >> (2 * i)) & 3) << 4);
      out[i] = float(int(q) - 32) * s;
    }
  }
};

}  // namespace mlxtune
