// CUDA kernels of log_softmax, softmax, nll_loss and cross_entropy (fused log_softmax + nll_loss:
// hard or soft targets, class weights, ignore_index, label smoothing). They accept what the CPU
// kernels accept and give the same results (csrc/cpu/softmax_cross_entropy.cpp is the
// reference).
//
// Layout: an input is viewed as (N, C, S), the class dim in the middle; a "row" is the C values
// of one (n, s).
// - S == 1 (rows contiguous): a group of tpr threads per row, tpr a power of two chosen from C:
//   up to 32 (a group inside a warp, several rows per block, shuffle reductions) or a whole
//   block of 64..512 threads (shared-memory reductions). Rows are read with 16-byte vector loads
//   after a scalar head up to the first aligned element.
// - S > 1 (classes S apart): a block of up to 256 threads = tiles of sx neighbouring positions
//   x cy class slices (loss_layout.h). Neighbouring threads read neighbouring positions
//   (coalesced); the cy slices of a position are merged in shared memory by a fixed tree. When
//   a whole n fits in a tile (sx == S), a block packs several n, so that small C and S still
//   keep its threads busy.
//
// Cross entropy forward is one pass over the logits: an online softmax (running max and sum of
// exponentials rescaled when the max grows) plus the sums label smoothing and soft targets need;
// it keeps one value per row, lse, for the backward. The backward is one pass that reads the
// logits and writes grad = (softmax - target distribution) * scale. Soft targets take a second
// pass over the target in the backward for their row sum.
//
// Determinism: there are no floating-point atomics, and every sum has a partition and order
// fixed by the shape, the dtype and the alignments (each tensor's address mod 16 bytes); row
// losses are summed by fixed blocks of rows, then the block sums in order, in float64. Same
// shape, dtype and alignments: same bits. The shape alone is not enough: in the S == 1 kernels
// a row's scalar head runs up to its first 16-byte aligned element, and the 16-byte path is
// taken only when the tensors read together share an alignment, so the same values at another
// storage offset may be summed in another order and round differently. The S > 1 layout
// depends on the shape and dtype only.
//
// Class targets are checked on the device: one outside [0, C) that is not ignore_index fails a
// device assertion (as torch's nll_loss) and is never used to index memory.
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../loss_checks.h"
#include "loss_common.cuh"
#include "loss_layout.h"

