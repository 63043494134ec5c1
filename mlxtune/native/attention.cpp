// Causal attention for MLX's CPU backend as one primitive, forward and backward.
//
// MLX's CPU backend composes attention from plain ops: a matmul for the scores, then a
// mask, a max, a subtraction, an exp, a sum and a division, each its own pass over every
// score, single-threaded and (for max / where / broadcasts) scalar. On a long-row training
// step those passes cost several times the two matmuls around them. Here each query block
// does its two matmuls through the BLAS MLX itself uses (cblas_sgemm) and everything in
// between in one vectorised pass over the block's scores; the backward pass recomputes the
// probabilities from the saved log-sum-exp (flash attention's scheme), so no [L x L] array
// is kept between the passes.
//
// Inputs (row-contiguous float32): q [B, H, L, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv],
// optionally a bool mask [Bm, 1, L, L] (Bm = 1 or B; true = attend). Key j is visible to
// query i when j <= i and (no mask or mask[i, j]); keys after the query are never read.
// Outputs: o [B, H, L, Dv] and lse [B, H, L] (the log-sum-exp of each query's visible
// scores; +inf for a query that sees no key, whose output row is 0).
//
// Scratch memory (each worker's scores for a block, and with grouped queries each head's
// dK / dV before they are summed) comes from MLX's allocator, so MLX's memory counters and
// the peak mlxtune reports include it.
//
// Each query block only reads keys from the first one any of its rows can see: for
// packed rows (a mask that starts each example's keys at its own first token) the blocks
// of later examples skip the earlier examples' keys entirely.

#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <utility>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>

#include "common.h"

namespace nb = nanobind;
using namespace mlxtune_native;

namespace {

constexpr int kBlock = 128;  // queries per block (the scores buffer is kBlock x L floats)

struct Shapes {
  int b, h, hk, len, d, dv, mask_batch;  // mask_batch: 0 (no mask), 1 or b
};

// First key each query can see (len = none), per mask batch: [mask_batch or 1, len].
Scratch<int> first_visible(const uint8_t* mask, const Shapes& s) {
  const int planes = s.mask_batch ? s.mask_batch : 1;
  Scratch<int> first(static_cast<size_t>(planes) * s.len);
  std::fill(first.get(), first.get() + static_cast<size_t>(planes) * s.len, 0);
  if (!s.mask_batch) return first;
  for (int p = 0; p < planes; ++p) {
    for (int i = 0; i < s.len; ++i) {
      const uint8_t* row = mask + (static_cast<size_t>(p) * s.len + i) * s.len;
      int j = 0;
      while (j <= i && !row[j]) ++j;
      first[static_cast<size_t>(p) * s.len + i] = j <= i ? j : s.len;
    }
  }
  return first;
}

// The keys [lo, hi) that the block's queries [q0, q1) read.
inline void key_range(const int* first, int q0, int q1, int& lo, int& hi) {
  lo = q1;
  for (int i = q0; i < q1; ++i) lo = std::min(lo, first[i]);
  hi = q1;
  if (lo > hi) lo = hi;
}

// Row i's scores over keys [lo, lo + n): those visible stay, the others become -inf;
// returns their max. cols = i - lo + 1 columns are causally visible.
template <bool kMasked>
inline float masked_max(float* row, const uint8_t* mrow, int cols) {
  float m = -kInf;
#pragma omp simd reduction(max : m)
  for (int c = 0; c < cols; ++c) {
    const float t = (!kMasked || mrow[c]) ? row[c] : -kInf;
    m = t > m ? t : m;
  }
  return m;
}

// row[c] = e^(row[c] - shift) where visible, else 0, over n columns; returns the sum.
template <bool kMasked>
inline float exp_shifted(float* row, const uint8_t* mrow, int cols, int n, float shift) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int c = 0; c < cols; ++c) {
    const float p = (!kMasked || mrow[c]) ? exp_approx(row[c] - shift) : 0.0f;
    row[c] = p;
    sum += p;
  }
  for (int c = cols; c < n; ++c) row[c] = 0.0f;
  return sum;
}

struct Views {
  const float *q, *k, *v;
  const uint8_t* mask;
};

