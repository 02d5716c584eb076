// CPU kernels of log_softmax, softmax, nll_loss and cross_entropy (fused log_softmax + nll_loss,
// hard or soft targets, class weights, ignore_index, label smoothing).
//
// Layout: the class dim is dim 1 ((C,) inputs have no batch), so an input is viewed as (N, C, S)
// with S the product of the spatial dims; a "row" is the C values of one (n, s). For S == 1 a
// row is contiguous and is processed in chunks that stay in L1 (an online softmax: running max
// and rescaled sum of exponentials, one pass over memory). For S > 1 the loops run over the
// classes with 16 neighbouring positions s in the SIMD lanes; cross entropy over rows of fewer
// than 16 classes runs 16 rows at a time the same way, through a class-major copy of the block.
//
// Determinism: per-row losses are summed in a fixed order (fixed blocks of rows, then the blocks
// in order), whatever the number of threads; there are no atomics.
#include <torch/library.h>

#include <array>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../activations.h"
#include "../loss_checks.h"
#include "../loss_functors.h"
#include "cpu_common.h"
#include "max_lanes.h"

namespace fastops {
namespace cpu {
namespace {

using at::Tensor;
using namespace fastops::loss;

constexpr int kLanes = 16;          // SIMD lanes of the accumulator arrays
constexpr int64_t kChunk = 2048;    // classes per chunk of a contiguous row (8 KB of float)
constexpr int64_t kClassBlock = 64; // classes per block of the lane (S > 1) kernels
constexpr int64_t kSumBlock = 4096; // rows / elements per block of a deterministic sum

template <class A>
FO_ALWAYS_INLINE A fmax_(A a, A b) { return a > b ? a : b; }  // drops a NaN in a (max of row)

template <class A>
FO_ALWAYS_INLINE A neg_inf() { return -std::numeric_limits<A>::infinity(); }

// fo_log (about 1 ulp, as torch's vectorised log) vectorises over the lanes of lane_stats;
// libm's logf is a call per row.
template <class A>
FO_ALWAYS_INLINE A log_(A v) { return fo_log(v); }

// ---- target checks and sums ----------------------------------------------------------------

// Checks every class target (ignore_index excepted) and returns the count of the non-ignored:
// one branch-free pass, and only when it finds a bad one a second pass for the first, to name
// it.
template <class I>
int64_t check_targets(const I* t, int64_t n, int64_t C, int64_t ignore_index, const char* op) {
  bool bad = false;
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t ti = static_cast<int64_t>(t[i]);
    const bool kept = ti != ignore_index;
    bad |= kept && (ti < 0 || ti >= C);
    count += kept;
  }
  if (!bad) return count;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t ti = static_cast<int64_t>(t[i]);
    TORCH_CHECK_INDEX(ti == ignore_index || (ti >= 0 && ti < C), op, ": target ", ti,
                      " (at flat index ", i, ") is out of bounds: expected a class index in [0, ",
                      C, ") or ignore_index (", ignore_index, ")");
  }
  return count;  // (not reached)
}

// check_targets, and the total weight: the sum of the weights of the non-ignored targets
// (their count without weights), summed in order.
template <class I, class T>
double check_targets_total_weight(const I* t, int64_t n, const T* w, int64_t C,
                                  int64_t ignore_index, const char* op) {
  const int64_t count = check_targets(t, n, C, ignore_index, op);
  if (w == nullptr) return static_cast<double>(count);
  double total = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t ti = static_cast<int64_t>(t[i]);
    if (ti != ignore_index) total += static_cast<double>(w[ti]);
  }
  return total;
}

#define FO_DISPATCH_TARGET(TT, ...)                                \
  [&] {                                                            \
    if ((TT) == at::kByte) {                                       \
      using index_t = uint8_t;                                     \
      return __VA_ARGS__();                                        \
    } else {                                                       \
      using index_t = int64_t;                                     \
      return __VA_ARGS__();                                        \
    }                                                              \
  }()

// Sum of v[0..n) in a fixed order: fixed blocks in parallel, then the blocks in order.
template <class A>
double deterministic_sum(const A* v, int64_t n) {
  const int64_t nb = (n + kSumBlock - 1) / kSumBlock;
  std::vector<double> part(nb, 0.0);
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double s = 0;
      const int64_t e = std::min(n, (b + 1) * kSumBlock);
      for (int64_t i = b * kSumBlock; i < e; ++i) s += static_cast<double>(v[i]);
      part[b] = s;
    }
  });
  double s = 0;
  for (double p : part) s += p;
  return s;
}

// ---- row statistics of the softmax -----------------------------------------------------------
//
// MODE: 0 lse only; 1 also dot = sum_c x_c; 2 also dot = sum_c w_c x_c (label smoothing);
//       3 soft targets: a = sum_c y'_c, dot = sum_c y'_c x_c; 4 the same with w_c y'_c
//       where y'_c = (1 - eps) y_c + eps / C.
struct Smooth {
  double om_eps;  // 1 - eps
  double eps_c;   // eps / C
};

