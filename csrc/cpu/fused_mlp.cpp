// CPU kernels of the fully fused MLP (fused_mlp_checks.h describes the op). Thin nets, one
// hidden layer between 1-4 inputs and 1-4 outputs, take their own kernels (fused_mlp_thin.h).
//
// The rows are cut into blocks of at most kBlockPanels * MR rows. Each thread task walks one
// block through every layer with the block's activations in thread-local buffers (L1/L2) and
// the weights packed once per call into the NR-wide panels of the tile kernel below (the
// register-blocked MR x NR tile of gemm.h; its A operand, the activations, is broadcast from
// row-major buffers, so only the weights are packed):
//
//   forward, layer l:  tile = a_{l-1} W_l^T, then the epilogue: z = tile + b (rounded to the
//                      dtype), saved to `hidden` / `out_preact` when asked, a = act(z) written
//                      to the block's buffer, the next layer's A operand (or to the output);
//                      a layer of a few outputs takes its tile as dot products (dot_rows.h).
//   backward, per block, from the last layer down:
//                      delta_{L-1} = grad_output * out_act'(z_{L-1})
//                      grad_b_l += sum_rows delta_l, grad_W_l += delta_l^T a_{l-1}
//                        (a_{l-1} = act(z_{l-1}) recomputed from `hidden`, or the input;
//                        a narrow first layer's z_0 from the input, fused_mlp_recomputes_z0)
//                      delta_{l-1} = (delta_l W_l) * act'(z_{l-1}) in the epilogue of that tile
//                        (for l = 0: grad_input = delta_0 W_0).
//
// The weight and bias gradients accumulate per chunk of blocks, chunks fixed by the shapes
// alone, and the chunks are summed in order: bitwise reproducible whatever the thread count.
// 16-bit dtypes compute in float and round to the dtype wherever nn.Sequential of Linear and
// activation modules would hold a 16-bit tensor (z, a, and each layer's gradients).
//
// The activation epilogues are small functions per (dtype, activation, ISA), called through a
// pointer once per tile or block: the layer loops are compiled once per dtype and ISA, not once
// per pair of activations.
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../fused_mlp_checks.h"
#include "cpu_common.h"
#include "dot_rows.h"
#include "fused_mlp_split.h"
#include "fused_mlp_thin.h"
#include "gemm.h"
#include "vec_act.h"

namespace fastops {
namespace cpu {
namespace {

using at::Tensor;
using gemm::ceil_div;
using gemm::round_up;
using gemm::Scratch;

// Row blocks hold up to this many MR-row panels: with MR = 12 (AVX-512 float) 120 rows, whose
// activations at width 64 (30 KB) stay in L1/L2 next to the layer's packed weights (16 KB).
constexpr int64_t kBlockPanels = 10;
// A thin net (at most kThinNetMacs multiply-adds per row per unit of its widest layer) takes
// blocks of kThinPanels panels (net_blocking).
constexpr int64_t kThinNetMacs = 16, kThinPanels = 2;

// A compute-type value rounded to the storage type and back (the identity for float, double).
template <class T, class Acc>
FO_ALWAYS_INLINE Acc round_to(Acc v) {
  if constexpr (std::is_same_v<T, Acc>) return v;
  else return static_cast<Acc>(static_cast<T>(v));
}

// c (MR x NR, leading dimension ldc) = (accumulate ? c : 0) + sum_k A(i, k) B(k, j) with
// B(k, j) = b[k * ldb + j] and A(i, k) = a[i * lda + k] (kRowA: A row-major, as the
// activations and deltas are kept) or a[k * lda + i] (A transposed: delta^T in the weight
// gradient): MR x NV vector accumulators in registers, kc rank-1 updates, A broadcast from
// memory (so it needs no packing).
template <class Acc, int W, int MR, int NV, bool kRowA>
FO_ALWAYS_INLINE void tile_kernel(int64_t kc, const Acc* __restrict a, int64_t lda,
                                  const Acc* __restrict b, int64_t ldb, Acc* c, int64_t ldc,
                                  bool accumulate) {
  using V = typename gemm::VecT<Acc, W>::type;
  using VU = typename gemm::VecT<Acc, W>::unaligned;
  V acc[MR][NV];
  if (accumulate) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = *reinterpret_cast<const VU*>(c + i * ldc + v * W);
  } else {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = V{};
  }
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    V bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = *reinterpret_cast<const VU*>(b + k * ldb + v * W);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const V av = (kRowA ? a[i * lda + k] : a[k * lda + i]) - V{};  // broadcast
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] += av * bv[v];
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) *reinterpret_cast<VU*>(c + i * ldc + v * W) = acc[i][v];
}

// ---- activation epilogues ---------------------------------------------------------------------

// A layer of at most kSmallK inputs (a 2-D point, a 3-D position) costs a few multiply-adds per
// output, less than storing a tile and reading it back: its epilogue computes the sums itself.
constexpr int64_t kSmallK = 4;

FO_ALWAYS_INLINE bool small_k(int64_t K) { return K >= 1 && K <= kSmallK; }

// The sums of an epilogue's rows: from a finished tile (row stride ldt), or, when tile is null,
// of a small-K product computed on the spot: row i, column j = sum_{k < kdim} x[i ldx + k]
// w[k ldw + j], the k in order from zero as tile_kernel adds them (so bitwise its sums).
template <class Acc>
struct TileSums {
  const Acc* tile = nullptr;
  int ldt = 0;
  const Acc* x = nullptr;
  int64_t ldx = 0;
  int kdim = 0;
  const Acc* w = nullptr;
  int ldw = 0;
};

// fn(std::integral_constant<int, K>): K the small-K product's kdim, or 0 for a tile's sums.
template <bool kSmall, class Fn>
FO_ALWAYS_INLINE void with_sums_k(int kdim, const Fn& fn) {
  static_assert(kSmallK == 4, "one case per K");
  if constexpr (!kSmall) {
    fn(std::integral_constant<int, 0>{});
  } else {
    switch (kdim) {
      case 1: fn(std::integral_constant<int, 1>{}); break;
      case 2: fn(std::integral_constant<int, 2>{}); break;
      case 3: fn(std::integral_constant<int, 3>{}); break;
      default: fn(std::integral_constant<int, 4>{}); break;
    }
  }
}

// The small-K product's row i, columns j < NC, into buf (K known at compile time: the sums
// stay in registers across the k).
template <int NC, int K, class Acc>
FO_ALWAYS_INLINE void small_k_row(const TileSums<Acc>& s, int i, Acc* buf) {
  const Acc* x = s.x + i * s.ldx;
  for (int j = 0; j < NC; ++j) buf[j] = Acc(0);
#pragma GCC unroll 4
  for (int k = 0; k < K; ++k) {
    const Acc xk = x[k];
    const Acc* w = s.w + static_cast<int64_t>(k) * s.ldw;
    for (int j = 0; j < NC; ++j) buf[j] += xk * w[j];
  }
}

template <int NC, class Acc>
FO_ALWAYS_INLINE void small_k_row(const TileSums<Acc>& s, int i, Acc* buf) {
  with_sums_k<true>(s.kdim, [&](auto k) FO_INLINE_LAMBDA {
    small_k_row<NC, decltype(k)::value>(s, i, buf);
  });
}

// Row i's sums: the tile's row, or (kSmall) the small-K product's row into buf. With a
// run-time width (NC = 0) the product runs over its whole panel, of width ldw = NR / 2 or NR
// with zeros past the real columns: loops of a run-time length would keep the sums in memory.
template <int NC, int NR, bool kSmall, class Acc>
FO_ALWAYS_INLINE const Acc* row_sums(const TileSums<Acc>& s, int i, Acc* buf) {
  if constexpr (!kSmall) {
    return s.tile + static_cast<int64_t>(i) * s.ldt;
  } else {
    if constexpr (NC > 0) small_k_row<NC>(s, i, buf);
    else if (s.ldw == NR) small_k_row<NR>(s, i, buf);
    else small_k_row<NR / 2>(s, i, buf);
    return buf;
  }
}

// A finished forward tile: rows i < mr, columns j < nc of its sums.
template <class T>
struct FwdTile {
  using Acc = acc_t<T>;
  TileSums<Acc> sums;
  int mr, nc;
  const Acc* bias;  // at the tile's first column
  T* z;             // the pre-activation to save (row stride ldz), or null
  int64_t ldz;
  Acc* a;           // the activation a = act(z), for the next layer (row stride lda), or null
  int64_t lda;
  T* y;             // the output (row stride ldy), or null
  int64_t ldy;
};