template <bool kMasked>
void forward_impl(Views in, float* o, float* lse, Shapes s, float scale) {
  const int rep = s.h / s.hk;
  const auto first = first_visible(in.mask, s);
  // Each worker's scores for a block of queries and their 1 / sum.
  const int workers = worker_count(s.b * s.h);
  const size_t per_worker = static_cast<size_t>(kBlock) * (s.len + 1);
  const Scratch<float> scratch(per_worker * workers);
  parallel_for(s.b * s.h, workers, true, [&](int worker, int task) {
    const int b = task / s.h, h = task % s.h, g = h / rep;
    float* scores = scratch.get() + per_worker * worker;
    float* inv = scores + static_cast<size_t>(kBlock) * s.len;
    const int mb = s.mask_batch == s.b ? b : 0;
    const int* first_b = first.get() + static_cast<size_t>(mb) * s.len * (s.mask_batch > 0);
    const uint8_t* mask_b = kMasked ? in.mask + static_cast<size_t>(mb) * s.len * s.len : nullptr;
    const float* qh = in.q + (static_cast<size_t>(b) * s.h + h) * s.len * s.d;
    const float* kh = in.k + (static_cast<size_t>(b) * s.hk + g) * s.len * s.d;
    const float* vh = in.v + (static_cast<size_t>(b) * s.hk + g) * s.len * s.dv;
    float* oh = o + (static_cast<size_t>(b) * s.h + h) * s.len * s.dv;
    float* lh = lse + (static_cast<size_t>(b) * s.h + h) * s.len;
    for (int q0 = 0; q0 < s.len; q0 += kBlock) {
      const int q1 = std::min(q0 + kBlock, s.len), rows = q1 - q0;
      int lo, hi;
      key_range(first_b, q0, q1, lo, hi);
      const int n = hi - lo;
      if (n == 0) {  // no query of the block sees a key
        std::fill(oh + static_cast<size_t>(q0) * s.dv, oh + static_cast<size_t>(q1) * s.dv, 0.0f);
        std::fill(lh + q0, lh + q1, kInf);
        continue;
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n, s.d, scale,
                  qh + static_cast<size_t>(q0) * s.d, s.d, kh + static_cast<size_t>(lo) * s.d,
                  s.d, 0.0f, scores, n);
      for (int r = 0; r < rows; ++r) {
        const int i = q0 + r;
        float* row = scores + static_cast<size_t>(r) * n;
        const uint8_t* mrow = kMasked ? mask_b + static_cast<size_t>(i) * s.len + lo : nullptr;
        const int cols = std::max(0, i - lo + 1);
        const float m = masked_max<kMasked>(row, mrow, cols);
        if (m == -kInf) {  // this query sees no key
          std::fill(row, row + n, 0.0f);
          inv[r] = 0.0f;
          lh[i] = kInf;
          continue;
        }
        const float sum = exp_shifted<kMasked>(row, mrow, cols, n, m);
        inv[r] = 1.0f / sum;
        lh[i] = m + std::log(sum);
      }
      float* ob = oh + static_cast<size_t>(q0) * s.dv;
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, s.dv, n, 1.0f, scores, n,
                  vh + static_cast<size_t>(lo) * s.dv, s.dv, 0.0f, ob, s.dv);
      for (int r = 0; r < rows; ++r) {
        float* orow = ob + static_cast<size_t>(r) * s.dv;
        const float f = inv[r];
#pragma omp simd
        for (int c = 0; c < s.dv; ++c) orow[c] *= f;
      }
    }
  });
}