// One contiguous row of C values: x[c], y[c] (soft targets), w[c].
template <int MODE, class T, class A>
FO_ALWAYS_INLINE void row_stats(const T* x, const T* y, const T* w, int64_t C, A om_eps, A eps_c,
                                A& lse, A& a_out, A& dot_out) {
  A M = neg_inf<A>();
  A sum = 0;
  A dot[kLanes], aa[kLanes];
  for (int j = 0; j < kLanes; ++j) dot[j] = 0, aa[j] = 0;
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    const int64_t len = std::min(kChunk, C - c0);
    const T* xc = x + c0;
    int64_t i = 0;
    const A nm = fmax_(row_max<A>(xc, len), M);
    // While the max is -inf, shifting by it would give exp(-inf + inf) = NaN for every value.
    if (nm != neg_inf<A>()) {
      if (nm != M) sum *= fo_exp(M - nm);
      M = nm;
      A se[kLanes];
      for (int j = 0; j < kLanes; ++j) se[j] = 0;
      i = 0;
      for (; i + kLanes <= len; i += kLanes)
        for (int j = 0; j < kLanes; ++j) {
          const A v = static_cast<A>(xc[i + j]);
          se[j] += fo_exp(v - M);
          if constexpr (MODE == 1) dot[j] += v;
          if constexpr (MODE == 2) dot[j] += static_cast<A>(w[c0 + i + j]) * v;
          if constexpr (MODE >= 3) {
            A yv = static_cast<A>(y[c0 + i + j]) * om_eps + eps_c;
            if constexpr (MODE == 4) yv *= static_cast<A>(w[c0 + i + j]);
            aa[j] += yv;
            dot[j] += yv * v;
          }
        }
      A s = 0;
      for (int j = 0; j < kLanes; ++j) s += se[j];
      for (; i < len; ++i) {
        const A v = static_cast<A>(xc[i]);
        s += fo_exp(v - M);
        if constexpr (MODE == 1) dot[0] += v;
        if constexpr (MODE == 2) dot[0] += static_cast<A>(w[c0 + i]) * v;
        if constexpr (MODE >= 3) {
          A yv = static_cast<A>(y[c0 + i]) * om_eps + eps_c;
          if constexpr (MODE == 4) yv *= static_cast<A>(w[c0 + i]);
          aa[0] += yv;
          dot[0] += yv * v;
        }
      }
      sum += s;
    } else {
      // Every value so far is -inf or NaN (the max skips NaN). exp(v) adds 0 for -inf and makes
      // the sum NaN for a NaN, which must reach lse whichever chunk holds it; the dot products
      // still see the values.
      for (i = 0; i < len; ++i) {
        const A v = static_cast<A>(xc[i]);
        sum += fo_exp(v);
        if constexpr (MODE == 1) dot[0] += v;
        if constexpr (MODE == 2) dot[0] += static_cast<A>(w[c0 + i]) * v;
        if constexpr (MODE >= 3) {
          A yv = static_cast<A>(y[c0 + i]) * om_eps + eps_c;
          if constexpr (MODE == 4) yv *= static_cast<A>(w[c0 + i]);
          aa[0] += yv;
          dot[0] += yv * v;
        }
      }
    }
  }
  lse = M + log_(sum);  // all -inf: -inf + log(0) = -inf, as torch's logsumexp
  A d = 0, a = 0;
  for (int j = 0; j < kLanes; ++j) d += dot[j], a += aa[j];
  dot_out = d;
  a_out = a;
}

// NL rows at once, the lanes being NL consecutive positions s of a (N, C, S) input (S > 1):
// x points at (n, 0, s0), classes are S apart.
template <int NL, int MODE, class T, class A>
FO_ALWAYS_INLINE void lane_stats(const T* x, const T* y, const T* w, int64_t C, int64_t S,
                                 A om_eps, A eps_c, A* lse, A* a_out, A* dot_out) {
  A M[NL], sum[NL], dot[NL], aa[NL];
  for (int j = 0; j < NL; ++j) M[j] = neg_inf<A>(), sum[j] = 0, dot[j] = 0, aa[j] = 0;
  for (int64_t c0 = 0; c0 < C; c0 += kClassBlock) {
    const int64_t c1 = std::min(C, c0 + kClassBlock);
    A nm[NL];
    for (int j = 0; j < NL; ++j) nm[j] = M[j];
    if constexpr (NL == MaxLanes<A>::N) {
      MaxLanes<A> mv = MaxLanes<A>::neg_inf();
      for (int64_t c = c0; c < c1; ++c) mv = mv.max_with(MaxLanes<A>::load(x + c * S));
      MaxLanes<A>::load(nm).max_with(mv).store(nm);
    } else {
      for (int64_t c = c0; c < c1; ++c)
        for (int j = 0; j < NL; ++j) nm[j] = fmax_(static_cast<A>(x[c * S + j]), nm[j]);
    }
    for (int j = 0; j < NL; ++j) {
      const A sc = fo_exp(M[j] - nm[j]);
      sum[j] = nm[j] == M[j] ? sum[j] : sum[j] * sc;
      M[j] = nm[j];
    }
    for (int64_t c = c0; c < c1; ++c) {
      A wc = 1;
      if constexpr (MODE == 2 || MODE == 4) wc = static_cast<A>(w[c]);
      for (int j = 0; j < NL; ++j) {
        const A v = static_cast<A>(x[c * S + j]);
        // while the max is -inf, shift by 0: exp(-inf) adds 0 and a NaN makes the sum NaN
        sum[j] += fo_exp(v - (M[j] == neg_inf<A>() ? A(0) : M[j]));
        if constexpr (MODE == 1) dot[j] += v;
        if constexpr (MODE == 2) dot[j] += wc * v;
        if constexpr (MODE >= 3) {
          A yv = static_cast<A>(y[c * S + j]) * om_eps + eps_c;
          if constexpr (MODE == 4) yv *= wc;
          aa[j] += yv;
          dot[j] += yv * v;
        }
      }
    }
  }
  for (int j = 0; j < NL; ++j) {
    lse[j] = M[j] + log_(sum[j]);
    dot_out[j] = dot[j];
    a_out[j] = aa[j];
  }
}

