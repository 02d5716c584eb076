// CPU kernels of the fused MLP for thin nets (fused_mlp_thin.h says which nets).
//
// Such a net does a few multiply-adds per hidden value (2-100-3: 5 forward, 10 backward), too
// few to pay the layer loops' costs per value (fused_mlp.cpp): each block's activations stored
// and read back, horizontal sums for the few-output layer, weight-gradient tiles of 2 or 3
// rows. Here a block's rows lie in the SIMD lanes (its input and output gradient transposed,
// W rows per vector) and the hidden units run in the loop:
//   forward, per pair of vectors of rows: for each unit k, z = x W1[k]^T + b1[k], a = act(z),
//     y += a W2[:, k] (y in registers); then y += b2.
//   backward, per block of rows, for each unit k and each vector of the block: z and a
//     recomputed, gW2[:, k] += g a, da = g W2[:, k], dz = act'(z) da, gb1[k] += dz,
//     gW1[k] += dz x, grad_x += dz W1[k]; the weight and bias gradients summed per lane in
//     registers, added to the chunk's lane sums once per unit and block.
// Nothing of the hidden layer is stored. Sums over the inputs, the outputs and the units run in
// order from the first, as the layer loops add them (z, dz and grad_x are bitwise theirs); the
// lane sums are added lane by lane, then chunk by chunk, the chunks fixed by the shapes:
// bitwise reproducible whatever the thread count.
#include "fused_mlp_thin.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu_common.h"
#include "fused_mlp_split.h"
#include "gemm.h"
#include "vec_act.h"

