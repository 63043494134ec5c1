// What mlxtune's CPU primitives share: the BLAS MLX uses, a vectorisable exp, a
// parallel loop on the BLAS's threads, output allocation and argument checks.
#pragma once

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdint>
#include <exception>
#include <limits>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/stream.h"

namespace mlxtune_native {

namespace mx = mlx::core;

extern "C" {
// Resolved at load time to the BLAS MLX's own matmuls use (the system OpenBLAS that
// mlxtune loads first, or the wheel's bundled one).
enum CBLAS_ORDER { CblasRowMajor = 101 };
enum CBLAS_TRANSPOSE { CblasNoTrans = 111, CblasTrans = 112 };
void cblas_sgemm(CBLAS_ORDER, CBLAS_TRANSPOSE, CBLAS_TRANSPOSE, int m, int n, int k,
                 float alpha, const float* a, int lda, const float* b, int ldb, float beta,
                 float* c, int ldc);
}

constexpr float kInf = std::numeric_limits<float>::infinity();

// e^x without libm, so that the loops around it vectorise: x = n ln2 + r, n rounded by the
// 1.5 * 2^23 shifter (plain float adds: this code is built without -ffast-math), Cephes'
// polynomial for e^r, 2^n written into the exponent bits. Below -87.33 (under the smallest
// normal float) the result is 0; NaN stays NaN.
inline float exp_approx(float x) {
  float xc = x < -87.33f ? -87.33f : x;
  xc = xc > 88.37f ? 88.37f : xc;
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693145751953125f;
  r = r - n * 1.428606765330187e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = 1.0f + r + (r * r) * p;
  const float two_n = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  const float y = e * two_n;
  return x < -87.33f ? 0.0f : y;
}

// The BLAS's own thread count: parallel loops run on that many threads, each calling a
// single-threaded sgemm (OpenBLAS threads small products poorly: one thread reaches ~70%
// of two threads' rate on attention's per-block products).
struct BlasThreads {
  void (*set)(int) = nullptr;
  int (*get)() = nullptr;
  BlasThreads() {
    set = reinterpret_cast<void (*)(int)>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
    get = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
    if (!set || !get) set = nullptr, get = nullptr;
  }
};

inline const BlasThreads& blas_threads() {
  static const BlasThreads threads;
  return threads;
}

// OpenBLAS's thread count is one number for the whole process, and with train.cpu_streams
// > 1 several streams run these primitives at the same time. Were each to set it to 1 and
// then put back the value it had read, a primitive that started while another held it at 1
// would put back 1, and every later matmul of the run would be single-threaded. So the
// parallel loops share one hold: the first in reads the count and sets 1, the last out
// puts that count back, and while it is held blas_count() answers the count read by the
// first. Only these two transitions call openblas_set_num_threads, under one lock.
class BlasHold {
 public:
  BlasHold() {
    auto& s = shared();
    std::lock_guard<std::mutex> hold(s.lock);
    const auto& blas = blas_threads();
    if (s.users++ == 0) {
      s.saved = blas.get ? blas.get() : 0;
      if (blas.set && s.saved > 1) blas.set(1);
    }
  }
  ~BlasHold() {
    auto& s = shared();
    std::lock_guard<std::mutex> hold(s.lock);
    const auto& blas = blas_threads();
    if (--s.users == 0 && blas.set && s.saved > 1) blas.set(s.saved);
  }
  BlasHold(const BlasHold&) = delete;
  BlasHold& operator=(const BlasHold&) = delete;

  // The BLAS's thread count as the run set it (not the 1 of a hold in progress).
  static int blas_count() {
    auto& s = shared();
    std::lock_guard<std::mutex> hold(s.lock);
    const auto& blas = blas_threads();
    if (s.users > 0 && s.saved > 0) return s.saved;
    return blas.get ? blas.get() : static_cast<int>(std::thread::hardware_concurrency());
  }

 private:
  struct Shared {
    std::mutex lock;
    int users = 0;
    int saved = 0;
  };
  static Shared& shared() {  // one per process (an inline function's static)
    static Shared s;
    return s;
  }
};

constexpr int kMaxWorkers = 64;

// The threads a parallel loop of count tasks gets: the BLAS's thread count, at most count
// and workers_wanted.
inline int worker_count(int count, int workers_wanted = kMaxWorkers) {
  return std::max(1, std::min({BlasHold::blas_count(), count, workers_wanted, kMaxWorkers}));
}

// Scratch memory from MLX's allocator, so that MLX's memory counters (mx.get_active_memory,
// mx.get_peak_memory and the peak mlxtune reports) include it and its cache reuses it.
// Freed when it goes out of scope.
template <class T>
class Scratch {
 public:
  explicit Scratch(size_t count)
      : data_(mx::allocator::malloc(std::max<size_t>(count, 1) * sizeof(T))),
        ptr_(static_cast<T*>(data_.buffer().raw_ptr())) {}
  T* get() const { return ptr_; }
  T& operator[](size_t i) const { return ptr_[i]; }

 private:
  mx::allocator::Data data_;
  T* ptr_;
};

// Runs task(worker, i) for i in [0, count) on `workers` threads (worker_count()), the
// calling thread included; worker numbers the thread (for its scratch buffers). With
// blas_inside (tasks that call the BLAS) the BLAS is single-threaded meanwhile (BlasHold);
// one worker leaves it as it is. An exception in a task is rethrown here after every
// thread ends.
template <class Task>
void parallel_for(int count, int workers, bool blas_inside, Task&& task) {
  workers = std::max(1, std::min(workers, count));
  if (workers == 1) {
    for (int i = 0; i < count; ++i) task(0, i);
    return;
  }
  std::optional<BlasHold> hold;
  if (blas_inside) hold.emplace();
  std::atomic<int> next{0};
  std::exception_ptr error;
  std::mutex error_lock;
  auto run = [&](int worker) {
    try {
      for (int i = next++; i < count; i = next++) task(worker, i);
    } catch (...) {
      std::lock_guard<std::mutex> guard(error_lock);
      if (!error) error = std::current_exception();
      next = count;
    }
  };
  std::vector<std::thread> threads;
  for (int w = 1; w < workers; ++w) threads.emplace_back(run, w);
  run(0);
  for (auto& t : threads) t.join();
  if (error) std::rethrow_exception(error);
}

// A primitive with a CPU implementation only (Metal and CUDA have MLX's own kernels for
// what these do): eval_gpu says so.
class CpuPrimitive : public mx::Primitive {
 public:
  using mx::Primitive::Primitive;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error(std::string(name()) + " runs on the CPU only (mlxtune.native)");
  }
};

inline void alloc_output(mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
}

// Registers the primitive's arrays with the CPU stream's encoder (which keeps them alive
// until the dispatched task has run) and allocates the outputs.
inline mx::cpu::CommandEncoder& prepare(const mx::Stream& stream,
                                        const std::vector<mx::array>& inputs,
                                        std::vector<mx::array>& outputs) {
  for (auto& out : outputs) alloc_output(out);
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (const auto& in : inputs) encoder.set_input_array(in);
  for (auto& out : outputs) encoder.set_output_array(out);
  return encoder;
}

inline void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

}  // namespace mlxtune_native