// Rows with fewer classes than lanes run kLanes rows at a time as the lanes of the kernels above:
// a row alone would leave most of a vector empty and pay a horizontal reduction per row. The
// block's values go class-major into dst (dst[c * kLanes + j] = row j's class c), zero in the
// lanes past the last row. Every per-lane sum runs over the classes in order, as row_stats sums
// a row of fewer than kLanes classes: the same sums as a row at a time.
template <class T>
FO_ALWAYS_INLINE void rows_to_lanes(const T* src, int64_t C, int64_t nl, T* dst) {
  if (nl == kLanes) {  // a full block: no select in the loop
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < kLanes; ++j) dst[c * kLanes + j] = src[j * C + c];
    return;
  }
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < kLanes; ++j)
      dst[c * kLanes + j] = j < nl ? src[j * C + c] : static_cast<T>(0);
}

// The inverse for the first nl lanes: row j's class c = src[c * kLanes + j].
template <class T>
FO_ALWAYS_INLINE void lanes_to_rows(const T* src, int64_t C, int64_t nl, T* dst) {
  if (nl == kLanes) {  // a full block: a fixed-length inner loop
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < kLanes; ++j) dst[j * C + c] = src[c * kLanes + j];
    return;
  }
  for (int64_t j = 0; j < nl; ++j)
    for (int64_t c = 0; c < C; ++c) dst[j * C + c] = src[c * kLanes + j];
}

// ---- cross entropy ---------------------------------------------------------------------------

// Blocks of kLanes rows per thread task for rows of C < kLanes classes: about 8192 values. A
// value costs an exp here, a nanosecond or more, so a task takes microseconds, more than waking
// a second thread (tasks of 65536 values, the row-at-a-time path's, kept a 3000 x 3 batch on
// one).
int64_t small_class_grain(int64_t C) {
  return std::max<int64_t>(1, 8192 / (kLanes * std::max<int64_t>(1, C)));
}

struct CEParams {
  Rows r;
  int64_t reduction, ignore_index;
  double eps;
  bool soft, has_w;
};

int ce_mode(const CEParams& p) {
  if (p.soft) return p.has_w ? 4 : 3;
  if (p.eps > 0) return p.has_w ? 2 : 1;
  return 0;
}

// Calls body.template operator()<MODE>() with the mode as a compile-time constant.
template <class Body>
void dispatch_mode(int mode, const Body& body) {
  switch (mode) {
    case 0: body(std::integral_constant<int, 0>()); break;
    case 1: body(std::integral_constant<int, 1>()); break;
    case 2: body(std::integral_constant<int, 2>()); break;
    case 3: body(std::integral_constant<int, 3>()); break;
    default: body(std::integral_constant<int, 4>()); break;
  }
}

// The loss of one row from its statistics.
template <int MODE, class A, class T, class I>
FO_ALWAYS_INLINE A ce_row_loss(A lse, A a, A dot, const T* xrow, int64_t cstride, const T* w,
                               const I* t, int64_t row, int64_t ignore_index, A om_eps, A eps_c,
                               A wsum) {
  if constexpr (MODE >= 3) {
    return lse * a - dot;
  } else {
    const int64_t ti = static_cast<int64_t>(t[row]);
    if (ti == ignore_index) return A(0);
    const A wt = w ? static_cast<A>(w[ti]) : A(1);
    const A nll = wt * (lse - static_cast<A>(xrow[ti * cstride]));
    if constexpr (MODE == 0) return nll;
    // eps / C * sum_c w_c (lse - x_c)
    return om_eps * nll + eps_c * (wsum * lse - dot);
  }
}