namespace fastops {
namespace cpu {
namespace {

using at::Tensor;
using gemm::ceil_div;
using gemm::round_up;
using gemm::Scratch;

constexpr int64_t kMaxEnds = 4;  // inputs, and outputs, of a thin net
// Rows per block, a multiple of 2 W for every W: a block's x^T, g^T and grad_x^T (at most 12
// rows of values, 12 KB of float) stay in L1 while every unit passes over them.
constexpr int64_t kBlockRows = 256;

// The hidden activations of the path: relu and leaky_relu, for which act(z) = act'(z) z, so one
// mask gives the backward both a and dz. (Each more costs a compilation of every kernel for
// every pair of ends, dtype and ISA.)
template <class F>
constexpr bool kThinAct = std::is_same_v<F, Relu> || std::is_same_v<F, LeakyRelu>;

// The net, its weights packed per hidden unit k: S = K0 + 1 + NL values, W1[k][0..K0), b1[k]
// (0 without biases), W2[0..NL)[k]; then b2 (NL values). Each value fills W lanes: the loops
// read it as a whole vector (broadcasts built in them were assembled lane by lane, in
// registers the loops need).
template <class T>
struct ThinNet {
  int64_t N, H;
  const T* x;
  int64_t xs0, xs1;
  std::vector<T> units;
};

template <class T>
ThinNet<T> make_thin_net(const FusedMlpDims& d, const Tensor& input, at::TensorList weights,
                         const std::vector<Tensor>& biases, int W) {
  ThinNet<T> net;
  net.N = d.N;
  net.H = d.hidden;
  net.x = input.const_data_ptr<T>();
  net.xs0 = input.stride(0);
  net.xs1 = input.stride(1);
  const int64_t K0 = d.in_features, NL = d.out_features, H = d.hidden, S = K0 + 1 + NL;
  net.units.assign((H * S + NL) * W, T(0));
  const auto put = [&](int64_t e, T v) { std::fill_n(net.units.data() + e * W, W, v); };
  const T* w1 = weights[0].const_data_ptr<T>();
  const T* w2 = weights[1].const_data_ptr<T>();
  const int64_t a0 = weights[0].stride(0), a1 = weights[0].stride(1);
  const int64_t c0 = weights[1].stride(0), c1 = weights[1].stride(1);
  for (int64_t k = 0; k < H; ++k) {
    for (int64_t i = 0; i < K0; ++i) put(k * S + i, w1[k * a0 + i * a1]);
    if (!biases.empty()) put(k * S + K0, biases[0].const_data_ptr<T>()[k * biases[0].stride(0)]);
    for (int64_t j = 0; j < NL; ++j) put(k * S + K0 + 1 + j, w2[j * c0 + k * c1]);
  }
  if (!biases.empty())
    for (int64_t j = 0; j < NL; ++j)
      put(H * S + j, biases[1].const_data_ptr<T>()[j * biases[1].stride(0)]);
  return net;
}

// dst[i * ld + r] = src[r * rs + i * cs] for rows r < n and columns i < m, zeros for the rows
// n <= r < npad.
template <class T>
FO_ALWAYS_INLINE void rows_to_lanes(const T* src, int64_t rs, int64_t cs, int64_t n,
                                    int64_t npad, int m, T* dst, int64_t ld) {
  for (int i = 0; i < m; ++i) {
    T* o = dst + i * ld;
    const T* s = src + i * cs;
    for (int64_t r = 0; r < n; ++r) o[r] = s[r * rs];
    for (int64_t r = n; r < npad; ++r) o[r] = T(0);
  }
}

// Hidden unit k's S values in lanes at p: W1[k] (K0 vectors), b1[k], W2[:, k] (NL vectors).
template <class T, int W, int K0, int NL>
struct UnitWeights {
  using L = vec::Lanes<T, W>;
  typename L::V w[K0], b, u[NL];
  FO_ALWAYS_INLINE explicit UnitWeights(const T* p) {
#pragma GCC unroll 4
    for (int i = 0; i < K0; ++i) w[i] = L::load(p + i * W);
    b = L::load(p + K0 * W);
#pragma GCC unroll 4
    for (int j = 0; j < NL; ++j) u[j] = L::load(p + (K0 + 1 + j) * W);
  }
};

// ---- forward ----------------------------------------------------------------------------------

// A pair of vectors of rows (two independent chains per output, which hide the latency of its
// multiply-adds): x^T at x (row stride ld), y^T into y.
template <class T, int W, int K0, int NL, class F>
FO_ALWAYS_INLINE void forward_pair(const F& f, int64_t H, const T* units, const T* x, int64_t ld,
                                   T* y) {
  using L = vec::Lanes<T, W>;
  using V = typename L::V;
  constexpr int S = K0 + 1 + NL, RV = 2;
  V xv[RV][K0], acc[RV][NL];
#pragma GCC unroll 4
  for (int r = 0; r < RV; ++r) {
#pragma GCC unroll 4
    for (int i = 0; i < K0; ++i) xv[r][i] = L::load(x + i * ld + r * W);
#pragma GCC unroll 4
    for (int j = 0; j < NL; ++j) acc[r][j] = V{};
  }
  for (int64_t k = 0; k < H; ++k) {
    const UnitWeights<T, W, K0, NL> uw(units + k * S * W);
    const auto& w = uw.w;
    const auto& b = uw.b;
    const auto& u = uw.u;
#pragma GCC unroll 4
    for (int r = 0; r < RV; ++r) {
      V s = V{};  // (from zero as in the layer loops, where no product is contracted away)
#pragma GCC unroll 4
      for (int i = 0; i < K0; ++i) s += xv[r][i] * w[i];
      const V a = f.forward(L(s + b)).v;
#pragma GCC unroll 4
      for (int j = 0; j < NL; ++j) acc[r][j] += a * u[j];
    }
  }
  const T* b2 = units + H * S * W;
#pragma GCC unroll 4
  for (int r = 0; r < RV; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NL; ++j) L::store(y + j * ld + r * W, acc[r][j] + L::load(b2 + j * W));
}

template <class T, Isa I, int K0, int NL, class F>
void forward_net(const F& f0, const ThinNet<T>& net, T* y) {
  constexpr int W = gemm::Config<T, I>::W;
  const int64_t N = net.N, H = net.H;
  const T* units = net.units.data();
  const int64_t blocks = ceil_div(N, kBlockRows);
  const bool serial = static_cast<double>(N) * static_cast<double>(H * (K0 + NL)) < kSerialWork;
  const auto run = [&](int64_t b0, int64_t b1) {
    thread_local Scratch scratch;
    T* xt = static_cast<T*>(scratch.get(sizeof(T) * (K0 + NL) * kBlockRows));
    T* yt = xt + K0 * kBlockRows;
    gemm::run_isa<I>([&]() FO_INLINE_LAMBDA {
      const F f = f0;  // (a local copy: its parameters stay in registers)
      for (int64_t bi = b0; bi < b1; ++bi) {
        const int64_t r0 = bi * kBlockRows, n = std::min(kBlockRows, N - r0);
        // whole pairs of vectors (kBlockRows is a multiple of 2 W), zero rows past n
        const int64_t nv = round_up(ceil_div(n, W), 2);
        rows_to_lanes(net.x + r0 * net.xs0, net.xs0, net.xs1, n, nv * W, K0, xt, kBlockRows);
        for (int64_t v = 0; v < nv; v += 2)
          forward_pair<T, W, K0, NL>(f, H, units, xt + v * W, kBlockRows, yt + v * W);
        T* yo = y + r0 * NL;
        for (int64_t r = 0; r < n; ++r)
#pragma GCC unroll 4
          for (int j = 0; j < NL; ++j) yo[r * NL + j] = yt[j * kBlockRows + r];
      }
    });
  };
  if (serial) run(0, blocks);
  else at::parallel_for(0, blocks, 1, run);
}

// ---- backward ---------------------------------------------------------------------------------

// Hidden unit k (its S values at p) over the nv vectors of a block: x^T, g^T at xt, dt (row
// stride ld); grad_x^T accumulated at gxt when want_x; the unit's S lane sums (gW1[k], gb1[k],
// gW2[:, k]) added to `lanes`. The last vector's lanes from `valid` on are padding, whose
// gradients are zeroed (a padded row's act(b1) could be infinite, and 0 * inf is NaN).
template <class T, int W, int K0, int NL, class F>
FO_ALWAYS_INLINE void backward_unit(const F& f, const T* p, const T* xt, const T* dt, T* gxt,
                                    int64_t ld, int64_t nv, int valid, bool want_x, T* lanes) {
  using L = vec::Lanes<T, W>;
  using V = typename L::V;
  using M = typename L::M;
  const UnitWeights<T, W, K0, NL> uw(p);
  const auto& w = uw.w;
  const auto& b = uw.b;
  const auto& u = uw.u;
  V gw[K0], gb = V{}, gu[NL];
#pragma GCC unroll 4
  for (int i = 0; i < K0; ++i) gw[i] = V{};
#pragma GCC unroll 4
  for (int j = 0; j < NL; ++j) gu[j] = V{};
  const auto step = [&](int64_t v, auto tail) FO_INLINE_LAMBDA {
    V x[K0], d[NL];
#pragma GCC unroll 4
    for (int i = 0; i < K0; ++i) x[i] = L::load(xt + i * ld + v * W);
#pragma GCC unroll 4
    for (int j = 0; j < NL; ++j) d[j] = L::load(dt + j * ld + v * W);
    V s = V{}, da = V{};  // (from zero, as in forward_pair)
#pragma GCC unroll 4
    for (int i = 0; i < K0; ++i) s += x[i] * w[i];
    const L z(s + b);
#pragma GCC unroll 4
    for (int j = 0; j < NL; ++j) da += d[j] * u[j];
    const auto m = f.mask(z);
    V a = f.backward_masked(m, z).v;  // act(z), as kThinAct allows
    V dz = f.backward_masked(m, L(da)).v;
    if constexpr (decltype(tail)::value) {
      M lane;
#pragma GCC unroll 16
      for (int l = 0; l < W; ++l) lane[l] = l;
      const M keep = lane < valid;
      a = keep ? a : V{};
      dz = keep ? dz : V{};
    }
#pragma GCC unroll 4
    for (int j = 0; j < NL; ++j) gu[j] += d[j] * a;
    gb += dz;
#pragma GCC unroll 4
    for (int i = 0; i < K0; ++i) gw[i] += dz * x[i];
    if (want_x)
#pragma GCC unroll 4
      for (int i = 0; i < K0; ++i) {
        T* g = gxt + i * ld + v * W;
        L::store(g, L::load(g) + dz * w[i]);
      }
  };
  const int64_t full = valid == W ? nv : nv - 1;
  for (int64_t v = 0; v < full; ++v) step(v, std::false_type{});
  if (full < nv) step(full, std::true_type{});
#pragma GCC unroll 4
  for (int i = 0; i < K0; ++i) L::store(lanes + i * W, L::load(lanes + i * W) + gw[i]);
  L::store(lanes + K0 * W, L::load(lanes + K0 * W) + gb);
#pragma GCC unroll 4
  for (int j = 0; j < NL; ++j) {
    T* o = lanes + (K0 + 1 + j) * W;
    L::store(o, L::load(o) + gu[j]);
  }
}

template <class T, Isa I, int K0, int NL, class F>
void backward_net(const F& f0, const ThinNet<T>& net, const T* g, int64_t gs0, int64_t gs1,
                  T* grad_x, T* gw1, T* gb1, T* gw2, T* gb2) {
  constexpr int W = gemm::Config<T, I>::W;
  constexpr int S = K0 + 1 + NL;
  const int64_t N = net.N, H = net.H;
  const T* units = net.units.data();
  const int64_t blocks = ceil_div(N, kBlockRows);
  const bool serial = static_cast<double>(N) * static_cast<double>(H * (K0 + NL)) < kSerialWork;
  const int64_t chunks = serial ? 1 : std::min(blocks, kMaxChunks);
  // per chunk: the lane sums of every unit's S values, then of gb2 (NL vectors)
  const int64_t acc_size = (H * S + NL) * W;
  thread_local Scratch acc_scratch;
  T* accs = static_cast<T*>(acc_scratch.get(sizeof(T) * acc_size * chunks));
  std::fill(accs, accs + acc_size * chunks, T(0));

  const auto run = [&](int64_t c0, int64_t c1) {
    thread_local Scratch scratch;
    T* xt = static_cast<T*>(scratch.get(sizeof(T) * (2 * K0 + NL) * kBlockRows));
    T* dt = xt + K0 * kBlockRows;
    T* gxt = dt + NL * kBlockRows;
    gemm::run_isa<I>([&]() FO_INLINE_LAMBDA {
      using L = vec::Lanes<T, W>;
      const F f = f0;
      for (int64_t c = c0; c < c1; ++c) {
        T* acc = accs + c * acc_size;
        for (int64_t bi = c * blocks / chunks; bi < (c + 1) * blocks / chunks; ++bi) {
          const int64_t r0 = bi * kBlockRows, n = std::min(kBlockRows, N - r0);
          const int64_t nv = ceil_div(n, W);
          const int valid = static_cast<int>(n - (nv - 1) * W);
          rows_to_lanes(net.x + r0 * net.xs0, net.xs0, net.xs1, n, nv * W, K0, xt, kBlockRows);
          rows_to_lanes(g + r0 * gs0, gs0, gs1, n, nv * W, NL, dt, kBlockRows);
          if (grad_x) std::fill(gxt, gxt + K0 * kBlockRows, T(0));
          // gb2: the output gradient's lanes (zeros in the padding)
#pragma GCC unroll 4
          for (int j = 0; j < NL; ++j) {
            T* o = acc + (H * S + j) * W;
            typename L::V s = L::load(o);
            for (int64_t v = 0; v < nv; ++v) s += L::load(dt + j * kBlockRows + v * W);
            L::store(o, s);
          }
          for (int64_t k = 0; k < H; ++k)
            backward_unit<T, W, K0, NL>(f, units + k * S * W, xt, dt, gxt, kBlockRows, nv, valid,
                                        grad_x != nullptr, acc + k * S * W);
          if (grad_x) {
            T* go = grad_x + r0 * K0;
            for (int64_t r = 0; r < n; ++r)
#pragma GCC unroll 4
              for (int i = 0; i < K0; ++i) go[r * K0 + i] = gxt[i * kBlockRows + r];
          }
        }
      }
    });
  };
  if (chunks == 1) run(0, 1);
  else at::parallel_for(0, chunks, 1, run);

  // value e's sum: its lanes in order within each chunk, the chunks in order
  const auto total = [&](int64_t e) {
    T s = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      const T* l = accs + c * acc_size + e * W;
      T part = l[0];
      for (int i = 1; i < W; ++i) part += l[i];
      s = c == 0 ? part : s + part;
    }
    return s;
  };
  for (int64_t k = 0; k < H; ++k) {
    if (gw1)
      for (int i = 0; i < K0; ++i) gw1[k * K0 + i] = total(k * S + i);
    if (gb1) gb1[k] = total(k * S + K0);
    if (gw2)
      for (int j = 0; j < NL; ++j) gw2[j * H + k] = total(k * S + K0 + 1 + j);
  }
  if (gb2)
    for (int j = 0; j < NL; ++j) gb2[j] = total(H * S + j);
}

// ---- dispatch ---------------------------------------------------------------------------------

// fn(std::integral_constant<int, n>) for 1 <= n <= kMaxEnds
template <class Fn>
void with_ends(int64_t n, const Fn& fn) {
  static_assert(kMaxEnds == 4, "one case per count");
  switch (n) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    default: return fn(std::integral_constant<int, 4>{});
  }
}

template <class Fn>
void with_isa(const Fn& fn) {
  if (cpu_isa() == Isa::avx512) fn(std::integral_constant<Isa, Isa::avx512>{});
  else fn(std::integral_constant<Isa, Isa::avx2>{});
}

// fn(T*, isa, K0, NL, functor) with the dtype, ISA, ends and activation of a thin net as
// compile-time types.
template <class Fn>
void with_thin_net(const FusedMlpDims& d, at::ScalarType st, const std::string& activation,
                   const Fn& fn) {
  const auto typed = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    with_fused_mlp_activation<T>(activation, [&](auto f) {
      if constexpr (kThinAct<decltype(f)>) {
        with_isa([&](auto isa) {
          with_ends(d.in_features, [&](auto k0) {
            with_ends(d.out_features, [&](auto nl) { fn(tag, isa, k0, nl, f); });
          });
        });
      }
    });
  };
  if (st == at::kDouble) typed(static_cast<double*>(nullptr));
  else typed(static_cast<float*>(nullptr));
}

}  // namespace

