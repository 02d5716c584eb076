// CPU kernel of the fused linear + cross entropy: the (N, V) logits are never stored.
//
// The non-ignored rows are processed in chunks of c rows (the logits of a chunk, c x V in the
// compute type, about kChunkBytes):
//   1. L = x_c W^T + b                       GEMM on gemm.h's micro-kernel, bias added to each tile
//   2. per row (parallel): softcap, max, lse, the loss terms
//   3. when gradients are wanted, per block of the vocabulary: L turned in place into
//      G = dloss/dz (softmax - target distribution, times the row's scale and the softcap chain
//      factor), then
//      grad_input rows += G W                GEMM, summed over the blocks in a fixed order
//      grad_weight += G^T x_c                GEMM accumulating in place across the chunks
//      grad_bias += column sums of G         rows summed in order
// The forward with gradients (reductions mean and sum, grad_loss = 1) thus runs the three GEMMs
// of the unfused forward + backward and never a fourth; the backward op recomputes step 1.
// Extra memory: the chunk's logits (about kChunkBytes, more for a vocabulary past 32k where
// the chunk keeps kMinChunkRows rows), x_c, the grad_input partial sums of the chunk, and a
// float grad_weight accumulator for 16-bit weights: O(c V + V H), never O(N V).
//
// Determinism: the chunks run in a fixed order and every sum has a fixed order (per row: the
// lanes of a fixed vector width; across rows: row order); the GEMMs' are fixed by the shapes.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../activations.h"
#include "../linear_cross_entropy_checks.h"
#include "cpu_common.h"
#include "gemm.h"
#include "max_lanes.h"

