// Fused CPU kernels (XLA FFI) for d, MetaNet's coordinate-wise LSTM generator.
//
// Every parameter coordinate p (P of them) is an independent sequence of T steps of two input
// features, all sharing one LSTM(2 -> H) and a linear read-out of the last hidden state. This
// is `_lstm_core` of metanet_jax/model/generators.py (and its hand-written VJP), fused:
//
//   z_t = x_t wx + h_{t-1} wh + b                    x_t = feats[t, :, p] (2), z_t (4H)
//   i, f, g, o = sig(z_t[0:H]), sig(z_t[H:2H]), tanh(z_t[2H:3H]), sig(z_t[3H:4H])
//   c_t = f c_{t-1} + i g,  h_t = o tanh(c_t)        (h_{-1} = c_{-1} = 0)
//   y = h_{T-1} . wo + bo                            sig(x) = 0.5 tanh(0.5 x) + 0.5
//
// and the backward (with dh = dy wo, dc = 0 at the last step, going back in time):
//   dc += dh o (1 - tanh(c_t)^2)
//   dz_t = [dc g i (1-i), dc c_{t-1} f (1-f), dc i (1-g^2), dh tanh(c_t) o (1-o)]  (df = 0 at t=0)
//   dwx += x_t^T dz_t,  db += sum dz_t,  dwh += h_{t-1}^T dz_t (t > 0),  dfeat_t = dz_t wx^T
//   dh = dz_t wh^T,  dc = dc f
//   dwo = h_{T-1}^T dy,  dbo = sum dy.
//
// ABI (float32, row-major, shapes read from the buffers):
//   MetanetLstmFwd: wx[2,4H], wh[H,4H], b[4H], wo[H], bo[], feats[T,2,P] -> y[P]
//   MetanetLstmBwd: same inputs and dy[P], attribute need_dfeat (bool)
//                   -> dwx[2,4H], dwh[H,4H], db[4H], dwo[H], dbo[], dfeat[T,2,P]
//                   (dfeat is zero-filled when need_dfeat is false).
// 1 <= H <= 64, T >= 1, P >= 0.
//
// Layout: coordinates are the vector lanes (kLanes floats per vector: 16 with AVX-512, 8 with
// AVX, 4 otherwise; see "vectors" below). A block of kBlock = kNV vectors of coordinates (64
// with AVX-512) runs all its T steps with its state in L1/L2: the forward is a register-tiled
// small GEMM per hidden unit (its 4 gate rows x kNV vectors of coordinates) followed by the
// gate nonlinearities in registers; the backward recomputes the forward for the block,
// keeping every step's gates, c and tanh(c), then back-propagates (elementwise dz, then
// dh = dz wh^T as a register-tiled GEMM). The weight gradients of a block are one more small
// GEMM, dW[k', j] += sum_t sum_lanes a_t[k'] dz_t[j] with a_t = [h_{t-1}; x_t; 1],
// accumulated lane-wise in per-thread vector accumulators (no horizontal sums per
// coordinate). Coordinates are split into fixed chunks of kChunkBlocks blocks (2048
// coordinates); each chunk's accumulators are reduced (fixed order) to doubles in its own
// slot, and the slots are summed in chunk order at the end, so the results are bitwise
// deterministic whatever the number of threads or their scheduling. Chunks are claimed
// dynamically by the caller and by tasks on the FFI thread pool.
//
// tanh is a [9/6] rational approximation (see TanhImpl): max relative error 4.9e-7 over all
// floats. Sigmoid gates use pre-halved weights (exact: scaling by 0.5) and 0.5 tanh + 0.5.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "kernels.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