bool fused_mlp_thin_applies(const FusedMlpDims& d, const Tensor& input,
                            const std::string& activation, const std::string& output_activation) {
  const auto st = input.scalar_type();
  if (cpu_isa() == Isa::baseline) return false;
  if (!input.is_cpu() || (st != at::kFloat && st != at::kDouble) || d.layers != 2) return false;
  if (d.in_features < 1 || d.in_features > kMaxEnds || d.out_features < 1 ||
      d.out_features > kMaxEnds || d.hidden < 1 || output_activation != "none")
    return false;
  bool thin_act = false;
  with_fused_mlp_activation<float>(activation, [&](auto f) { thin_act = kThinAct<decltype(f)>; });
  return thin_act;
}

void fused_mlp_thin_forward(const FusedMlpDims& d, const Tensor& input, at::TensorList weights,
                            const std::vector<Tensor>& biases, const std::string& activation,
                            Tensor& y) {
  with_thin_net(d, input.scalar_type(), activation, [&](auto* tag, auto isa, auto k0, auto nl,
                                                        const auto& f) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const ThinNet<T> net =
        make_thin_net<T>(d, input, weights, biases, gemm::Config<T, decltype(isa)::value>::W);
    forward_net<T, decltype(isa)::value, decltype(k0)::value, decltype(nl)::value>(
        f, net, y.mutable_data_ptr<T>());
  });
}