// A finished backward tile of delta_l W_l (the gradient by a_{l-1}): delta_{l-1} =
// (tile rounded) * act'(z) into d (row stride ldd).
template <class T>
struct BwdTile {
  using Acc = acc_t<T>;
  TileSums<Acc> sums;
  int mr, nc;
  const T* z;  // z_{l-1} at the tile (row stride ldz)
  int64_t ldz;
  Acc* d;
  int64_t ldd;
};

// delta of the output layer from grad_output (any strides) and z (row stride ldz, unused for
// 'none'), for rows r < rows and columns j < n, into d (row stride ldd).
template <class T>
struct OutDelta {
  using Acc = acc_t<T>;
  const T* g;
  int64_t gs0, gs1;
  const T* z;
  int64_t ldz;
  int64_t rows, n;
  Acc* d;
  int64_t ldd;
};

// a = act(z) for rows r < rows, columns j < n: z (row stride ldz) into a (row stride lda).
template <class T>
struct ActRows {
  using Acc = acc_t<T>;
  const T* z;
  int64_t ldz, rows, n;
  Acc* a;
  int64_t lda;
};

// ---- the epilogues in vector code ----
// A float or double tile of known width NC (whole vectors of W = NR / 2 lanes) whose activation
// runs on lanes (vec_act.h) keeps its rows in vector registers; the others take the loops below.
template <class T, class F, int NC>
constexpr bool kVectorRows = NC > 0 && std::is_same_v<T, acc_t<T>> &&
                             (std::is_same_v<F, IdentityAct> || vec::kPiecewiseLinear<F>);

// The small-K product's weights, NV vectors per k, loaded once per tile (none for K = 0).
template <int W, int NV, int K, class Acc>
struct SumWeights {
  using L = vec::Lanes<Acc, W>;
  typename L::V w[K > 0 ? K : 1][NV];
  FO_ALWAYS_INLINE explicit SumWeights(const TileSums<Acc>& s) {
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) w[k][v] = L::load(s.w + static_cast<int64_t>(k) * s.ldw + v * W);
  }
};

// Row i's sums in NV vectors: the tile's row, or the small-K product's (k in order from zero,
// as tile_kernel adds them).
template <int W, int NV, int K, class Acc>
FO_ALWAYS_INLINE void row_vectors(const TileSums<Acc>& s, const SumWeights<W, NV, K, Acc>& sw,
                                  int i, typename vec::Lanes<Acc, W>::V (&t)[NV]) {
  using L = vec::Lanes<Acc, W>;
  if constexpr (K == 0) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) t[v] = L::load(s.tile + static_cast<int64_t>(i) * s.ldt + v * W);
  } else {
    const Acc* x = s.x + i * s.ldx;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) t[v] = typename L::V{};
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) {
      const typename L::V xk = L::splat(x[k]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) t[v] += xk * sw.w[k][v];
    }
  }
}

template <class T, class F, bool kZ, bool kA, bool kY, int NC, int W, int K>
FO_ALWAYS_INLINE void fwd_rows_vec(const FwdTile<T>& e, const F& f) {
  using L = vec::Lanes<T, W>;
  constexpr int NV = NC / W;
  const SumWeights<W, NV, K, T> sw(e.sums);
  typename L::V b[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) b[v] = L::load(e.bias + v * W);
  // (locals: the vector stores may alias anything, e's fields too, which would be reloaded)
  const TileSums<T> s = e.sums;
  const int mr = e.mr;
  T* zo = e.z;
  T* ao = e.a;
  T* yo = e.y;
  const int64_t ldz = e.ldz, lda = e.lda, ldy = e.ldy;
  for (int i = 0; i < mr; ++i) {
    typename L::V t[NV];
    row_vectors(s, sw, i, t);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const typename L::V z = t[v] + b[v];
      const typename L::V a = f.forward(L(z)).v;
      if constexpr (kZ) L::store(zo + i * ldz + v * W, z);
      if constexpr (kA) L::store(ao + i * lda + v * W, a);
      if constexpr (kY) L::store(yo + i * ldy + v * W, a);
    }
  }
}

template <class T, class F, int NC, int W, int K>
FO_ALWAYS_INLINE void bwd_rows_vec(const BwdTile<T>& e, const F& f) {
  using L = vec::Lanes<T, W>;
  constexpr int NV = NC / W;
  const SumWeights<W, NV, K, T> sw(e.sums);
  const TileSums<T> s = e.sums;  // (locals, as in fwd_rows_vec)
  const int mr = e.mr;
  const T* zi = e.z;
  T* d = e.d;
  const int64_t ldz = e.ldz, ldd = e.ldd;
  for (int i = 0; i < mr; ++i) {
    typename L::V t[NV];
    row_vectors(s, sw, i, t);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const L z(L::load(zi + i * ldz + v * W));
      L::store(d + i * ldd + v * W, f.backward(z, L(t[v])).v);
    }
  }
}

// ---- the epilogues in scalar loops ----
// One loop per row with every store in it: copies out of a local row would become memcpy calls.
// NC > 0: the tile's width, known at compile time (whole vectors, no loop or tail to run); at
// most NR columns.
template <class T, class F, bool kZ, bool kA, bool kY, int NC, int NR, bool kSmall>
FO_ALWAYS_INLINE void fwd_rows(const FwdTile<T>& e, const F& f) {
  using Acc = acc_t<T>;
  if constexpr (kVectorRows<T, F, NC>) {
    with_sums_k<kSmall>(e.sums.kdim, [&](auto k) FO_INLINE_LAMBDA {
      fwd_rows_vec<T, F, kZ, kA, kY, NC, NR / 2, decltype(k)::value>(e, f);
    });
    return;
  }
  const int nc = NC > 0 ? NC : e.nc;
  Acc buf[NR];
  for (int i = 0; i < e.mr; ++i) {
    const Acc* t = row_sums<NC, NR, kSmall>(e.sums, i, buf);
    T* zo = kZ ? e.z + i * e.ldz : nullptr;
    Acc* ao = kA ? e.a + i * e.lda : nullptr;
    T* yo = kY ? e.y + i * e.ldy : nullptr;
    for (int j = 0; j < nc; ++j) {
      const Acc z = round_to<T>(t[j] + e.bias[j]);
      const Acc a = round_to<T>(static_cast<Acc>(f.forward(z)));
      if constexpr (kZ) zo[j] = static_cast<T>(z);
      if constexpr (kA) ao[j] = a;
      if constexpr (kY) yo[j] = static_cast<T>(a);
    }
  }
}

// A hidden layer's tile writes a (and z when saved), the output layer's y (and z when saved);
// small-K products only run in hidden layers (forward_layer).
template <class T, class F, int NC, int NR, bool kSmall>
FO_ALWAYS_INLINE void fwd_rows_of(const FwdTile<T>& e, const F& f) {
  const bool z = e.z != nullptr;
  if constexpr (kSmall) {
    if (z) fwd_rows<T, F, true, true, false, NC, NR, kSmall>(e, f);
    else fwd_rows<T, F, false, true, false, NC, NR, kSmall>(e, f);
  } else if (e.a != nullptr) {
    if (z) fwd_rows<T, F, true, true, false, NC, NR, kSmall>(e, f);
    else fwd_rows<T, F, false, true, false, NC, NR, kSmall>(e, f);
  } else if (z) {
    fwd_rows<T, F, true, false, true, NC, NR, kSmall>(e, f);
  } else {
    fwd_rows<T, F, false, false, true, NC, NR, kSmall>(e, f);
  }
}

// Full tiles (NR columns, the common case), and one-vector tiles where they run in vector code,
// run with their width known at compile time; the sums from a tile, or from a small-K product
// (tile null).
template <int NR, class T, class F>
FO_ALWAYS_INLINE void fwd_tile(const FwdTile<T>& e, const F& f) {
  const bool small = e.sums.tile == nullptr;
  if (e.nc == NR) {
    if (small) fwd_rows_of<T, F, NR, NR, true>(e, f);
    else fwd_rows_of<T, F, NR, NR, false>(e, f);
  } else if (kVectorRows<T, F, NR / 2> && e.nc == NR / 2) {
    if (small) fwd_rows_of<T, F, NR / 2, NR, true>(e, f);
    else fwd_rows_of<T, F, NR / 2, NR, false>(e, f);
  } else {
    if (small) fwd_rows_of<T, F, 0, NR, true>(e, f);
    else fwd_rows_of<T, F, 0, NR, false>(e, f);
  }
}