namespace fastops {
namespace cpu {
namespace {

using at::Tensor;

constexpr int64_t kChunkBytes = 24 << 20;  // logits of one chunk of rows

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// Rows per chunk: a multiple of 12 (the micro-kernel's MR) sized by kChunkBytes, but at least
// kMinChunkRows: every chunk reads W twice and reads and writes grad_W once, which only a
// few hundred rows of GEMM work per element hide (at a 128k vocabulary and H = 2048, W and
// grad_W are 1 GB each); at most 1020 (the depth of grad_W's GEMM).
constexpr int64_t kMinChunkRows = 192;
template <class Acc>
int64_t chunk_rows(int64_t V) {
  int64_t c = kChunkBytes / (static_cast<int64_t>(sizeof(Acc)) * std::max<int64_t>(V, 1));
  c = std::max<int64_t>(kMinChunkRows, c / 12 * 12);
  return std::min<int64_t>(c, 1020);
}

// ---- per-row math (the compute type A: float, or double for double) -------------------------

// sum_c f(c) with 16 lanes, in a fixed order.
template <class A, class F>
FO_ALWAYS_INLINE A lane_sum(int64_t V, const F& f) {
  constexpr int L = 16;
  A acc[L];
  for (int j = 0; j < L; ++j) acc[j] = 0;
  int64_t c = 0;
  for (; c + L <= V; c += L)
    for (int j = 0; j < L; ++j) acc[j] += f(c + j);
  A s = 0;
  for (int j = 0; j < L; ++j) s += acc[j];
  for (; c < V; ++c) s += f(c);
  return s;
}

// What every row shares.
template <class T, class A>
struct RowCtx {
  int64_t V;
  const A* cw;   // class weights, or null
  A cw_sum;      // their sum (V without)
  A eps, z, cap; // label smoothing, z-loss coefficient, softcap (0: none)
  const T* y;    // class-probability target rows (N x V, contiguous), or null
  const int64_t* t;  // class-index targets, or null
};

// The softcap in place: s = cap * tanh(s / cap).
template <class A>
FO_ALWAYS_INLINE void softcap_row(A* s, int64_t V, A cap) {
  const A inv = A(1) / cap;
  for (int64_t c = 0; c < V; ++c) s[c] = cap * fo_tanh(s[c] * inv);
}

// The row's lse and loss term (before the reduction) from its final logits s.
template <class T, class A>
FO_ALWAYS_INLINE A row_loss(const RowCtx<T, A>& r, const A* s, int64_t row, A& lse, A& ysum_out) {
  const int64_t V = r.V;
  const A m = row_max<A>(s, V);
  const A sum = lane_sum<A>(V, [&](int64_t c) FO_INLINE_LAMBDA { return fo_exp(s[c] - m); });
  lse = m + std::log(sum);
  A loss = r.z * lse * lse;
  if (r.y == nullptr) {
    const int64_t t = r.t[row];
    const A wt = r.cw ? r.cw[t] : A(1);
    loss += (A(1) - r.eps) * wt * (lse - s[t]);
    if (r.eps > 0) {
      const A dot = r.cw ? lane_sum<A>(V, [&](int64_t c) FO_INLINE_LAMBDA { return r.cw[c] * s[c]; })
                         : lane_sum<A>(V, [&](int64_t c) FO_INLINE_LAMBDA { return s[c]; });
      loss += r.eps / static_cast<A>(V) * (lse * r.cw_sum - dot);
    }
  } else {
    const T* y = r.y + row * V;
    const A om = A(1) - r.eps, ev = r.eps / static_cast<A>(V);
    A ysum, dot;
    if (r.cw) {
      ysum = lane_sum<A>(V, [&](int64_t c) FO_INLINE_LAMBDA {
        return r.cw[c] * (om * static_cast<A>(y[c]) + ev);
      });
      dot = lane_sum<A>(V, [&](int64_t c) FO_INLINE_LAMBDA {
        return r.cw[c] * (om * static_cast<A>(y[c]) + ev) * s[c];
      });
    } else {
      ysum = lane_sum<A>(V, [&](int64_t c) FO_INLINE_LAMBDA {
        return om * static_cast<A>(y[c]) + ev;
      });
      dot = lane_sum<A>(V, [&](int64_t c) FO_INLINE_LAMBDA {
        return (om * static_cast<A>(y[c]) + ev) * s[c];
      });
    }
    loss += lse * ysum - dot;
    ysum_out = ysum;
  }
  return loss;
}

// The weighted sum of the smoothed probability target, sum_c w_c y'_c (what its softmax term
// is multiplied by).
template <class T, class A>
FO_ALWAYS_INLINE A row_ysum(const RowCtx<T, A>& r, int64_t row) {
  const T* y = r.y + row * r.V;
  const A om = A(1) - r.eps, ev = r.eps / static_cast<A>(r.V);
  if (r.cw)
    return lane_sum<A>(r.V, [&](int64_t c) FO_INLINE_LAMBDA {
      return r.cw[c] * (om * static_cast<A>(y[c]) + ev);
    });
  return lane_sum<A>(r.V, [&](int64_t c) FO_INLINE_LAMBDA {
    return om * static_cast<A>(y[c]) + ev;
  });
}

// s[v0, v1) (the row's final logits) becomes, in place, scale * dloss/dz there (z the logits
// before the cap). ysum: row_ysum for a probability target.
template <class T, class A>
FO_ALWAYS_INLINE void row_grad(const RowCtx<T, A>& r, A* s, int64_t row, A lse, A scale, A ysum,
                               int64_t v0, int64_t v1) {
  const int64_t V = r.V;
  const A om = A(1) - r.eps, ev = r.eps / static_cast<A>(V), zz = A(2) * r.z * lse;
  const A inv_cap = r.cap > 0 ? A(1) / r.cap : A(0);
  // chain factor of the softcap: d(cap tanh(z / cap))/dz = 1 - (s / cap)^2
  const auto chain = [&](A sc) FO_INLINE_LAMBDA {
    return r.cap > 0 ? A(1) - sc * inv_cap * sc * inv_cap : A(1);
  };
  if (r.y == nullptr) {
    const int64_t t = r.t[row];
    const bool has_t = t >= v0 && t < v1;
    const A wt = r.cw ? r.cw[t] : A(1);
    const A st = has_t ? s[t] : A(0);
    const A coef = om * wt + ev * r.cw_sum + zz;
    if (r.cw) {
      for (int64_t c = v0; c < v1; ++c)
        s[c] = scale * chain(s[c]) * (fo_exp(s[c] - lse) * coef - ev * r.cw[c]);
    } else if (r.cap > 0 || ev != 0) {
      for (int64_t c = v0; c < v1; ++c)
        s[c] = scale * chain(s[c]) * (fo_exp(s[c] - lse) * coef - ev);
    } else {
      const A sc = scale * coef;
      for (int64_t c = v0; c < v1; ++c) s[c] = sc * fo_exp(s[c] - lse);
    }
    if (has_t) s[t] -= scale * chain(st) * om * wt;
  } else {
    const T* y = r.y + row * V;
    const A coef = ysum + zz;
    for (int64_t c = v0; c < v1; ++c) {
      const A yc = (om * static_cast<A>(y[c]) + ev) * (r.cw ? r.cw[c] : A(1));
      s[c] = scale * chain(s[c]) * (fo_exp(s[c] - lse) * coef - yc);
    }
  }
}

// ---- the driver ------------------------------------------------------------------------------
//
// The three GEMMs of a chunk run on the micro-kernel of gemm.h under one schedule: the
// vocabulary is cut into blocks of vb classes (vb x H of W stays in L2), and each block is one
// task, so W is read twice per chunk (logits, then gradients) and every thread works on its own
// block between two barriers (a generic GEMM call per product would sync at every k block).
//   phase 1 (tasks = vocabulary blocks): L[:, block] = x_c W_block^T + b, A = x_c packed once
//   phase 2 (tasks = rows): the softcap, the row statistics (lse) and the loss
//   phase 3 (tasks = groups of blocks): per block, G[:, block] in place (in cache), then
//           grad_W[block] (+)= G[:, block]^T x_c, the group's grad_input partial sum
//           += G[:, block] W_block, and grad_b[block] += column sums
//   the groups' partial sums of grad_input are added in group order.
// The groups are fixed by the shapes (kGroups of them), not by the thread count: the sums, and
// so the results, are the same whatever the number of threads.
// Memory, not arithmetic, is what stalls the tiles at a large vocabulary: while a block computes,
// the thread prefetches its next block's rows of W and of the logits, and the tiles of partial
// sums two updates ahead: grad_W's (back in memory since the previous chunk, also across row
// panels and into the next block) and grad_input's (pushed out of L2 by the block's other work).

constexpr int64_t kGroups = 8;            // grad_input partial sums per chunk
constexpr int64_t kBlockBytes = 384 << 10;  // a block of W (vb x H, compute type)
constexpr int64_t kDepth = 512;             // k block of the logits' GEMM

// What one call computes. lse is written by the forward (stats) and read by the backward.
template <class A>
struct Work {
  bool stats;             // forward: lse and loss terms
  A* lse;                 // N
  double* loss;           // N loss terms (forward), or null
  const A* row_scale;     // grads: per-row scale (N), or null for one scale
  A scale;                // grads: the scale of every row when row_scale is null
  bool want_gi, want_gw, want_gb;
};

// One MR x NR tile of C (+)= Ap Bp (packed panels, depth kc) at c (row stride ldc), of which
// only mr x nr are real: full tiles go straight between memory and registers, edge tiles through
// a local tile (the same order of sums either way).
template <class A, int W, int MR, int NV>
FO_ALWAYS_INLINE void tile_update(int64_t kc, const A* ap, const A* bp, bool accumulate, A* c,
                                  int64_t ldc, int mr, int nr) {
  constexpr int NR = W * NV;
  if (mr == MR && nr == NR) {
    gemm::micro_kernel<A, W, MR, NV>(kc, ap, bp, accumulate ? c : nullptr, ldc, c, ldc);
    return;
  }
  alignas(gemm::kAlign) A tile[MR * NR];
  if (accumulate) {
    for (int e = 0; e < MR * NR; ++e) tile[e] = A(0);
    for (int i = 0; i < mr; ++i)
      for (int j = 0; j < nr; ++j) tile[i * NR + j] = c[i * ldc + j];
  }
  gemm::micro_kernel<A, W, MR, NV>(kc, ap, bp, accumulate ? tile : nullptr, NR, tile, NR);
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) c[i * ldc + j] = tile[i * NR + j];
}

// Fetches rows [0, rows) x columns [0, cols) of c (row stride ldc; rows <= MR, cols <= NR)
// into L1 for writing: the tile of partial sums that an update a little later reads and writes.
template <class A, int MR, int NR>
FO_ALWAYS_INLINE void prefetch_tile(A* c, int64_t ldc, int64_t rows, int64_t cols) {
  constexpr int kLine = 64 / static_cast<int>(sizeof(A));
  if (rows == MR && cols == NR) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NR; j += kLine) __builtin_prefetch(c + i * ldc + j, 1, 3);
    return;
  }
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; j += kLine) __builtin_prefetch(c + i * ldc + j, 1, 3);
}