template <bool kMasked>
void backward_impl(Views in, const float* o, const float* lse, const float* dout, float* dq,
                   float* dk, float* dv, Shapes s, float scale) {
  const int rep = s.h / s.hk;
  const auto first = first_visible(in.mask, s);
  const size_t kv_rows = static_cast<size_t>(s.len);
  // With grouped queries the rep heads of a kv head each get their own dK / dV rows (so
  // that heads can run in parallel), summed into dk / dv at the end.
  const size_t head_rows = rep > 1 ? static_cast<size_t>(s.b) * s.h * kv_rows : 0;
  const Scratch<float> dk_heads(head_rows * s.d), dv_heads(head_rows * s.dv);
  if (rep > 1) {
    std::fill(dk_heads.get(), dk_heads.get() + head_rows * s.d, 0.0f);
    std::fill(dv_heads.get(), dv_heads.get() + head_rows * s.dv, 0.0f);
  } else {
    std::fill(dk, dk + static_cast<size_t>(s.b) * s.hk * kv_rows * s.d, 0.0f);
    std::fill(dv, dv + static_cast<size_t>(s.b) * s.hk * kv_rows * s.dv, 0.0f);
  }
  // Each worker's probabilities and their gradient for a block of queries, and delta.
  const int workers = worker_count(s.b * s.h);
  const size_t per_worker = static_cast<size_t>(kBlock) * s.len * 2 + s.len;
  const Scratch<float> scratch(per_worker * workers);
  parallel_for(s.b * s.h, workers, true, [&](int worker, int task) {
    const int b = task / s.h, h = task % s.h, g = h / rep;
    float* probs = scratch.get() + per_worker * worker;
    float* dprobs = probs + static_cast<size_t>(kBlock) * s.len;
    float* delta = dprobs + static_cast<size_t>(kBlock) * s.len;
    const int mb = s.mask_batch == s.b ? b : 0;
    const int* first_b = first.get() + static_cast<size_t>(mb) * s.len * (s.mask_batch > 0);
    const uint8_t* mask_b = kMasked ? in.mask + static_cast<size_t>(mb) * s.len * s.len : nullptr;
    const size_t qoff = (static_cast<size_t>(b) * s.h + h) * s.len;
    const size_t koff = (static_cast<size_t>(b) * s.hk + g) * s.len;
    const float* qh = in.q + qoff * s.d;
    const float* kh = in.k + koff * s.d;
    const float* vh = in.v + koff * s.dv;
    const float* oh = o + qoff * s.dv;
    const float* doh = dout + qoff * s.dv;
    const float* lh = lse + qoff;
    float* dqh = dq + qoff * s.d;
    float* dkh = rep > 1 ? dk_heads.get() + qoff * s.d : dk + koff * s.d;
    float* dvh = rep > 1 ? dv_heads.get() + qoff * s.dv : dv + koff * s.dv;
    // delta_i = dO_i . O_i: the softmax backward's row term.
    for (int i = 0; i < s.len; ++i) {
      const float* a = doh + static_cast<size_t>(i) * s.dv;
      const float* c = oh + static_cast<size_t>(i) * s.dv;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int x = 0; x < s.dv; ++x) acc += a[x] * c[x];
      delta[i] = acc;
    }
    for (int q0 = 0; q0 < s.len; q0 += kBlock) {
      const int q1 = std::min(q0 + kBlock, s.len), rows = q1 - q0;
      int lo, hi;
      key_range(first_b, q0, q1, lo, hi);
      const int n = hi - lo;
      float* dqb = dqh + static_cast<size_t>(q0) * s.d;
      if (n == 0) {
        std::fill(dqb, dqb + static_cast<size_t>(rows) * s.d, 0.0f);
        continue;
      }
      const float* qb = qh + static_cast<size_t>(q0) * s.d;
      const float* dob = doh + static_cast<size_t>(q0) * s.dv;
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n, s.d, scale, qb, s.d,
                  kh + static_cast<size_t>(lo) * s.d, s.d, 0.0f, probs, n);
      for (int r = 0; r < rows; ++r) {
        const int i = q0 + r;
        float* row = probs + static_cast<size_t>(r) * n;
        if (lh[i] == kInf) {
          std::fill(row, row + n, 0.0f);
          continue;
        }
        const uint8_t* mrow = kMasked ? mask_b + static_cast<size_t>(i) * s.len + lo : nullptr;
        exp_shifted<kMasked>(row, mrow, std::max(0, i - lo + 1), n, lh[i]);
      }
      // dP = dO V^T, then dS = P * (dP - delta) in place.
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n, s.dv, 1.0f, dob, s.dv,
                  vh + static_cast<size_t>(lo) * s.dv, s.dv, 0.0f, dprobs, n);
      for (int r = 0; r < rows; ++r) {
        const float* p = probs + static_cast<size_t>(r) * n;
        float* ds = dprobs + static_cast<size_t>(r) * n;
        const float dl = delta[q0 + r];
#pragma omp simd
        for (int c = 0; c < n; ++c) ds[c] = p[c] * (ds[c] - dl);
      }
      // dQ = scale dS K; dK += scale dS^T Q; dV += P^T dO.
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, s.d, n, scale, dprobs, n,
                  kh + static_cast<size_t>(lo) * s.d, s.d, 0.0f, dqb, s.d);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n, s.d, rows, scale, dprobs, n, qb,
                  s.d, 1.0f, dkh + static_cast<size_t>(lo) * s.d, s.d);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n, s.dv, rows, 1.0f, probs, n, dob,
                  s.dv, 1.0f, dvh + static_cast<size_t>(lo) * s.dv, s.dv);
    }
  });
  if (rep > 1) {
    for (int b = 0; b < s.b; ++b) {
      for (int g = 0; g < s.hk; ++g) {
        const size_t koff = (static_cast<size_t>(b) * s.hk + g) * kv_rows;
        const size_t qoff = (static_cast<size_t>(b) * s.h + g * rep) * kv_rows;
        for (auto [dst, src, width] : {std::tuple{dk, dk_heads.get(), s.d},
                                       std::tuple{dv, dv_heads.get(), s.dv}}) {
          const size_t size = kv_rows * width;
          float* out = dst + koff * width;
          std::copy(src + qoff * width, src + qoff * width + size, out);
          for (int r = 1; r < rep; ++r) {
            const float* part = src + (qoff + r * kv_rows) * width;
#pragma omp simd
            for (size_t x = 0; x < size; ++x) out[x] += part[x];
          }
        }
      }
    }
  }
}