template <int NC, int NR, bool kSmall, class T, class F>
FO_ALWAYS_INLINE void bwd_rows(const BwdTile<T>& e, const F& f) {
  using Acc = acc_t<T>;
  if constexpr (kVectorRows<T, F, NC>) {
    with_sums_k<kSmall>(e.sums.kdim, [&](auto k) FO_INLINE_LAMBDA {
      bwd_rows_vec<T, F, NC, NR / 2, decltype(k)::value>(e, f);
    });
    return;
  }
  const int nc = NC > 0 ? NC : e.nc;
  Acc buf[NR];
  for (int i = 0; i < e.mr; ++i) {
    const Acc* t = row_sums<NC, NR, kSmall>(e.sums, i, buf);
    const T* z = e.z + i * e.ldz;
    Acc* d = e.d + i * e.ldd;
    for (int j = 0; j < nc; ++j)
      d[j] = round_to<T>(
          static_cast<Acc>(f.backward(static_cast<Acc>(z[j]), round_to<T>(t[j]))));
  }
}

template <int NR, class T, class F>
FO_ALWAYS_INLINE void bwd_tile(const BwdTile<T>& e, const F& f) {
  const bool small = e.sums.tile == nullptr;
  if (e.nc == NR) {
    if (small) bwd_rows<NR, NR, true>(e, f);
    else bwd_rows<NR, NR, false>(e, f);
  } else if (kVectorRows<T, F, NR / 2> && e.nc == NR / 2) {
    if (small) bwd_rows<NR / 2, NR, true>(e, f);
    else bwd_rows<NR / 2, NR, false>(e, f);
  } else {
    if (small) bwd_rows<0, NR, true>(e, f);
    else bwd_rows<0, NR, false>(e, f);
  }
}

template <class T, class F>
FO_ALWAYS_INLINE void out_delta(const OutDelta<T>& e, const F& f) {
  using Acc = acc_t<T>;
  const bool has_z = !std::is_same_v<F, IdentityAct>;
  for (int64_t r = 0; r < e.rows; ++r) {
    const T* g = e.g + r * e.gs0;
    Acc* d = e.d + r * e.ldd;
    if (e.gs1 == 1) {
      if (has_z) {
        const T* z = e.z + r * e.ldz;
        for (int64_t j = 0; j < e.n; ++j)
          d[j] = round_to<T>(static_cast<Acc>(
              f.backward(static_cast<Acc>(z[j]), static_cast<Acc>(g[j]))));
      } else {
        for (int64_t j = 0; j < e.n; ++j) d[j] = static_cast<Acc>(g[j]);
      }
    } else {
      for (int64_t j = 0; j < e.n; ++j) {
        const Acc gv = static_cast<Acc>(g[j * e.gs1]);
        d[j] = has_z ? round_to<T>(static_cast<Acc>(
                           f.backward(static_cast<Acc>(e.z[r * e.ldz + j]), gv)))
                     : gv;
      }
    }
  }
}

template <class T, class F>
FO_ALWAYS_INLINE void act_rows(const ActRows<T>& e, const F& f) {
  using Acc = acc_t<T>;
  for (int64_t r = 0; r < e.rows; ++r) {
    const T* z = e.z + r * e.ldz;
    Acc* a = e.a + r * e.lda;
    for (int64_t j = 0; j < e.n; ++j)
      a[j] = round_to<T>(static_cast<Acc>(f.forward(static_cast<Acc>(z[j]))));
  }
}

// The epilogues of one activation, compiled for the ISA the CPU runs (functor in `self`).
template <class T>
struct ActFns {
  const void* self;
  void (*fwd)(const void*, const FwdTile<T>&);
  void (*bwd)(const void*, const BwdTile<T>&);
  void (*out)(const void*, const OutDelta<T>&);
  void (*act)(const void*, const ActRows<T>&);
};

template <class T, Isa I, class F>
ActFns<T> make_fns(const F* f) {
  using Cfg = gemm::Config<acc_t<T>, I>;
  constexpr int NR = Cfg::W * Cfg::NV;
  // Each epilogue works on a local copy of the functor: its parameters (elu's alpha) then stay
  // in registers, where read through the pointer they were read again after every store.
  return {f,
          [](const void* s, const FwdTile<T>& e) {
            gemm::run_isa<I>([&]() FO_INLINE_LAMBDA {
              const F act = *static_cast<const F*>(s);
              fwd_tile<NR>(e, act);
            });
          },
          [](const void* s, const BwdTile<T>& e) {
            gemm::run_isa<I>([&]() FO_INLINE_LAMBDA {
              const F act = *static_cast<const F*>(s);
              bwd_tile<NR>(e, act);
            });
          },
          [](const void* s, const OutDelta<T>& e) {
            gemm::run_isa<I>([&]() FO_INLINE_LAMBDA {
              const F act = *static_cast<const F*>(s);
              out_delta(e, act);
            });
          },
          [](const void* s, const ActRows<T>& e) {
            gemm::run_isa<I>([&]() FO_INLINE_LAMBDA {
              const F act = *static_cast<const F*>(s);
              act_rows(e, act);
            });
          }};
}

// The table of one activation: built at its first use. Every activation here has fixed
// parameters (torch's defaults, rounded to T where torch does), so one functor per (T, F).
template <class T, class F>
const ActFns<T>& fns_of(const F& f) {
  static const F kept = f;
  static const ActFns<T> table = [] {
    switch (cpu_isa()) {
      case Isa::avx512: return make_fns<T, Isa::avx512>(&kept);
      case Isa::avx2: return make_fns<T, Isa::avx2>(&kept);
      default: return make_fns<T, Isa::baseline>(&kept);
    }
  }();
  return table;
}

template <class T>
const ActFns<T>& activation_fns(const std::string& name) {
  const ActFns<T>* out = nullptr;
  with_fused_mlp_activation<T>(name, [&](auto f) { out = &fns_of<T>(f); });
  return *out;
}

// ---- the layer loops ----------------------------------------------------------------------------

// A 64-byte aligned thread-local buffer of n values, zeroed when it grows (padding columns are
// read by the tile kernel and must hold numbers).
template <class Acc>
Acc* block_buffer(Scratch& s, int64_t n) {
  const size_t before = s.bytes;
  void* p = s.get(sizeof(Acc) * static_cast<size_t>(n));
  if (s.bytes != before) std::memset(p, 0, s.bytes);
  return static_cast<Acc*>(p);
}

struct Blocking {
  int64_t rows_per_block, blocks, chunks;
  bool serial;
};

Blocking blocking(int64_t N, int64_t mr, int64_t weights, int64_t panels = kBlockPanels) {
  Blocking b;
  const int64_t max_rows = panels * mr;
  const int64_t nb = std::max<int64_t>(1, ceil_div(N, max_rows));
  b.rows_per_block = round_up(std::max<int64_t>(1, ceil_div(N, nb)), mr);
  b.blocks = ceil_div(N, b.rows_per_block);
  b.serial = static_cast<double>(N) * static_cast<double>(weights) < kSerialWork;
  b.chunks = b.serial ? 1 : std::min(b.blocks, kMaxChunks);
  return b;
}

// Everything a pass needs, for storage type T.
template <class T>
struct Net {
  using Acc = acc_t<T>;
  int64_t N, L, in, H, out;
  std::vector<int64_t> lin, lout;  // in_l, out_l
  const T* x;
  int64_t xs0, xs1;

  int64_t widest() const { return std::max(in, std::max(H, out)); }
};

// The blocks of both passes. A thin net, one hidden layer between narrow ends (2-100-3: 5
// multiply-adds per row and unit of its widest layer), does little arithmetic per value of its
// block buffers: blocks of kThinPanels keep those in L1 (2-100-3: the training step 297 -> 277
// us at 3000 rows, 1377 -> 1151 at 20000). Nets with more work per value lose a little by short
// blocks.
template <class T>
Blocking net_blocking(const Net<T>& net, int64_t mr, int64_t weights_total) {
  const bool thin = weights_total <= kThinNetMacs * net.widest();
  return blocking(net.N, mr, weights_total, thin ? kThinPanels : kBlockPanels);
}

template <class T>
Net<T> make_net(const FusedMlpDims& d, const Tensor& input) {
  Net<T> n;
  n.N = d.N;
  n.L = d.layers;
  n.in = d.in_features;
  n.H = d.hidden;
  n.out = d.out_features;
  for (int64_t l = 0; l < n.L; ++l) {
    n.lin.push_back(l == 0 ? n.in : n.H);
    n.lout.push_back(l == n.L - 1 ? n.out : n.H);
  }
  n.x = input.const_data_ptr<T>();
  n.xs0 = input.stride(0);
  n.xs1 = input.stride(1);
  return n;
}