// ----------------------------------------------------------------------------- vectors
// V is one vector of kLanes floats; the kernels below use only the operations defined here.
// With AVX-512 (-march=native on a machine that has it) they are the AVX-512 intrinsics, with
// masked tail loads and stores. Elsewhere V is a GCC vector type as wide as the target's
// vectors (8 floats with AVX, 4 otherwise: SSE2, NEON, ...), its operators compiled to the
// target's instructions (g++ contracts a * b + c to an FMA where the target has one), and the
// tails are copied lane by lane. Same arithmetic in every case, up to FMA contraction and the
// order of the sums (the block width sets it); each build is deterministic.
constexpr int kLanes = metanet::kVectorLanes;
#if defined(__AVX512F__)
using V = __m512;
inline V Set1(float x) { return _mm512_set1_ps(x); }
inline V Zero() { return _mm512_setzero_ps(); }
inline V Load(const float* p) { return _mm512_load_ps(p); }  // 64-byte aligned
inline void Store(float* p, V v) { _mm512_store_ps(p, v); }
inline V Add(V a, V b) { return _mm512_add_ps(a, b); }
inline V Sub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V Mul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V Div(V a, V b) { return _mm512_div_ps(a, b); }
inline V Min(V a, V b) { return _mm512_min_ps(a, b); }
inline V Max(V a, V b) { return _mm512_max_ps(a, b); }
inline V Fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }    // a b + c
inline V Fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b
inline __mmask16 LaneMask(int64_t n) {
  if (n >= kLanes) return 0xFFFF;
  if (n <= 0) return 0;
  return static_cast<__mmask16>((1u << n) - 1u);
}
// The first n lanes (all when n >= kLanes) from p, unaligned; zeros in the others. Reads
// nothing past p + n.
inline V LoadTail(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(LaneMask(n), p); }
// Writes the first n lanes of v (all when n >= kLanes) to p, unaligned; nothing past p + n.
inline void StoreTail(float* p, int64_t n, V v) { _mm512_mask_storeu_ps(p, LaneMask(n), v); }
#else
typedef float V __attribute__((vector_size(kLanes * sizeof(float))));
inline V Set1(float x) { return V{} + x; }
inline V Zero() { return V{}; }
inline V Load(const float* p) { return *reinterpret_cast<const V*>(p); }  // aligned
inline void Store(float* p, V v) { *reinterpret_cast<V*>(p) = v; }
inline V Add(V a, V b) { return a + b; }
inline V Sub(V a, V b) { return a - b; }
inline V Mul(V a, V b) { return a * b; }
inline V Div(V a, V b) { return a / b; }
// As the x86 min/max instructions: b where a is NaN.
inline V Min(V a, V b) { return a < b ? a : b; }
inline V Max(V a, V b) { return a > b ? a : b; }
inline V Fmadd(V a, V b, V c) { return a * b + c; }
inline V Fnmadd(V a, V b, V c) { return c - a * b; }
inline V LoadTail(const float* p, int64_t n) {
  V v;
  if (n >= kLanes) {
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  v = V{};
  for (int64_t l = 0; l < n; ++l) v[l] = p[l];
  return v;
}
inline void StoreTail(float* p, int64_t n, V v) {
  if (n >= kLanes) {
    std::memcpy(p, &v, sizeof(V));
    return;
  }
  for (int64_t l = 0; l < n; ++l) p[l] = v[l];
}
#endif

// Register tiles: a block is kNV vectors wide; BackTile takes at most kBackRows rows (kBackRows
// x kNV accumulators), GradTile at most kGradRows (kGradRows x 4). Sized for 32 vector
// registers (AVX-512, aarch64) or 16 (x86 without AVX-512).
#if defined(__AVX512F__) || defined(__aarch64__)
constexpr int kNV = 4;
constexpr int kBackRows = 6;
constexpr int kGradRows = 6;
#else
constexpr int kNV = 2;
constexpr int kBackRows = 6;
constexpr int kGradRows = 3;
#endif
constexpr int kBlock = kLanes * kNV;                 // coordinates per block (= floats per row)
constexpr int64_t kChunkBlocks = 2048 / kBlock;      // blocks per chunk (2048 coordinates: the
                                                     // unit of work and of reduction)
constexpr int kMaxH = 64;
static_assert(kBlock * sizeof(float) % 16 == 0 && 2048 % kBlock == 0);

// ----------------------------------------------------------------------------- math
// tanh(x) ~ x P(x^2) / Q(x^2), |x| clamped to 7.9053 (where tanh rounds to 1 in float32), with
// P of degree 4 and Q of degree 3 (Q(0) = 1): a minimax fit of the relative error (ours).
// Evaluated in float32 with a true division (the divider is not an FMA pipe): max relative
// error 4.9e-7 over all floats, |tanh| <= 1. kHalf: returns 0.5 tanh(x) + 0.5 (the sigmoid
// of 2x), folding the 0.5 into P's coefficients (exact) and adding 0.5 last.
template <bool kHalf>
inline V TanhImpl(V x) {
  const float k = kHalf ? 0.5f : 1.0f;
  x = Min(Max(x, Set1(-7.90531110763549805f)), Set1(7.90531110763549805f));
  const V s = Mul(x, x);
  V p = Fmadd(s, Set1(k * -6.256881235344736e-09f), Set1(k * 7.225603440019768e-06f));
  p = Fmadd(s, p, Set1(k * 0.0027047486510127783f));
  p = Fmadd(s, p, Set1(k * 0.1272047609090805f));
  p = Fmadd(s, p, Set1(k * 0.9999998211860657f));
  p = Mul(p, x);
  V q = Fmadd(s, Set1(0.00019782000163104385f), Set1(0.022885719314217567f));
  q = Fmadd(s, q, Set1(0.46053653955459595f));
  q = Fmadd(s, q, Set1(1.0f));
  const V r = Div(p, q);
  return kHalf ? Add(r, Set1(0.5f)) : r;
}

inline V Tanh(V x) { return TanhImpl<false>(x); }
// sigmoid(z) given zh = z / 2: 0.5 tanh(zh) + 0.5.
inline V SigmoidHalf(V zh) { return TanhImpl<true>(zh); }

// Keeps a loaded vector in a register: stops GCC from folding the load into every FMA that
// uses it (one load per use, which makes the small GEMMs load-bound).
#if defined(__x86_64__) || defined(__i386__)
#define KEEP_IN_REG(x) __asm__("" : "+v"(x))
#elif defined(__aarch64__)
#define KEEP_IN_REG(x) __asm__("" : "+w"(x))
#else
#define KEEP_IN_REG(x) ((void)0)
#endif

// Horizontal sum in a fixed order.
inline double HSum(const float* v) {
  double s = 0.0;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// ----------------------------------------------------------------------------- problem
struct Problem {
  int H = 0;
  int T = 0;
  int64_t P = 0;
  // Forward weights packed per hidden unit u: [u][k'][gate], k' < H: wh[k', gate*H+u],
  // k' = H, H+1: wx[0/1, gate*H+u], k' = H+2: b[gate*H+u]; sigmoid gates (i, f, o) halved.
  std::vector<float> wf;
  // Backward weights [j][k'] (stride H+2): k' < H: wh[k', j], k' = H, H+1: wx[0/1, j].
  std::vector<float> wbt;
  const float* wo = nullptr;
  float bo = 0.f;
  const float* feats = nullptr;  // [T, 2, P]
  int64_t nblocks = 0;
  int64_t nchunks = 0;

  void Pack(const float* wx, const float* wh, const float* b) {
    const int J = 4 * H, S = H + 3;
    wf.assign(static_cast<size_t>(H) * S * 4, 0.f);
    for (int u = 0; u < H; ++u)
      for (int g = 0; g < 4; ++g) {
        const float scale = (g == 2) ? 1.f : 0.5f;
        const int j = g * H + u;
        float* w = &wf[static_cast<size_t>(u) * S * 4];
        for (int k = 0; k < H; ++k) w[k * 4 + g] = scale * wh[k * J + j];
        w[H * 4 + g] = scale * wx[j];
        w[(H + 1) * 4 + g] = scale * wx[J + j];
        w[(H + 2) * 4 + g] = scale * b[j];
      }
    wbt.assign(static_cast<size_t>(J) * (H + 2), 0.f);
    for (int j = 0; j < J; ++j) {
      float* w = &wbt[static_cast<size_t>(j) * (H + 2)];
      for (int k = 0; k < H; ++k) w[k] = wh[k * J + j];
      w[H] = wx[j];
      w[H + 1] = wx[J + j];
    }
  }
};

// Per-thread scratch: all rows are kBlock floats (kNV vectors), 64-byte aligned.
struct Scratch {
  int H = 0, T = 0;
  float* mem = nullptr;
  float* abuf = nullptr;   // [T+1][H+3] rows: step t holds h_{t-1} (rows < H), x_t, ones
  float* gbuf = nullptr;   // [T][4H] rows: gates i, f, g, o of step t, then dz_t
  float* cbuf = nullptr;   // [T][H] rows: c_t
  float* tcbuf = nullptr;  // [T][H] rows: tanh(c_t)
  float* dhbuf = nullptr;  // [H+2] rows: dh (rows < H), dfeat_t (rows H, H+1)
  float* dcbuf = nullptr;  // [H] rows
  float* dybuf = nullptr;  // 1 row
  float* acc = nullptr;    // vectors: [H+3][4H] dW (wh, wx, b rows), [H] dwo, [1] dbo
  size_t nacc = 0;         // number of accumulator vectors

  Scratch(int h, int t) : H(h), T(t) {
    const size_t row = kBlock;
    const size_t nrows = static_cast<size_t>(T + 1) * (H + 3) + static_cast<size_t>(T) * 4 * H +
                         2 * static_cast<size_t>(T) * H + (H + 2) + H + 1;
    nacc = static_cast<size_t>(H + 3) * 4 * H + H + 1;
    const size_t bytes = (nrows * row + nacc * kLanes) * sizeof(float);
    mem = static_cast<float*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64));
    float* p = mem;
    abuf = p; p += static_cast<size_t>(T + 1) * (H + 3) * row;
    gbuf = p; p += static_cast<size_t>(T) * 4 * H * row;
    cbuf = p; p += static_cast<size_t>(T) * H * row;
    tcbuf = p; p += static_cast<size_t>(T) * H * row;
    dhbuf = p; p += static_cast<size_t>(H + 2) * row;
    dcbuf = p; p += static_cast<size_t>(H) * row;
    dybuf = p; p += row;
    acc = p;
    for (int s = 0; s <= T; ++s) {
      float* ones = ARow(s, H + 2);
      for (size_t l = 0; l < row; ++l) ones[l] = 1.f;
      float* h0 = ARow(s, 0);  // h_{-1} = 0: read by GradRows at t = 0 (never written)
      if (s == 0) std::memset(h0, 0, static_cast<size_t>(H) * row * sizeof(float));
    }
  }
  ~Scratch() { std::free(mem); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  float* ARow(int t, int k) const {
    return abuf + (static_cast<size_t>(t) * (H + 3) + k) * kBlock;
  }
  float* GRow(int t, int j) const { return gbuf + (static_cast<size_t>(t) * 4 * H + j) * kBlock; }
  float* CRow(int t, int u) const { return cbuf + (static_cast<size_t>(t) * H + u) * kBlock; }
  float* TCRow(int t, int u) const { return tcbuf + (static_cast<size_t>(t) * H + u) * kBlock; }
};

// ----------------------------------------------------------------------------- block kernels
// Loads the block's features x_t into abuf rows H, H+1 (zero in lanes past P).
inline void LoadFeatures(const Problem& pr, Scratch& s, int64_t p0) {
  const int64_t P = pr.P;
  for (int t = 0; t < pr.T; ++t)
    for (int r = 0; r < 2; ++r) {
      const float* src = pr.feats + (static_cast<int64_t>(t) * 2 + r) * P + p0;
      float* dst = s.ARow(t, pr.H + r);
      for (int v = 0; v < kNV; ++v) {
        Store(dst + v * kLanes, LoadTail(src + v * kLanes, P - p0 - v * kLanes));
      }
    }
}

// One forward step t for the block: h_t into abuf[t+1], c_t into cbuf[kStore ? t : 0]; with
// kStore also the gates (gbuf[t]) and tanh(c_t) (tcbuf[t]).
template <bool kStore>
inline void FwdStep(const Problem& pr, Scratch& s, int t) {
  const int H = pr.H, S = H + 3;
  const int kbeg = (t == 0) ? H : 0;
  const float* A = s.ARow(t, 0);
  float* Anext = s.ARow(t + 1, 0);
  for (int u = 0; u < H; ++u) {
    const float* w = pr.wf.data() + static_cast<size_t>(u) * S * 4;
    V acc[4][kNV];
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
      const V bg = Set1(w[(H + 2) * 4 + g]);
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) acc[g][v] = bg;
    }
    for (int k = kbeg; k < H + 2; ++k) {
      const float* a = A + static_cast<size_t>(k) * kBlock;
      V av[kNV];
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) {
        av[v] = Load(a + v * kLanes);
        KEEP_IN_REG(av[v]);
      }
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        const V wg = Set1(w[k * 4 + g]);
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) acc[g][v] = Fmadd(av[v], wg, acc[g][v]);
      }
    }
    float* crow = s.CRow(kStore ? t : 0, u);
    const float* cprev = kStore ? (t > 0 ? s.CRow(t - 1, u) : nullptr) : crow;
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) {
      const V i = SigmoidHalf(acc[0][v]);
      // f is not needed at t = 0 (c_{-1} = 0): not computed, stored as 0.
      const V f = (t == 0) ? Zero() : SigmoidHalf(acc[1][v]);
      const V g = Tanh(acc[2][v]);
      const V o = SigmoidHalf(acc[3][v]);
      const V ig = Mul(i, g);
      const V c =
          (t == 0) ? ig : Fmadd(f, Load(cprev + v * kLanes), ig);
      const V tc = Tanh(c);
      const V h = Mul(o, tc);
      Store(crow + v * kLanes, c);
      Store(Anext + static_cast<size_t>(u) * kBlock + v * kLanes, h);
      if (kStore) {
        Store(s.GRow(t, u) + v * kLanes, i);
        Store(s.GRow(t, H + u) + v * kLanes, f);
        Store(s.GRow(t, 2 * H + u) + v * kLanes, g);
        Store(s.GRow(t, 3 * H + u) + v * kLanes, o);
        Store(s.TCRow(t, u) + v * kLanes, tc);
      }
    }
  }
}

