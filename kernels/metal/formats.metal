// Weight decoders for mlxtune's own quantized formats (layouts: mlxtune/quant/layouts.py).
// Passed to mx.fast.metal_kernel as part of the header, before qmm.metal.
//
// Every input array is bound in the device address space: mlxtune pads arrays of fewer
// than 8 elements, which MLX would otherwise bind as `constant`.

namespace mlxtune {

// NF4 levels (QLoRA): quantiles of N(0, 1) scaled to [-1, 1].
constant float NF4_LEVELS[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// NF4 with double quantization: codes 8 per uint32 word (element i in bits 4i..4i+3),
// one int8 absmax code per 64 weights, one float scale per 256 absmax codes, one offset.
struct Nf4Weights {
  const device uint32_t* words;
  const device int8_t* absmax_q;
  const device float* absmax_scale;
  float absmax_offset;
  uint K;  // weights per row

  float absmax(uint row, uint col) const {
    uint block = row * (K / 64) + col / 64;
    return float(absmax_q[block]) * absmax_scale[block / 256] + absmax_offset;
  }
  float at(uint row, uint col) const {
    uint word = words[row * (K / 8) + col / 8];
    return NF4_LEVELS[(word >> (4 * (col % 8))) & 15] * absmax(row, col);
  }
  // The 8 weights held by word `wi` of `row` (columns 8*wi .. 8*wi + 7).
  void load8(uint row, uint wi, thread float* out) const {
    uint word = words[row * (K / 8) + wi];
    float a = absmax(row, wi * 8);
    for (int i = 0; i < 8; ++i) {
      out[i] = NF4_LEVELS[(word >> (4 * i)) & 15] * a;
    }
  }
};

// GGUF Q6_K in element order: low 4 bits 8 per word, top 2 bits 16 per word, an int8
// scale per 16 weights and a half d per 256; w = d * scale * (q - 32).
struct Q6kWeights {
  const device uint32_t* low;
  const device uint32_t* high;
  const device int8_t* scales;
  const device half* d;
  uint K;

  float scale(uint row, uint col) const {
    return float(d[row * (K / 256) + col / 256]) * float(scales[row * (K / 16) + col / 16]);
  }
  float at(uint row, uint col) const {
    uint lo = (low[row * (K / 8) + col / 8] >> (4 * (col % 8))) & 15;
    uint hi = (high[row * (K / 16) + col / 16] >> (2 * (col % 16))) & 3;
    return float(int(lo | (hi << 4)) - 32) * scale(row, col);
  }
  void load8(uint row, uint wi, thread float* out) const {
    uint lo = low[row * (K / 8) + wi];
    uint hi = high[row * (K / 16) + wi / 2] >> (16 * (wi % 2));
    float s = scale(row, wi * 8);
    for (int i = 0; i < 8; ++i) {
      uint q = ((lo >> (4 * i)) & 15) | (((hi >> (2 * i)) & 3) << 4);
      out[i] = float(int(q) - 32) * s;
    }
  }
};

}  // namespace mlxtune