// Packs weight l for the forward tile (B = W^T: panel p holds [k][j] = W[p NR + j][k], zero
// columns past out_l) or, transposed = false, for the backward (B = W: [k][j] = W[k][p NR + j],
// zero columns past in_l).
template <int NR, class T, class Acc>
void pack_weight(const Tensor& w, bool for_forward, Acc* out) {
  const T* p = w.const_data_ptr<T>();
  const int64_t rows = w.size(0), cols = w.size(1), s0 = w.stride(0), s1 = w.stride(1);
  // forward: N = rows (out_l), K = cols; backward: N = cols, K = rows
  const int64_t N = for_forward ? rows : cols, K = for_forward ? cols : rows;
  for (int64_t j0 = 0; j0 < N; j0 += NR) {
    Acc* o = out + j0 * K;
    const int64_t nr = std::min<int64_t>(NR, N - j0);
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t j = 0; j < nr; ++j)
        o[k * NR + j] = static_cast<Acc>(for_forward ? p[(j0 + j) * s0 + k * s1]
                                                     : p[k * s0 + (j0 + j) * s1]);
      for (int64_t j = nr; j < NR; ++j) o[k * NR + j] = Acc(0);
    }
  }
}

// Small widths waste little of a tile: a layer whose output (or, backward, input) is at most
// one vector wide runs tiles of one vector (NR = W), and the weight gradient of a layer with at
// most kNarrowRows outputs (or inputs) runs tiles of exactly that many rows (narrow_grad_tiles).
constexpr int kNarrowRows = 4;

// The panel width for n columns: one vector when n fits in one, else the tile's NR.
template <int W, int NR>
FO_ALWAYS_INLINE int panel_width(int64_t n) {
  return n <= W ? W : NR;
}

// tile_kernel with row-major A, B in panels of width nr (W or W * NV).
template <class Acc, int W, int MR, int NV>
FO_ALWAYS_INLINE void row_tile(int nr, int64_t kc, const Acc* a, int64_t lda, const Acc* b,
                               Acc* c) {
  if (nr == W * NV) tile_kernel<Acc, W, MR, NV, true>(kc, a, lda, b, W * NV, c, W * NV, false);
  else tile_kernel<Acc, W, MR, 1, true>(kc, a, lda, b, W, c, W, false);
}

template <int NR, class T, class Acc>
void pack_weight_panels(int nr, const Tensor& w, bool for_forward, Acc* out);

// The input rows r0 .. r0 + n in the compute type, dense (row stride in): one pass over a
// contiguous input (per-row copies of a few elements would each cost a memcpy call).
template <class T, class Acc>
FO_ALWAYS_INLINE void load_input(const Net<T>& net, int64_t r0, int64_t n, Acc* out) {
  const T* x = net.x + r0 * net.xs0;
  const int64_t in = net.in;
  if (net.xs1 == 1 && net.xs0 == in) {
    for (int64_t e = 0; e < n * in; ++e) out[e] = static_cast<Acc>(x[e]);
    return;
  }
  for (int64_t r = 0; r < n; ++r)
    for (int64_t k = 0; k < in; ++k)
      out[r * in + k] = static_cast<Acc>(x[r * net.xs0 + k * net.xs1]);
}

template <int NR, class T, class Acc>
void pack_weight_panels(int nr, const Tensor& w, bool for_forward, Acc* out) {
  if (nr == NR) pack_weight<NR, T>(w, for_forward, out);
  else pack_weight<NR / 2, T>(w, for_forward, out);  // one vector: every config has NV = 2
}

// The packed bias of layer l: out_l values, zeros up to a whole tile (NR).
template <int NR, class T, class Acc>
void pack_bias(const std::vector<Tensor>& biases, int64_t l, int64_t out_l, Acc* b) {
  std::fill(b, b + round_up(out_l, NR), Acc(0));
  if (biases.empty()) return;
  const T* bp = biases[l].const_data_ptr<T>();
  const int64_t bs = biases[l].stride(0);
  for (int64_t j = 0; j < out_l; ++j) b[j] = static_cast<Acc>(bp[j * bs]);
}

// Where a layer's forward epilogue writes, at the block's first row: z (when not null), a =
// act(z) for the next layer, or the output y.
template <class T>
struct LayerOut {
  T* z = nullptr;
  int64_t ldz = 0;
  acc_t<T>* a = nullptr;
  int64_t lda = 0;
  T* y = nullptr;
  int64_t ldy = 0;
};

// The activation's epilogue for rows [i0, i0 + mr) and columns [j0, j0 + nc) of a layer's
// output o, bias at the layer's first column; the caller sets its sums (set_tile_sums,
// set_small_k_sums) and calls fns.fwd.
template <class T>
FO_ALWAYS_INLINE FwdTile<T> fwd_tile_at(const LayerOut<T>& o, int64_t i0, int mr, int64_t j0,
                                        int nc, const acc_t<T>* bias) {
  FwdTile<T> e;
  e.mr = mr;
  e.nc = nc;
  e.bias = bias + j0;
  e.z = o.z ? o.z + i0 * o.ldz + j0 : nullptr;
  e.ldz = o.ldz;
  e.a = o.a ? o.a + i0 * o.lda + j0 : nullptr;
  e.lda = o.lda;
  e.y = o.y ? o.y + i0 * o.ldy + j0 : nullptr;
  e.ldy = o.ldy;
  return e;
}

// The sums set field by field in the tile's own struct: a TileSums built apart and copied in
// was copied by 16-byte moves from its 4- and 8-byte stores, a store-forwarding stall per
// epilogue call (a sixth of the spiral net's forward with AVX2).
// The sums of a finished tile (row stride ldt).
template <class Acc>
FO_ALWAYS_INLINE void set_tile_sums(TileSums<Acc>& s, const Acc* tile, int ldt) {
  s.tile = tile;
  s.ldt = ldt;
}

// The sums of a small-K product: A (row stride lda) times a panel of B (row stride ldb).
template <class Acc>
FO_ALWAYS_INLINE void set_small_k_sums(TileSums<Acc>& s, const Acc* a, int64_t lda, int64_t K,
                                       const Acc* b, int ldb) {
  s.x = a;
  s.ldx = lda;
  s.kdim = static_cast<int>(K);
  s.w = b;
  s.ldw = ldb;
}

// One layer's forward over a block's n rows: tiles of A W_l^T (A row-major, row stride lda; W_l
// packed in panels of width nr at wp, K = in_l), each finished by the activation's epilogue; at
// K <= kSmallK a hidden layer's panel, all rows at once, by the epilogue alone, its last panel
// computed whole where o's rows have room (the block buffers and the recomputed z_0 do): a loop
// of run-time length would do its arithmetic a value at a time. (The padding then holds z = 0
// and act(0), a finite value, which the next layer multiplies by zero weights or ignores.)
template <class T, int W, int MR, int NV>
FO_ALWAYS_INLINE void forward_layer(const ActFns<T>& fns, int nr, int64_t K, int64_t Nl,
                                    int64_t n, const acc_t<T>* A, int64_t lda,
                                    const acc_t<T>* wp, const acc_t<T>* bias,
                                    const LayerOut<T>& o, acc_t<T>* tile) {
  const int64_t nrp = round_up(n, MR);
  for (int64_t j0 = 0; j0 < Nl; j0 += nr) {
    const acc_t<T>* bp = wp + j0 * K;
    const int nc = static_cast<int>(std::min<int64_t>(nr, Nl - j0));
    if (small_k(K) && o.a != nullptr) {
      const int64_t room = round_up(Nl, nr);
      const int ncw = o.lda >= room && (o.z == nullptr || o.ldz >= room) ? nr : nc;
      FwdTile<T> e = fwd_tile_at(o, 0, static_cast<int>(n), j0, ncw, bias);
      set_small_k_sums(e.sums, A, lda, K, bp, nr);
      fns.fwd(fns.self, e);
      continue;
    }
    for (int64_t ip = 0; ip < nrp; ip += MR) {
      row_tile<acc_t<T>, W, MR, NV>(nr, K, A + ip * lda, lda, bp, tile);
      FwdTile<T> e =
          fwd_tile_at(o, ip, static_cast<int>(std::min<int64_t>(MR, n - ip)), j0, nc, bias);
      set_tile_sums(e.sums, tile, nr);
      fns.fwd(fns.self, e);
    }
  }
}