namespace fastops {
namespace gpu {
namespace {

using at::Tensor;
using namespace fastops::loss;
using loss_layout::SpatialLayout;
using loss_layout::SpatialPos;
using loss_layout::SpatialThread;

static_assert(loss_layout::kSpatialMaxThreads == kThreads, "the S > 1 kernels' shared arrays");

// ---- device math -----------------------------------------------------------------------------

// exp for the softmax terms. float: the hardware exp2, whose error grows with |x| (about
// 2 + 1.2 |x| ulp: some 1e-6 relative at the x - lse of -12 where a large vocabulary's terms
// lie) and which flushes results below 2^-126 to 0; -inf -> 0, NaN -> NaN. double: libm.
__device__ __forceinline__ float dexp(float x) { return __expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }
// max that never returns a NaN operand (as `v > m ? v : m` for a NaN v): a running max stays a
// number and the NaN shows in the sum of exponentials instead.
__device__ __forceinline__ float dmax(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double dmax(double a, double b) { return fmax(a, b); }

// s, a sum of exp(v - m), moved to the max nm >= m. Equal maxima (-inf included) keep s as is,
// so that exp(-inf - -inf) never turns it into NaN.
template <class A>
__device__ __forceinline__ A rescale(A s, A m, A nm) {
  return m == nm ? s : s * dexp(m - nm);
}

// Folds K values into the running max m and sum s of exp(v - m). A NaN never becomes the max
// but makes the sum NaN; +inf gives exp(inf - inf) = NaN, as in the CPU kernel. While the max is
// -inf every value is -inf or NaN: they are shifted by 0 instead, giving 0 (not the NaN of
// -inf - -inf) or NaN.
template <int K, class A>
__device__ __forceinline__ void lse_fold(const A (&v)[K], A& m, A& s) {
  A nm = m;
#pragma unroll
  for (int j = 0; j < K; ++j) nm = dmax(nm, v[j]);
  s = rescale(s, m, nm);
  m = nm;
  const A ref = nm == neg_inf<A>() ? A(0) : nm;
#pragma unroll
  for (int j = 0; j < K; ++j) s += dexp(v[j] - ref);
}

// ---- loads -----------------------------------------------------------------------------------

// Elements before the first 16-byte aligned one (at most len).
template <class T>
__device__ __forceinline__ int64_t aligned_head(const T* p, int64_t len) {
  const int64_t h =
      static_cast<int64_t>((16u - (reinterpret_cast<uintptr_t>(p) & 15u)) & 15u) / sizeof(T);
  return h < len ? h : len;
}

// Packs of 16 bytes in flight per thread and loop step: 4 for float (16 values), 2 for the
// 16-bit types (16 values) and for double (4 values: its exp and log take many registers).
template <class T>
constexpr int kUnroll = kVec<T> == 4 ? 4 : 2;

// Resident blocks of kMaxRowThreads asked of the row kernels: 2 caps the registers at 64 for
// full speed on the float types; double, not a speed path, gets room for libm's exp instead.
template <class T>
constexpr int kRowMinBlocks = sizeof(T) == 8 ? 1 : 2;

// Classes in flight per thread in the S > 1 kernels (fewer for double, for its registers).
template <class T>
constexpr int kSpatialUnroll = sizeof(T) == 8 ? 2 : 4;

// Visits the elements [0, len) of a row shared by nt threads (this one is `lane`): the first
// `head` elements and the tail one at a time (scalar(c)), the rest as packs of V elements,
// U packs at a time (packs(integral_constant<NP>, c0, cstride): pack u starts at c0 + u * cstride).
// head == len makes everything scalar. The order is fixed by (len, head, nt); head, from the
// row's address, differs between rows at different offsets mod 16 bytes.
template <int V, int U, class Scalar, class Packs>
__device__ __forceinline__ void visit_row(int64_t len, int64_t head, int lane, int nt,
                                          Scalar&& scalar, Packs&& packs) {
  for (int64_t c = lane; c < head; c += nt) scalar(c);
  const int64_t np = (len - head) / V;
  int64_t k = lane;
  for (; k + static_cast<int64_t>(U - 1) * nt < np; k += static_cast<int64_t>(U) * nt)
    packs(std::integral_constant<int, U>(), head + k * V, static_cast<int64_t>(nt) * V);
  for (; k < np; k += nt) packs(std::integral_constant<int, 1>(), head + k * V, int64_t(0));
  for (int64_t c = head + np * V + lane; c < len; c += nt) scalar(c);
}

// ---- reductions over a row group -------------------------------------------------------------
//
// tpr <= 32: the group is tpr neighbouring lanes of a warp (xor shuffles stay inside it);
// tpr > 32: the group is the whole block (blockDim.x == tpr), reduced through `smem` (32 * K
// values). Must be reached by every thread of the block. Every thread of the group gets the
// same bits (a butterfly adds the same pairs in every lane; the block step reads the warp sums
// in the same order everywhere).

template <int K, class A>
__device__ __forceinline__ void group_sum(A (&v)[K], int tpr, A* smem) {
  if (tpr <= 32) {
    for (int off = tpr >> 1; off > 0; off >>= 1) {
#pragma unroll
      for (int k = 0; k < K; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  const int warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();  // smem may still be read by a previous call
  if ((threadIdx.x & 31) == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) smem[warp * K + k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    A t = smem[k];
    for (int w = 1; w < nw; ++w) t += smem[w * K + k];
    v[k] = t;
  }
}

// NaN-propagating like warp_max (the running maxima it merges never hold one: lse_fold).
template <class A>
__device__ __forceinline__ A group_max(A v, int tpr, A* smem) {
  if (tpr <= 32) {
    for (int off = tpr >> 1; off > 0; off >>= 1)
      v = nan_max(__shfl_xor_sync(0xffffffffu, v, off), v);
    return v;
  }
  v = warp_max(v);
  const int warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();
  if ((threadIdx.x & 31) == 0) smem[warp] = v;
  __syncthreads();
  A t = smem[0];
  for (int w = 1; w < nw; ++w) t = nan_max(smem[w], t);
  return t;
}

// Row-group coordinates of this thread for the S == 1 kernels.
struct RowGroup {
  int tpr, lane, group, rows_per_block;
  __device__ explicit RowGroup(int tpr_) : tpr(tpr_) {
    if (tpr <= 32) {
      lane = threadIdx.x & (tpr - 1);
      group = threadIdx.x / tpr;
      rows_per_block = blockDim.x / tpr;
    } else {
      lane = threadIdx.x;
      group = 0;
      rows_per_block = 1;
    }
  }
};

// ---- cross entropy: shared row math ----------------------------------------------------------

// kHard: class targets; kSmooth: class targets with label smoothing; kSoft: class
// probabilities; kNll: nll_loss (backward only, on log-probabilities).
enum CeMode : int { kHard = 0, kSmooth = 1, kSoft = 2, kNll = 3 };

template <class T>
struct CeArgs {
  const T* x;          // (N, C, S) logits (log-probabilities for kNll), contiguous
  const T* y;          // soft targets, the shape of x (kSoft)
  const T* w;          // class weights or null
  const void* tgt;     // class targets, N * S of int64 or uint8 (not kSoft)
  bool tgt_byte;
  int64_t N, C, S;
  int64_t ignore_index;
  acc_t<T> om_eps, eps_c;  // 1 - label_smoothing, label_smoothing / C
  const double* wsum;      // sum of the weights (kSmooth with weights), else null: C
};

template <class T>
__device__ __forceinline__ acc_t<T> weight_total(const CeArgs<T>& p) {
  using A = acc_t<T>;
  return p.wsum != nullptr ? static_cast<A>(*p.wsum) : static_cast<A>(p.C);
}

template <class A>
struct Stats {
  A m, s, dot, a;  // max, sum of exp(x - m), sum of y' x (or w x), sum of y'
};

template <class A>
__device__ __forceinline__ Stats<A> empty_stats() {
  return {neg_inf<A>(), A(0), A(0), A(0)};
}

// The label-smoothing / soft-target sums of one element x_c (y: its soft target).
template <int MODE, class T, class A>
__device__ __forceinline__ void ce_extra(Stats<A>& st, A v, A y, const T* w, int64_t c, A om_eps,
                                         A eps_c) {
  if constexpr (MODE == kSmooth) st.dot += w != nullptr ? static_cast<A>(w[c]) * v : v;
  if constexpr (MODE == kSoft) {
    A yv = y * om_eps + eps_c;
    if (w != nullptr) yv *= static_cast<A>(w[c]);
    st.a += yv;
    st.dot += yv * v;
  }
}

// Two partial statistics of one row merged (the max first, then the sums moved to it).
template <class A>
__device__ __forceinline__ Stats<A> merge_stats(const Stats<A>& u, const Stats<A>& v) {
  const A m = u.m > v.m ? u.m : v.m;
  return {m, rescale(u.s, u.m, m) + rescale(v.s, v.m, m), u.dot + v.dot, u.a + v.a};
}

// The loss of a row from its statistics (lse = st.m + log_s); take: a class target that counts
// (x_t its logit).
template <int MODE, class A>
__device__ __forceinline__ A ce_row_loss(A lse, A log_s, const Stats<A>& st, bool take, A wt,
                                         A xt, A om_eps, A eps_c, A wsum) {
  if constexpr (MODE == kSoft) {
    return lse * st.a - st.dot;
  } else {
    if (!take) return A(0);
    // lse - x_t as (max - x_t) + log(sum): exact when x_t is the max, where a confident row's
    // small loss would otherwise lose its digits to the rounding of lse.
    const A nll = wt * ((st.m - xt) + log_s);
    if constexpr (MODE == kHard) return nll;
    // plus eps / C * sum_c w_c (lse - x_c)
    return om_eps * nll + eps_c * (wsum * lse - st.dot);
  }
}

// Row coefficients of the gradient: grad_c = exp(x_c - l) * coef - cw * (w_c | y'_c) and, at
// the target class, - tterm (kNll: grad_c = tterm at the target, 0 elsewhere).
template <class A>
struct RowGrad {
  A l, gn, coef, cw, tterm;
  int64_t t;
  bool keep;  // false: the row's gradient is 0 (ignored target, or no row)
};

template <int MODE, class T, class A>
__device__ __forceinline__ RowGrad<A> ce_row_grad(const CeArgs<T>& p, const A* lse,
                                                  const GradIn& gi, A gscale, A wsum,
                                                  int64_t row, bool valid) {
  RowGrad<A> r{A(0), A(0), A(0), A(0), A(0), int64_t(-1), false};
  if (!valid) return r;
  r.gn = gi.reduction == kNone ? load_as<A>(gi.g, gi.g_kind, row) : gscale;
  if constexpr (MODE != kNll) r.l = lse[row];
  if constexpr (MODE == kSoft) {
    r.keep = true;
    r.cw = r.gn;  // coef = gn * sum_c y'_c, set once that sum is known
  } else {
    const int64_t t = load_target(p.tgt, p.tgt_byte, row);
    r.keep = target_class(t, p.C, p.ignore_index);
    if (!r.keep) return r;
    r.t = t;
    const A wt = p.w != nullptr ? static_cast<A>(p.w[t]) : A(1);
    if constexpr (MODE == kHard) {
      r.coef = r.gn * wt;
      r.tterm = r.gn * wt;
    } else if constexpr (MODE == kSmooth) {
      r.coef = r.gn * (p.om_eps * wt + p.eps_c * wsum);
      r.cw = r.gn * p.eps_c;
      r.tterm = r.gn * p.om_eps * wt;
    } else {
      r.tterm = -wt * r.gn;
    }
  }
  return r;
}

// The soft target term y'_c (times w_c).
template <class T, class A>
__device__ __forceinline__ A soft_term(A y, const T* w, int64_t c, A om_eps, A eps_c) {
  A yv = y * om_eps + eps_c;
  if (w != nullptr) yv *= static_cast<A>(w[c]);
  return yv;
}

// The gradient of one element c of a kept row, but for the target class's own term.
template <int MODE, class T, class A>
__device__ __forceinline__ A ce_grad(const RowGrad<A>& r, A x, A y, const T* w, int64_t c,
                                     A om_eps, A eps_c) {
  if constexpr (MODE == kNll) {
    return A(0);
  } else {
    A v = dexp(x - r.l) * r.coef;
    if constexpr (MODE == kSmooth) v -= w != nullptr ? r.cw * static_cast<A>(w[c]) : r.cw;
    if constexpr (MODE == kSoft) v -= r.cw * soft_term(y, w, c, om_eps, eps_c);
    return v;
  }
}

// v of the target class with its own term (class targets only).
template <int MODE, class A>
__device__ __forceinline__ A ce_grad_target(const RowGrad<A>& r, A v) {
  if constexpr (MODE == kNll) return r.tterm;
  else return v - r.tterm;
}

// The gradient of element c of a kept row.
template <int MODE, class T, class A>
__device__ __forceinline__ A ce_grad_full(const RowGrad<A>& r, A x, A y, const T* w, int64_t c,
                                          A om_eps, A eps_c) {
  const A v = ce_grad<MODE>(r, x, y, w, c, om_eps, eps_c);
  if constexpr (MODE == kSoft) return v;
  else return c == r.t ? ce_grad_target<MODE>(r, v) : v;
}

// ---- cross entropy: forward ------------------------------------------------------------------

constexpr int kMaxRowThreads = 512;

// S == 1. Writes lse and the row loss (into loss_none for reduction 'none', else row_loss).
template <class T, int MODE>
__global__ void __launch_bounds__(kMaxRowThreads, kRowMinBlocks<T>)
    ce_forward_rows(CeArgs<T> p, acc_t<T>* lse_out, T* loss_none, acc_t<T>* row_loss, int tpr,
                    bool vec) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  constexpr int U = kUnroll<T>;
  __shared__ A smem[32 * 3];
  const RowGroup rg(tpr);
  const A wsum = MODE == kSmooth ? weight_total(p) : A(0);
  const int64_t rows = p.N;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * rg.rows_per_block; base < rows;
       base += static_cast<int64_t>(gridDim.x) * rg.rows_per_block) {
    const int64_t row = base + rg.group;
    const bool valid = row < rows;
    const int64_t len = valid ? p.C : 0;
    const T* xr = p.x + (valid ? row : 0) * p.C;
    const T* yr = MODE == kSoft ? p.y + (valid ? row : 0) * p.C : nullptr;
    // The target's logit, loaded before the pass so that its latency hides behind it.
    bool take = false;
    A wt = A(1), xt = A(0);
    if constexpr (MODE != kSoft) {
      if (valid && rg.lane == 0) {
        const int64_t t = load_target(p.tgt, p.tgt_byte, row);
        take = target_class(t, p.C, p.ignore_index);
        if (take) {
          xt = static_cast<A>(xr[t]);
          if (p.w != nullptr) wt = static_cast<A>(p.w[t]);
        }
      }
    }
    Stats<A> st = empty_stats<A>();
    const int64_t head = vec ? aligned_head(xr, len) : len;
    visit_row<V, U>(
        len, head, rg.lane, tpr,
        [&](int64_t c) {
          const A v[1] = {static_cast<A>(xr[c])};
          lse_fold(v, st.m, st.s);
          ce_extra<MODE>(st, v[0], MODE == kSoft ? static_cast<A>(yr[c]) : A(0), p.w, c,
                         p.om_eps, p.eps_c);
        },
        [&](auto np_c, int64_t c0, int64_t cs) {
          constexpr int NP = decltype(np_c)::value;
          Pack<T, V> px[NP];
#pragma unroll
          for (int u = 0; u < NP; ++u) px[u] = load_pack<T, V>(xr + c0 + u * cs);
          A v[NP * V];
#pragma unroll
          for (int u = 0; u < NP; ++u)
#pragma unroll
            for (int j = 0; j < V; ++j) v[u * V + j] = static_cast<A>(px[u].v[j]);
          lse_fold(v, st.m, st.s);
          if constexpr (MODE == kSmooth) {
#pragma unroll
            for (int u = 0; u < NP; ++u)
#pragma unroll
              for (int j = 0; j < V; ++j)
                ce_extra<MODE>(st, v[u * V + j], A(0), p.w, c0 + u * cs + j, p.om_eps, p.eps_c);
          }
          if constexpr (MODE == kSoft) {
#pragma unroll
            for (int u = 0; u < NP; ++u) {
              const Pack<T, V> py = load_pack<T, V>(yr + c0 + u * cs);
#pragma unroll
              for (int j = 0; j < V; ++j)
                ce_extra<MODE>(st, v[u * V + j], static_cast<A>(py.v[j]), p.w, c0 + u * cs + j,
                               p.om_eps, p.eps_c);
            }
          }
        });
    const A m = group_max(st.m, tpr, smem);
    st.s = rescale(st.s, st.m, m);
    st.m = m;
    if constexpr (MODE == kHard) {
      A r[1] = {st.s};
      group_sum(r, tpr, smem);
      st.s = r[0];
    } else if constexpr (MODE == kSmooth) {
      A r[2] = {st.s, st.dot};
      group_sum(r, tpr, smem);
      st.s = r[0];
      st.dot = r[1];
    } else {
      A r[3] = {st.s, st.dot, st.a};
      group_sum(r, tpr, smem);
      st.s = r[0];
      st.dot = r[1];
      st.a = r[2];
    }
    if (valid && rg.lane == 0) {
      const A log_s = dlog(st.s);
      const A lse = st.m + log_s;  // a row of -inf: -inf + log(0) = -inf
      lse_out[row] = lse;
      const A loss = ce_row_loss<MODE>(lse, log_s, st, take, wt, xt, p.om_eps, p.eps_c, wsum);
      if (loss_none != nullptr) loss_none[row] = static_cast<T>(loss);
      else row_loss[row] = loss;
    }
  }
}

// S > 1: blockDim.x == L.threads; a thread's (n, s) per tile group and its class slice yq come
// from loss_layout.h.
template <class T, int MODE>
__global__ void __launch_bounds__(kThreads)
    ce_forward_spatial(CeArgs<T> p, acc_t<T>* lse_out, T* loss_none, acc_t<T>* row_loss,
                       SpatialLayout L) {
  using A = acc_t<T>;
  constexpr int U = kSpatialUnroll<T>;
  __shared__ Stats<A> sm[kThreads];
  const SpatialThread th = loss_layout::spatial_thread(L, threadIdx.x);
  const int Cy = L.cy, yq = th.slice;
  const A wsum = MODE == kSmooth ? weight_total(p) : A(0);
  for (int64_t group = blockIdx.x; group < L.groups; group += gridDim.x) {
    const SpatialPos pos = loss_layout::spatial_pos(L, th, group);
    const bool valid = pos.valid;
    const int64_t row = pos.row;
    const int64_t base = pos.base;  // class c at base + c * S
    bool take = false;
    A wt = A(1), xt = A(0);
    if constexpr (MODE != kSoft) {
      if (valid && yq == 0) {
        const int64_t t = load_target(p.tgt, p.tgt_byte, row);
        take = target_class(t, p.C, p.ignore_index);
        if (take) {
          xt = static_cast<A>(p.x[base + t * p.S]);
          if (p.w != nullptr) wt = static_cast<A>(p.w[t]);
        }
      }
    }
    Stats<A> st = empty_stats<A>();
    if (valid) {
      int64_t c = yq;
      for (; c + static_cast<int64_t>(U - 1) * Cy < p.C; c += static_cast<int64_t>(U) * Cy) {
        A v[U], yv[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t at = base + (c + static_cast<int64_t>(u) * Cy) * p.S;
          v[u] = static_cast<A>(p.x[at]);
          yv[u] = MODE == kSoft ? static_cast<A>(p.y[at]) : A(0);
        }
        lse_fold(v, st.m, st.s);
#pragma unroll
        for (int u = 0; u < U; ++u)
          ce_extra<MODE>(st, v[u], yv[u], p.w, c + static_cast<int64_t>(u) * Cy, p.om_eps,
                         p.eps_c);
      }
      for (; c < p.C; c += Cy) {
        const int64_t at = base + c * p.S;
        const A v[1] = {static_cast<A>(p.x[at])};
        lse_fold(v, st.m, st.s);
        ce_extra<MODE>(st, v[0], MODE == kSoft ? static_cast<A>(p.y[at]) : A(0), p.w, c,
                       p.om_eps, p.eps_c);
      }
    }
    // Merge the Cy slices of each position by a fixed tree; the result lands in slice 0.
    sm[threadIdx.x] = st;
    __syncthreads();
    for (int h = Cy >> 1; h > 0; h >>= 1) {
      if (yq < h) {
        sm[threadIdx.x] = merge_stats(sm[threadIdx.x], sm[threadIdx.x + h * L.columns]);
      }
      __syncthreads();
    }
    // Slice 0 reads back only its own slot, which the next group's writes do not race with.
    if (valid && yq == 0) {
      const Stats<A> r = sm[threadIdx.x];
      const A log_s = dlog(r.s);
      const A lse = r.m + log_s;
      lse_out[row] = lse;
      const A loss = ce_row_loss<MODE>(lse, log_s, r, take, wt, xt, p.om_eps, p.eps_c, wsum);
      if (loss_none != nullptr) loss_none[row] = static_cast<T>(loss);
      else row_loss[row] = loss;
    }
  }
}

// ---- cross entropy / nll_loss: backward ------------------------------------------------------

template <class T, int MODE>
__global__ void __launch_bounds__(kMaxRowThreads, kRowMinBlocks<T>)
    ce_backward_rows(CeArgs<T> p, const acc_t<T>* lse, GradIn gi, T* gx, int tpr, bool vec) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  constexpr int U = kUnroll<T>;
  __shared__ A smem[32];
  const RowGroup rg(tpr);
  const A gscale = grad_scale<A>(gi);
  const A wsum = MODE == kSmooth ? weight_total(p) : A(0);
  const int64_t rows = p.N;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * rg.rows_per_block; base < rows;
       base += static_cast<int64_t>(gridDim.x) * rg.rows_per_block) {
    const int64_t row = base + rg.group;
    const bool valid = row < rows;
    const int64_t len = valid ? p.C : 0;
    const int64_t off = (valid ? row : 0) * p.C;
    const T* xr = p.x + off;
    const T* yr = MODE == kSoft ? p.y + off : nullptr;
    T* gr = gx + off;
    RowGrad<A> r = ce_row_grad<MODE>(p, lse, gi, gscale, wsum, row, valid);
    const int64_t head = vec ? aligned_head(gr, len) : len;
    if constexpr (MODE == kSoft) {
      A a[1] = {A(0)};
      visit_row<V, U>(
          len, head, rg.lane, tpr,
          [&](int64_t c) { a[0] += soft_term(static_cast<A>(yr[c]), p.w, c, p.om_eps, p.eps_c); },
          [&](auto np_c, int64_t c0, int64_t cs) {
            constexpr int NP = decltype(np_c)::value;
            Pack<T, V> py[NP];
#pragma unroll
            for (int u = 0; u < NP; ++u) py[u] = load_pack<T, V>(yr + c0 + u * cs);
#pragma unroll
            for (int u = 0; u < NP; ++u)
#pragma unroll
              for (int j = 0; j < V; ++j)
                a[0] += soft_term(static_cast<A>(py[u].v[j]), p.w, c0 + u * cs + j, p.om_eps,
                                  p.eps_c);
          });
      group_sum(a, tpr, smem);
      r.coef = r.gn * a[0];
    }
    const bool keep = r.keep;
    visit_row<V, U>(
        len, head, rg.lane, tpr,
        [&](int64_t c) {
          A v = A(0);
          if (keep) {
            const A x = MODE == kNll ? A(0) : static_cast<A>(xr[c]);
            const A y = MODE == kSoft ? static_cast<A>(yr[c]) : A(0);
            v = ce_grad_full<MODE>(r, x, y, p.w, c, p.om_eps, p.eps_c);
          }
          gr[c] = static_cast<T>(v);
        },
        [&](auto np_c, int64_t c0, int64_t cs) {
          constexpr int NP = decltype(np_c)::value;
          if (!keep) {
            Pack<T, V> zero;
#pragma unroll
            for (int j = 0; j < V; ++j) zero.v[j] = static_cast<T>(A(0));
#pragma unroll
            for (int u = 0; u < NP; ++u) store_pack<T, V>(gr + c0 + u * cs, zero);
            return;
          }
          Pack<T, V> px[NP];
          if constexpr (MODE != kNll) {
#pragma unroll
            for (int u = 0; u < NP; ++u) px[u] = load_pack<T, V>(xr + c0 + u * cs);
          }
#pragma unroll
          for (int u = 0; u < NP; ++u) {
            const int64_t c = c0 + u * cs;
            Pack<T, V> py;
            if constexpr (MODE == kSoft) py = load_pack<T, V>(yr + c);
            A v[V];
#pragma unroll
            for (int j = 0; j < V; ++j) {
              const A x = MODE == kNll ? A(0) : static_cast<A>(px[u].v[j]);
              const A y = MODE == kSoft ? static_cast<A>(py.v[j]) : A(0);
              v[j] = ce_grad<MODE>(r, x, y, p.w, c + j, p.om_eps, p.eps_c);
            }
            // The target's own term: one test per pack, the per-element one only on a hit.
            if constexpr (MODE != kSoft) {
              if (static_cast<uint64_t>(r.t - c) < static_cast<uint64_t>(V)) {
#pragma unroll
                for (int j = 0; j < V; ++j)
                  if (c + j == r.t) v[j] = ce_grad_target<MODE>(r, v[j]);
              }
            }
            Pack<T, V> out;
#pragma unroll
            for (int j = 0; j < V; ++j) out.v[j] = static_cast<T>(v[j]);
            store_pack<T, V>(gr + c, out);
          }
        });
  }
}

template <class T, int MODE>
__global__ void __launch_bounds__(kThreads)
    ce_backward_spatial(CeArgs<T> p, const acc_t<T>* lse, GradIn gi, T* gx, SpatialLayout L) {
  using A = acc_t<T>;
  constexpr int U = kSpatialUnroll<T>;
  __shared__ A sm[kThreads];
  const SpatialThread th = loss_layout::spatial_thread(L, threadIdx.x);
  const int Cy = L.cy, yq = th.slice;
  const A gscale = grad_scale<A>(gi);
  const A wsum = MODE == kSmooth ? weight_total(p) : A(0);
  for (int64_t group = blockIdx.x; group < L.groups; group += gridDim.x) {
    const SpatialPos pos = loss_layout::spatial_pos(L, th, group);
    const bool valid = pos.valid;
    const int64_t row = pos.row;
    const int64_t base = pos.base;
    RowGrad<A> r = ce_row_grad<MODE>(p, lse, gi, gscale, wsum, row, valid);
    if constexpr (MODE == kSoft) {
      A a = A(0);
      if (valid)
        for (int64_t c = yq; c < p.C; c += Cy)
          a += soft_term(static_cast<A>(p.y[base + c * p.S]), p.w, c, p.om_eps, p.eps_c);
      sm[threadIdx.x] = a;
      __syncthreads();
      for (int h = Cy >> 1; h > 0; h >>= 1) {
        if (yq < h) sm[threadIdx.x] += sm[threadIdx.x + h * L.columns];
        __syncthreads();
      }
      r.coef = r.gn * sm[th.column];
      __syncthreads();  // every slice has read the sum before the next group overwrites it
    }
    if (!valid) continue;
    int64_t c = yq;
    for (; c + static_cast<int64_t>(U - 1) * Cy < p.C; c += static_cast<int64_t>(U) * Cy) {
      A x[U], y[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t at = base + (c + static_cast<int64_t>(u) * Cy) * p.S;
        x[u] = (MODE == kNll || !r.keep) ? A(0) : static_cast<A>(p.x[at]);
        y[u] = (MODE == kSoft) ? static_cast<A>(p.y[at]) : A(0);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t cu = c + static_cast<int64_t>(u) * Cy;
        const A v =
            r.keep ? ce_grad_full<MODE>(r, x[u], y[u], p.w, cu, p.om_eps, p.eps_c) : A(0);
        gx[base + cu * p.S] = static_cast<T>(v);
      }
    }
    for (; c < p.C; c += Cy) {
      const int64_t at = base + c * p.S;
      A v = A(0);
      if (r.keep) {
        const A x = MODE == kNll ? A(0) : static_cast<A>(p.x[at]);
        const A y = MODE == kSoft ? static_cast<A>(p.y[at]) : A(0);
        v = ce_grad_full<MODE>(r, x, y, p.w, c, p.om_eps, p.eps_c);
      }
      gx[at] = static_cast<T>(v);
    }
  }
}

// Terms of cross entropy: the row losses of the forward kernel (null for 'none') and the
// weight of each row's target (1 per row for soft targets).
template <class T>
struct CeTerms {
  const acc_t<T>* row_loss;
  const void* tgt;  // null for soft targets
  bool tgt_byte;
  const T* w;
  int64_t C, ignore_index;
  __device__ LossTerms operator()(int64_t row) const {
    const double l = row_loss != nullptr ? static_cast<double>(row_loss[row]) : 0.0;
    double wt = 1.0;
    if (tgt != nullptr) {
      const int64_t t = load_target(tgt, tgt_byte, row);
      wt = target_class(t, C, ignore_index)
               ? (w != nullptr ? static_cast<double>(static_cast<acc_t<T>>(w[t])) : 1.0)
               : 0.0;
    }
    return {l, wt};
  }
};

// Terms of nll_loss, computed here: -w_t * x[n, t, s]; written out for 'none'.
template <class T>
struct NllTerms {
  const T* x;
  const void* tgt;
  bool tgt_byte;
  const T* w;
  int64_t C, S, ignore_index;
  T* loss_none;
  __device__ LossTerms operator()(int64_t row) const {
    using A = acc_t<T>;
    const int64_t t = load_target(tgt, tgt_byte, row);
    A v = A(0), wt = A(0);
    if (target_class(t, C, ignore_index)) {
      const int64_t n = S == 1 ? row : row / S;
      const int64_t s = row - n * S;
      wt = w != nullptr ? static_cast<A>(w[t]) : A(1);
      v = -wt * static_cast<A>(x[(n * C + t) * S + s]);
    }
    if (loss_none != nullptr) loss_none[row] = static_cast<T>(v);
    return {static_cast<double>(v), static_cast<double>(wt)};
  }
};

// The sum of the class weights in float64 (label smoothing with weights).
template <class T>
__global__ void __launch_bounds__(kReduceThreads)
    weight_sum_kernel(const T* w, int64_t C, double* out) {
  __shared__ double scratch[32];
  double s = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) s += static_cast<double>(w[c]);
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) out[0] = s;
}

// ---- launch configuration --------------------------------------------------------------------

int ceil_log2(int64_t v) {
  int l = 0;
  while ((int64_t(1) << l) < v) ++l;
  return l;
}

unsigned int capped_grid(int64_t work, int per_sm) {
  return loss_layout::grid_size(work, static_cast<int64_t>(num_sms()) * per_sm);
}

// S == 1 kernels: tpr threads per row, about 8 packs each for short rows (a group within a
// warp), up to 512 threads (one block) with about 32 packs each for long ones.
struct RowConfig {
  int tpr, threads;
  unsigned int grid;
};

RowConfig row_config(int64_t rows, int64_t C, int vec) {
  const int64_t packs = (C + vec - 1) / vec;
  RowConfig cfg{};
  if (packs <= 32 * 8) {
    int tpr = 1;
    while (tpr < 32 && int64_t(tpr) * 8 < packs) tpr <<= 1;
    cfg.tpr = tpr;
    cfg.threads = kThreads;
  } else {
    const int64_t want = int64_t(1) << ceil_log2((packs + 31) / 32);
    cfg.tpr = static_cast<int>(want < 64 ? 64 : (want > kMaxRowThreads ? kMaxRowThreads : want));
    cfg.threads = cfg.tpr;
  }
  const int64_t rpb = cfg.tpr <= 32 ? cfg.threads / cfg.tpr : 1;
  // One row group per block up to a large cap, so that the hardware balances the blocks.
  cfg.grid = capped_grid((rows + rpb - 1) / rpb, 256);
  return cfg;
}

// S > 1 kernels: blocks of layout.threads (at most 256) threads, one tile group each per step
// (loss_layout.h).
struct SpatialConfig {
  SpatialLayout layout;
  unsigned int grid;
};

SpatialConfig spatial_config(int64_t N, int64_t C, int64_t S, int elem_size) {
  const SpatialLayout l = loss_layout::spatial_layout(N, C, S, elem_size);
  return {l, capped_grid(l.groups, 64)};
}

// Whether pointers that move together along a row can all take the 16-byte path: the same
// offset within 16 bytes (then one scalar head aligns them all).
template <class... Ptrs>
bool same_alignment(const void* first, const Ptrs*... rest) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(first) % 16;
  return ((reinterpret_cast<uintptr_t>(rest) % 16 == a) && ...);
}