// out rows [k0, k0+KT) of dz_t wbt^T: out[k'][lanes] = sum_j dz[j] * wbt[j][k'].
template <int KT>
inline void BackTile(const float* dz, const float* wbt, int H, int k0, float* out) {
  const int J = 4 * H, S = H + 2;
  V acc[KT][kNV];
#pragma GCC unroll 8
  for (int kk = 0; kk < KT; ++kk)
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) acc[kk][v] = Zero();
  for (int j = 0; j < J; ++j) {
    const float* d = dz + static_cast<size_t>(j) * kBlock;
    const float* w = wbt + static_cast<size_t>(j) * S + k0;
    V dv[kNV];
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) dv[v] = Load(d + v * kLanes);
#pragma GCC unroll 8
    for (int kk = 0; kk < KT; ++kk) {
      const V wk = Set1(w[kk]);
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) acc[kk][v] = Fmadd(dv[v], wk, acc[kk][v]);
    }
  }
#pragma GCC unroll 8
  for (int kk = 0; kk < KT; ++kk)
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v)
      Store(out + static_cast<size_t>(k0 + kk) * kBlock + v * kLanes, acc[kk][v]);
}

// Rows [r0, r1) of dz_t wbt^T in balanced tiles of at most kBackRows rows.
inline void BackRows(const float* dz, const float* wbt, int H, int r0, int r1, float* out) {
  const int rows = r1 - r0;
  const int ntiles = (rows + kBackRows - 1) / kBackRows;
  int k = r0;
  for (int n = 0; n < ntiles; ++n) {
    const int kt = rows / ntiles + (n < rows % ntiles ? 1 : 0);
    switch (kt) {
      case 6: BackTile<6>(dz, wbt, H, k, out); break;
      case 5: BackTile<5>(dz, wbt, H, k, out); break;
      case 4: BackTile<4>(dz, wbt, H, k, out); break;
      case 3: BackTile<3>(dz, wbt, H, k, out); break;
      case 2: BackTile<2>(dz, wbt, H, k, out); break;
      default: BackTile<1>(dz, wbt, H, k, out); break;
    }
    k += kt;
  }
}