// The weight-gradient tiles of R <= kNarrowRows rows, c (R x cols, row stride ldc) += A^T B with
// A(i, k) = a[k lda + i] and B(k, j) = b[k ldb + j], k < kc: tiles of narrow_vecs(R) vectors
// (the last one narrower), whose R x NV accumulators, NV vectors of B and a broadcast fit in 15
// of the 16 vector registers of AVX2 (more spilled an accumulator to the stack). Padded to
// tiles of kNarrowRows x NR, the spiral net's 3 x 100 and (transposed) 2 x 100 weight gradients
// took 56 vector multiply-adds per row of the batch each (AVX2 float), where these take 39 and
// 26. One ahead.step() per tile.
constexpr int narrow_vecs(int64_t rows) {
  return static_cast<int>(std::min<int64_t>(4, 14 / (rows + 1)));
}

// fn(std::integral_constant<int, n>) for 1 <= n <= N
template <int N, class Fn>
FO_ALWAYS_INLINE void with_vector_count(int64_t n, const Fn& fn) {
  if constexpr (N > 1)
    if (n < N) return with_vector_count<N - 1>(n, fn);
  fn(std::integral_constant<int, N>{});
}

template <class Acc, int W, int R>
FO_ALWAYS_INLINE void narrow_grad_row_tiles(int64_t cols, int64_t kc, const Acc* a, int64_t lda,
                                            const Acc* b, int64_t ldb, Acc* c, int64_t ldc,
                                            gemm::Prefetcher& ahead) {
  constexpr int NVm = narrow_vecs(R);
  for (int64_t j0 = 0; j0 < cols; j0 += NVm * W) {
    with_vector_count<NVm>(ceil_div(cols - j0, W), [&](auto nv) FO_INLINE_LAMBDA {
      tile_kernel<Acc, W, R, decltype(nv)::value, false>(kc, a, lda, b + j0, ldb, c + j0, ldc,
                                                         true);
    });
    ahead.step();
  }
}

template <class Acc, int W>
FO_ALWAYS_INLINE void narrow_grad_tiles(int64_t rows, int64_t cols, int64_t kc, const Acc* a,
                                        int64_t lda, const Acc* b, int64_t ldb, Acc* c,
                                        int64_t ldc, gemm::Prefetcher& ahead) {
  static_assert(kNarrowRows == 4, "one case per row count");
  switch (rows) {
    case 0: return;
    case 1: return narrow_grad_row_tiles<Acc, W, 1>(cols, kc, a, lda, b, ldb, c, ldc, ahead);
    case 2: return narrow_grad_row_tiles<Acc, W, 2>(cols, kc, a, lda, b, ldb, c, ldc, ahead);
    case 3: return narrow_grad_row_tiles<Acc, W, 3>(cols, kc, a, lda, b, ldb, c, ldc, ahead);
    default: return narrow_grad_row_tiles<Acc, W, 4>(cols, kc, a, lda, b, ldb, c, ldc, ahead);
  }
}

// ---- narrow layers (dot_rows.h) ----------------------------------------------------------------

// The widest layer that runs as dot_rows with W lanes: W / 4 outputs (R >= 4 rows at a time),
// and with 8 lanes 4 (R = 2): a tile of 8 lanes with 3 or 4 of them used costs a broadcast and
// a multiply-add per row and input, where dot_rows of 2 rows takes 5 loads and 6 or 8
// multiply-adds per 8 inputs of 2 rows (the spiral net's 100 -> 3 with AVX2).
template <int W>
constexpr int kNarrowMax = W == 8 ? 4 : W / 4;

// The layers that run as dot_rows: 1 to kNarrowMax outputs, at least W inputs, A from the
// activation buffers (whose columns past the hidden width hold finite values: forward_isa).
template <int W>
FO_ALWAYS_INLINE bool narrow_layer(int64_t l, int64_t in_l, int64_t out_l) {
  return l > 0 && out_l >= 1 && out_l <= kNarrowMax<W> && in_l >= W;
}

// W_l (out_l, in_l) as out_l rows of kp = round_up(in_l, W) values, zero past in_l.
template <int W, class T, class Acc>
void pack_rows(const Tensor& w, Acc* out) {
  const T* p = w.const_data_ptr<T>();
  const int64_t rows = w.size(0), cols = w.size(1), kp = round_up(cols, W);
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t k = 0; k < kp; ++k)
      out[j * kp + k] = k < cols ? static_cast<Acc>(p[j * w.stride(0) + k * w.stride(1)]) : Acc(0);
}

// forward_layer for a narrow layer of NL outputs: the block's rows R at a time (the last group
// repeats row n - 1 and leaves it unstored), one epilogue per tile-buffer of rows (room for
// `room` values).
template <class T, int W, int NL>
FO_ALWAYS_INLINE void forward_narrow(const ActFns<T>& fns, int64_t K, int64_t n,
                                     const acc_t<T>* A, int64_t lda, const acc_t<T>* wp,
                                     const acc_t<T>* bias, const LayerOut<T>& o, acc_t<T>* tile,
                                     int64_t room) {
  constexpr int R = W / NL;
  const int64_t kp = round_up(K, W);
  const int64_t group = (room - W) / NL / R * R;
  for (int64_t g0 = 0; g0 < n; g0 += group) {
    const int64_t m = std::min(group, n - g0);
    for (int64_t i = 0; i < m; i += R) {
      const acc_t<T>* rows[R];
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) rows[r] = A + std::min<int64_t>(g0 + i + r, n - 1) * lda;
      dot_rows<acc_t<T>, W, NL>(kp, rows, wp, tile + i * NL);
    }
    FwdTile<T> e = fwd_tile_at(o, g0, static_cast<int>(m), 0, NL, bias);
    set_tile_sums(e.sums, tile, NL);
    fns.fwd(fns.self, e);
  }
}

template <class T, Isa I>
void forward_isa(const Net<T>& net, at::TensorList weights, const std::vector<Tensor>& biases,
                 const ActFns<T>& hid, const ActFns<T>& outf, T* y,
                 const std::vector<T*>& hidden, T* out_preact) {
  using Acc = acc_t<T>;
  using Cfg = gemm::Config<Acc, I>;
  constexpr int W = Cfg::W, MR = Cfg::MR, NV = Cfg::NV, NR = W * NV;
  static_assert(NV == 2, "the narrow panels (pack_weight_panels) are half a tile wide");
  const int64_t L = net.L, N = net.N;

  // the packed weights and biases, once per call
  std::vector<int64_t> woff(L), boff(L);
  std::vector<int> lnr(L);  // panel width per layer
  std::vector<char> narrow(L);
  bool any_narrow = false;
  int64_t total = 0, weights_total = 0;
  for (int64_t l = 0; l < L; ++l) {
    lnr[l] = panel_width<W, NR>(net.lout[l]);
    narrow[l] = narrow_layer<W>(l, net.lin[l], net.lout[l]);
    any_narrow = any_narrow || narrow[l];
    woff[l] = total;
    total += narrow[l] ? net.lout[l] * round_up(net.lin[l], W)
                       : net.lin[l] * round_up(net.lout[l], lnr[l]);
    boff[l] = total;
    total += round_up(net.lout[l], NR);
    weights_total += net.lin[l] * net.lout[l];
  }
  thread_local Scratch pack_scratch;
  Acc* pack = static_cast<Acc*>(pack_scratch.get(sizeof(Acc) * std::max<int64_t>(total, 1)));
  for (int64_t l = 0; l < L; ++l) {
    if (narrow[l]) pack_rows<W, T>(weights[l], pack + woff[l]);
    else pack_weight_panels<NR, T>(lnr[l], weights[l], true, pack + woff[l]);
    pack_bias<NR, T>(biases, l, net.lout[l], pack + boff[l]);
  }

  const Blocking blk = net_blocking(net, MR, weights_total);
  // row stride of the activation buffers (row-major, rows_per_block rows each): whole tiles
  // (forward_layer)
  const int64_t ld = round_up(net.widest(), NR);
  const int64_t buf = blk.rows_per_block * ld;
  // the dense input rows, and room for the tiles' reads past the last row
  const int64_t xbuf = blk.rows_per_block * net.in + NR + MR;

  const auto run_blocks = [&](int64_t b0, int64_t b1) {
    thread_local Scratch block_scratch;
    Acc* cur0 = block_buffer<Acc>(block_scratch, 2 * buf + xbuf + MR * NR);
    // a narrow layer reads whole vectors of the activations, and multiplies what lies past the
    // hidden width by zeros: finite values there (zeros, or a small-K layer's act(0)), where an
    // earlier call of a wider net may have left anything
    if (any_narrow)
      for (int64_t r = 0; r < 2 * blk.rows_per_block; ++r)
        std::fill(cur0 + r * ld + net.H, cur0 + r * ld + round_up(net.H, W), Acc(0));
    gemm::run_isa<I>([&]() FO_INLINE_LAMBDA {
      Acc* X = cur0 + 2 * buf;  // the input rows, dense
      Acc* tile = X + xbuf;
      for (int64_t bi = b0; bi < b1; ++bi) {
        const int64_t r0 = bi * blk.rows_per_block;
        const int64_t n = std::min(blk.rows_per_block, N - r0);
        Acc* cur = cur0;
        Acc* nxt = cur0 + buf;
        // (the rows of the last panel past n keep what an earlier block left: their results
        // are never stored)
        load_input(net, r0, n, X);
        for (int64_t l = 0; l < L; ++l) {
          const int64_t Nl = net.lout[l];
          const bool last = l == L - 1;
          LayerOut<T> o;
          o.ldz = o.ldy = Nl;
          if (last) {
            o.z = out_preact ? out_preact + r0 * Nl : nullptr;
            o.y = y + r0 * Nl;
          } else {
            o.z = hidden.empty() || !hidden[l] ? nullptr : hidden[l] + r0 * Nl;
            o.a = nxt;
            o.lda = ld;
          }
          const ActFns<T>& fns = last ? outf : hid;
          if (narrow[l]) {
            const auto run = [&](auto nl) {
              constexpr int NL = decltype(nl)::value;
              if constexpr (NL <= kNarrowMax<W>)
                forward_narrow<T, W, NL>(fns, net.lin[l], n, cur, ld, pack + woff[l],
                                         pack + boff[l], o, tile, MR * NR);
            };
            if (Nl == 1) run(std::integral_constant<int, 1>{});
            else if (Nl == 2) run(std::integral_constant<int, 2>{});
            else if (Nl == 3) run(std::integral_constant<int, 3>{});
            else run(std::integral_constant<int, 4>{});
          } else {
            forward_layer<T, W, MR, NV>(fns, lnr[l], net.lin[l], Nl, n, l == 0 ? X : cur,
                                        l == 0 ? net.in : ld, pack + woff[l], pack + boff[l], o,
                                        tile);
          }
          std::swap(cur, nxt);
        }
      }
    });
  };
  if (blk.serial) run_blocks(0, blk.blocks);
  else at::parallel_for(0, blk.blocks, 1, run_blocks);
}