template <class T, Isa I>
void run_chunks_isa(const LceDims& d, const Tensor& x, const Tensor& w, const acc_t<T>* bias,
                    const RowCtx<T, acc_t<T>>& r, const std::vector<int64_t>& active,
                    Work<acc_t<T>> wk, T* gi, acc_t<T>* gw, acc_t<T>* gb) {
  using A = acc_t<T>;
  using Cfg = gemm::Config<A, I>;
  constexpr int W = Cfg::W, MR = Cfg::MR, NV = Cfg::NV, NR = W * NV;
  using gemm::ceil_div;
  using gemm::round_up;
  const int64_t H = d.H, V = d.V, n = static_cast<int64_t>(active.size());
  if (n == 0) return;
  const bool grads = wk.want_gi || wk.want_gw || wk.want_gb;
  const int64_t C = std::min(chunk_rows<A>(V), n);
  const int64_t Cp = round_up(C, MR), Hn = round_up(H, NR);
  // vocabulary blocks of vb classes, a multiple of both tile sides (so that only the last block
  // has edge tiles): W's block (vb x H) and the logits' block (C x vb) about kBlockBytes each,
  // but at least 4 NR deep for grad_input's GEMM (whose partial sums go through L2 once per
  // block)
  constexpr int64_t unit = std::lcm(MR, NR);
  const int64_t vb = std::min(
      round_up(V, NR),
      round_up(std::max<int64_t>(4 * NR, kBlockBytes / (sizeof(A) * std::max<int64_t>({H, C, 1}))
                                             / unit * unit),
               unit));
  const int64_t nblocks = ceil_div(V, vb);
  const int64_t per_group = ceil_div(nblocks, std::min(kGroups, nblocks));
  const int64_t groups = ceil_div(nblocks, per_group);  // none of them empty

  const auto fopts = x.options().dtype(c10::CppTypeToScalarType<A>::value);
  Tensor logits = at::empty({C, V}, fopts);
  Tensor xa_buf = at::empty({Cp * H}, fopts);                       // x_c as A panels
  Tensor xb_buf = grads && wk.want_gw ? at::empty({Hn * C}, fopts) : Tensor();  // x_c as B
  Tensor gi_buf = wk.want_gi ? at::empty({groups, C, H}, fopts) : Tensor();
  A* L = logits.mutable_data_ptr<A>();
  A* xa = xa_buf.mutable_data_ptr<A>();
  A* xb = xb_buf.defined() ? xb_buf.mutable_data_ptr<A>() : nullptr;
  A* gip = gi_buf.defined() ? gi_buf.mutable_data_ptr<A>() : nullptr;
  std::vector<A> ysums(C, A(0));  // row_ysum of the chunk's rows (probability targets)
  const T* xp = x.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), ws0 = w.stride(0), ws1 = w.stride(1);

  for (int64_t c0 = 0; c0 < n; c0 += C) {
    const int64_t c = std::min(C, n - c0);
    const int64_t* rows = active.data() + c0;
    // x_c packed as the A operand of the logits (MR-row panels, depth H) and as the B operand
    // of grad_W (NR-column panels, depth c), straight from x's rows (any strides); little work,
    // on this thread
    gemm::run_isa<I>([&]() FO_INLINE_LAMBDA {
      for (int64_t p = 0; p * MR < c; ++p) {
        A* o = xa + p * MR * H;
        const int64_t mr = std::min<int64_t>(MR, c - p * MR);
        for (int64_t i = 0; i < MR; ++i) {
          const T* src = i < mr ? xp + rows[p * MR + i] * xs0 : nullptr;
          for (int64_t h = 0; h < H; ++h) o[h * MR + i] = src ? static_cast<A>(src[h * xs1]) : A(0);
        }
      }
      if (xb != nullptr)
        for (int64_t q = 0; q * NR < H; ++q) {
          A* o = xb + q * NR * c;
          const int64_t nr = std::min<int64_t>(NR, H - q * NR);
          for (int64_t k = 0; k < c; ++k) {
            const T* src = xp + rows[k] * xs0 + q * NR * xs1;
            for (int64_t j = 0; j < NR; ++j)
              o[k * NR + j] = j < nr ? static_cast<A>(src[j * xs1]) : A(0);
          }
        }
    });

    // W's rows of vocabulary block blk (none for -1), to be fetched over `steps` tiles; only
    // when W's rows are contiguous (its transpose is read column by column anyway)
    const auto prefetch_w_rows = [&](int64_t blk, int64_t steps) {
      if (blk < 0 || ws1 != 1) return gemm::Prefetcher();
      return gemm::Prefetcher(wp + blk * vb * ws0, std::min(vb, V - blk * vb),
                              H * static_cast<int64_t>(sizeof(T)), ws0 * sizeof(T), steps);
    };

    // phase 1: the logits, block by block of the vocabulary, by k blocks of kDepth features
    // (x_c's slice of a k block and W's block stay in L2)
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      thread_local gemm::Scratch scratch;
      A* wpack = static_cast<A*>(scratch.get(sizeof(A) * vb * std::min<int64_t>(H, kDepth)));
      gemm::run_isa<I>([&]() FO_INLINE_LAMBDA {
        for (int64_t blk = b0; blk < b1; ++blk) {
          const int64_t v0 = blk * vb, nv = std::min(vb, V - v0);
          const int64_t npan = ceil_div(nv, NR);
          // the rows of W of this thread's next block, fetched while this one computes
          gemm::Prefetcher next_w = prefetch_w_rows(blk + 1 < b1 ? blk + 1 : -1,
                                                    npan * ceil_div(c, MR) * ceil_div(H, kDepth));
          for (int64_t k0 = 0; k0 < std::max<int64_t>(H, 1); k0 += kDepth) {
            const int64_t kc = std::min(kDepth, H - k0);
            for (int64_t p = 0; p < npan; ++p)  // W_block^T: B(h, v) = W[v, h]
              gemm::pack_b_panel<NR, W>(wp + (v0 + p * NR) * ws0 + k0 * ws1, ws1, ws0,
                                        std::min<int64_t>(NR, nv - p * NR), kc,
                                        wpack + p * NR * kc);
            for (int64_t p = 0; p < npan; ++p) {
              const int64_t j0 = v0 + p * NR;
              const int nr = static_cast<int>(std::min<int64_t>(NR, V - j0));
              for (int64_t ip = 0; ip < c; ip += MR, next_w.step())
                tile_update<A, W, MR, NV>(kc, xa + ip * H + k0 * MR, wpack + p * NR * kc, k0 > 0,
                                          L + ip * V + j0, V,
                                          static_cast<int>(std::min<int64_t>(MR, c - ip)), nr);
            }
          }
          if (bias != nullptr)
            for (int64_t i = 0; i < c; ++i) {
              A* o = L + i * V + v0;
              for (int64_t j = 0; j < nv; ++j) o[j] += bias[v0 + j];
            }
        }
      });
    });

    // phase 2: per row, the softcap, the statistics and the loss (the gradient of the logits is
    // computed block by block in phase 3, while the block is in cache)
    const bool soft_grads = grads && r.y != nullptr;
    if (r.cap > 0 || wk.stats || soft_grads) {
      at::parallel_for(0, c, 1, [&](int64_t i0, int64_t i1) {
        dispatch_isa([&]() FO_INLINE_LAMBDA {
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t row = rows[i];
            A* s = L + i * V;
            if (r.cap > 0) softcap_row(s, V, r.cap);
            if (wk.stats) {
              A lse, ysum = 0;
              const A loss = row_loss(r, s, row, lse, ysum);
              wk.lse[row] = lse;
              ysums[i] = ysum;
              if (wk.loss != nullptr) wk.loss[row] = static_cast<double>(loss);
            } else if (soft_grads) {
              ysums[i] = row_ysum(r, row);
            }
          }
        });
      });
    }
    if (!grads) continue;

    // phase 3: the gradients, by groups of vocabulary blocks
    const bool first_chunk = c0 == 0;
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      thread_local gemm::Scratch wscratch, gscratch, tscratch;
      A* wpack = static_cast<A*>(wscratch.get(sizeof(A) * vb * Hn));
      A* gpack = static_cast<A*>(gscratch.get(sizeof(A) * round_up(c, MR) * vb));
      A* gtpack = static_cast<A*>(tscratch.get(sizeof(A) * round_up(vb, MR) * c));
      gemm::run_isa<I>([&]() FO_INLINE_LAMBDA {
        for (int64_t g = g0; g < g1; ++g) {
          A* part = gip != nullptr ? gip + g * C * H : nullptr;
          const int64_t bend = std::min(nblocks, (g + 1) * per_group);
          for (int64_t blk = g * per_group; blk < bend; ++blk) {
            const int64_t v0 = blk * vb, nv = std::min(vb, V - v0);
            const bool first_block = blk == g * per_group;
            // this thread's next block: its logits and W's rows, fetched over this block's tiles
            const int64_t next = blk + 1 < std::min(nblocks, g1 * per_group) ? blk + 1 : -1;
            const int64_t tiles = (wk.want_gi ? ceil_div(c, MR) : 0) * ceil_div(H, NR) +
                                  (wk.want_gw ? ceil_div(nv, MR) * ceil_div(H, NR) : 0);
            gemm::Prefetcher next_l =
                next < 0 ? gemm::Prefetcher()
                         : gemm::Prefetcher(L + next * vb, c,
                                            std::min(vb, V - next * vb) * sizeof(A),
                                            V * sizeof(A), tiles);
            gemm::Prefetcher next_w = prefetch_w_rows(wk.want_gi ? next : -1, tiles);
            const auto prefetch_step = [&]() FO_INLINE_LAMBDA {
              next_l.step();
              next_w.step();
            };
            // grad_W's tile t of this block (tiles by MR-row panels, nq per panel; past the
            // block: the next block's, when this thread runs it), fetched two updates ahead:
            // its rows went back to memory after the last chunk
            const int64_t nq = ceil_div(H, NR);
            const int64_t gw_end = next >= 0 ? std::min(V, v0 + nv + vb) : v0 + nv;
            const auto prefetch_gw = [&](int64_t t) FO_INLINE_LAMBDA {
              if (first_chunk || !wk.want_gw) return;
              const int64_t r0 = v0 + t / nq * MR, j0 = t % nq * NR;
              prefetch_tile<A, MR, NR>(gw + r0 * H + j0, H, std::min<int64_t>(MR, gw_end - r0),
                                       std::min<int64_t>(NR, H - j0));
            };
            // the same for the grad_input partial sums (tiles by NR-column panels, nip per
            // panel), which the other GEMMs of the block pushed out of L2
            const int64_t nip = ceil_div(c, MR);
            const auto prefetch_gi = [&](int64_t t) FO_INLINE_LAMBDA {
              if (first_block || t >= nip * nq) return;
              const int64_t r0 = t % nip * MR, j0 = t / nip * NR;
              prefetch_tile<A, MR, NR>(part + r0 * H + j0, H, std::min<int64_t>(MR, c - r0),
                                       std::min<int64_t>(NR, H - j0));
            };
            if (blk == g0 * per_group) {  // this thread's first block: nothing fetched it yet
              prefetch_gw(0);
              prefetch_gw(1);
            }
            for (int64_t i = 0; i < c; ++i) {
              const int64_t row = rows[i];
              row_grad(r, L + i * V, row, wk.lse[row],
                       wk.row_scale ? wk.row_scale[row] : wk.scale, ysums[i], v0, v0 + nv);
            }
            if (wk.want_gi) {
              // grad_input partial += G[:, block] W_block: A = G (c x nv), B = W_block (nv x H)
              gemm::pack_a<MR, W>(L + v0, V, 1, c, nv, gpack);
              if (ws1 == 1)
                gemm::pack_b_rowwise<NR, W>(wp + v0 * ws0, ws0, H, nv, wpack);
              else
                for (int64_t q = 0; q * NR < H; ++q)
                  gemm::pack_b_panel<NR, W>(wp + v0 * ws0 + q * NR * ws1, ws0, ws1,
                                            std::min<int64_t>(NR, H - q * NR), nv,
                                            wpack + q * NR * nv);
              prefetch_gi(0);
              prefetch_gi(1);
              for (int64_t q = 0; q * NR < H; ++q) {
                const int nr = static_cast<int>(std::min<int64_t>(NR, H - q * NR));
                for (int64_t ip = 0; ip < c; ip += MR, prefetch_step()) {
                  prefetch_gi(q * nip + ip / MR + 2);
                  tile_update<A, W, MR, NV>(nv, gpack + ip * nv, wpack + q * NR * nv,
                                            !first_block, part + ip * H + q * NR, H,
                                            static_cast<int>(std::min<int64_t>(MR, c - ip)), nr);
                }
              }
            }
            if (wk.want_gw) {
              // grad_W[block] (+)= G[:, block]^T x_c: A = G^T (nv x c), B = x_c (c x H)
              gemm::pack_a<MR, W>(L + v0, 1, V, nv, c, gtpack);
              for (int64_t ip = 0; ip < nv; ip += MR) {  // MR rows of grad_W, left to right
                const int mr = static_cast<int>(std::min<int64_t>(MR, nv - ip));
                for (int64_t q = 0; q * NR < H; ++q, prefetch_step()) {
                  A* tile = gw + (v0 + ip) * H + q * NR;
                  prefetch_gw(ip / MR * nq + q + 2);
                  tile_update<A, W, MR, NV>(c, gtpack + ip * c, xb + q * NR * c, !first_chunk,
                                            tile, H, mr,
                                            static_cast<int>(std::min<int64_t>(NR, H - q * NR)));
                }
              }
            }
            if (wk.want_gb)
              for (int64_t i = 0; i < c; ++i) {
                const A* gr = L + i * V + v0;
                for (int64_t v = 0; v < nv; ++v) gb[v0 + v] += gr[v];
              }
          }
        }
      });
    });
    if (wk.want_gi) {
      // the groups' partial sums, in group order, to the chunk's rows of grad_input
      gemm::run_isa<I>([&]() FO_INLINE_LAMBDA {
        for (int64_t i = 0; i < c; ++i) {
          T* o = gi + rows[i] * H;
          for (int64_t h = 0; h < H; ++h) {
            A sum = gip[i * H + h];
            for (int64_t g = 1; g < groups; ++g) sum += gip[(g * C + i) * H + h];
            o[h] = static_cast<T>(sum);
          }
        }
      });
    }
  }
}