// acc[k'][j] += sum_{t >= tbeg} sum_v a_t[k'][v] * dz_t[j][v] for k' in [k0, k0+KT).
template <int KT>
inline void GradTile(const Scratch& s, int k0, int tbeg, float* acc) {
  const int H = s.H, T = s.T, J = 4 * H;
  for (int j0 = 0; j0 < J; j0 += 4) {
    V sum[KT][4];
#pragma GCC unroll 8
    for (int kk = 0; kk < KT; ++kk)
#pragma GCC unroll 4
      for (int jj = 0; jj < 4; ++jj) sum[kk][jj] = Zero();
    for (int t = tbeg; t < T; ++t) {
      const float* A = s.ARow(t, k0);
      const float* D = s.GRow(t, j0);
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) {
        V av[KT];
#pragma GCC unroll 8
        for (int kk = 0; kk < KT; ++kk) {
          av[kk] = Load(A + static_cast<size_t>(kk) * kBlock + v * kLanes);
          KEEP_IN_REG(av[kk]);
        }
#pragma GCC unroll 4
        for (int jj = 0; jj < 4; ++jj) {
          V d = Load(D + static_cast<size_t>(jj) * kBlock + v * kLanes);
          KEEP_IN_REG(d);
#pragma GCC unroll 8
          for (int kk = 0; kk < KT; ++kk) sum[kk][jj] = Fmadd(av[kk], d, sum[kk][jj]);
        }
      }
    }
#pragma GCC unroll 8
    for (int kk = 0; kk < KT; ++kk)
#pragma GCC unroll 4
      for (int jj = 0; jj < 4; ++jj) {
        float* c = acc + (static_cast<size_t>(k0 + kk) * J + j0 + jj) * kLanes;
        Store(c, Add(Load(c), sum[kk][jj]));
      }
  }
}