Shapes shapes_of(const mx::array& q, const mx::array& k, const mx::array& v, bool masked,
                 const mx::array* mask) {
  Shapes s{};
  s.b = q.shape(0);
  s.h = q.shape(1);
  s.len = q.shape(2);
  s.d = q.shape(3);
  s.hk = k.shape(1);
  s.dv = v.shape(3);
  s.mask_batch = masked ? mask->shape(0) : 0;
  return s;
}

// The data pointers and shapes of inputs q, k, v [, mask] (both primitives start so).
std::pair<Views, Shapes> views_of(const std::vector<mx::array>& inputs, bool masked) {
  const auto& q = inputs[0];
  const auto& k = inputs[1];
  const auto& v = inputs[2];
  const mx::array* mask = masked ? &inputs[3] : nullptr;
  return {Views{q.data<float>(), k.data<float>(), v.data<float>(),
                mask ? mask->data<uint8_t>() : nullptr},
          shapes_of(q, k, v, masked, mask)};
}

class CausalAttentionBackward : public CpuPrimitive {
 public:
  CausalAttentionBackward(mx::Stream stream, float scale, bool masked)
      : CpuPrimitive(stream), scale_(scale), masked_(masked) {}

  // inputs: q, k, v, [mask], o, lse, dout; outputs: dq, dk, dv
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const int base = masked_ ? 4 : 3;
    const auto& o = inputs[base];
    const auto& lse = inputs[base + 1];
    const auto& dout = inputs[base + 2];
    auto& encoder = prepare(stream(), inputs, outputs);
    const auto [views, s] = views_of(inputs, masked_);
    encoder.dispatch([views, s, scale = scale_, masked = masked_, o = o.data<float>(),
                      lse = lse.data<float>(), dout = dout.data<float>(),
                      dq = outputs[0].data<float>(), dk = outputs[1].data<float>(),
                      dv = outputs[2].data<float>()]() {
      if (masked)
        backward_impl<true>(views, o, lse, dout, dq, dk, dv, s, scale);
      else
        backward_impl<false>(views, o, lse, dout, dq, dk, dv, s, scale);
    });
  }

  const char* name() const override { return "MlxtuneCausalAttentionBackward"; }

 private:
  float scale_;
  bool masked_;
};