template <class T>
void run_chunks(const LceDims& d, const Tensor& x, const Tensor& w, const acc_t<T>* bias,
                const RowCtx<T, acc_t<T>>& r, const std::vector<int64_t>& active,
                Work<acc_t<T>> wk, T* gi, acc_t<T>* gw, acc_t<T>* gb) {
  switch (cpu_isa()) {
    case Isa::avx512:
      return run_chunks_isa<T, Isa::avx512>(d, x, w, bias, r, active, wk, gi, gw, gb);
    case Isa::avx2:
      return run_chunks_isa<T, Isa::avx2>(d, x, w, bias, r, active, wk, gi, gw, gb);
    default:
      return run_chunks_isa<T, Isa::baseline>(d, x, w, bias, r, active, wk, gi, gw, gb);
  }
}

// ---- the ops -----------------------------------------------------------------------------------

template <class T>
std::vector<acc_t<T>> acc_vector(const c10::optional<Tensor>& t, int64_t n) {
  std::vector<acc_t<T>> v;
  if (!t.has_value() || !t->defined()) return v;
  const Tensor c = t->contiguous();
  const T* p = c.const_data_ptr<T>();
  v.resize(n);
  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<acc_t<T>>(p[i]);
  return v;
}

// The rows that count (all of them for probability targets) and the divisor of 'mean' (the sum
// of the class weights of their targets, N for probabilities). Checks every class target.
template <class A>
double active_rows(const LceDims& d, const Tensor& target, const std::vector<A>& cw,
                   int64_t ignore_index, std::vector<int64_t>& active, const char* op) {
  active.clear();
  if (d.soft) {
    active.resize(d.N);
    for (int64_t i = 0; i < d.N; ++i) active[i] = i;
    return static_cast<double>(d.N);
  }
  const int64_t* t = target.const_data_ptr<int64_t>();
  double total = 0;
  active.reserve(d.N);
  for (int64_t i = 0; i < d.N; ++i) {
    const int64_t ti = t[i];
    if (ti == ignore_index) continue;
    TORCH_CHECK_INDEX(ti >= 0 && ti < d.V, op, ": target ", ti, " (at index ", i,
                      ") is out of bounds: expected a class index in [0, ", d.V,
                      ") or ignore_index (", ignore_index, ")");
    total += cw.empty() ? 1.0 : static_cast<double>(cw[ti]);
    active.push_back(i);
  }
  return total;
}