void fused_mlp_thin_backward(const FusedMlpDims& d, const Tensor& grad_output,
                             const Tensor& input, at::TensorList weights,
                             const std::vector<Tensor>& biases, const std::string& activation,
                             Tensor& grad_input, std::vector<Tensor>& grad_weights,
                             std::vector<Tensor>& grad_biases) {
  with_thin_net(d, input.scalar_type(), activation, [&](auto* tag, auto isa, auto k0, auto nl,
                                                        const auto& f) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const ThinNet<T> net =
        make_thin_net<T>(d, input, weights, biases, gemm::Config<T, decltype(isa)::value>::W);
    const auto ptr = [](std::vector<Tensor>& v, size_t l) {
      return v.empty() ? nullptr : v[l].mutable_data_ptr<T>();
    };
    backward_net<T, decltype(isa)::value, decltype(k0)::value, decltype(nl)::value>(
        f, net, grad_output.const_data_ptr<T>(), grad_output.stride(0), grad_output.stride(1),
        grad_input.defined() ? grad_input.mutable_data_ptr<T>() : nullptr, ptr(grad_weights, 0),
        ptr(grad_biases, 0), ptr(grad_weights, 1), ptr(grad_biases, 1));
  });
}

}  // namespace cpu
}  // namespace fastops
