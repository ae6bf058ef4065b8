// m, the example-level generator: a coordinate-wise MLP 2 -> H -> H -> 1 (ReLU), forward and
// backward, fused (ABI in kernels.h).
//
// Coordinates are processed in blocks of kB = kL * kNV (structure of arrays: one vector holds
// kL coordinates of one feature; kL = 16 with AVX-512, 8 with AVX, 4 otherwise: SSE2, NEON).
// A block's hidden layers [H][kB] stay in L1; the H x H layer and its two backward products
// are register-tiled like a small GEMM (accumulators of R rows x kNV vectors, weights
// broadcast from memory). The backward pass recomputes the forward. The weight gradients are
// accumulated per chunk of coordinates in vectors (one lane per coordinate slot), summed over
// lanes at the chunk's end, and the chunks summed in order.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace ffi = xla::ffi;

namespace metanet {
namespace {

constexpr int kL = kVectorLanes;  // lanes per vector (kernels.h)
typedef float vf __attribute__((vector_size(kL * sizeof(float))));
constexpr int kNV = 4;              // vectors per block
constexpr int kB = kL * kNV;        // coordinates per block
constexpr int64_t kChunk = 8192;    // coordinates per parallel chunk (a multiple of kB)
constexpr int kR = 6;               // rows per register tile (H x H layer)
constexpr int kKR = 4, kJR = 5;     // rows x columns of a dw1 tile

inline vf Bc(float s) { return vf{} + s; }
inline vf Ld(const float* p) { return *reinterpret_cast<const vf*>(p); }
inline void St(float* p, vf v) { *reinterpret_cast<vf*>(p) = v; }
inline vf Relu(vf a) {
  vf z = {};
  return a > z ? a : z;
}
inline float Hsum(vf v) {
  float s = 0.f;
  for (int l = 0; l < kL; ++l) s += v[l];
  return s;
}

// Calls f(std::integral_constant<int, R>, start) over [0, n) in tiles of kMax rows, the last
// one (n % kMax rows) with its own compile-time size.
template <int kMax, typename F>
inline void Tiles(int n, F&& f) {
  int s = 0;
  for (; s + kMax <= n; s += kMax) f(std::integral_constant<int, kMax>{}, s);
  int rest = n - s;
  if constexpr (kMax > 1) {
    if (rest > 0) {
      if constexpr (kMax > 1)
        [&]<int... I>(std::integer_sequence<int, I...>) {
          ((rest == I + 1 ? (f(std::integral_constant<int, I + 1>{}, s), 0) : 0), ...);
        }(std::make_integer_sequence<int, kMax - 1>{});
    }
  }
}

// acc[r][v] = sum_s w[s * ldw + r] * in[s * kB + kL v], r < R (one output tile), then
// epi(acc).
template <int R, typename Epi>
inline void TileGemm(const float* w, int ldw, const float* in, int S, Epi&& epi) {
  vf acc[R][kNV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kNV; ++v) acc[r][v] = vf{};
  for (int s = 0; s < S; ++s) {
    vf x[kNV];
    for (int v = 0; v < kNV; ++v) x[v] = Ld(in + s * kB + v * kL);
    for (int r = 0; r < R; ++r) {
      vf ws = Bc(w[s * ldw + r]);
      for (int v = 0; v < kNV; ++v) acc[r][v] += ws * x[v];
    }
  }
  epi(acc);
}

struct Weights {
  int H;
  const float *w0, *b0, *w1, *b1, *w2;
  float b2;
  std::vector<float> w1t;  // w1 transposed (backward)
};

// h1[k][c] = relu(w0[0,k] x0[c] + w0[1,k] x1[c] + b0[k]) for one block.
inline void Hidden1(const Weights& w, const float* x0, const float* x1, float* h1) {
  const int H = w.H;
  for (int k = 0; k < H; ++k) {
    vf a = Bc(w.w0[k]), b = Bc(w.w0[H + k]), c = Bc(w.b0[k]);
    for (int v = 0; v < kNV; ++v)
      St(h1 + k * kB + v * kL, Relu(a * Ld(x0 + v * kL) + b * Ld(x1 + v * kL) + c));
  }
}

// One block forward: x0, x1 [kB] -> y [kB].
void BlockFwd(const Weights& w, const float* x0, const float* x1, float* y, float* h1) {
  const int H = w.H;
  Hidden1(w, x0, x1, h1);
  vf out[kNV];
  for (int v = 0; v < kNV; ++v) out[v] = Bc(w.b2);
  Tiles<kR>(H, [&](auto RC, int j0) {
    constexpr int R = decltype(RC)::value;
    TileGemm<R>(w.w1 + j0, H, h1, H, [&](vf(&acc)[R][kNV]) {
      for (int r = 0; r < R; ++r) {
        vf b = Bc(w.b1[j0 + r]), o = Bc(w.w2[j0 + r]);
        for (int v = 0; v < kNV; ++v) out[v] += o * Relu(acc[r][v] + b);
      }
    });
  });
  for (int v = 0; v < kNV; ++v) St(y + v * kL, out[v]);
}

// Per-chunk gradient accumulators: one vector (kL coordinate slots) per weight.
struct Grads {
  int H;
  Scratch mem;
  vf *dw0, *db0, *dw1, *db1, *dw2, *db2;
  explicit Grads(int H_) : H(H_) {
    int64_t n = 2 * H + H + H * H + H + H + 1;
    mem = AllocScratch(n * kL);
    vf* p = reinterpret_cast<vf*>(mem.get());
    dw0 = p, p += 2 * H;
    db0 = p, p += H;
    dw1 = p, p += H * H;
    db1 = p, p += H;
    dw2 = p, p += H;
    db2 = p;
    Zero();
  }
  int64_t Size() const { return 2 * H + H + H * H + H + H + 1; }
  void Zero() { std::memset(mem.get(), 0, Size() * kL * sizeof(float)); }
  // Lane sums, in the order dw0, db0, dw1, db1, dw2, db2.
  void Reduce(float* out) const {
    const vf* p = reinterpret_cast<const vf*>(mem.get());
    for (int64_t i = 0; i < Size(); ++i) out[i] = Hsum(p[i]);
  }
};

// One block backward. x0, x1, dy [kB] (dy zero on padding, so padding contributes nothing);
// dx0, dx1 [kB] written when need_dx. Scratch h1, dh2 [H][kB].
void BlockBwd(const Weights& w, const float* x0, const float* x1, const float* dy, Grads& g,
              bool need_dx, float* dx0, float* dx1, float* h1, float* dh2) {
  const int H = w.H;
  Hidden1(w, x0, x1, h1);
  vf dyv[kNV];
  for (int v = 0; v < kNV; ++v) dyv[v] = Ld(dy + v * kL);
  {
    vf s = g.db2[0];
    for (int v = 0; v < kNV; ++v) s += dyv[v];
    g.db2[0] = s;
  }
  // z2 = w1^T h1 + b1; dh2 = [z2 > 0] w2 dy; dw2 += relu(z2) dy; db1 += dh2.
  Tiles<kR>(H, [&](auto RC, int j0) {
    constexpr int R = decltype(RC)::value;
    TileGemm<R>(w.w1 + j0, H, h1, H, [&](vf(&acc)[R][kNV]) {
      for (int r = 0; r < R; ++r) {
        const int j = j0 + r;
        vf b = Bc(w.b1[j]), o = Bc(w.w2[j]), zero = {};
        vf sw = g.dw2[j], sb = g.db1[j];
        for (int v = 0; v < kNV; ++v) {
          vf z = acc[r][v] + b;
          vf h = z > zero ? z : zero;
          vf d = z > zero ? o * dyv[v] : zero;
          sw += h * dyv[v];
          sb += d;
          St(dh2 + j * kB + v * kL, d);
        }
        g.dw2[j] = sw;
        g.db1[j] = sb;
      }
    });
  });
  // dw1[k][j] += sum_c h1[k][c] dh2[j][c] (lane-wise).
  Tiles<kKR>(H, [&](auto KC, int k0) {
    constexpr int KR = decltype(KC)::value;
    Tiles<kJR>(H, [&](auto JC, int j0) {
      constexpr int JR = decltype(JC)::value;
      vf acc[KR][JR];
      for (int a = 0; a < KR; ++a)
        for (int b = 0; b < JR; ++b) acc[a][b] = g.dw1[(k0 + a) * H + j0 + b];
      for (int v = 0; v < kNV; ++v) {
        vf hv[KR], dv[JR];
        for (int a = 0; a < KR; ++a) hv[a] = Ld(h1 + (k0 + a) * kB + v * kL);
        for (int b = 0; b < JR; ++b) dv[b] = Ld(dh2 + (j0 + b) * kB + v * kL);
        for (int a = 0; a < KR; ++a)
          for (int b = 0; b < JR; ++b) acc[a][b] += hv[a] * dv[b];
      }
      for (int a = 0; a < KR; ++a)
        for (int b = 0; b < JR; ++b) g.dw1[(k0 + a) * H + j0 + b] = acc[a][b];
    });
  });
  // dh1 = [h1 > 0] w1 dh2; dw0 += x dh1^T; db0 += dh1; dx = w0 dh1.
  vf x0v[kNV], x1v[kNV], dxa[kNV], dxb[kNV];
  for (int v = 0; v < kNV; ++v) {
    x0v[v] = Ld(x0 + v * kL), x1v[v] = Ld(x1 + v * kL);
    dxa[v] = dxb[v] = vf{};
  }
  Tiles<kR>(H, [&](auto RC, int k0) {
    constexpr int R = decltype(RC)::value;
    TileGemm<R>(w.w1t.data() + k0, H, dh2, H, [&](vf(&acc)[R][kNV]) {
      for (int r = 0; r < R; ++r) {
        const int k = k0 + r;
        vf s0 = g.dw0[k], s1 = g.dw0[H + k], sb = g.db0[k], zero = {};
        vf wa = Bc(w.w0[k]), wb = Bc(w.w0[H + k]);
        for (int v = 0; v < kNV; ++v) {
          vf d = Ld(h1 + k * kB + v * kL) > zero ? acc[r][v] : zero;
          s0 += x0v[v] * d;
          s1 += x1v[v] * d;
          sb += d;
          if (need_dx) {
            dxa[v] += wa * d;
            dxb[v] += wb * d;
          }
        }
        g.dw0[k] = s0, g.dw0[H + k] = s1, g.db0[k] = sb;
      }
    });
  });
  if (need_dx) {
    for (int v = 0; v < kNV; ++v) St(dx0 + v * kL, dxa[v]), St(dx1 + v * kL, dxb[v]);
  }
}

// Copies coordinates [c, c + n) of a row into an aligned block, zero-padded to kB.
inline void LoadBlock(const float* src, int64_t c, int64_t n, float* dst) {
  std::memcpy(dst, src + c, n * sizeof(float));
  if (n < kB) std::memset(dst + n, 0, (kB - n) * sizeof(float));
}

ffi::Error CheckShapes(int64_t H, ffi::Buffer<ffi::F32>& w0, ffi::Buffer<ffi::F32>& b0,
                       ffi::Buffer<ffi::F32>& w1, ffi::Buffer<ffi::F32>& b1,
                       ffi::Buffer<ffi::F32>& w2, ffi::Buffer<ffi::F32>& b2,
                       ffi::Buffer<ffi::F32>& x) {
  auto d0 = w0.dimensions();
  auto dx = x.dimensions();
  if (d0.size() != 2 || d0[0] != 2 || H < 1 || H > 64)
    return ffi::Error::InvalidArgument("metanet_mlp: w0 must be [2, H] with 1 <= H <= 64");
  if (b0.element_count() != H || w1.element_count() != H * H || b1.element_count() != H ||
      w2.element_count() != H || b2.element_count() != 1)
    return ffi::Error::InvalidArgument("metanet_mlp: weight shapes do not match w0's H");
  if (dx.size() != 2 || dx[0] != 2)
    return ffi::Error::InvalidArgument("metanet_mlp: x must be [2, M]");
  return ffi::Error::Success();
}

Weights MakeWeights(int H, ffi::Buffer<ffi::F32>& w0, ffi::Buffer<ffi::F32>& b0,
                    ffi::Buffer<ffi::F32>& w1, ffi::Buffer<ffi::F32>& b1,
                    ffi::Buffer<ffi::F32>& w2, ffi::Buffer<ffi::F32>& b2, bool transpose) {
  Weights w{H,          w0.typed_data(), b0.typed_data(), w1.typed_data(), b1.typed_data(),
            w2.typed_data(), b2.typed_data()[0], {}};
  if (transpose) {
    w.w1t.resize(H * H);
    for (int k = 0; k < H; ++k)
      for (int j = 0; j < H; ++j) w.w1t[j * H + k] = w.w1[k * H + j];
  }
  return w;
}

ffi::Error MlpFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w0, ffi::Buffer<ffi::F32> b0,
                      ffi::Buffer<ffi::F32> w1, ffi::Buffer<ffi::F32> b1,
                      ffi::Buffer<ffi::F32> w2, ffi::Buffer<ffi::F32> b2,
                      ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  const int64_t H = w0.dimensions().size() == 2 ? w0.dimensions()[1] : 0;
  if (auto e = CheckShapes(H, w0, b0, w1, b1, w2, b2, x); e.failure()) return e;
  const int64_t M = x.dimensions()[1];
  if (y->element_count() != M) return ffi::Error::InvalidArgument("metanet_mlp_fwd: y must be [M]");
  if (M == 0) return ffi::Error::Success();
  Weights w = MakeWeights(H, w0, b0, w1, b1, w2, b2, false);
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  const int64_t chunks = (M + kChunk - 1) / kChunk;
  ParallelFor(pool, chunks, [&](int64_t ci) {
    Scratch buf = AllocScratch(H * kB + 3 * kB);
    float* h1 = buf.get();
    float *bx0 = h1 + H * kB, *bx1 = bx0 + kB, *by = bx1 + kB;
    const int64_t end = std::min(M, (ci + 1) * kChunk);
    for (int64_t c = ci * kChunk; c < end; c += kB) {
      const int64_t n = std::min<int64_t>(kB, end - c);
      LoadBlock(xp, c, n, bx0);
      LoadBlock(xp + M, c, n, bx1);
      BlockFwd(w, bx0, bx1, by, h1);
      std::memcpy(yp + c, by, n * sizeof(float));
    }
  });
  return ffi::Error::Success();
}

ffi::Error MlpBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w0, ffi::Buffer<ffi::F32> b0,
                      ffi::Buffer<ffi::F32> w1, ffi::Buffer<ffi::F32> b1,
                      ffi::Buffer<ffi::F32> w2, ffi::Buffer<ffi::F32> b2,
                      ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, bool need_dx,
                      ffi::ResultBuffer<ffi::F32> dw0, ffi::ResultBuffer<ffi::F32> db0,
                      ffi::ResultBuffer<ffi::F32> dw1, ffi::ResultBuffer<ffi::F32> db1,
                      ffi::ResultBuffer<ffi::F32> dw2, ffi::ResultBuffer<ffi::F32> db2,
                      ffi::ResultBuffer<ffi::F32> dx) {
  const int64_t H = w0.dimensions().size() == 2 ? w0.dimensions()[1] : 0;
  if (auto e = CheckShapes(H, w0, b0, w1, b1, w2, b2, x); e.failure()) return e;
  const int64_t M = x.dimensions()[1];
  if (dy.element_count() != M || dx->element_count() != 2 * M ||
      dw0->element_count() != 2 * H || db0->element_count() != H ||
      dw1->element_count() != H * H || db1->element_count() != H ||
      dw2->element_count() != H || db2->element_count() != 1)
    return ffi::Error::InvalidArgument("metanet_mlp_bwd: output or dy shapes do not match");
  Weights w = MakeWeights(H, w0, b0, w1, b1, w2, b2, true);
  const float* xp = x.typed_data();
  const float* dyp = dy.typed_data();
  float* dxp = dx->typed_data();
  const int64_t chunks = (M + kChunk - 1) / kChunk;
  const int64_t nw = 2 * H + H + H * H + H + H + 1;
  std::vector<float> partial(chunks * nw);
  ParallelFor(pool, chunks, [&](int64_t ci) {
    Grads g(H);
    Scratch buf = AllocScratch(2 * H * kB + 5 * kB);
    float *h1 = buf.get(), *dh2 = h1 + H * kB;
    float *bx0 = dh2 + H * kB, *bx1 = bx0 + kB, *bdy = bx1 + kB, *bdx0 = bdy + kB,
          *bdx1 = bdx0 + kB;
    const int64_t end = std::min(M, (ci + 1) * kChunk);
    for (int64_t c = ci * kChunk; c < end; c += kB) {
      const int64_t n = std::min<int64_t>(kB, end - c);
      LoadBlock(xp, c, n, bx0);
      LoadBlock(xp + M, c, n, bx1);
      LoadBlock(dyp, c, n, bdy);
      BlockBwd(w, bx0, bx1, bdy, g, need_dx, bdx0, bdx1, h1, dh2);
      if (need_dx) {
        std::memcpy(dxp + c, bdx0, n * sizeof(float));
        std::memcpy(dxp + M + c, bdx1, n * sizeof(float));
      } else {
        std::memset(dxp + c, 0, n * sizeof(float));
        std::memset(dxp + M + c, 0, n * sizeof(float));
      }
    }
    g.Reduce(partial.data() + ci * nw);
  });
  // Chunks summed in order: deterministic.
  std::vector<float> total(nw, 0.f);
  for (int64_t ci = 0; ci < chunks; ++ci)
    for (int64_t i = 0; i < nw; ++i) total[i] += partial[ci * nw + i];
  const float* t = total.data();
  std::memcpy(dw0->typed_data(), t, 2 * H * sizeof(float)), t += 2 * H;
  std::memcpy(db0->typed_data(), t, H * sizeof(float)), t += H;
  std::memcpy(dw1->typed_data(), t, H * H * sizeof(float)), t += H * H;
  std::memcpy(db1->typed_data(), t, H * sizeof(float)), t += H;
  std::memcpy(dw2->typed_data(), t, H * sizeof(float)), t += H;
  db2->typed_data()[0] = *t;
  return ffi::Error::Success();
}

}  // namespace
}  // namespace metanet

// w0, b0, w1, b1, w2, b2, x -> y
XLA_FFI_DEFINE_HANDLER_SYMBOL(MetanetMlpFwd, metanet::MlpFwdImpl,
                              metanet::F32Rets<1>(metanet::F32Args<7>(metanet::PoolBinding())));

// w0, b0, w1, b1, w2, b2, x, dy; need_dx -> dw0, db0, dw1, db1, dw2, db2, dx
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    MetanetMlpBwd, metanet::MlpBwdImpl,
    metanet::F32Rets<7>(
        metanet::F32Args<8>(metanet::PoolBinding()).Attr<bool>("need_dx")));
