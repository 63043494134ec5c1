// The output head and the cross-entropy over the vocabulary, for MLX's CPU backend, as one
// primitive.
//
// Composed from MLX ops, the loss over a 49,152-word vocabulary holds [positions x vocab]
// logits (or chunks of them, each an MLX allocation), and every pass over them (max,
// subtract, exp, sum, the one-hot subtraction) is a single-threaded op of its own. Here a
// chunk of positions at a time: one sgemm for its logits into a scratch buffer, one
// vectorised pass per row on the BLAS's threads for max, exp, sum, the loss and (when the
// gradient is wanted) softmax minus one-hot in place, then one sgemm for the gradient with
// respect to the hidden states. The scratch buffers are taken from MLX's allocator, so MLX's
// memory counters (and the peak mlxtune reports) include them.
//
// Only the positions marked active are computed (a loss-bearing position's prediction);
// the others get loss 0 and gradient 0, and cost nothing.
//
// Inputs (row-contiguous): h [N, D] float32, w [V, D] float32 (the head: logits = h w^T),
// targets [N] int32, active [N] bool. Outputs: loss [N] float32 (log-sum-exp minus the
// target's logit; NaN for an active position whose target is outside [0, V)), and with
// the gradient, grad [N, D] float32: d loss_i / d h_i (per unit of loss, so that the
// backward pass only scales its rows by the cotangent).

#include <cmath>

#include <nanobind/nanobind.h>

#include "common.h"

namespace nb = nanobind;
using namespace mlxtune_native;

namespace {

// Positions per chunk: the logits of a chunk are chunk x V floats, at most 64 MB (50 MB for
// 256 x 49,152). Measured for SmolLM2's head over 1,216 positions, forward and backward:
// 0.86 s with chunks of 64 rows, 0.72 s with 128, 0.68 s with 256.
int chunk_rows(int vocab) {
  const int by_memory = static_cast<int>((64u << 20) / (4u * static_cast<unsigned>(vocab)));
  return std::max(8, std::min(256, by_memory));
}

struct Shapes {
  int n, d, vocab;
};

// One row of logits: returns the loss; with the gradient, the row becomes softmax minus
// the one-hot target.
template <bool kGrad>
float row_loss(float* row, int vocab, int target) {
  if (target < 0 || target >= vocab) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    if (kGrad) std::fill(row, row + vocab, nan);
    return nan;
  }
  const float target_logit = row[target];
  float m = -kInf;
#pragma omp simd reduction(max : m)
  for (int c = 0; c < vocab; ++c) m = row[c] > m ? row[c] : m;
  float sum = 0.0f;
  if (kGrad) {
#pragma omp simd reduction(+ : sum)
    for (int c = 0; c < vocab; ++c) {
      const float e = exp_approx(row[c] - m);
      row[c] = e;
      sum += e;
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int c = 0; c < vocab; ++c) row[c] *= inv;
    row[target] -= 1.0f;
  } else {
#pragma omp simd reduction(+ : sum)
    for (int c = 0; c < vocab; ++c) sum += exp_approx(row[c] - m);
  }
  return m + std::log(sum) - target_logit;
}

template <bool kGrad>
void cross_entropy_impl(const float* h, const float* w, const int32_t* targets,
                        const uint8_t* active, float* loss, float* grad, Shapes s) {
  const Scratch<int> rows(s.n);  // the active positions
  int total = 0;
  for (int i = 0; i < s.n; ++i) {
    if (active[i]) {
      rows[total++] = i;
    } else {
      loss[i] = 0.0f;
      if (kGrad)
        std::fill(grad + static_cast<size_t>(i) * s.d, grad + static_cast<size_t>(i + 1) * s.d,
                  0.0f);
    }
  }
  if (total == 0) return;
  const int chunk = chunk_rows(s.vocab);
  const size_t floats = static_cast<size_t>(chunk) * (s.vocab + 2 * s.d);
  const Scratch<float> scratch(floats);
  float* logits = scratch.get();
  float* hc = logits + static_cast<size_t>(chunk) * s.vocab;
  float* gc = hc + static_cast<size_t>(chunk) * s.d;
  for (int a = 0; a < total; a += chunk) {
    const int c = std::min(chunk, total - a);
    for (int r = 0; r < c; ++r)  // the chunk's active rows, gathered
      std::copy(h + static_cast<size_t>(rows[a + r]) * s.d,
                h + static_cast<size_t>(rows[a + r] + 1) * s.d,
                hc + static_cast<size_t>(r) * s.d);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, c, s.vocab, s.d, 1.0f, hc, s.d, w,
                s.d, 0.0f, logits, s.vocab);
    // (the rows' passes call no BLAS: it keeps its threads for the sgemm calls around them)
    parallel_for(c, worker_count(c), false, [&](int, int r) {
      const int i = rows[a + r];
      loss[i] = row_loss<kGrad>(logits + static_cast<size_t>(r) * s.vocab, s.vocab, targets[i]);
    });
    if (!kGrad) continue;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, c, s.d, s.vocab, 1.0f, logits,
                s.vocab, w, s.d, 0.0f, gc, s.d);
    for (int r = 0; r < c; ++r)
      std::copy(gc + static_cast<size_t>(r) * s.d, gc + static_cast<size_t>(r + 1) * s.d,
                grad + static_cast<size_t>(rows[a + r]) * s.d);
  }
}