template <class T>
CeArgs<T> ce_args(const Tensor& x, const Tensor& y, const Tensor& w, const Tensor& tg,
                  const Rows& r, int64_t ignore_index, double label_smoothing,
                  const Tensor& wsum) {
  using A = acc_t<T>;
  CeArgs<T> p{};
  p.x = x.const_data_ptr<T>();
  p.y = y.defined() ? y.const_data_ptr<T>() : nullptr;
  p.w = w.defined() ? w.const_data_ptr<T>() : nullptr;
  p.tgt = tg.defined() ? tg.const_data_ptr() : nullptr;
  p.tgt_byte = tg.defined() && tg.scalar_type() == at::kByte;
  p.N = r.N;
  p.C = r.C;
  p.S = r.S;
  p.ignore_index = ignore_index;
  p.om_eps = static_cast<A>(1.0 - label_smoothing);
  p.eps_c = r.C > 0 ? static_cast<A>(label_smoothing / r.C) : A(0);
  p.wsum = wsum.defined() ? wsum.const_data_ptr<double>() : nullptr;
  return p;
}

// The sum of the weights on the device, for label smoothing with weights.
template <class T>
Tensor weight_sum(const Tensor& w, cudaStream_t stream) {
  Tensor out = at::empty({1}, w.options().dtype(at::kDouble));
  weight_sum_kernel<T><<<1, kReduceThreads, 0, stream>>>(w.const_data_ptr<T>(), w.numel(),
                                                         out.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Calls body(integral_constant<int, MODE>).
template <class Body>
void dispatch_ce_mode(int mode, const Body& body) {
  switch (mode) {
    case kHard: body(std::integral_constant<int, kHard>()); break;
    case kSmooth: body(std::integral_constant<int, kSmooth>()); break;
    case kSoft: body(std::integral_constant<int, kSoft>()); break;
    default: body(std::integral_constant<int, kNll>()); break;
  }
}

// ---- cross entropy: host ---------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> cross_entropy_cuda(const Tensor& self, const Tensor& target,
                                                      const c10::optional<Tensor>& weight,
                                                      int64_t reduction, int64_t ignore_index,
                                                      double label_smoothing) {
  const char* op = "fastops.cross_entropy";
  const Rows r = check_cross_entropy(self, target, weight, reduction, label_smoothing, op);
  const KernelScope scope(self);
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
  const int64_t rows = r.rows();
  const int mode = soft ? kSoft : (label_smoothing > 0 ? kSmooth : kHard);

  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using A = acc_t<scalar_t>;
    const Tensor wsum = mode == kSmooth && w.defined() ? weight_sum<scalar_t>(w, scope.stream)
                                                       : Tensor();
    const CeArgs<scalar_t> p = ce_args<scalar_t>(x, soft ? tg : Tensor(), w, soft ? Tensor() : tg,
                                                 r, ignore_index, label_smoothing, wsum);
    Tensor row_loss;
    if (reduction != kNone) row_loss = at::empty({rows}, self.options().dtype(adt));
    A* lp = lse.mutable_data_ptr<A>();
    scalar_t* loss_none = reduction == kNone ? loss.mutable_data_ptr<scalar_t>() : nullptr;
    A* rl = reduction == kNone ? nullptr : row_loss.mutable_data_ptr<A>();
    if (rows > 0) {
      dispatch_ce_mode(mode, [&](auto mode_c) {
        constexpr int MODE = decltype(mode_c)::value;
        if constexpr (MODE != kNll) {
          if (r.S == 1) {
            const RowConfig cfg = row_config(rows, r.C, kVec<scalar_t>);
            const bool vec = soft ? same_alignment(p.x, p.y) : true;
            ce_forward_rows<scalar_t, MODE><<<cfg.grid, cfg.threads, 0, scope.stream>>>(
                p, lp, loss_none, rl, cfg.tpr, vec);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          } else {
            const SpatialConfig cfg = spatial_config(r.N, r.C, r.S, sizeof(scalar_t));
            ce_forward_spatial<scalar_t, MODE>
                <<<cfg.grid, cfg.layout.threads, 0, scope.stream>>>(p, lp, loss_none, rl,
                                                                    cfg.layout);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        }
      });
    }
    // total_weight always; the reduced loss from the row losses.
    const CeTerms<scalar_t> terms{rl, soft ? nullptr : tg.const_data_ptr(),
                                  !soft && tg.scalar_type() == at::kByte, p.w, r.C,
                                  ignore_index};
    const LossOut<scalar_t> out{reduction == kNone ? nullptr : loss.mutable_data_ptr<scalar_t>(),
                                total_weight.mutable_data_ptr<A>(), reduction};
    launch_sum_rows<scalar_t>(terms, rows, out, self.options(), scope.stream);
  });
  return {loss, lse, total_weight};
}