// Weight-gradient GEMM of a block: rows k' < H (dwh) over steps t >= 1, rows H..H+2 (dwx, db)
// over all steps. The H + 3 rows are cut into balanced tiles of at most kGradRows rows; the
// tile that holds rows >= H also runs step 0, where its h rows (h_{-1}) are zeros (abuf[0]
// rows < H).
inline void GradRows(const Scratch& s, float* acc) {
  const int H = s.H, T = s.T;
  if (T == 1) {  // only x and the bias rows have a gradient
    GradTile<3>(s, H, 0, acc);
    return;
  }
  const int rows = H + 3;
  const int ntiles = (rows + kGradRows - 1) / kGradRows;
  int k = 0;
  for (int n = 0; n < ntiles; ++n) {
    const int kt = rows / ntiles + (n < rows % ntiles ? 1 : 0);
    const int tbeg = (k + kt > H) ? 0 : 1;
    switch (kt) {
      case 6: GradTile<6>(s, k, tbeg, acc); break;
      case 5: GradTile<5>(s, k, tbeg, acc); break;
      case 4: GradTile<4>(s, k, tbeg, acc); break;
      case 3: GradTile<3>(s, k, tbeg, acc); break;
      case 2: GradTile<2>(s, k, tbeg, acc); break;
      default: GradTile<1>(s, k, tbeg, acc); break;
    }
    k += kt;
  }
}

// Forward of one block: y[p0 : p0+kBlock) (clipped to P).
void FwdBlock(const Problem& pr, Scratch& s, int64_t p0, float* y) {
  const int H = pr.H, T = pr.T;
  LoadFeatures(pr, s, p0);
  for (int t = 0; t < T; ++t) FwdStep<false>(pr, s, t);
  const float* hT = s.ARow(T, 0);
  for (int v = 0; v < kNV; ++v) {
    V out = Set1(pr.bo);
    for (int k = 0; k < H; ++k)
      out = Fmadd(Load(hT + static_cast<size_t>(k) * kBlock + v * kLanes),
                            Set1(pr.wo[k]), out);
    StoreTail(y + p0 + v * kLanes, pr.P - p0 - v * kLanes, out);
  }
}