// Prepares the shared row context and runs body(ctx, active, divisor, bias vector).
template <class T, class Body>
void with_context(const LceDims& d, const Tensor& weight, const c10::optional<Tensor>& bias,
                  const Tensor& target, const c10::optional<Tensor>& class_weight,
                  int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
                  const Tensor& tgt, const char* op, const Body& body) {
  using A = acc_t<T>;
  const std::vector<A> cw = acc_vector<T>(class_weight, d.V);
  const std::vector<A> bv = acc_vector<T>(bias, d.V);
  std::vector<int64_t> active;
  const double divisor = active_rows(d, tgt, cw, ignore_index, active, op);
  double cw_sum = static_cast<double>(d.V);
  if (!cw.empty()) {
    cw_sum = 0;
    for (A v : cw) cw_sum += static_cast<double>(v);
  }
  RowCtx<T, A> r{d.V,
                 cw.empty() ? nullptr : cw.data(),
                 static_cast<A>(cw_sum),
                 static_cast<A>(label_smoothing),
                 static_cast<A>(z_loss),
                 static_cast<A>(softcap),
                 d.soft ? tgt.const_data_ptr<T>() : nullptr,
                 d.soft ? nullptr : tgt.const_data_ptr<int64_t>()};
  body(r, active, divisor, bv.empty() ? static_cast<const A*>(nullptr) : bv.data());
  (void)weight;
  (void)target;
}