// total_weight as a floating tensor on self's device (any dtype is accepted, as on the CPU).
Tensor total_weight_for_device(const Tensor& self, const Tensor& total_weight, const char* op) {
  check_same_device(self, total_weight, op, "self", "total_weight");
  const auto t = total_weight.scalar_type();
  const bool ok = t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
  return ok ? total_weight : total_weight.to(at::kDouble);
}

// Shared by cross_entropy_backward (MODE from the target and label smoothing) and
// nll_loss_backward (kNll).
template <class T>
void launch_ce_backward(int mode, const CeArgs<T>& p, const acc_t<T>* lse, const GradIn& gi,
                        T* gx, bool vec, cudaStream_t stream) {
  const int64_t rows = p.N * p.S;
  dispatch_ce_mode(mode, [&](auto mode_c) {
    constexpr int MODE = decltype(mode_c)::value;
    if (p.S == 1) {
      const RowConfig cfg = row_config(rows, p.C, kVec<T>);
      ce_backward_rows<T, MODE><<<cfg.grid, cfg.threads, 0, stream>>>(p, lse, gi, gx, cfg.tpr,
                                                                     vec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const SpatialConfig cfg = spatial_config(p.N, p.C, p.S, sizeof(T));
      ce_backward_spatial<T, MODE><<<cfg.grid, cfg.layout.threads, 0, stream>>>(p, lse, gi, gx,
                                                                                cfg.layout);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

Tensor cross_entropy_backward_cuda(const Tensor& grad_output, const Tensor& self,
                                   const Tensor& target, const c10::optional<Tensor>& weight,
                                   int64_t reduction, int64_t ignore_index,
                                   double label_smoothing, const Tensor& lse,
                                   const Tensor& total_weight) {
  const char* op = "fastops.cross_entropy_backward";
  const Rows r = check_cross_entropy_backward(grad_output, self, target, weight, reduction, lse,
                                              total_weight, op);
  check_same_device(self, lse, op, "self", "lse");
  const Tensor tw = total_weight_for_device(self, total_weight, op);
  const KernelScope scope(self);
  const bool soft = at::isFloatingType(target.scalar_type());
  const Tensor x = self.contiguous();
  const Tensor tg = target.contiguous();
  const Tensor w = weight_or_undefined(weight);
  const Tensor ls = lse.contiguous();
  const Tensor g = grad_output.contiguous();
  Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return gx;
  const int mode = soft ? kSoft : (label_smoothing > 0 ? kSmooth : kHard);
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using A = acc_t<scalar_t>;
    const Tensor wsum = mode == kSmooth && w.defined() ? weight_sum<scalar_t>(w, scope.stream)
                                                       : Tensor();
    const CeArgs<scalar_t> p = ce_args<scalar_t>(x, soft ? tg : Tensor(), w, soft ? Tensor() : tg,
                                                 r, ignore_index, label_smoothing, wsum);
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    const bool vec = soft ? same_alignment(p.x, p.y, gxp) : same_alignment(p.x, gxp);
    launch_ce_backward<scalar_t>(mode, p, ls.const_data_ptr<A>(), grad_in(g, reduction, tw), gxp,
                                 vec, scope.stream);
  });
  return gx;
}

// ---- nll_loss --------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> nll_loss_cuda(const Tensor& self, const Tensor& target,
                                         const c10::optional<Tensor>& weight, int64_t reduction,
                                         int64_t ignore_index) {
  const char* op = "fastops.nll_loss";
  const Rows r = check_nll_loss(self, target, weight, reduction, op);
  const KernelScope scope(self);
  const Tensor x = self.contiguous();
  const Tensor tg = target.contiguous();
  const Tensor w = weight_or_undefined(weight);
  const auto rshape = row_shape(self);
  const auto adt = acc_dtype(self.scalar_type());
  Tensor loss = reduction == kNone ? at::empty(rshape, self.options())
                                   : at::empty({}, self.options());
  Tensor total_weight = at::empty({}, self.options().dtype(adt));
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using A = acc_t<scalar_t>;
    const NllTerms<scalar_t> terms{x.const_data_ptr<scalar_t>(),
                                   tg.const_data_ptr(),
                                   tg.scalar_type() == at::kByte,
                                   w.defined() ? w.const_data_ptr<scalar_t>() : nullptr,
                                   r.C,
                                   r.S,
                                   ignore_index,
                                   reduction == kNone ? loss.mutable_data_ptr<scalar_t>()
                                                      : nullptr};
    const LossOut<scalar_t> out{reduction == kNone ? nullptr : loss.mutable_data_ptr<scalar_t>(),
                                total_weight.mutable_data_ptr<A>(), reduction, false};
    launch_sum_rows<scalar_t>(terms, r.rows(), out, self.options(), scope.stream);
  });
  return {loss, total_weight};
}