// Forward + backward of one block, accumulating the weight gradients into s.acc.
void BwdBlock(const Problem& pr, Scratch& s, int64_t p0, const float* dy, bool need_dfeat,
              float* dfeat) {
  const int H = pr.H, T = pr.T, J = 4 * H;
  const int64_t P = pr.P;
  LoadFeatures(pr, s, p0);
  for (int v = 0; v < kNV; ++v)
    Store(s.dybuf + v * kLanes,
                    LoadTail(dy + p0 + v * kLanes, P - p0 - v * kLanes));
  for (int t = 0; t < T; ++t) FwdStep<true>(pr, s, t);

  // dwo += h_{T-1} dy, dbo += dy.
  float* acc_wo = s.acc + static_cast<size_t>(H + 3) * J * kLanes;
  float* acc_bo = acc_wo + static_cast<size_t>(H) * kLanes;
  {
    const float* hT = s.ARow(T, 0);
    for (int k = 0; k < H; ++k) {
      V a = Load(acc_wo + k * kLanes);
      for (int v = 0; v < kNV; ++v)
        a = Fmadd(Load(hT + static_cast<size_t>(k) * kBlock + v * kLanes),
                            Load(s.dybuf + v * kLanes), a);
      Store(acc_wo + k * kLanes, a);
    }
    V a = Load(acc_bo);
    for (int v = 0; v < kNV; ++v) a = Add(a, Load(s.dybuf + v * kLanes));
    Store(acc_bo, a);
  }

  const V one = Set1(1.f);
  for (int t = T - 1; t >= 0; --t) {
    for (int u = 0; u < H; ++u) {
      const V wo_u = Set1(pr.wo[u]);
      float* gi = s.GRow(t, u);
      float* gf = s.GRow(t, H + u);
      float* gg = s.GRow(t, 2 * H + u);
      float* go = s.GRow(t, 3 * H + u);
      const float* tcr = s.TCRow(t, u);
      const float* cprev = t > 0 ? s.CRow(t - 1, u) : nullptr;
      float* dhr = s.dhbuf + static_cast<size_t>(u) * kBlock;
      float* dcr = s.dcbuf + static_cast<size_t>(u) * kBlock;
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) {
        const int o_ = v * kLanes;
        const V dh = (t == T - 1) ? Mul(Load(s.dybuf + o_), wo_u)
                                       : Load(dhr + o_);
        const V i = Load(gi + o_);
        const V f = Load(gf + o_);
        const V g = Load(gg + o_);
        const V o = Load(go + o_);
        const V tc = Load(tcr + o_);
        const V dc_t = Mul(Mul(dh, o), Fnmadd(tc, tc, one));
        const V dc = (t == T - 1) ? dc_t : Add(Load(dcr + o_), dc_t);
        const V dzi = Mul(Mul(Mul(dc, g), i),
                                         Sub(one, i));
        const V dzf =
            (t > 0) ? Mul(
                          Mul(Mul(dc, Load(cprev + o_)), f),
                          Sub(one, f))
                    : Zero();
        const V dzg = Mul(Mul(dc, i), Fnmadd(g, g, one));
        const V dzo = Mul(Mul(Mul(dh, tc), o),
                                         Sub(one, o));
        Store(dcr + o_, Mul(dc, f));
        Store(gi + o_, dzi);
        Store(gf + o_, dzf);
        Store(gg + o_, dzg);
        Store(go + o_, dzo);
      }
    }
    // dh_{t-1} = dz_t wh^T (rows < H, when t > 0); dfeat_t = dz_t wx^T (rows H, H+1).
    const int r0 = (t > 0) ? 0 : H;
    const int r1 = need_dfeat ? H + 2 : H;
    if (r0 < r1) BackRows(s.GRow(t, 0), pr.wbt.data(), H, r0, r1, s.dhbuf);
    if (need_dfeat) {
      for (int r = 0; r < 2; ++r) {
        float* dst = dfeat + (static_cast<int64_t>(t) * 2 + r) * P + p0;
        const float* src = s.dhbuf + static_cast<size_t>(H + r) * kBlock;
        for (int v = 0; v < kNV; ++v)
          StoreTail(dst + v * kLanes, P - p0 - v * kLanes,
                                Load(src + v * kLanes));
      }
    }
  }
  // dwh (rows < H, steps t >= 1), dwx and db (rows H..H+2, all steps).
  GradRows(s, s.acc);
}

// ----------------------------------------------------------------------------- threading
// Runs work(scratch, chunk) for chunk in [0, n) on the caller and the pool's threads
// (metanet::ParallelFor), each chunk with a Scratch of its own (the chunks' results do not
// depend on which thread ran them). Returns when every chunk is done.
template <typename Work>
void ParallelChunks(ffi::ThreadPool& pool, int H, int T, int64_t n, Work&& work) {
  metanet::ParallelFor(pool, n, [&](int64_t c) {
    Scratch scratch(H, T);
    work(scratch, c);
  });
}