// A contiguous weight whose rows or columns are contiguous (the GEMM packs either fast).
Tensor gemm_ready(const Tensor& w) {
  return (w.stride(1) == 1 || w.stride(0) == 1) ? w : w.contiguous();
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lce_forward(
    const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
    const Tensor& target, const c10::optional<Tensor>& class_weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
    bool with_grad) {
  const char* op = "fastops.linear_cross_entropy";
  const LceDims d = check_linear_cross_entropy(input, weight, bias, target, class_weight,
                                               reduction, label_smoothing, z_loss, softcap, op);
  const bool grads = with_grad && reduction != kNone;
  const bool has_bias = bias.has_value() && bias->defined();
  const auto opts = input.options();
  const auto adt = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor lse = at::zeros({d.N}, opts.dtype(adt));
  Tensor loss = reduction == kNone ? at::empty({d.N}, opts) : at::empty({}, opts);
  Tensor gi = grads ? at::zeros({d.N, d.H}, opts) : at::empty({0}, opts);
  Tensor gw = grads ? at::zeros({d.V, d.H}, opts) : at::empty({0}, opts);
  Tensor gb = grads && has_bias ? at::zeros({d.V}, opts) : at::empty({0}, opts);
  const Tensor w = gemm_ready(weight);
  const Tensor tgt = target.contiguous();

  FO_DISPATCH_FLOATING(input.scalar_type(), [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    with_context<T>(d, w, bias, target, class_weight, ignore_index, label_smoothing, z_loss,
                    softcap, tgt, op, [&](const RowCtx<T, A>& r,
                                          const std::vector<int64_t>& active, double divisor,
                                          const A* bv) {
      std::vector<double> terms(d.N, 0.0);
      // grad_weight accumulates in the compute type: a float buffer for 16-bit weights
      Tensor gw_acc = grads ? (std::is_same_v<T, A> ? gw : at::zeros({d.V, d.H}, opts.dtype(adt)))
                            : Tensor();
      Tensor gb_acc = grads && has_bias ? at::zeros({d.V}, opts.dtype(adt)) : Tensor();
      Work<A> wk{true, lse.mutable_data_ptr<A>(), terms.data(), nullptr,
                 static_cast<A>(reduction == kMean ? 1.0 / divisor : 1.0), grads, grads,
                 grads && has_bias};
      run_chunks<T>(d, input, w, bv, r, active, wk, grads ? gi.mutable_data_ptr<T>() : nullptr,
                    grads ? gw_acc.mutable_data_ptr<A>() : nullptr,
                    gb_acc.defined() ? gb_acc.mutable_data_ptr<A>() : nullptr);
      if (reduction == kNone) {
        T* lp = loss.mutable_data_ptr<T>();
        for (int64_t i = 0; i < d.N; ++i) lp[i] = static_cast<T>(terms[i]);
      } else {
        double s = 0;
        for (double v : terms) s += v;
        loss.fill_(reduction == kMean ? s / divisor : s);
      }
      if (grads && !std::is_same_v<T, A>) gw.copy_(gw_acc);
      if (gb_acc.defined()) gb.copy_(gb_acc);
    });
  });
  return {loss, lse, gi, gw, gb};
}

std::tuple<Tensor, Tensor, Tensor> lce_backward(
    const Tensor& grad_loss, const Tensor& input, const Tensor& weight,
    const c10::optional<Tensor>& bias, const Tensor& target,
    const c10::optional<Tensor>& class_weight, const Tensor& lse, int64_t reduction,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
    std::array<bool, 3> output_mask) {
  const char* op = "fastops.linear_cross_entropy_backward";
  const LceDims d = check_linear_cross_entropy_backward(grad_loss, input, weight, bias, target,
                                                        class_weight, lse, reduction,
                                                        label_smoothing, z_loss, softcap, op);
  const bool has_bias = bias.has_value() && bias->defined();
  const auto opts = input.options();
  const auto adt = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool want_gb = output_mask[2] && has_bias;
  Tensor gi = output_mask[0] ? at::zeros({d.N, d.H}, opts) : at::empty({0}, opts);
  Tensor gw = output_mask[1] ? at::zeros({d.V, d.H}, opts) : at::empty({0}, opts);
  Tensor gb = want_gb ? at::zeros({d.V}, opts) : at::empty({0}, opts);
  if (!output_mask[0] && !output_mask[1] && !want_gb) return {gi, gw, gb};
  const Tensor w = gemm_ready(weight);
  const Tensor tgt = target.contiguous();
  const Tensor g = grad_loss.to(adt).contiguous();
  Tensor lse_c = lse.contiguous();

  FO_DISPATCH_FLOATING(input.scalar_type(), [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    with_context<T>(d, w, bias, target, class_weight, ignore_index, label_smoothing, z_loss,
                    softcap, tgt, op, [&](const RowCtx<T, A>& r,
                                          const std::vector<int64_t>& active, double divisor,
                                          const A* bv) {
      const A* gp = g.const_data_ptr<A>();
      Tensor gw_acc = output_mask[1] ? (std::is_same_v<T, A> ? gw
                                                             : at::zeros({d.V, d.H}, opts.dtype(adt)))
                                     : Tensor();
      Tensor gb_acc = want_gb ? at::zeros({d.V}, opts.dtype(adt)) : Tensor();
      const double base = reduction == kNone ? 1.0 : static_cast<double>(gp[0]);
      Work<A> wk{false, lse_c.mutable_data_ptr<A>(), nullptr,
                 reduction == kNone ? gp : nullptr,
                 static_cast<A>(reduction == kMean ? base / divisor : base), output_mask[0],
                 output_mask[1], want_gb};
      run_chunks<T>(d, input, w, bv, r, active, wk,
                    output_mask[0] ? gi.mutable_data_ptr<T>() : nullptr,
                    gw_acc.defined() ? gw_acc.mutable_data_ptr<A>() : nullptr,
                    gb_acc.defined() ? gb_acc.mutable_data_ptr<A>() : nullptr);
      if (output_mask[1] && !std::is_same_v<T, A>) gw.copy_(gw_acc);
      if (want_gb) gb.copy_(gb_acc);
    });
  });
  return {gi, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CPU, m) {
  m.impl("linear_cross_entropy", &lce_forward);
  m.impl("linear_cross_entropy_backward", &lce_backward);
}

}  // namespace cpu
}  // namespace fastops