Tensor nll_loss_backward_cuda(const Tensor& grad_output, const Tensor& self, const Tensor& target,
                              const c10::optional<Tensor>& weight, int64_t reduction,
                              int64_t ignore_index, const Tensor& total_weight) {
  const char* op = "fastops.nll_loss_backward";
  const Rows r = check_nll_loss_backward(grad_output, self, target, weight, reduction,
                                         total_weight, op);
  const Tensor tw = total_weight_for_device(self, total_weight, op);
  const KernelScope scope(self);
  const Tensor tg = target.contiguous();
  const Tensor w = weight_or_undefined(weight);
  const Tensor g = grad_output.contiguous();
  Tensor gx = at::empty_like(self, at::MemoryFormat::Contiguous);
  if (gx.numel() == 0) return gx;
  FO_DISPATCH_FLOATING(self.scalar_type(), [&] {
    // kNll never reads the input (only its shape matters): x is set to the output to have a
    // valid pointer.
    const CeArgs<scalar_t> p =
        ce_args<scalar_t>(gx, Tensor(), w, tg, r, ignore_index, 0.0, Tensor());
    launch_ce_backward<scalar_t>(kNll, p, nullptr, grad_in(g, reduction, tw),
                                 gx.mutable_data_ptr<scalar_t>(), true, scope.stream);
  });
  return gx;
}