// ----------------------------------------------------------------------------- validation
std::string DimsStr(ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

// Reads H, T, P from the inputs and checks every shape.
ffi::Error CheckInputs(ffi::Buffer<ffi::F32>& wx, ffi::Buffer<ffi::F32>& wh,
                       ffi::Buffer<ffi::F32>& b, ffi::Buffer<ffi::F32>& wo,
                       ffi::Buffer<ffi::F32>& bo, ffi::Buffer<ffi::F32>& feats, Problem& pr) {
  auto dx = wx.dimensions();
  if (dx.size() != 2 || dx[0] != 2 || dx[1] % 4 != 0 || dx[1] < 4)
    return ffi::Error::InvalidArgument("metanet_lstm: wx must be [2, 4H] with H >= 1, got " +
                                       DimsStr(dx));
  const int64_t H = dx[1] / 4;
  if (H > kMaxH)
    return ffi::Error::InvalidArgument("metanet_lstm: H = " + std::to_string(H) +
                                       " > 64 is not supported");
  auto dh = wh.dimensions();
  if (dh.size() != 2 || dh[0] != H || dh[1] != 4 * H)
    return ffi::Error::InvalidArgument("metanet_lstm: wh must be [H, 4H] = [" +
                                       std::to_string(H) + ", " + std::to_string(4 * H) +
                                       "], got " + DimsStr(dh));
  auto db = b.dimensions();
  if (db.size() != 1 || db[0] != 4 * H)
    return ffi::Error::InvalidArgument("metanet_lstm: b must be [4H] = [" +
                                       std::to_string(4 * H) + "], got " + DimsStr(db));
  auto dwo = wo.dimensions();
  if (dwo.size() != 1 || dwo[0] != H)
    return ffi::Error::InvalidArgument("metanet_lstm: wo must be [H] = [" + std::to_string(H) +
                                       "], got " + DimsStr(dwo));
  if (bo.dimensions().size() != 0)
    return ffi::Error::InvalidArgument("metanet_lstm: bo must be a scalar (rank 0), got " +
                                       DimsStr(bo.dimensions()));
  auto df = feats.dimensions();
  if (df.size() != 3 || df[0] < 1 || df[1] != 2)
    return ffi::Error::InvalidArgument(
        "metanet_lstm: feats must be [T, 2, P] with T >= 1, got " + DimsStr(df));
  pr.H = static_cast<int>(H);
  pr.T = static_cast<int>(df[0]);
  pr.P = df[2];
  pr.Pack(wx.typed_data(), wh.typed_data(), b.typed_data());
  pr.wo = wo.typed_data();
  pr.bo = bo.typed_data()[0];
  pr.feats = feats.typed_data();
  pr.nblocks = (pr.P + kBlock - 1) / kBlock;
  pr.nchunks = (pr.nblocks + kChunkBlocks - 1) / kChunkBlocks;
  return ffi::Error::Success();
}

ffi::Error CheckShape(const char* name, ffi::Span<const int64_t> got,
                      std::vector<int64_t> want) {
  bool ok = got.size() == want.size();
  for (size_t i = 0; ok && i < want.size(); ++i) ok = got[i] == want[i];
  if (ok) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string("metanet_lstm: ") + name + " must be " +
                                     DimsStr(ffi::Span<const int64_t>(want.data(), want.size())) +
                                     ", got " + DimsStr(got));
}

// ----------------------------------------------------------------------------- handlers
ffi::Error LstmFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> wx, ffi::Buffer<ffi::F32> wh,
                   ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> wo, ffi::Buffer<ffi::F32> bo,
                   ffi::Buffer<ffi::F32> feats, ffi::ResultBuffer<ffi::F32> y) {
  Problem pr;
  if (ffi::Error e = CheckInputs(wx, wh, b, wo, bo, feats, pr); e.failure()) return e;
  if (ffi::Error e = CheckShape("y", y->dimensions(), {pr.P}); e.failure()) return e;
  float* out = y->typed_data();
  const Problem& cpr = pr;
  ParallelChunks(pool, pr.H, pr.T, pr.nchunks, [&cpr, out](Scratch& s, int64_t c) {
    const int64_t b0 = c * kChunkBlocks, b1 = std::min(cpr.nblocks, b0 + kChunkBlocks);
    for (int64_t bl = b0; bl < b1; ++bl) FwdBlock(cpr, s, bl * kBlock, out);
  });
  return ffi::Error::Success();
}