std::tuple<Tensor, Tensor, Tensor> cross_entropy_fwd(const Tensor& self, const Tensor& target,
                                                     const c10::optional<Tensor>& weight,
                                                     int64_t reduction, int64_t ignore_index,
                                                     double label_smoothing) {
  const char* op = "fastops.cross_entropy";
  const Rows r = check_cross_entropy(self, target, weight, reduction, label_smoothing, op);
  const bool soft = at::isFloatingType(target.scalar_type());
  const Tensor x = self.contiguous();
  const Tensor tg = target.contiguous();
  const Tensor w = weight_or_undefined(weight);
  const auto rshape = row_shape(self);
  const auto adt = acc_dtype(self.scalar_type());
  Tensor lse = at::empty(rshape, self.options().dtype(adt));
  Tensor loss = reduction == kNone ? at::empty(rshape, self.options())
                                   : at::empty({}, self.options());
  Tensor total_weight = at::empty({}, self.options().dtype(adt));
  CEParams p{r, reduction, ignore_index, label_smoothing, soft, w.defined()};
  const int mode = ce_mode(p);
  const int64_t rows = r.rows();

  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* yp = soft ? tg.const_data_ptr<scalar_t>() : nullptr;
    const A om_eps = static_cast<A>(1.0 - label_smoothing);
    const A eps_c = r.C > 0 ? static_cast<A>(label_smoothing / r.C) : A(0);
    A wsum = 0;
    if (wp) {
      double s = 0;
      for (int64_t c = 0; c < r.C; ++c) s += static_cast<double>(wp[c]);
      wsum = static_cast<A>(s);
    } else {
      wsum = static_cast<A>(r.C);
    }
    FO_DISPATCH_TARGET(tg.scalar_type(), [&] {
      const index_t* tp = soft ? nullptr : tg.const_data_ptr<index_t>();
      double tw = static_cast<double>(rows);
      if (!soft) tw = check_targets_total_weight(tp, rows, wp, r.C, ignore_index, op);
      total_weight.fill_(tw);
      // Per-row losses: into the output for 'none', else into a buffer summed in order.
      std::vector<A> buf(reduction == kNone ? 0 : rows);
      A* lp = lse.mutable_data_ptr<A>();
      scalar_t* outp = reduction == kNone ? loss.mutable_data_ptr<scalar_t>() : nullptr;
      auto store = [&](int64_t row, A v) FO_INLINE_LAMBDA {
        if (outp) outp[row] = static_cast<scalar_t>(v);
        else buf[row] = v;
      };
      dispatch_mode(mode, [&](auto mode_c) {
        constexpr int MODE = decltype(mode_c)::value;
        if (r.S == 1 && r.C < kLanes) {
          const int64_t nblk = (rows + kLanes - 1) / kLanes;
          const int64_t grain = small_class_grain(r.C);
          at::parallel_for(0, nblk, grain, [&](int64_t b, int64_t e) {
            dispatch_isa([&]() FO_INLINE_LAMBDA {
              scalar_t xt[kLanes * kLanes], yt[kLanes * kLanes];
              for (int64_t blk = b; blk < e; ++blk) {
                const int64_t row0 = blk * kLanes;
                const int64_t nl = std::min<int64_t>(kLanes, rows - row0);
                rows_to_lanes(xp + row0 * r.C, r.C, nl, xt);
                if (yp) rows_to_lanes(yp + row0 * r.C, r.C, nl, yt);
                A l[kLanes], a[kLanes], d[kLanes];
                lane_stats<kLanes, MODE>(xt, yp ? yt : yp, wp, r.C, kLanes, om_eps, eps_c, l, a,
                                         d);
                for (int64_t j = 0; j < nl; ++j) {
                  const int64_t n = row0 + j;
                  lp[n] = l[j];
                  store(n, ce_row_loss<MODE>(l[j], a[j], d[j], xp + n * r.C, 1, wp, tp, n,
                                             ignore_index, om_eps, eps_c, wsum));
                }
              }
            });
          });
        } else if (r.S == 1) {
          const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, r.C));
          at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
            dispatch_isa([&]() FO_INLINE_LAMBDA {
              for (int64_t n = b; n < e; ++n) {
                const scalar_t* xr = xp + n * r.C;
                A l, a, d;
                row_stats<MODE>(xr, yp ? yp + n * r.C : yp, wp, r.C, om_eps, eps_c, l, a, d);
                lp[n] = l;
                store(n, ce_row_loss<MODE>(l, a, d, xr, 1, wp, tp, n, ignore_index, om_eps,
                                           eps_c, wsum));
              }
            });
          });
        } else {
          // Tasks: (n, block of kLanes positions s); the last block of each n may be partial.
          const int64_t nblk = (r.S + kLanes - 1) / kLanes;
          const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, r.C));
          at::parallel_for(0, r.N * nblk, grain, [&](int64_t b, int64_t e) {
            dispatch_isa([&]() FO_INLINE_LAMBDA {
              for (int64_t task = b; task < e; ++task) {
                const int64_t n = task / nblk, s0 = (task % nblk) * kLanes;
                const int64_t base = n * r.C * r.S + s0;
                const int64_t row0 = n * r.S + s0;
                A l[kLanes], a[kLanes], d[kLanes];
                const int64_t nl = std::min<int64_t>(kLanes, r.S - s0);
                if (nl == kLanes) {
                  lane_stats<kLanes, MODE>(xp + base, yp ? yp + base : yp, wp, r.C, r.S, om_eps,
                                           eps_c, l, a, d);
                } else {
                  for (int64_t j = 0; j < nl; ++j)
                    lane_stats<1, MODE>(xp + base + j, yp ? yp + base + j : yp, wp, r.C, r.S,
                                        om_eps, eps_c, l + j, a + j, d + j);
                }
                for (int64_t j = 0; j < nl; ++j) {
                  lp[row0 + j] = l[j];
                  store(row0 + j, ce_row_loss<MODE>(l[j], a[j], d[j], xp + base + j, r.S, wp, tp,
                                                    row0 + j, ignore_index, om_eps, eps_c, wsum));
                }
              }
            });
          });
        }
      });
      if (reduction != kNone) {
        double s = deterministic_sum(buf.data(), rows);
        if (reduction == kMean) {
          // Hard targets: the sum over the total weight, NaN when that is 0 (all ignored, or
          // zero weights: torch's nll part is then 0 / 0 even where label smoothing adds to the
          // sum); soft targets: over the number of rows (NaN for an empty batch), as torch.
          s = tw == 0 ? std::numeric_limits<double>::quiet_NaN() : s / tw;
        }
        loss.fill_(s);
      }
    });
  });
  return {loss, lse, total_weight};
}