// ---- log_softmax and softmax -----------------------------------------------------------------
//
// Forward: the row's max M and sum s of exp(x - M) in one online pass, then one pass writing
// (x - M) - log(s) (log_softmax; keeps the digits of the values near the max, which x - lse
// would round to the precision of lse) or exp(x - M) / s (softmax). Backward, from the output:
//   log_softmax: g - exp(y) * sum(g)      softmax: y * (g - sum(g * y))

template <bool Log, class A>
__device__ __forceinline__ A softmax_out(A x, A M, A log_s, A inv_s) {
  if constexpr (Log) return (x - M) - log_s;
  else return dexp(x - M) * inv_s;
}
template <bool Log, class A>
__device__ __forceinline__ A softmax_bwd_term(A g, A y) {
  if constexpr (Log) return g;
  else return g * y;
}
template <bool Log, class A>
__device__ __forceinline__ A softmax_grad(A g, A y, A s) {
  if constexpr (Log) return g - dexp(y) * s;
  else return y * (g - s);
}

// S == 1 (dim is the last one, or all after it have size 1).
template <bool Log, class T>
__global__ void __launch_bounds__(kMaxRowThreads, kRowMinBlocks<T>)
    softmax_rows(const T* x, T* y, int64_t rows, int64_t C, int tpr, bool vec) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  constexpr int U = kUnroll<T>;
  __shared__ A smem[32];
  const RowGroup rg(tpr);
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * rg.rows_per_block; base < rows;
       base += static_cast<int64_t>(gridDim.x) * rg.rows_per_block) {
    const int64_t row = base + rg.group;
    const bool valid = row < rows;
    const int64_t len = valid ? C : 0;
    const T* xr = x + (valid ? row : 0) * C;
    T* yr = y + (valid ? row : 0) * C;
    const int64_t head = vec ? aligned_head(xr, len) : len;
    A m = neg_inf<A>(), s = A(0);
    visit_row<V, U>(
        len, head, rg.lane, tpr,
        [&](int64_t c) {
          const A v[1] = {static_cast<A>(xr[c])};
          lse_fold(v, m, s);
        },
        [&](auto np_c, int64_t c0, int64_t cs) {
          constexpr int NP = decltype(np_c)::value;
          Pack<T, V> px[NP];
#pragma unroll
          for (int u = 0; u < NP; ++u) px[u] = load_pack<T, V>(xr + c0 + u * cs);
          A v[NP * V];
#pragma unroll
          for (int u = 0; u < NP; ++u)
#pragma unroll
            for (int j = 0; j < V; ++j) v[u * V + j] = static_cast<A>(px[u].v[j]);
          lse_fold(v, m, s);
        });
    const A M = group_max(m, tpr, smem);
    A r[1] = {rescale(s, m, M)};
    group_sum(r, tpr, smem);
    const A log_s = dlog(r[0]), inv_s = A(1) / r[0];
    visit_row<V, U>(
        len, head, rg.lane, tpr,
        [&](int64_t c) {
          yr[c] = static_cast<T>(softmax_out<Log>(static_cast<A>(xr[c]), M, log_s, inv_s));
        },
        [&](auto np_c, int64_t c0, int64_t cs) {
          constexpr int NP = decltype(np_c)::value;
          Pack<T, V> px[NP];
#pragma unroll
          for (int u = 0; u < NP; ++u) px[u] = load_pack<T, V>(xr + c0 + u * cs);
#pragma unroll
          for (int u = 0; u < NP; ++u) {
            Pack<T, V> out;
#pragma unroll
            for (int j = 0; j < V; ++j)
              out.v[j] =
                  static_cast<T>(softmax_out<Log>(static_cast<A>(px[u].v[j]), M, log_s, inv_s));
            store_pack<T, V>(yr + c0 + u * cs, out);
          }
        });
  }
}