ffi::Error LstmBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> wx, ffi::Buffer<ffi::F32> wh,
                   ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> wo, ffi::Buffer<ffi::F32> bo,
                   ffi::Buffer<ffi::F32> feats, ffi::Buffer<ffi::F32> dy, bool need_dfeat,
                   ffi::ResultBuffer<ffi::F32> dwx, ffi::ResultBuffer<ffi::F32> dwh,
                   ffi::ResultBuffer<ffi::F32> db, ffi::ResultBuffer<ffi::F32> dwo,
                   ffi::ResultBuffer<ffi::F32> dbo, ffi::ResultBuffer<ffi::F32> dfeat) {
  Problem pr;
  if (ffi::Error e = CheckInputs(wx, wh, b, wo, bo, feats, pr); e.failure()) return e;
  const int64_t H = pr.H, T = pr.T, P = pr.P, J = 4 * H;
  if (ffi::Error e = CheckShape("dy", dy.dimensions(), {P}); e.failure()) return e;
  if (ffi::Error e = CheckShape("dwx", dwx->dimensions(), {2, J}); e.failure()) return e;
  if (ffi::Error e = CheckShape("dwh", dwh->dimensions(), {H, J}); e.failure()) return e;
  if (ffi::Error e = CheckShape("db", db->dimensions(), {J}); e.failure()) return e;
  if (ffi::Error e = CheckShape("dwo", dwo->dimensions(), {H}); e.failure()) return e;
  if (ffi::Error e = CheckShape("dbo", dbo->dimensions(), {}); e.failure()) return e;
  if (ffi::Error e = CheckShape("dfeat", dfeat->dimensions(), {T, 2, P}); e.failure()) return e;

  // Per-chunk partial sums (doubles), reduced in chunk order below.
  const int64_t nsum = (H + 3) * J + H + 1;
  std::vector<double> partial(static_cast<size_t>(std::max<int64_t>(pr.nchunks, 1) * nsum), 0.0);
  const Problem& cpr = pr;
  const float* dyp = dy.typed_data();
  float* dfp = dfeat->typed_data();
  double* part = partial.data();
  ParallelChunks(pool, pr.H, pr.T, pr.nchunks,
                 [&cpr, dyp, dfp, part, need_dfeat, nsum](Scratch& s, int64_t c) {
                   std::memset(s.acc, 0, s.nacc * kLanes * sizeof(float));
                   const int64_t b0 = c * kChunkBlocks;
                   const int64_t b1 = std::min(cpr.nblocks, b0 + kChunkBlocks);
                   if (!need_dfeat) {
                     const int64_t q0 = b0 * kBlock, q1 = std::min(cpr.P, b1 * kBlock);
                     for (int64_t r = 0; r < 2 * static_cast<int64_t>(cpr.T); ++r)
                       std::memset(dfp + r * cpr.P + q0, 0, (q1 - q0) * sizeof(float));
                   }
                   for (int64_t bl = b0; bl < b1; ++bl)
                     BwdBlock(cpr, s, bl * kBlock, dyp, need_dfeat, dfp);
                   double* out = part + c * nsum;
                   for (int64_t i = 0; i < nsum; ++i) out[i] = HSum(s.acc + i * kLanes);
                 });

  std::vector<double> total(static_cast<size_t>(nsum), 0.0);
  for (int64_t c = 0; c < pr.nchunks; ++c)
    for (int64_t i = 0; i < nsum; ++i) total[i] += partial[c * nsum + i];
  // Accumulator rows: k' < H -> dwh[k'], H, H+1 -> dwx[0/1], H+2 -> db; then dwo, dbo.
  float* pdwh = dwh->typed_data();
  float* pdwx = dwx->typed_data();
  float* pdb = db->typed_data();
  for (int64_t j = 0; j < J; ++j) {
    for (int64_t k = 0; k < H; ++k) pdwh[k * J + j] = static_cast<float>(total[k * J + j]);
    pdwx[j] = static_cast<float>(total[H * J + j]);
    pdwx[J + j] = static_cast<float>(total[(H + 1) * J + j]);
    pdb[j] = static_cast<float>(total[(H + 2) * J + j]);
  }
  for (int64_t k = 0; k < H; ++k) dwo->typed_data()[k] = static_cast<float>(total[(H + 3) * J + k]);
  dbo->typed_data()[0] = static_cast<float>(total[(H + 3) * J + H]);
  return ffi::Error::Success();
}

}  // namespace

// wx [2, 4H], wh [H, 4H], b [4H], wo [H], bo [], feats [T, 2, P] -> y [P]
XLA_FFI_DEFINE_HANDLER_SYMBOL(MetanetLstmFwd, LstmFwd,
                              metanet::F32Rets<1>(metanet::F32Args<6>(metanet::PoolBinding())));

// the forward's six, dy [P]; need_dfeat -> dwx, dwh, db, dwo, dbo, dfeat [T, 2, P]
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    MetanetLstmBwd, LstmBwd,
    metanet::F32Rets<6>(
        metanet::F32Args<7>(metanet::PoolBinding()).Attr<bool>("need_dfeat")));