class CausalAttention : public CpuPrimitive {
 public:
  CausalAttention(mx::Stream stream, float scale, bool masked)
      : CpuPrimitive(stream), scale_(scale), masked_(masked) {}

  // inputs: q, k, v, [mask]; outputs: o, lse
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& encoder = prepare(stream(), inputs, outputs);
    const auto [views, s] = views_of(inputs, masked_);
    encoder.dispatch([views, s, scale = scale_, masked = masked_,
                      o = outputs[0].data<float>(), lse = outputs[1].data<float>()]() {
      if (masked)
        forward_impl<true>(views, o, lse, s, scale);
      else
        forward_impl<false>(views, o, lse, s, scale);
    });
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>& outputs) override {
    // The lse output is internal (never handed to Python), so only o's cotangent counts.
    std::vector<mx::array> inputs(primals.begin(), primals.end());
    inputs.push_back(outputs[0]);
    inputs.push_back(outputs[1]);
    inputs.push_back(mx::contiguous(cotangents[0], false, stream()));
    auto grads = mx::array::make_arrays(
        {primals[0].shape(), primals[1].shape(), primals[2].shape()},
        {mx::float32, mx::float32, mx::float32},
        std::make_shared<CausalAttentionBackward>(stream(), scale_, masked_), inputs);
    std::vector<mx::array> result;
    for (int arg : argnums) {
      if (arg < 3)
        result.push_back(grads[arg]);
      else
        result.push_back(mx::zeros_like(primals[arg], stream()));
    }
    return result;
  }

  const char* name() const override { return "MlxtuneCausalAttention"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const CausalAttention&>(other);
    return scale_ == o.scale_ && masked_ == o.masked_;
  }

 private:
  float scale_;
  bool masked_;
};

void check_args(bool ok, const std::string& what) { check(ok, "causal_attention: " + what); }

// o = softmax(q k^T * scale, causal [and mask]) v; see the top of this file.
mx::array causal_attention(const mx::array& q, const mx::array& k, const mx::array& v,
                           float scale, std::optional<mx::array> mask) {
  check_args(q.ndim() == 4 && k.ndim() == 4 && v.ndim() == 4, "q, k and v must be 4-d");
  check_args(q.dtype() == mx::float32 && k.dtype() == mx::float32 && v.dtype() == mx::float32,
             "q, k and v must be float32");
  check_args(k.shape(0) == q.shape(0) && v.shape(0) == q.shape(0), "batch sizes differ");
  check_args(k.shape(2) == q.shape(2) && v.shape(2) == q.shape(2),
             "queries and keys must have the same length");
  check_args(k.shape(3) == q.shape(3), "q and k head dims differ");
  check_args(v.shape(1) == k.shape(1) && q.shape(1) % k.shape(1) == 0,
             "query heads must be a multiple of the key / value heads");
  const auto stream = mx::default_stream(mx::Device::cpu);
  std::vector<mx::array> inputs = {mx::contiguous(q, false, stream),
                                   mx::contiguous(k, false, stream),
                                   mx::contiguous(v, false, stream)};
  if (mask) {
    const int len = q.shape(2);
    check_args(mask->dtype() == mx::bool_ && mask->ndim() == 4 && mask->shape(1) == 1 &&
                   (mask->shape(0) == 1 || mask->shape(0) == q.shape(0)) &&
                   mask->shape(2) == len && mask->shape(3) == len,
               "mask must be bool [1 or B, 1, L, L]");
    inputs.push_back(mx::contiguous(*mask, false, stream));
  }
  auto lse_shape = q.shape();
  lse_shape.pop_back();
  auto out_shape = q.shape();
  out_shape.back() = v.shape(3);
  auto outs = mx::array::make_arrays(
      {out_shape, lse_shape}, {mx::float32, mx::float32},
      std::make_shared<CausalAttention>(stream, scale, mask.has_value()), inputs);
  return outs[0];
}

}  // namespace

namespace mlxtune_native {

void register_attention(nb::module_& m) {
  m.def("causal_attention", &causal_attention, nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("scale"), nb::arg("mask").none() = nb::none());
}

}  // namespace mlxtune_native