template <bool Log, class T>
__global__ void __launch_bounds__(kThreads)
    softmax_spatial(const T* x, T* y, SpatialLayout L) {
  using A = acc_t<T>;
  constexpr int U = kSpatialUnroll<T>;
  __shared__ A sm_m[kThreads], sm_s[kThreads];
  const SpatialThread th = loss_layout::spatial_thread(L, threadIdx.x);
  const int Cy = L.cy, yq = th.slice;
  const int64_t C = L.C, S = L.S;
  for (int64_t group = blockIdx.x; group < L.groups; group += gridDim.x) {
    const SpatialPos pos = loss_layout::spatial_pos(L, th, group);
    const bool valid = pos.valid;
    const int64_t base = pos.base;
    A m = neg_inf<A>(), sum = A(0);
    if (valid) {
      int64_t c = yq;
      for (; c + static_cast<int64_t>(U - 1) * Cy < C; c += static_cast<int64_t>(U) * Cy) {
        A v[U];
#pragma unroll
        for (int u = 0; u < U; ++u)
          v[u] = static_cast<A>(x[base + (c + static_cast<int64_t>(u) * Cy) * S]);
        lse_fold(v, m, sum);
      }
      for (; c < C; c += Cy) {
        const A v[1] = {static_cast<A>(x[base + c * S])};
        lse_fold(v, m, sum);
      }
    }
    sm_m[threadIdx.x] = m;
    sm_s[threadIdx.x] = sum;
    __syncthreads();
    for (int h = Cy >> 1; h > 0; h >>= 1) {
      if (yq < h) {
        const int o = threadIdx.x + h * L.columns;
        const A m1 = sm_m[threadIdx.x], m2 = sm_m[o];
        const A mm = m1 > m2 ? m1 : m2;
        sm_s[threadIdx.x] = rescale(sm_s[threadIdx.x], m1, mm) + rescale(sm_s[o], m2, mm);
        sm_m[threadIdx.x] = mm;
      }
      __syncthreads();
    }
    const A M = sm_m[th.column], log_s = dlog(sm_s[th.column]), inv_s = A(1) / sm_s[th.column];
    __syncthreads();  // every slice has read the row's stats before the next group's writes
    if (!valid) continue;
    for (int64_t c = yq; c < C; c += Cy) {
      const int64_t at = base + c * S;
      y[at] = static_cast<T>(softmax_out<Log>(static_cast<A>(x[at]), M, log_s, inv_s));
    }
  }
}