// gb[j] += the sum over rows r < n of d[r * ld + j], for the NVec * W columns j: each column
// summed over the rows in order, NVec vectors of columns at a time (independent chains of adds,
// where one vector at a time would wait on each add's latency).
template <class Acc, int W, int NVec>
FO_ALWAYS_INLINE void column_sums(Acc* gb, const Acc* d, int64_t ld, int64_t n) {
  using VU = typename gemm::VecT<Acc, W>::unaligned;
  typename gemm::VecT<Acc, W>::type s[NVec];
#pragma GCC unroll 4
  for (int v = 0; v < NVec; ++v) s[v] = *reinterpret_cast<const VU*>(gb + v * W);
  for (int64_t r = 0; r < n; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NVec; ++v) s[v] += *reinterpret_cast<const VU*>(d + r * ld + v * W);
#pragma GCC unroll 4
  for (int v = 0; v < NVec; ++v) *reinterpret_cast<VU*>(gb + v * W) = s[v];
}

template <class T>
struct Grads {
  T* grad_input;                 // (N, in) or null
  std::vector<T*> grad_weights;  // per layer (out_l, in_l) contiguous, or empty
  std::vector<T*> grad_biases;   // per layer (out_l,), or empty
};

template <class T, Isa I>
void backward_isa(const Net<T>& net, at::TensorList weights, const std::vector<Tensor>& biases,
                  const ActFns<T>& hid, const ActFns<T>& outf, const T* g, int64_t gs0, int64_t gs1,
                  const std::vector<const T*>& hidden, const T* out_preact,
                  const Grads<T>& grads) {
  using Acc = acc_t<T>;
  using Cfg = gemm::Config<Acc, I>;
  constexpr int W = Cfg::W, MR = Cfg::MR, NV = Cfg::NV, NR = W * NV;
  static_assert(NV == 2, "the narrow panels (pack_weight_panels) are half a tile wide");
  const int64_t L = net.L, N = net.N, H = net.H;
  const bool want_w = !grads.grad_weights.empty(), want_b = !grads.grad_biases.empty();
  const bool want_x = grads.grad_input != nullptr;

  // packed weights (B = W_l) for the backward products; layer 0 only for grad_input
  std::vector<int64_t> woff(L);
  std::vector<int> lnr(L);  // panel width per layer (of in_l columns)
  int64_t total = 0, weights_total = 0;
  for (int64_t l = 0; l < L; ++l) {
    lnr[l] = panel_width<W, NR>(net.lin[l]);
    woff[l] = total;
    if (l > 0 || want_x) total += net.lout[l] * round_up(net.lin[l], lnr[l]);
    weights_total += net.lin[l] * net.lout[l];
  }
  // z_0 not saved (fused_mlp_recomputes_z0): layer 0 packed as the forward packs it too, and
  // its bias, to recompute z_0 and a_0 block by block
  const bool recompute = L >= 2 && hidden[0] == nullptr;
  // the row stride of the recomputed z_0: whole tiles (forward_layer)
  const int64_t ldz0 = round_up(H, NR);
  const int nr0 = panel_width<W, NR>(H);
  const int64_t fwoff = total, fboff = fwoff + net.in * round_up(H, nr0);
  if (recompute) total = fboff + round_up(H, NR);
  thread_local Scratch pack_scratch;
  Acc* pack = static_cast<Acc*>(pack_scratch.get(sizeof(Acc) * std::max<int64_t>(total, 1)));
  for (int64_t l = 0; l < L; ++l)
    if (l > 0 || want_x) pack_weight_panels<NR, T>(lnr[l], weights[l], false, pack + woff[l]);
  if (recompute) {
    pack_weight_panels<NR, T>(nr0, weights[0], true, pack + fwoff);
    pack_bias<NR, T>(biases, 0, H, pack + fboff);
  }

  // per chunk accumulators: grad_W_l, then grad_b_l. grad_W_l = delta_l^T a_{l-1} (out_l x
  // in_l), or transposed (in_l x out_l, wtrans) when that pads less: e.g. the 100 x 2 weight of
  // a 2-D input is 2 x 112 cells per row, not 102 x 16 (AVX2 float). Rows padded to the tile
  // height (none for at most kNarrowRows: narrow_grad_tiles), columns to NR.
  std::vector<int64_t> gwoff(L), gwld(L), gboff(L), gwrows(L), gwcols(L);
  std::vector<char> wtrans(L);
  const auto padded_rows = [](int64_t m) { return m <= kNarrowRows ? m : round_up(m, MR); };
  int64_t acc_size = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t in = net.lin[l], out = net.lout[l];
    const int64_t cells = padded_rows(out) * round_up(in, NR);
    const int64_t cells_t = padded_rows(in) * round_up(out, NR);
    wtrans[l] = cells_t < cells;
    gwrows[l] = wtrans[l] ? in : out;
    gwcols[l] = wtrans[l] ? out : in;
    gwoff[l] = acc_size;
    gwld[l] = round_up(gwcols[l], NR);
    acc_size += want_w ? padded_rows(gwrows[l]) * gwld[l] : 0;
    gboff[l] = acc_size;
    acc_size += want_b ? round_up(net.lout[l], W) : 0;
  }
  // the weight-gradient tiles of layer l
  const auto grad_tiles = [&](int64_t l) -> int64_t {
    if (gwrows[l] == 0) return int64_t(0);
    if (gwrows[l] <= kNarrowRows) return ceil_div(gwcols[l], W * narrow_vecs(gwrows[l]));
    return ceil_div(gwrows[l], MR) * ceil_div(gwcols[l], NR);
  };
  acc_size = round_up(std::max<int64_t>(acc_size, 1), 16);

  const int64_t fmax = net.widest();
  const Blocking blk = net_blocking(net, MR, weights_total);
  // row stride of the row-major buffers: covers a tile's columns (NR) and the A reads of the
  // weight-gradient tile (MR rows of delta^T)
  const int64_t ld = round_up(std::max(round_up(fmax, NR), round_up(fmax, MR)), W);
  const int64_t buf = blk.rows_per_block * ld;
  const int64_t xbuf = blk.rows_per_block * net.in + NR + MR;

  thread_local Scratch acc_scratch;
  Acc* accs = static_cast<Acc*>(acc_scratch.get(sizeof(Acc) * acc_size * blk.chunks));
  std::fill(accs, accs + acc_size * blk.chunks, Acc(0));

  // A block's layer l reads z_{l-1} (hidden[l-1]) from memory, layer 0 the input rows, and then
  // the next block starts at z_{L-2}: each is prefetched while the layer before it computes,
  // a few cache lines per tile, instead of stalling the first pass over it.
  const auto prefetch_after = [&](int64_t bi, int64_t blast, int64_t l, int64_t tiles) {
    const int64_t r0 = bi * blk.rows_per_block;
    const int64_t n = std::min(blk.rows_per_block, N - r0);
    const int64_t hb = H * static_cast<int64_t>(sizeof(T));
    if (l >= 2) {
      if (hidden[l - 2] == nullptr) return gemm::Prefetcher();
      return gemm::Prefetcher(hidden[l - 2] + r0 * H, n, hb, hb, tiles);
    }
    if (l == 1) {
      if (!want_w || recompute || net.xs1 != 1 || net.xs0 != net.in) return gemm::Prefetcher();
      const int64_t xb = net.in * static_cast<int64_t>(sizeof(T));
      return gemm::Prefetcher(net.x + r0 * net.in, n, xb, xb, tiles);
    }
    const int64_t r1 = r0 + blk.rows_per_block;
    if (L < 2 || bi + 1 >= blast || hidden[L - 2] == nullptr) return gemm::Prefetcher();
    return gemm::Prefetcher(hidden[L - 2] + r1 * H, std::min(blk.rows_per_block, N - r1), hb, hb,
                            tiles);
  };

  const auto run_chunks = [&](int64_t c0, int64_t c1) {
    thread_local Scratch block_scratch, z_scratch;
    Acc* base = block_buffer<Acc>(block_scratch, 3 * buf + xbuf + MR * NR);
    // the block's recomputed z_0 (row stride ldz0)
    T* Z = recompute ? static_cast<T*>(z_scratch.get(sizeof(T) * blk.rows_per_block * ldz0))
                     : nullptr;
    gemm::run_isa<I>([&]() FO_INLINE_LAMBDA {
      Acc* P = base;  // a_{l-1}
      Acc* D = base + buf;  // delta_l, then delta_{l-1} in D2
      Acc* D2 = base + 2 * buf;
      Acc* X = base + 3 * buf;  // the input rows, dense
      Acc* tile = X + xbuf;
      for (int64_t c = c0; c < c1; ++c) {
        Acc* acc = accs + c * acc_size;
        const int64_t bfirst = c * blk.blocks / blk.chunks;
        const int64_t blast = (c + 1) * blk.blocks / blk.chunks;
        for (int64_t bi = bfirst; bi < blast; ++bi) {
          const int64_t r0 = bi * blk.rows_per_block;
          const int64_t n = std::min(blk.rows_per_block, N - r0);
          const int64_t nrp = round_up(n, MR);
          Acc* d = D;
          Acc* d2 = D2;
          {
            OutDelta<T> e;
            e.g = g + r0 * gs0;
            e.gs0 = gs0;
            e.gs1 = gs1;
            e.z = out_preact ? out_preact + r0 * net.out : nullptr;
            e.ldz = net.out;
            e.rows = n;
            e.n = net.out;
            e.d = d;
            e.ldd = ld;
            outf.out(outf.self, e);
          }
          for (int64_t l = L - 1; l >= 0; --l) {
            const int64_t K = net.lin[l], Nl = net.lout[l];
            const bool input_tiles = l > 0 || want_x;
            const int64_t tiles = (want_w ? grad_tiles(l) : 0) +
                                  (input_tiles ? ceil_div(K, lnr[l]) * (nrp / MR) : 0);
            gemm::Prefetcher ahead = prefetch_after(bi, blast, l, tiles);
            if (l == 1 && recompute) {
              // z_0 and a_0 by the forward's own tiles and epilogue: bitwise what it computed
              load_input(net, r0, n, X);
              LayerOut<T> o;
              o.z = Z;
              o.ldz = ldz0;
              o.a = P;
              o.lda = ld;
              forward_layer<T, W, MR, NV>(hid, nr0, net.in, H, n, X, net.in, pack + fwoff,
                                          pack + fboff, o, tile);
            }
            if (want_b) {
              // (gb is padded to whole vectors, and d's rows to ld >= that)
              Acc* gb = acc + gboff[l];
              for (int64_t j0 = 0; j0 < Nl; j0 += 4 * W) {
                const int64_t nvec = std::min<int64_t>(4, ceil_div(Nl - j0, W));
                if (nvec == 4) column_sums<Acc, W, 4>(gb + j0, d + j0, ld, n);
                else if (nvec == 3) column_sums<Acc, W, 3>(gb + j0, d + j0, ld, n);
                else if (nvec == 2) column_sums<Acc, W, 2>(gb + j0, d + j0, ld, n);
                else column_sums<Acc, W, 1>(gb + j0, d + j0, ld, n);
              }
            }
            if (want_w) {
              // (a recomputed z_0 left the input rows in X and a_0 in P)
              if (l == 0) {
                if (!recompute) load_input(net, r0, n, X);
              } else if (!(recompute && l == 1)) {
                ActRows<T> e{hidden[l - 1] + r0 * H, H, n, H, P, ld};
                hid.act(hid.self, e);
              }
              // the rows of the accumulator come from A (transposed: A(i, k) = a[k ld + i]),
              // its columns from B: (delta, a_{l-1}), or (a_{l-1}, delta) when transposed
              Acc* gw = acc + gwoff[l];
              const Acc* a_prev = l == 0 ? X : P;
              const int64_t ld_prev = l == 0 ? K : ld;
              const Acc* A = wtrans[l] ? a_prev : d;
              const Acc* B = wtrans[l] ? d : a_prev;
              const int64_t lda = wtrans[l] ? ld_prev : ld, ldb = wtrans[l] ? ld : ld_prev;
              const int64_t rows = gwrows[l], cols = gwcols[l];
              const int64_t gl = gwld[l];
              if (rows <= kNarrowRows) {
                narrow_grad_tiles<Acc, W>(rows, cols, n, A, lda, B, ldb, gw, gl, ahead);
              } else {
                for (int64_t i0 = 0; i0 < rows; i0 += MR)
                  for (int64_t j0 = 0; j0 < cols; j0 += NR) {
                    tile_kernel<Acc, W, MR, NV, false>(n, A + i0, lda, B + j0, ldb,
                                                       gw + i0 * gl + j0, gl, true);
                    ahead.step();
                  }
              }
            }
            if (!input_tiles) break;
            const Acc* wp = pack + woff[l];
            const int nrl = lnr[l];
            // z_{l-1} at the block's first row (row stride ldzb)
            const bool from_z = recompute && l == 1;
            const T* zb = l == 0 ? nullptr : from_z ? Z : hidden[l - 1] + r0 * H;
            const int64_t ldzb = from_z ? ldz0 : H;
            // (sums set field by field in e, as fwd_tile_at's callers do)
            const auto bwd_tile_at = [&](int64_t ip, int mr, int64_t j0, int nc) {
              BwdTile<T> e;
              e.mr = mr;
              e.nc = nc;
              e.z = zb + ip * ldzb + j0;
              e.ldz = ldzb;
              e.d = d2 + ip * ld + j0;
              e.ldd = ld;
              return e;
            };
            for (int64_t j0 = 0; j0 < K; j0 += nrl) {
              const int nc = static_cast<int>(std::min<int64_t>(nrl, K - j0));
              if (l > 0 && small_k(Nl)) {
                // the whole last panel where the rows have room, as forward_layer (the
                // recomputed z_0 has; delta is 0 in the padding)
                const int ncw = std::min(ld, ldzb) >= round_up(K, nrl) ? nrl : nc;
                BwdTile<T> e = bwd_tile_at(0, static_cast<int>(n), j0, ncw);
                set_small_k_sums<Acc>(e.sums, d, ld, Nl, wp + j0 * Nl, nrl);
                hid.bwd(hid.self, e);
                for (int64_t ip = 0; ip < nrp; ip += MR) ahead.step();
                continue;
              }
              for (int64_t ip = 0; ip < nrp; ip += MR) {
                row_tile<Acc, W, MR, NV>(nrl, Nl, d + ip * ld, ld, wp + j0 * Nl, tile);
                ahead.step();
                const int mr = static_cast<int>(std::min<int64_t>(MR, n - ip));
                if (l == 0) {
                  T* gi = grads.grad_input + (r0 + ip) * K + j0;
                  for (int i = 0; i < mr; ++i)
                    for (int j = 0; j < nc; ++j) gi[i * K + j] = static_cast<T>(tile[i * nrl + j]);
                } else {
                  BwdTile<T> e = bwd_tile_at(ip, mr, j0, nc);
                  set_tile_sums<Acc>(e.sums, tile, nrl);
                  hid.bwd(hid.self, e);
                }
              }
            }
            std::swap(d, d2);
          }
        }
      }
    });
  };
  if (blk.chunks == 1) run_chunks(0, 1);
  else at::parallel_for(0, blk.chunks, 1, run_chunks);

  // the chunks' sums, added in chunk order: whole accumulator arrays at a time (a sum per entry
  // over the chunks would be one chain of dependent adds each)
  thread_local Scratch sum_scratch;
  Acc* sums = static_cast<Acc*>(sum_scratch.get(sizeof(Acc) * acc_size));
  gemm::run_isa<I>([&]() FO_INLINE_LAMBDA {
    std::fill(sums, sums + acc_size, Acc(0));
    for (int64_t c = 0; c < blk.chunks; ++c) {
      const Acc* part = accs + c * acc_size;
      for (int64_t e = 0; e < acc_size; ++e) sums[e] += part[e];
    }
  });
  for (int64_t l = 0; l < L; ++l) {
    const int64_t K = net.lin[l], Nl = net.lout[l];
    if (want_w) {
      T* o = grads.grad_weights[l];
      const Acc* gw = sums + gwoff[l];
      for (int64_t i = 0; i < Nl; ++i)
        for (int64_t k = 0; k < K; ++k)
          o[i * K + k] = static_cast<T>(gw[wtrans[l] ? k * gwld[l] + i : i * gwld[l] + k]);
    }
    if (want_b) {
      T* o = grads.grad_biases[l];
      for (int64_t j = 0; j < Nl; ++j) o[j] = static_cast<T>(sums[gboff[l] + j]);
    }
  }
}