Tensor cross_entropy_bwd(const Tensor& grad_output, const Tensor& self, const Tensor& target,
                         const c10::optional<Tensor>& weight, int64_t reduction,
                         int64_t ignore_index, double label_smoothing, const Tensor& lse,
                         const Tensor& total_weight) {
  const char* op = "fastops.cross_entropy_backward";
  const Rows r = check_cross_entropy_backward(grad_output, self, target, weight, reduction, lse,
                                              total_weight, op);
  const auto adt = acc_dtype(self.scalar_type());
  const bool soft = at::isFloatingType(target.scalar_type());
  const Tensor x = self.contiguous();
  const Tensor tg = target.contiguous();
  const Tensor w = weight_or_undefined(weight);
  const Tensor ls = lse.contiguous();
  const Tensor g = grad_output.to(adt).contiguous();
  Tensor gx = empty_output(x);
  CEParams p{r, reduction, ignore_index, label_smoothing, soft, w.defined()};
  const int mode = ce_mode(p);
  const int64_t rows = r.rows();
  if (x.numel() == 0) return gx;
  const double tw = total_weight.item<double>();  // any dtype, read as double

  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* yp = soft ? tg.const_data_ptr<scalar_t>() : nullptr;
    const A* lp = ls.const_data_ptr<A>();
    const A* gp = g.const_data_ptr<A>();
    scalar_t* op_ = gx.mutable_data_ptr<scalar_t>();
    const A om_eps = static_cast<A>(1.0 - label_smoothing);
    const A eps_c = static_cast<A>(label_smoothing / r.C);
    A wsum = 0;
    if (wp) {
      double s = 0;
      for (int64_t c = 0; c < r.C; ++c) s += static_cast<double>(wp[c]);
      wsum = static_cast<A>(s);
    } else {
      wsum = static_cast<A>(r.C);
    }
    const A gscale = reduction == kMean ? static_cast<A>(static_cast<double>(gp[0]) / tw) : gp[0];
    FO_DISPATCH_TARGET(tg.scalar_type(), [&] {
      const index_t* tp = soft ? nullptr : tg.const_data_ptr<index_t>();
      if (!soft) check_targets(tp, rows, r.C, ignore_index, op);
      dispatch_mode(mode, [&](auto mode_c) {
        constexpr int MODE = decltype(mode_c)::value;
        // The lanes of one task: kLanes rows (positions s of one n, or rows of fewer classes than
        // lanes) whose class c values are xb[c * S + j] (yb soft targets, gb the gradient); rows
        // row0 .. row0 + nl are real, and `computed` lanes are computed (all kLanes where the
        // lanes past nl are padding).
        const auto lane_task = [&](const scalar_t* xb, const scalar_t* yb, scalar_t* gb,
                                   int64_t S, int64_t row0, int64_t nl,
                                   int64_t computed) FO_INLINE_LAMBDA {
          // Per-lane coefficients; an ignored row gets coef = cw = 0 (and NaN-free zeros
          // below through the select). Hard targets: lane j's target class tl[j] (-1 where
          // none) takes tsub[j] off, in the same vector loop as the other classes.
          A coef[kLanes], cwl[kLanes], l[kLanes], keep[kLanes], tsub[kLanes];
          int64_t tl[kLanes];
          for (int j = 0; j < kLanes; ++j)
            coef[j] = 0, cwl[j] = 0, l[j] = 0, keep[j] = 0, tsub[j] = 0, tl[j] = -1;
          for (int64_t j = 0; j < nl; ++j) {
            const A gn = reduction == kNone ? gp[row0 + j] : gscale;
            l[j] = lp[row0 + j];
            if constexpr (MODE >= 3) {
              A a = 0;
              for (int64_t c = 0; c < r.C; ++c) {
                A yv = static_cast<A>(yb[c * S + j]) * om_eps + eps_c;
                if constexpr (MODE == 4) yv *= static_cast<A>(wp[c]);
                a += yv;
              }
              coef[j] = gn * a;
              cwl[j] = gn;
              keep[j] = 1;
            } else {
              const int64_t ti = static_cast<int64_t>(tp[row0 + j]);
              if (ti == ignore_index) continue;
              const A wt = wp ? static_cast<A>(wp[ti]) : A(1);
              coef[j] = MODE == 0 ? gn * wt : gn * (om_eps * wt + eps_c * wsum);
              cwl[j] = gn * eps_c;
              keep[j] = 1;
              tl[j] = ti;
              tsub[j] = MODE == 0 ? gn * wt : gn * om_eps * wt;
            }
          }
          // lanes j < n of every class: n a compile-time kLanes (the vectorised loop) or the
          // count of a partial task
          const auto grads = [&](auto n) FO_INLINE_LAMBDA {
            for (int64_t c = 0; c < r.C; ++c) {
              const scalar_t* xc = xb + c * S;
              scalar_t* gc = gb + c * S;
              A wc = 1;
              if constexpr (MODE == 2 || MODE == 4) wc = static_cast<A>(wp[c]);
              for (int j = 0; j < n; ++j) {
                A v = fo_exp(static_cast<A>(xc[j]) - l[j]) * coef[j];
                if constexpr (MODE == 1) v -= cwl[j];
                if constexpr (MODE == 2) v -= cwl[j] * wc;
                if constexpr (MODE >= 3) {
                  A yv = static_cast<A>(yb[c * S + j]) * om_eps + eps_c;
                  if constexpr (MODE == 4) yv *= wc;
                  v -= cwl[j] * yv;
                } else {
                  v -= c == tl[j] ? tsub[j] : A(0);
                }
                gc[j] = static_cast<scalar_t>(keep[j] != 0 ? v : A(0));
              }
            }
          };
          if (computed == kLanes) grads(std::integral_constant<int, kLanes>());
          else grads(static_cast<int>(computed));
        };
        // Row coefficients: grad_c = g * (p_c * coef - cw * w_c [- y'_c w_c for soft]) and
        // at the target class additionally - g * (1 - eps) * w_t.
        if (r.S == 1 && r.C >= kLanes) {
          const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, r.C));
          at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
            dispatch_isa([&]() FO_INLINE_LAMBDA {
              for (int64_t n = b; n < e; ++n) {
                const scalar_t* xr = xp + n * r.C;
                scalar_t* gr = op_ + n * r.C;
                const A gn = reduction == kNone ? gp[n] : gscale;
                const A l = lp[n];
                if constexpr (MODE >= 3) {
                  const scalar_t* yr = yp + n * r.C;
                  A aa[kLanes];
                  for (int j = 0; j < kLanes; ++j) aa[j] = 0;
                  int64_t c = 0;
                  for (; c + kLanes <= r.C; c += kLanes)
                    for (int j = 0; j < kLanes; ++j) {
                      A yv = static_cast<A>(yr[c + j]) * om_eps + eps_c;
                      if constexpr (MODE == 4) yv *= static_cast<A>(wp[c + j]);
                      aa[j] += yv;
                    }
                  A a = 0;
                  for (int j = 0; j < kLanes; ++j) a += aa[j];
                  for (; c < r.C; ++c) {
                    A yv = static_cast<A>(yr[c]) * om_eps + eps_c;
                    if constexpr (MODE == 4) yv *= static_cast<A>(wp[c]);
                    a += yv;
                  }
                  const A coef = gn * a;
                  for (c = 0; c < r.C; ++c) {
                    A yv = static_cast<A>(yr[c]) * om_eps + eps_c;
                    if constexpr (MODE == 4) yv *= static_cast<A>(wp[c]);
                    gr[c] = static_cast<scalar_t>(fo_exp(static_cast<A>(xr[c]) - l) * coef -
                                                  gn * yv);
                  }
                } else {
                  const int64_t ti = static_cast<int64_t>(tp[n]);
                  if (ti == ignore_index) {
                    for (int64_t c = 0; c < r.C; ++c) gr[c] = static_cast<scalar_t>(0);
                    continue;
                  }
                  const A wt = wp ? static_cast<A>(wp[ti]) : A(1);
                  const A coef = MODE == 0 ? gn * wt : gn * (om_eps * wt + eps_c * wsum);
                  const A cw = gn * eps_c;
                  for (int64_t c = 0; c < r.C; ++c) {
                    A v = fo_exp(static_cast<A>(xr[c]) - l) * coef;
                    if constexpr (MODE == 1) v -= cw;
                    if constexpr (MODE == 2) v -= cw * static_cast<A>(wp[c]);
                    gr[c] = static_cast<scalar_t>(v);
                  }
                  A v = fo_exp(static_cast<A>(xr[ti]) - l) * coef;
                  if constexpr (MODE == 1) v -= cw;
                  if constexpr (MODE == 2) v -= cw * wt;
                  gr[ti] = static_cast<scalar_t>(v - (MODE == 0 ? gn * wt : gn * om_eps * wt));
                }
              }
            });
          });
        } else if (r.S == 1) {  // fewer classes than lanes
          const int64_t nblk = (rows + kLanes - 1) / kLanes;
          const int64_t grain = small_class_grain(r.C);
          at::parallel_for(0, nblk, grain, [&](int64_t b, int64_t e) {
            dispatch_isa([&]() FO_INLINE_LAMBDA {
              scalar_t xt[kLanes * kLanes], yt[kLanes * kLanes], gt[kLanes * kLanes];
              for (int64_t blk = b; blk < e; ++blk) {
                const int64_t row0 = blk * kLanes;
                const int64_t nl = std::min<int64_t>(kLanes, rows - row0);
                rows_to_lanes(xp + row0 * r.C, r.C, nl, xt);
                if (yp) rows_to_lanes(yp + row0 * r.C, r.C, nl, yt);
                lane_task(xt, yp ? yt : yp, gt, kLanes, row0, nl, kLanes);
                lanes_to_rows(gt, r.C, nl, op_ + row0 * r.C);
              }
            });
          });
        } else {
          const int64_t nblk = (r.S + kLanes - 1) / kLanes;
          const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, r.C));
          at::parallel_for(0, r.N * nblk, grain, [&](int64_t b, int64_t e) {
            dispatch_isa([&]() FO_INLINE_LAMBDA {
              for (int64_t task = b; task < e; ++task) {
                const int64_t n = task / nblk, s0 = (task % nblk) * kLanes;
                const int64_t nl = std::min<int64_t>(kLanes, r.S - s0);
                const int64_t base = n * r.C * r.S + s0;
                lane_task(xp + base, yp ? yp + base : yp, op_ + base, r.S, n * r.S + s0, nl, nl);
              }
            });
          });
        }
      });
    });
  });
  return gx;
}

