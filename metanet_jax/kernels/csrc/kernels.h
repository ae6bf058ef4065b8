// Fused fast-weight generators of metanet-jax: XLA FFI custom calls for the CPU.
//
// Built by `python -m metanet_jax.kernels.build` (`make kernels`; `make install`, hence
// `make test`, `make demo` and `make bench`, rebuild it when a file of this folder changes):
// every csrc/*.cc is compiled with g++ -O3 -march=native against the FFI headers jaxlib ships
// (`jax.ffi.include_dir()`) into one library, metanet_jax/kernels/_metanet_kernels.so, which
// `metanet_jax.kernels` loads with ctypes and registers with `jax.ffi.register_ffi_target`.
// The XLA path of metanet_jax/model/generators.py is the reference these kernels are tested
// against (tests/kernels/).
//
// ABI (keep to it: the Python wrappers in metanet_jax/kernels/_ops.py depend on it)
// -------------------------------------------------------------------------------
// float32 only, row-major, every shape taken from the buffers; H (hidden size) any value
// 1..64; M, P (coordinates) any value >= 0; T >= 1.
//
// "metanet_mlp_fwd", C symbol MetanetMlpFwd (m, generators._mlp_core):
//   inputs  w0[2,H], b0[H], w1[H,H], b1[H], w2[H], b2[] (scalar), x[2,M]
//   output  y[M],  y = w2 . relu(w1^T relu(w0^T x + b0) + b1) + b2 per coordinate.
// "metanet_mlp_bwd", C symbol MetanetMlpBwd:
//   inputs  the forward's seven, then dy[M]; attribute need_dx (bool)
//   outputs dw0[2,H], db0[H], dw1[H,H], db1[H], dw2[H], db2[], dx[2,M]
//   (need_dx false: dx is written as zeros and not computed).
// "metanet_lstm_fwd", C symbol MetanetLstmFwd (d, generators._lstm_core):
//   inputs  wx[2,4H], wh[H,4H], b[4H], wo[H], bo[] (scalar), feats[T,2,P]
//   output  y[P]: gate order i, f, g, o; zero initial state; sigmoid gates;
//           c_t = f c_{t-1} + i g, h_t = o tanh(c_t); y = h_T . wo + bo.
// "metanet_lstm_bwd", C symbol MetanetLstmBwd:
//   inputs  the forward's six, then dy[P]; attribute need_dfeat (bool)
//   outputs dwx[2,4H], dwh[H,4H], db[4H], dwo[H], dbo[], dfeat[T,2,P]
//   (need_dfeat false: dfeat is written as zeros and not computed).
//
// All four handlers take the CPU thread pool (ffi::Ctx<ffi::ThreadPool>) and split the
// coordinates over it in chunks whose bounds depend only on the shapes; weight gradients are
// reduced per chunk and the chunks summed in order, so the same inputs give bitwise the same
// outputs whatever the scheduling or the number of threads. Small calls run inline.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace metanet {

// Floats per vector register of the build's target (-march): 16 with AVX-512, 8 with AVX, 4
// otherwise (SSE2, NEON, ...). Both kernels' vectors are this wide: a wider GCC vector type
// would be split into several registers, slow to compile and to run.
#if defined(__AVX512F__)
constexpr int kVectorLanes = 16;
#elif defined(__AVX__)
constexpr int kVectorLanes = 8;
#else
constexpr int kVectorLanes = 4;
#endif

// Runs body(chunk) for chunk in [0, n) on the caller and the pool's threads. Chunks are
// claimed from an atomic counter; the caller waits only for chunks that were claimed, never
// for a scheduled task to start (pool threads may all be busy, e.g. running this same call's
// siblings), so it cannot deadlock. `body` must stay valid until this returns; tasks that
// start after all chunks were claimed touch only the shared counter.
template <typename Body>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, Body&& body) {
  if (n <= 0) return;
  int64_t threads = pool.num_threads();
  if (n == 1 || threads <= 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    void* body = nullptr;
    void (*call)(void*, int64_t) = nullptr;
  };
  auto state = std::make_shared<State>();
  state->body = &body;
  state->call = [](void* b, int64_t i) { (*static_cast<Body*>(b))(i); };
  auto work = [](State& s, int64_t n) {
    for (;;) {
      int64_t i = s.next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) return;
      s.call(s.body, i);
      s.done.fetch_add(1, std::memory_order_release);
      s.done.notify_all();
    }
  };
  int64_t helpers = std::min<int64_t>(threads, n) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([state, n, work] { work(*state, n); });
  }
  work(*state, n);
  // Blocks (no spinning: the machine may be shared) until the claimed chunks are done.
  for (int64_t d; (d = state->done.load(std::memory_order_acquire)) < n;) {
    state->done.wait(d, std::memory_order_acquire);
  }
}

// 64-byte aligned scratch memory.
struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};
using Scratch = std::unique_ptr<float[], AlignedFree>;
inline Scratch AllocScratch(int64_t floats) {
  size_t bytes = (static_cast<size_t>(floats) * sizeof(float) + 63) / 64 * 64;
  return Scratch(static_cast<float*>(std::aligned_alloc(64, bytes ? bytes : 64)));
}

// The handlers' bindings: the thread pool, then runs of float32 buffers (the ABI above names
// each, in the order of kernels/_ops.py's calls). F32Args<n>(b) / F32Rets<n>(b) append n >= 1
// buffer arguments / results to the binding b. (A binding cannot be copied or moved by user
// code, only built on: every step returns the prvalue of the next.)
using F32Buffer = xla::ffi::Buffer<xla::ffi::F32>;
inline auto PoolBinding() { return xla::ffi::Ffi::Bind().Ctx<xla::ffi::ThreadPool>(); }
template <bool kResults, int N, typename Binding>
auto F32Buffers(Binding&& binding) {
  static_assert(N >= 1);
  auto next = [&] {
    if constexpr (kResults) {
      return std::move(binding).template Ret<F32Buffer>();
    } else {
      return std::move(binding).template Arg<F32Buffer>();
    }
  };
  if constexpr (N == 1) {
    return next();
  } else {
    return F32Buffers<kResults, N - 1>(next());
  }
}
template <int N, typename Binding>
auto F32Args(Binding binding) {
  return F32Buffers<false, N>(std::move(binding));
}
template <int N, typename Binding>
auto F32Rets(Binding binding) {
  return F32Buffers<true, N>(std::move(binding));
}

}  // namespace metanet
