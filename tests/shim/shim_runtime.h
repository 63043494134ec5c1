// Runs GPU kernels on the CPU for the tests: every thread of a threadgroup / block is a
// ucontext coroutine on one OS thread; barriers and SIMD (warp) operations are points
// where a thread yields until all the threads they concern have arrived. Threadgroup
// (shared) arrays are `static` locals, so the threads of a group share them; groups run
// one after another. A barrier or SIMD operation that some threads of the group (or
// simdgroup) never reach is reported as an error instead of hanging.
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <vector>

namespace shim {

enum Wait { NONE, GROUP_BARRIER, SIMD_OP };

struct Thread {
  ucontext_t ctx;
  Wait wait = NONE;
  bool done = false;
  unsigned lid = 0;
};

struct Group {
  std::vector<Thread> threads;
  std::vector<char> stacks;
  std::vector<float> slots;  // one per thread, for SIMD exchanges
  std::vector<char> joined;  // lanes released together by the last SIMD op
  ucontext_t scheduler;
  unsigned current = 0;
  std::function<void(unsigned)> body;
};

constexpr unsigned SIMD_WIDTH = 32;
constexpr size_t STACK = 128 * 1024;

inline Group*& group() {
  static Group* g = nullptr;
  return g;
}
inline unsigned current_lid() { return group()->threads[group()->current].lid; }

inline void yield(Wait w) {
  Group& g = *group();
  Thread& t = g.threads[g.current];
  t.wait = w;
  swapcontext(&t.ctx, &g.scheduler);
}

inline void barrier() { yield(GROUP_BARRIER); }

// The values of the lanes of this thread's simdgroup, after all live lanes posted theirs.
template <typename F>
inline float simd_exchange(float v, F combine) {
  Group& g = *group();
  unsigned lid = current_lid();
  g.slots[lid] = v;
  yield(SIMD_OP);
  float out = combine(g, lid);
  yield(SIMD_OP);  // nobody posts again before every lane has read
  return out;
}

inline float simd_sum(float v) {
  return simd_exchange(v, [](Group& g, unsigned lid) {
    unsigned base = lid / SIMD_WIDTH * SIMD_WIDTH;
    unsigned end = std::min<unsigned>(base + SIMD_WIDTH, g.threads.size());
    float s = 0.0f;
    for (unsigned i = base; i < end; ++i) {
      if (g.joined[i]) s += g.slots[i];
    }
    return s;
  });
}

inline float shfl_xor(float v, unsigned mask) {
  return simd_exchange(v, [mask](Group& g, unsigned lid) {
    unsigned base = lid / SIMD_WIDTH * SIMD_WIDTH;
    unsigned other = base + ((lid - base) ^ mask);
    return other < g.threads.size() && g.joined[other] ? g.slots[other] : g.slots[lid];
  });
}

inline void trampoline() {
  Group& g = *group();
  Thread& t = g.threads[g.current];
  g.body(t.lid);
  t.done = true;
  t.wait = NONE;
  swapcontext(&t.ctx, &g.scheduler);
}

// Runs `body(lid)` for lid in [0, n) as one threadgroup. Returns 0, or an error code:
// 1 a barrier that not every live thread reaches, 2 a SIMD op not every live lane of the
// simdgroup reaches (divergence), 3 a barrier reached after some threads returned.
inline int run_group(unsigned n, std::function<void(unsigned)> body) {
  Group g;
  g.threads.resize(n);
  g.stacks.resize(n * STACK);
  g.slots.assign(n, 0.0f);
  g.joined.assign(n, 0);
  g.body = std::move(body);
  group() = &g;
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = g.threads[i];
    t.lid = i;
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = &g.stacks[i * STACK];
    t.ctx.uc_stack.ss_size = STACK;
    t.ctx.uc_link = nullptr;
    makecontext(&t.ctx, trampoline, 0);
  }
  while (true) {
    for (unsigned i = 0; i < n; ++i) {
      Thread& t = g.threads[i];
      if (!t.done && t.wait == NONE) {
        g.current = i;
        swapcontext(&g.scheduler, &t.ctx);
      }
    }
    unsigned live = 0, at_barrier = 0, done = 0;
    for (auto& t : g.threads) {
      live += !t.done;
      at_barrier += !t.done && t.wait == GROUP_BARRIER;
      done += t.done;
    }
    if (live == 0) break;
    bool released = false;
    for (unsigned base = 0; base < n; base += SIMD_WIDTH) {
      unsigned end = std::min(base + SIMD_WIDTH, n);
      bool any = false, all = true;
      for (unsigned i = base; i < end; ++i) {
        const Thread& t = g.threads[i];
        if (t.done) continue;
        any = true;
        all = all && t.wait == SIMD_OP;
      }
      if (any && all) {
        for (unsigned i = base; i < end; ++i) {
          g.joined[i] = !g.threads[i].done;
          if (!g.threads[i].done) g.threads[i].wait = NONE;
        }
        released = true;
      }
    }
    if (released) continue;
    if (at_barrier == live) {
      if (done) {
        group() = nullptr;
        return 3;
      }
      for (auto& t : g.threads) t.wait = NONE;
      continue;
    }
    group() = nullptr;
    return at_barrier ? 1 : 2;
  }
  group() = nullptr;
  return 0;
}

struct dim3u {
  unsigned x, y, z;
};

// Runs a grid of `grid` threads in groups of `tg` (grid a multiple of tg in each axis).
inline int run_grid(dim3u grid, dim3u tg,
                    std::function<void(dim3u group, unsigned lid, dim3u local)> kernel) {
  if (grid.x % tg.x || grid.y % tg.y || grid.z % tg.z) return 4;
  unsigned n = tg.x * tg.y * tg.z;
  for (unsigned gz = 0; gz < grid.z / tg.z; ++gz)
    for (unsigned gy = 0; gy < grid.y / tg.y; ++gy)
      for (unsigned gx = 0; gx < grid.x / tg.x; ++gx) {
        dim3u group{gx, gy, gz};
        int err = run_group(n, [&](unsigned lid) {
          dim3u local{lid % tg.x, lid / tg.x % tg.y, lid / (tg.x * tg.y)};
          kernel(group, lid, local);
        });
        if (err) return err;
      }
  return 0;
}

}  // namespace shim