// ---- nll_loss --------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> nll_loss_fwd(const Tensor& self, const Tensor& target,
                                        const c10::optional<Tensor>& weight, int64_t reduction,
                                        int64_t ignore_index) {
  const char* op = "fastops.nll_loss";
  const Rows r = check_nll_loss(self, target, weight, reduction, op);
  const Tensor x = self.contiguous();
  const Tensor tg = target.contiguous();
  const Tensor w = weight_or_undefined(weight);
  const auto rshape = row_shape(self);
  const auto adt = acc_dtype(self.scalar_type());
  Tensor loss = reduction == kNone ? at::empty(rshape, self.options())
                                   : at::empty({}, self.options());
  Tensor total_weight = at::empty({}, self.options().dtype(adt));
  const int64_t rows = r.rows();
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
    FO_DISPATCH_TARGET(tg.scalar_type(), [&] {
      const index_t* tp = tg.const_data_ptr<index_t>();
      const double tw = check_targets_total_weight(tp, rows, wp, r.C, ignore_index, op);
      total_weight.fill_(tw);
      std::vector<A> buf(reduction == kNone ? 0 : rows);
      scalar_t* outp = reduction == kNone ? loss.mutable_data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, rows, kElementwiseGrain, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const int64_t n = i / r.S, s = i % r.S;
          const int64_t ti = static_cast<int64_t>(tp[i]);
          A v = 0;
          if (ti != ignore_index) {
            const A wt = wp ? static_cast<A>(wp[ti]) : A(1);
            v = -wt * static_cast<A>(xp[(n * r.C + ti) * r.S + s]);
          }
          if (outp) outp[i] = static_cast<scalar_t>(v);
          else buf[i] = v;
        }
      });
      if (reduction != kNone) {
        double s = deterministic_sum(buf.data(), rows);
        if (reduction == kMean) s /= tw;
        loss.fill_(s);
      }
    });
  });
  return {loss, total_weight};
}