// ---- the ops ------------------------------------------------------------------------------------

template <class Fn>
void with_isa(const Fn& fn) {
  switch (cpu_isa()) {
    case Isa::avx512: return fn(std::integral_constant<Isa, Isa::avx512>{});
    case Isa::avx2: return fn(std::integral_constant<Isa, Isa::avx2>{});
    default: return fn(std::integral_constant<Isa, Isa::baseline>{});
  }
}

std::tuple<Tensor, std::vector<Tensor>, Tensor> fused_mlp_forward(
    const Tensor& input, at::TensorList weights, const c10::List<c10::optional<Tensor>>& biases,
    c10::string_view activation, c10::string_view output_activation, bool save_for_backward) {
  const char* op = "fastops.fused_mlp";
  const std::string act(activation), out_act(output_activation);
  const FusedMlpDims d = check_fused_mlp(op, input, weights, biases);
  check_fused_mlp_activations(op, act, out_act);
  const std::vector<Tensor> bias_list = fused_mlp_biases(biases);
  const auto opts = input.options();
  Tensor y = empty_output({d.N, d.out_features}, opts);
  std::vector<Tensor> hidden;
  if (save_for_backward)
    for (int64_t l = 0; l + 1 < d.layers; ++l)
      hidden.push_back(l == 0 && fused_mlp_recomputes_z0(d, input)
                           ? at::empty({0}, opts)
                           : empty_output({d.N, d.hidden}, opts));
  Tensor out_preact = save_for_backward && out_act != "none"
                          ? empty_output({d.N, d.out_features}, opts)
                          : at::empty({0}, opts);
  if (d.N == 0) return {y, hidden, out_preact};
  if (fused_mlp_thin_applies(d, input, act, out_act)) {
    fused_mlp_thin_forward(d, input, weights, bias_list, act, y);
    return {y, hidden, out_preact};
  }
  FO_DISPATCH_FLOATING(input.scalar_type(), [&] {
    using T = scalar_t;
    const Net<T> net = make_net<T>(d, input);
    const ActFns<T>& hid = activation_fns<T>(act);
    const ActFns<T>& outf = activation_fns<T>(out_act);
    std::vector<T*> hp;
    for (Tensor& h : hidden) hp.push_back(h.numel() > 0 ? h.mutable_data_ptr<T>() : nullptr);
    T* op_ = out_preact.numel() > 0 ? out_preact.mutable_data_ptr<T>() : nullptr;
    with_isa([&](auto isa) {
      forward_isa<T, decltype(isa)::value>(net, weights, bias_list, hid, outf,
                                           y.mutable_data_ptr<T>(), hp, op_);
    });
  });
  return {y, hidden, out_preact};
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> fused_mlp_backward(
    const Tensor& grad_output, const Tensor& input, at::TensorList weights,
    const c10::List<c10::optional<Tensor>>& biases, at::TensorList hidden_in,
    const Tensor& out_preact_in, c10::string_view activation,
    c10::string_view output_activation, std::array<bool, 3> output_mask) {
  const char* op = "fastops.fused_mlp_backward";
  const std::string act(activation), out_act(output_activation);
  const FusedMlpDims d = check_fused_mlp(op, input, weights, biases);
  check_fused_mlp_activations(op, act, out_act);
  check_fused_mlp_backward(op, d, input, grad_output, hidden_in, out_preact_in, out_act);
  const auto opts = input.options();
  const bool want_b = output_mask[2] && d.has_bias;
  Tensor gi = output_mask[0] ? at::empty({d.N, d.in_features}, opts) : at::empty({0}, opts);
  std::vector<Tensor> gw, gb;
  for (int64_t l = 0; l < d.layers; ++l) {
    gw.push_back(output_mask[1] ? at::empty(weights[l].sizes(), opts) : at::empty({0}, opts));
    gb.push_back(want_b ? at::empty({weights[l].size(0)}, opts) : at::empty({0}, opts));
  }
  if (!output_mask[0] && !output_mask[1] && !want_b) return {gi, gw, gb};
  if (d.N == 0) {
    for (auto& t : gw) t.zero_();
    for (auto& t : gb) t.zero_();
    return {gi, gw, gb};
  }
  const std::vector<Tensor> bias_list = fused_mlp_biases(biases);
  if (fused_mlp_thin_applies(d, input, act, out_act)) {
    Tensor gi_wanted = output_mask[0] ? gi : Tensor();
    std::vector<Tensor> gw_wanted = output_mask[1] ? gw : std::vector<Tensor>();
    std::vector<Tensor> gb_wanted = want_b ? gb : std::vector<Tensor>();
    fused_mlp_thin_backward(d, grad_output, input, weights, bias_list, act, gi_wanted, gw_wanted,
                            gb_wanted);
    return {gi, gw, gb};
  }
  std::vector<Tensor> hidden;
  for (const Tensor& h : hidden_in) hidden.push_back(h.contiguous());
  const Tensor out_preact = out_act != "none" ? out_preact_in.contiguous() : out_preact_in;
  FO_DISPATCH_FLOATING(input.scalar_type(), [&] {
    using T = scalar_t;
    const Net<T> net = make_net<T>(d, input);
    const ActFns<T>& hid = activation_fns<T>(act);
    const ActFns<T>& outf = activation_fns<T>(out_act);
    Grads<T> grads;
    grads.grad_input = output_mask[0] ? gi.mutable_data_ptr<T>() : nullptr;
    if (output_mask[1])
      for (auto& t : gw) grads.grad_weights.push_back(t.mutable_data_ptr<T>());
    if (want_b)
      for (auto& t : gb) grads.grad_biases.push_back(t.mutable_data_ptr<T>());
    std::vector<const T*> hp;
    for (const Tensor& h : hidden) hp.push_back(h.numel() > 0 ? h.const_data_ptr<T>() : nullptr);
    const T* opp = out_act != "none" ? out_preact.const_data_ptr<T>() : nullptr;
    with_isa([&](auto isa) {
      backward_isa<T, decltype(isa)::value>(net, weights, bias_list, hid, outf,
                                            grad_output.const_data_ptr<T>(),
                                            grad_output.stride(0), grad_output.stride(1), hp, opp,
                                            grads);
    });
  });
  return {gi, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CPU, m) {
  m.impl("fused_mlp", &fused_mlp_forward);
  m.impl("fused_mlp_backward", &fused_mlp_backward);
}

}  // namespace cpu
}  // namespace fastops