class CrossEntropy : public CpuPrimitive {
 public:
  CrossEntropy(mx::Stream stream, bool with_grad)
      : CpuPrimitive(stream), with_grad_(with_grad) {}

  // inputs: h, w, targets, active; outputs: loss [, grad]
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& encoder = prepare(stream(), inputs, outputs);
    const Shapes s{inputs[0].shape(0), inputs[0].shape(1), inputs[1].shape(0)};
    encoder.dispatch([s, with_grad = with_grad_, h = inputs[0].data<float>(),
                      w = inputs[1].data<float>(), targets = inputs[2].data<int32_t>(),
                      active = inputs[3].data<uint8_t>(), loss = outputs[0].data<float>(),
                      grad = with_grad_ ? outputs[1].data<float>() : nullptr]() {
      if (with_grad)
        cross_entropy_impl<true>(h, w, targets, active, loss, grad, s);
      else
        cross_entropy_impl<false>(h, w, targets, active, loss, grad, s);
    });
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>& outputs) override {
    // Only the loss reaches Python, so only its cotangent counts; the gradient with
    // respect to h is the saved per-unit gradient (or, without one, a recomputation)
    // scaled row by row.
    mx::array grad = with_grad_ ? outputs[1] : make(primals, stream(), true)[1];
    std::vector<mx::array> result;
    for (int arg : argnums) {
      if (arg == 0) {
        result.push_back(mx::multiply(grad, mx::expand_dims(cotangents[0], -1, stream()),
                                      stream()));
      } else if (arg == 1) {
        throw std::invalid_argument(
            "cross_entropy: no gradient for the head's weight (the head must be frozen)");
      } else {
        result.push_back(mx::zeros_like(primals[arg], stream()));
      }
    }
    return result;
  }

  const char* name() const override { return "MlxtuneCrossEntropy"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return with_grad_ == static_cast<const CrossEntropy&>(other).with_grad_;
  }

  static std::vector<mx::array> make(const std::vector<mx::array>& inputs, mx::Stream stream,
                                     bool with_grad) {
    const int n = inputs[0].shape(0), d = inputs[0].shape(1);
    std::vector<mx::Shape> shapes = {{n}};
    std::vector<mx::Dtype> dtypes = {mx::float32};
    if (with_grad) {
      shapes.push_back({n, d});
      dtypes.push_back(mx::float32);
    }
    return mx::array::make_arrays(std::move(shapes), std::move(dtypes),
                                  std::make_shared<CrossEntropy>(stream, with_grad), inputs);
  }

 private:
  bool with_grad_;
};

void check_args(bool ok, const std::string& what) { check(ok, "cross_entropy: " + what); }

// Per-position cross-entropy of h's logits (h w^T) against targets, at active positions
// (0 elsewhere). with_grad computes d loss / d h beside the loss, for a loss that will be
// differentiated; without it a backward pass recomputes it.
mx::array cross_entropy(const mx::array& h, const mx::array& w, const mx::array& targets,
                        const mx::array& active, bool with_grad) {
  check_args(h.ndim() == 2 && w.ndim() == 2 && h.shape(1) == w.shape(1),
             "h must be [N, D] and w [V, D]");
  check_args(h.dtype() == mx::float32 && w.dtype() == mx::float32, "h and w must be float32");
  check_args(targets.ndim() == 1 && targets.shape(0) == h.shape(0) &&
                 targets.dtype() == mx::int32,
             "targets must be int32 [N]");
  check_args(active.ndim() == 1 && active.shape(0) == h.shape(0) &&
                 active.dtype() == mx::bool_,
             "active must be bool [N]");
  const auto stream = mx::default_stream(mx::Device::cpu);
  std::vector<mx::array> inputs = {
      mx::contiguous(h, false, stream), mx::contiguous(w, false, stream),
      mx::contiguous(targets, false, stream), mx::contiguous(active, false, stream)};
  return CrossEntropy::make(inputs, stream, with_grad)[0];
}

}  // namespace

namespace mlxtune_native {

void register_cross_entropy(nb::module_& m) {
  m.def("cross_entropy", &cross_entropy, nb::arg("h"), nb::arg("w"), nb::arg("targets"),
        nb::arg("active"), nb::arg("with_grad") = false);
}

}  // namespace mlxtune_native