template <bool Log, class T>
__global__ void __launch_bounds__(kMaxRowThreads, kRowMinBlocks<T>)
    softmax_backward_rows(const T* g, const T* y, T* gx, int64_t rows, int64_t C, int tpr,
                          bool vec) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  constexpr int U = kUnroll<T>;
  __shared__ A smem[32];
  const RowGroup rg(tpr);
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * rg.rows_per_block; base < rows;
       base += static_cast<int64_t>(gridDim.x) * rg.rows_per_block) {
    const int64_t row = base + rg.group;
    const bool valid = row < rows;
    const int64_t len = valid ? C : 0;
    const int64_t off = (valid ? row : 0) * C;
    const T* gr = g + off;
    const T* yr = y + off;
    T* out = gx + off;
    const int64_t head = vec ? aligned_head(gr, len) : len;
    A sum[1] = {A(0)};
    visit_row<V, U>(
        len, head, rg.lane, tpr,
        [&](int64_t c) {
          sum[0] += softmax_bwd_term<Log>(static_cast<A>(gr[c]), static_cast<A>(yr[c]));
        },
        [&](auto np_c, int64_t c0, int64_t cs) {
          constexpr int NP = decltype(np_c)::value;
          Pack<T, V> pg[NP], py[NP];
#pragma unroll
          for (int u = 0; u < NP; ++u) {
            pg[u] = load_pack<T, V>(gr + c0 + u * cs);
            if constexpr (!Log) py[u] = load_pack<T, V>(yr + c0 + u * cs);
          }
#pragma unroll
          for (int u = 0; u < NP; ++u)
#pragma unroll
            for (int j = 0; j < V; ++j)
              sum[0] += softmax_bwd_term<Log>(static_cast<A>(pg[u].v[j]),
                                              Log ? A(0) : static_cast<A>(py[u].v[j]));
        });
    group_sum(sum, tpr, smem);
    const A s = sum[0];
    visit_row<V, U>(
        len, head, rg.lane, tpr,
        [&](int64_t c) {
          out[c] = static_cast<T>(
              softmax_grad<Log>(static_cast<A>(gr[c]), static_cast<A>(yr[c]), s));
        },
        [&](auto np_c, int64_t c0, int64_t cs) {
          constexpr int NP = decltype(np_c)::value;
          Pack<T, V> pg[NP], py[NP];
#pragma unroll
          for (int u = 0; u < NP; ++u) {
            pg[u] = load_pack<T, V>(gr + c0 + u * cs);
            py[u] = load_pack<T, V>(yr + c0 + u * cs);
          }
#pragma unroll
          for (int u = 0; u < NP; ++u) {
            Pack<T, V> o;
#pragma unroll
            for (int j = 0; j < V; ++j)
              o.v[j] = static_cast<T>(softmax_grad<Log>(static_cast<A>(pg[u].v[j]),
                                                        static_cast<A>(py[u].v[j]), s));
            store_pack<T, V>(out + c0 + u * cs, o);
          }
        });
  }
}

template <bool Log, class T>
__global__ void __launch_bounds__(kThreads)
    softmax_backward_spatial(const T* g, const T* y, T* gx, SpatialLayout L) {
  using A = acc_t<T>;
  __shared__ A sm[kThreads];
  const SpatialThread th = loss_layout::spatial_thread(L, threadIdx.x);
  const int Cy = L.cy, yq = th.slice;
  const int64_t C = L.C, S = L.S;
  for (int64_t group = blockIdx.x; group < L.groups; group += gridDim.x) {
    const SpatialPos pos = loss_layout::spatial_pos(L, th, group);
    const bool valid = pos.valid;
    const int64_t base = pos.base;
    A sum = A(0);
    if (valid)
      for (int64_t c = yq; c < C; c += Cy)
        sum += softmax_bwd_term<Log>(static_cast<A>(g[base + c * S]),
                                     static_cast<A>(y[base + c * S]));
    sm[threadIdx.x] = sum;
    __syncthreads();
    for (int h = Cy >> 1; h > 0; h >>= 1) {
      if (yq < h) sm[threadIdx.x] += sm[threadIdx.x + h * L.columns];
      __syncthreads();
    }
    const A tot = sm[th.column];
    __syncthreads();  // every slice has read the sum before the next group overwrites it
    if (!valid) continue;
    for (int64_t c = yq; c < C; c += Cy) {
      const int64_t at = base + c * S;
      gx[at] = static_cast<T>(softmax_grad<Log>(static_cast<A>(g[at]), static_cast<A>(y[at]), tot));
    }
  }
}

template <bool Log>
Tensor softmax_forward(const Tensor& self, int64_t dim, const char* op) {
  const DimLayout l = check_log_softmax(self, dim, op);
  const KernelScope scope(self);
  const Tensor x = self.contiguous();
  Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return y;
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    if (l.inner == 1) {
      const RowConfig cfg = row_config(l.outer, l.C, kVec<scalar_t>);
      softmax_rows<Log, scalar_t><<<cfg.grid, cfg.threads, 0, scope.stream>>>(
          xp, yp, l.outer, l.C, cfg.tpr, same_alignment(xp, yp));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const SpatialConfig cfg = spatial_config(l.outer, l.C, l.inner, sizeof(scalar_t));
      softmax_spatial<Log, scalar_t><<<cfg.grid, cfg.layout.threads, 0, scope.stream>>>(
          xp, yp, cfg.layout);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return y;
}

template <bool Log>
Tensor softmax_backward(const Tensor& grad_output, const Tensor& output, int64_t dim,
                        const char* op) {
  const DimLayout l = check_log_softmax_backward(grad_output, output, dim, op);
  const KernelScope scope(output);
  const Tensor y = output.contiguous();
  const Tensor g = grad_output.contiguous();
  Tensor gx = at::empty_like(y, at::MemoryFormat::Contiguous);
  if (y.numel() == 0) return gx;
  FO_DISPATCH_FLOATING(y.scalar_type(), [&] {
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* op_ = gx.mutable_data_ptr<scalar_t>();
    if (l.inner == 1) {
      const RowConfig cfg = row_config(l.outer, l.C, kVec<scalar_t>);
      softmax_backward_rows<Log, scalar_t><<<cfg.grid, cfg.threads, 0, scope.stream>>>(
          gp, yp, op_, l.outer, l.C, cfg.tpr, same_alignment(gp, yp, op_));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const SpatialConfig cfg = spatial_config(l.outer, l.C, l.inner, sizeof(scalar_t));
      softmax_backward_spatial<Log, scalar_t>
          <<<cfg.grid, cfg.layout.threads, 0, scope.stream>>>(gp, yp, op_, cfg.layout);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return gx;
}

Tensor log_softmax_cuda(const Tensor& self, int64_t dim) {
  return softmax_forward<true>(self, dim, "fastops.log_softmax");
}
Tensor log_softmax_backward_cuda(const Tensor& grad_output, const Tensor& output, int64_t dim) {
  return softmax_backward<true>(grad_output, output, dim, "fastops.log_softmax_backward");
}
Tensor softmax_cuda(const Tensor& self, int64_t dim) {
  return softmax_forward<false>(self, dim, "fastops.softmax");
}
Tensor softmax_backward_cuda(const Tensor& grad_output, const Tensor& output, int64_t dim) {
  return softmax_backward<false>(grad_output, output, dim, "fastops.softmax_backward");
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CUDA, m) {
  m.impl("log_softmax", &log_softmax_cuda);
  m.impl("log_softmax_backward", &log_softmax_backward_cuda);
  m.impl("softmax", &softmax_cuda);
  m.impl("softmax_backward", &softmax_backward_cuda);
  m.impl("nll_loss", &nll_loss_cuda);
  m.impl("nll_loss_backward", &nll_loss_backward_cuda);
  m.impl("cross_entropy", &cross_entropy_cuda);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cuda);
}

}  // namespace gpu
}  // namespace fastops