Tensor nll_loss_bwd(const Tensor& grad_output, const Tensor& self, const Tensor& target,
                    const c10::optional<Tensor>& weight, int64_t reduction, int64_t ignore_index,
                    const Tensor& total_weight) {
  const char* op = "fastops.nll_loss_backward";
  const Rows r = check_nll_loss_backward(grad_output, self, target, weight, reduction,
                                         total_weight, op);
  const auto adt = acc_dtype(self.scalar_type());
  const Tensor tg = target.contiguous();
  const Tensor w = weight_or_undefined(weight);
  const Tensor g = grad_output.to(adt).contiguous();
  Tensor gx = empty_output(self);
  if (gx.numel() == 0) return gx;
  const double tw = total_weight.item<double>();  // any dtype, read as double
  const int64_t rows = r.rows();
  FO_DISPATCH_FLOATING(self.scalar_type(), [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* wp = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
    const A* gp = g.const_data_ptr<A>();
    scalar_t* op_ = gx.mutable_data_ptr<scalar_t>();
    const A gscale = reduction == kMean ? static_cast<A>(static_cast<double>(gp[0]) / tw) : gp[0];
    FO_DISPATCH_TARGET(tg.scalar_type(), [&] {
      const index_t* tp = tg.const_data_ptr<index_t>();
      check_targets(tp, rows, r.C, ignore_index, op);
      // Per n: zero the (C, S) slab, then set the targets.
      const int64_t slab = r.C * r.S;
      at::parallel_for(0, r.N, std::max<int64_t>(1, kElementwiseGrain / std::max<int64_t>(1, slab)),
                       [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          scalar_t* gs = op_ + n * slab;
          std::fill(gs, gs + slab, static_cast<scalar_t>(0));
          for (int64_t s = 0; s < r.S; ++s) {
            const int64_t i = n * r.S + s;
            const int64_t ti = static_cast<int64_t>(tp[i]);
            if (ti == ignore_index) continue;
            const A wt = wp ? static_cast<A>(wp[ti]) : A(1);
            const A gn = reduction == kNone ? gp[i] : gscale;
            gs[ti * r.S + s] = static_cast<scalar_t>(-wt * gn);
          }
        }
      });
    });
  });
  return gx;
}

// ---- log_softmax and softmax -----------------------------------------------------------------
//
// Forward: the row's lse in one online pass (row_stats / lane_stats), then one pass writing
// x - lse (log_softmax) or exp(x - lse) (softmax). Backward, from the output y:
//   log_softmax: g - exp(y) * sum(g)      softmax: y * (g - sum(g * y))

template <bool Log, class A>
FO_ALWAYS_INLINE A softmax_out(A x, A lse) {
  if constexpr (Log) return x - lse;
  else return fo_exp(x - lse);
}

// The row sum the backward needs: sum(g) (log_softmax) or sum(g * y) (softmax).
template <bool Log, class A>
FO_ALWAYS_INLINE A softmax_bwd_term(A g, A y) {
  if constexpr (Log) return g;
  else return g * y;
}

template <bool Log, class A>
FO_ALWAYS_INLINE A softmax_grad(A g, A y, A s) {
  if constexpr (Log) return g - fo_exp(y) * s;
  else return y * (g - s);
}

// softmax of one contiguous float / double row with one exp per element: the max, then
// y = exp(x - max) with its sum, then y *= 1 / sum while the row is still in cache. (The online
// pass of row_stats computes each exp twice: once for the sum, once for the output.) A NaN, or
// a row of -inf, makes the whole row NaN, as in torch.
template <class A>
FO_ALWAYS_INLINE void softmax_row(const A* x, A* y, int64_t C) {
  const A M = row_max<A>(x, C);
  A acc[kLanes];
  for (int j = 0; j < kLanes; ++j) acc[j] = 0;
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const A v = fo_exp(x[c + j] - M);
      y[c + j] = v;
      acc[j] += v;
    }
  A sum = 0;
  for (int j = 0; j < kLanes; ++j) sum += acc[j];
  for (; c < C; ++c) {
    const A v = fo_exp(x[c] - M);
    y[c] = v;
    sum += v;
  }
  const A inv = A(1) / sum;
  for (c = 0; c < C; ++c) y[c] *= inv;
}

template <bool Log>
Tensor softmax_forward(const Tensor& self, int64_t dim, const char* op) {
  const DimLayout l = check_log_softmax(self, dim, op);
  const Tensor x = self.contiguous();
  Tensor y = empty_output(x);
  if (x.numel() == 0) return y;
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    if (l.inner == 1) {
      at::parallel_for(0, l.outer, std::max<int64_t>(1, 65536 / l.C), [&](int64_t b, int64_t e) {
        dispatch_isa([&]() FO_INLINE_LAMBDA {
          for (int64_t n = b; n < e; ++n) {
            const scalar_t* xr = xp + n * l.C;
            scalar_t* yr = yp + n * l.C;
            if constexpr (!Log && std::is_same_v<scalar_t, A>) {
              softmax_row(xr, yr, l.C);
              continue;
            }
            A lse, a, d;
            row_stats<0>(xr, xr, xr, l.C, A(1), A(0), lse, a, d);
            for (int64_t c = 0; c < l.C; ++c)
              yr[c] = static_cast<scalar_t>(softmax_out<Log>(static_cast<A>(xr[c]), lse));
          }
        });
      });
    } else {
      const int64_t nblk = (l.inner + kLanes - 1) / kLanes;
      at::parallel_for(0, l.outer * nblk, std::max<int64_t>(1, 4096 / l.C),
                       [&](int64_t b, int64_t e) {
        dispatch_isa([&]() FO_INLINE_LAMBDA {
          for (int64_t task = b; task < e; ++task) {
            const int64_t n = task / nblk, s0 = (task % nblk) * kLanes;
            const int64_t nl = std::min<int64_t>(kLanes, l.inner - s0);
            const int64_t base = n * l.C * l.inner + s0;
            A lse[kLanes], a[kLanes], d[kLanes];
            if (nl == kLanes) {
              lane_stats<kLanes, 0>(xp + base, xp, xp, l.C, l.inner, A(1), A(0), lse, a, d);
            } else {
              for (int64_t j = 0; j < nl; ++j)
                lane_stats<1, 0>(xp + base + j, xp, xp, l.C, l.inner, A(1), A(0), lse + j, a + j,
                                 d + j);
            }
            for (int64_t c = 0; c < l.C; ++c) {
              const scalar_t* xc = xp + base + c * l.inner;
              scalar_t* yc = yp + base + c * l.inner;
              if (nl == kLanes) {
                for (int j = 0; j < kLanes; ++j)
                  yc[j] = static_cast<scalar_t>(softmax_out<Log>(static_cast<A>(xc[j]), lse[j]));
              } else {
                for (int64_t j = 0; j < nl; ++j)
                  yc[j] = static_cast<scalar_t>(softmax_out<Log>(static_cast<A>(xc[j]), lse[j]));
              }
            }
          }
        });
      });
    }
  });
  return y;
}

template <bool Log>
Tensor softmax_backward(const Tensor& grad_output, const Tensor& output, int64_t dim,
                        const char* op) {
  const DimLayout l = check_log_softmax_backward(grad_output, output, dim, op);
  const Tensor y = output.contiguous();
  const Tensor g = grad_output.contiguous();
  Tensor gx = empty_output(y);
  if (y.numel() == 0) return gx;
  FO_DISPATCH_FLOATING(y.scalar_type(), [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* op_ = gx.mutable_data_ptr<scalar_t>();
    if (l.inner == 1) {
      at::parallel_for(0, l.outer, std::max<int64_t>(1, 65536 / l.C), [&](int64_t b, int64_t e) {
        dispatch_isa([&]() FO_INLINE_LAMBDA {
          for (int64_t n = b; n < e; ++n) {
            const scalar_t* yr = yp + n * l.C;
            const scalar_t* gr = gp + n * l.C;
            scalar_t* o = op_ + n * l.C;
            A acc[kLanes];
            for (int j = 0; j < kLanes; ++j) acc[j] = 0;
            int64_t c = 0;
            for (; c + kLanes <= l.C; c += kLanes)
              for (int j = 0; j < kLanes; ++j)
                acc[j] += softmax_bwd_term<Log>(static_cast<A>(gr[c + j]),
                                                static_cast<A>(yr[c + j]));
            A s = 0;
            for (int j = 0; j < kLanes; ++j) s += acc[j];
            for (; c < l.C; ++c)
              s += softmax_bwd_term<Log>(static_cast<A>(gr[c]), static_cast<A>(yr[c]));
            for (c = 0; c < l.C; ++c)
              o[c] = static_cast<scalar_t>(
                  softmax_grad<Log>(static_cast<A>(gr[c]), static_cast<A>(yr[c]), s));
          }
        });
      });
    } else {
      at::parallel_for(0, l.outer, std::max<int64_t>(1, 65536 / (l.C * l.inner)),
                       [&](int64_t b, int64_t e) {
        dispatch_isa([&]() FO_INLINE_LAMBDA {
          std::vector<A> s(l.inner);
          for (int64_t n = b; n < e; ++n) {
            const int64_t base = n * l.C * l.inner;
            for (int64_t i = 0; i < l.inner; ++i) s[i] = 0;
            for (int64_t c = 0; c < l.C; ++c)
              for (int64_t i = 0; i < l.inner; ++i) {
                const int64_t k = base + c * l.inner + i;
                s[i] += softmax_bwd_term<Log>(static_cast<A>(gp[k]), static_cast<A>(yp[k]));
              }
            for (int64_t c = 0; c < l.C; ++c)
              for (int64_t i = 0; i < l.inner; ++i) {
                const int64_t k = base + c * l.inner + i;
                op_[k] = static_cast<scalar_t>(
                    softmax_grad<Log>(static_cast<A>(gp[k]), static_cast<A>(yp[k]), s[i]));
              }
          }
        });
      });
    }
  });
  return gx;
}

Tensor log_softmax_fwd(const Tensor& self, int64_t dim) {
  return softmax_forward<true>(self, dim, "fastops.log_softmax");
}
Tensor log_softmax_bwd(const Tensor& grad_output, const Tensor& output, int64_t dim) {
  return softmax_backward<true>(grad_output, output, dim, "fastops.log_softmax_backward");
}
Tensor softmax_fwd(const Tensor& self, int64_t dim) {
  return softmax_forward<false>(self, dim, "fastops.softmax");
}
Tensor softmax_bwd(const Tensor& grad_output, const Tensor& output, int64_t dim) {
  return softmax_backward<false>(grad_output, output, dim, "fastops.softmax_backward");
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CPU, m) {
  m.impl("log_softmax", &log_softmax_fwd);
  m.impl("log_softmax_backward", &log_softmax_bwd);
  m.impl("softmax", &softmax_fwd);
  m.impl("softmax_backward", &softmax_bwd);
  m.impl("nll_loss", &nll_loss_fwd);
  m.impl("nll_loss_backward", &nll_loss_bwd);
  m.impl("cross_entropy", &cross_entropy_fwd);
  m.impl("cross_entropy_backward", &cross_entropy_bwd);
}

}  // namespace cpu
}  // namespace fastops
