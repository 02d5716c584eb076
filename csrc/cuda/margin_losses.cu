// CUDA kernels of the margin losses: hinge_embedding_loss and multi_margin_loss. They accept
// what the CPU kernels accept and give the same results (csrc/cpu/margin_losses.cpp is the
// reference; the math of both is margin_math.h).
//
// - hinge_embedding_loss is elementwise: grid-stride loops with 16-byte packs of the input (and
//   of the target, in as many packs as its wider elements need) where every tensor is 16-byte
//   aligned, one element at a time otherwise; a reduced loss is summed by fixed chunks of
//   elements, then the chunk sums in order, in float64.
// - multi_margin_loss: a group of tpr threads per row (tpr a power of two: neighbouring lanes
//   of a warp up to 32, several rows per block; else a whole block for rows of many classes),
//   each thread summing the classes lane, lane + tpr, ... in order, the group reducing by a
//   fixed tree. Neighbouring threads read neighbouring classes. Row losses are summed by fixed
//   blocks of rows, then the block sums in order, in float64 (launch_sum_rows). The backward
//   writes every class's gradient and the group's sum of them, negated, to the target class.
//
// Determinism: no floating-point atomics; same shape, dtype and alignments: same bits (the
// hinge's 16-byte path is taken only when every tensor is 16-byte aligned; the multi-margin
// kernels' order depends on the shape only).
//
// Class targets are checked on the device: one outside [0, C) fails a device assertion (as
// torch's kernels) and is never used as an index; its row's loss and gradient are NaN should
// the assertion be compiled out.
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "../loss_checks.h"
#include "../margin_math.h"
#include "loss_common.cuh"

namespace fastops {
namespace gpu {
namespace {

using at::Tensor;
using namespace fastops::loss;
using margin::hinge_grad;
using margin::hinge_term;
using margin::margin_grad;
using margin::margin_term;

// Calls body(tag) with a value of the hinge target's element type: T (the input's), or int64.
template <class T, class Body>
void dispatch_hinge_target(at::ScalarType target_type, const Body& body) {
  if (target_type == at::kLong) body(int64_t{});
  else body(T{});
}

// ---- hinge_embedding_loss --------------------------------------------------------------------

constexpr int64_t kHingeChunk = 8192;  // elements per block of the sum (a multiple of every kVec)

// V targets from a 16-byte aligned p, in 16-byte packs (an int64 target takes V / 2 of them for
// a float input: its elements are wider than the input's, never narrower).
template <class TT, int V>
__device__ __forceinline__ void load_targets(const TT* p, TT (&out)[V]) {
  constexpr int TV = kVec<TT>;
  static_assert(V % TV == 0, "a target pack never straddles two input packs");
#pragma unroll
  for (int c = 0; c < V; c += TV) {
    const Pack<TT, TV> pk = load_pack<TT, TV>(p + c);
#pragma unroll
    for (int j = 0; j < TV; ++j) out[c + j] = pk.v[j];
  }
}

template <class T, class TT>
__global__ void __launch_bounds__(kThreads)
    hinge_none_kernel(const T* x, const TT* t, T* out, int64_t n, acc_t<T> m, bool vec) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t npk = vec ? n / V : 0;
  for (int64_t k = first; k < npk; k += stride) {
    const Pack<T, V> px = load_pack<T, V>(x + k * V);
    TT pt[V];
    load_targets<TT, V>(t + k * V, pt);
    Pack<T, V> o;
#pragma unroll
    for (int j = 0; j < V; ++j)
      o.v[j] = static_cast<T>(hinge_term(static_cast<A>(px.v[j]), static_cast<A>(pt[j]), m));
    store_pack<T, V>(out + k * V, o);
  }
  for (int64_t i = npk * V + first; i < n; i += stride)
    out[i] = static_cast<T>(hinge_term(static_cast<A>(x[i]), static_cast<A>(t[i]), m));
}

// Block b sums the terms of [b * kHingeChunk, ...) in an order fixed by n and vec; the chunk
// sums are added in order (finish_sums) unless one block covers everything. The "weight" is
// the element count, so that 'mean' divides by n (0 / 0 = NaN for an empty input).
template <class T, class TT>
__global__ void __launch_bounds__(kThreads)
    hinge_sum_kernel(const T* x, const TT* t, int64_t n, acc_t<T> m, bool vec, double* partials,
                     LossOut<T> out) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  __shared__ A scratch[32];
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * kHingeChunk;
  const int64_t b1 = n < b0 + kHingeChunk ? n : b0 + kHingeChunk;
  A acc = A(0);
  const int64_t npk = vec && b1 > b0 ? (b1 - b0) / V : 0;
  for (int64_t k = threadIdx.x; k < npk; k += blockDim.x) {
    const Pack<T, V> px = load_pack<T, V>(x + b0 + k * V);
    TT pt[V];
    load_targets<TT, V>(t + b0 + k * V, pt);
#pragma unroll
    for (int j = 0; j < V; ++j)
      acc += hinge_term(static_cast<A>(px.v[j]), static_cast<A>(pt[j]), m);
  }
  for (int64_t i = b0 + npk * V + threadIdx.x; i < b1; i += blockDim.x)
    acc += hinge_term(static_cast<A>(x[i]), static_cast<A>(t[i]), m);
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) {
    const double cnt = b1 > b0 ? static_cast<double>(b1 - b0) : 0.0;
    if (gridDim.x == 1) {
      write_loss(out, static_cast<double>(acc), cnt);
    } else {
      partials[blockIdx.x] = static_cast<double>(acc);
      partials[gridDim.x + blockIdx.x] = cnt;
    }
  }
}

// g_none: the elementwise incoming gradient ('none'), else g (any floating dtype, one value)
// is read here: divided by n for 'mean' and rounded to T, as torch's mean backward rounds it.
template <class T, class TT>
__global__ void __launch_bounds__(kThreads)
    hinge_backward_kernel(const T* x, const TT* t, const T* g_none, const void* g, int g_kind,
                          int64_t reduction, acc_t<T> m, T* gx, int64_t n, bool vec) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  A g_all = A(0);
  if (g_none == nullptr) {
    double s = load_as<double>(g, g_kind, 0);
    if (reduction == kMean) s /= static_cast<double>(n);
    g_all = static_cast<A>(static_cast<T>(static_cast<A>(s)));
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t npk = vec ? n / V : 0;
  for (int64_t k = first; k < npk; k += stride) {
    const Pack<T, V> px = load_pack<T, V>(x + k * V);
    TT pt[V];
    load_targets<TT, V>(t + k * V, pt);
    Pack<T, V> pg;
    if (g_none != nullptr) pg = load_pack<T, V>(g_none + k * V);
    Pack<T, V> o;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const A gj = g_none != nullptr ? static_cast<A>(pg.v[j]) : g_all;
      o.v[j] = static_cast<T>(hinge_grad(static_cast<A>(px.v[j]), static_cast<A>(pt[j]), m, gj));
    }
    store_pack<T, V>(gx + k * V, o);
  }
  for (int64_t i = npk * V + first; i < n; i += stride) {
    const A gi = g_none != nullptr ? static_cast<A>(g_none[i]) : g_all;
    gx[i] = static_cast<T>(hinge_grad(static_cast<A>(x[i]), static_cast<A>(t[i]), m, gi));
  }
}

Tensor hinge_embedding_loss_cuda(const Tensor& self, const Tensor& target, double margin,
                                 int64_t reduction) {
  const char* op = "fastops.hinge_embedding_loss";
  check_hinge_embedding(self, target, reduction, op);
  const KernelScope scope(self);
  const Tensor x = self.contiguous();
  const Tensor t = target.contiguous();
  const int64_t n = x.numel();
  Tensor out = reduction == kNone ? at::empty_like(x, at::MemoryFormat::Contiguous)
                                  : at::empty({}, self.options());
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using A = acc_t<scalar_t>;
    const A m = static_cast<A>(margin);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    dispatch_hinge_target<scalar_t>(t.scalar_type(), [&](auto tag) {
      using TT = decltype(tag);
      const TT* tp = t.const_data_ptr<TT>();
      if (reduction == kNone) {
        if (n == 0) return;
        scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
        const bool vec = aligned16(xp, tp, op_);
        const int64_t work = vec ? (n + kVec<scalar_t> - 1) / kVec<scalar_t> : n;
        hinge_none_kernel<scalar_t, TT>
            <<<grid_for(work, kThreads, 8), kThreads, 0, scope.stream>>>(xp, tp, op_, n, m, vec);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      const int64_t nblocks = n > 0 ? (n + kHingeChunk - 1) / kHingeChunk : 1;
      TORCH_CHECK(nblocks <= std::numeric_limits<int32_t>::max(), op, ": input too large (", n,
                  " elements)");
      Tensor partials;
      double* pp = nullptr;
      if (nblocks > 1) {
        partials = at::empty({2 * nblocks}, self.options().dtype(at::kDouble));
        pp = partials.mutable_data_ptr<double>();
      }
      const LossOut<scalar_t> lo{out.mutable_data_ptr<scalar_t>(), nullptr, reduction};
      hinge_sum_kernel<scalar_t, TT>
          <<<static_cast<unsigned int>(nblocks), kThreads, 0, scope.stream>>>(
              xp, tp, n, m, aligned16(xp, tp), pp, lo);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (nblocks > 1) {
        finish_sums<scalar_t><<<1, kReduceThreads, 0, scope.stream>>>(pp, nblocks, lo);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return out;
}

Tensor hinge_embedding_loss_backward_cuda(const Tensor& grad_output, const Tensor& self,
                                          const Tensor& target, double margin,
                                          int64_t reduction) {
  const char* op = "fastops.hinge_embedding_loss_backward";
  check_hinge_embedding_backward(grad_output, self, target, reduction, op);
  const KernelScope scope(self);
  const Tensor x = self.contiguous();
  const Tensor t = target.contiguous();
  const int64_t n = x.numel();
  Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (n == 0) return gx;
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using A = acc_t<scalar_t>;
    // 'none': the elementwise gradient in the input's dtype, as the CPU kernel reads it; else
    // the one value is read on the device (no host synchronisation)
    const Tensor g = reduction == kNone ? grad_output.to(x.scalar_type()).contiguous()
                                        : grad_output.contiguous();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gn = reduction == kNone ? g.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    dispatch_hinge_target<scalar_t>(t.scalar_type(), [&](auto tag) {
      using TT = decltype(tag);
      const TT* tp = t.const_data_ptr<TT>();
      const bool vec = aligned16(xp, tp, gxp) && (gn == nullptr || aligned16(gn));
      const int64_t work = vec ? (n + kVec<scalar_t> - 1) / kVec<scalar_t> : n;
      hinge_backward_kernel<scalar_t, TT>
          <<<grid_for(work, kThreads, 8), kThreads, 0, scope.stream>>>(
              xp, tp, gn, g.const_data_ptr(), dkind(g.scalar_type()), reduction,
              static_cast<A>(margin), gxp, n, vec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return gx;
}

// ---- multi_margin_loss -----------------------------------------------------------------------

template <class T>
struct MarginArgs {
  const T* x;            // (N, C), contiguous
  const int64_t* tgt;    // N class targets
  const T* w;            // class weights or null
  int64_t N, C;
  acc_t<T> margin;
};

// Whether a class target is in [0, C); one that is not fails a device assertion and its row is
// never read.
__device__ __forceinline__ bool class_in_range(int64_t t, int64_t C) {
  const bool ok = t >= 0 && t < C;
  CUDA_KERNEL_ASSERT_MSG(ok, "fastops.multi_margin_loss: target out of range: expected a class "
                             "index in [0, C)");
  return ok;
}

// This thread's place in the row groups of tpr threads.
struct RowGroup {
  int lane, group, rows_per_block;
  __device__ explicit RowGroup(int tpr) {
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

// The sum over a row group: tpr <= 32 neighbouring lanes of a warp (xor shuffles stay inside
// the group), else the whole block (blockDim.x == tpr). Every thread of the block must reach
// it; every thread of the group gets the same bits.
template <class A>
__device__ __forceinline__ A group_total(A v, int tpr, A* scratch) {
  if (tpr <= 32) {
    for (int off = tpr >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
  }
  return block_sum(v, scratch);
}

// Writes the row losses: into loss_none for reduction 'none', else into row_loss.
template <class T, int P>
__global__ void __launch_bounds__(kThreads)
    margin_forward_rows(MarginArgs<T> p, T* loss_none, acc_t<T>* row_loss, int tpr) {
  using A = acc_t<T>;
  __shared__ A scratch[32];
  const RowGroup rg(tpr);
  // every thread of the block runs the same number of steps (the group sums need them all)
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * rg.rows_per_block; base < p.N;
       base += static_cast<int64_t>(gridDim.x) * rg.rows_per_block) {
    const int64_t row = base + rg.group;
    const int64_t y = row < p.N ? p.tgt[row] : 0;
    const bool valid = row < p.N && class_in_range(y, p.C);
    A sum = A(0);
    if (valid) {
      const T* xr = p.x + row * p.C;
      const A a = p.margin - static_cast<A>(xr[y]);
#pragma unroll 4
      for (int64_t c = rg.lane; c < p.C; c += tpr) {
        const A term = margin_term<P>(a + static_cast<A>(xr[c]));
        sum += c != y ? term : A(0);
      }
    }
    sum = group_total(sum, tpr, scratch);
    if (row < p.N && rg.lane == 0) {
      A v = std::numeric_limits<A>::quiet_NaN();  // a target out of range, never read
      if (valid) {
        v = sum;
        if (p.w != nullptr) v *= static_cast<A>(p.w[y]);
        v /= static_cast<A>(p.C);
      }
      if (loss_none != nullptr) loss_none[row] = static_cast<T>(v);
      else row_loss[row] = v;
    }
  }
}

// g (any floating dtype): per row for reduction 'none', else one value; divided by C (and by
// N for 'mean') in float64, as the CPU kernel divides it.
template <class T, int P>
__global__ void __launch_bounds__(kThreads)
    margin_backward_rows(MarginArgs<T> p, const void* g, int g_kind, int64_t reduction, T* gx,
                         int tpr) {
  using A = acc_t<T>;
  __shared__ A scratch[32];
  const RowGroup rg(tpr);
  const double g_div = static_cast<double>(p.C) * (reduction == kMean ? p.N : 1);
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * rg.rows_per_block; base < p.N;
       base += static_cast<int64_t>(gridDim.x) * rg.rows_per_block) {
    const int64_t row = base + rg.group;
    const int64_t y = row < p.N ? p.tgt[row] : 0;
    const bool valid = row < p.N && class_in_range(y, p.C);
    const T* xr = p.x + (row < p.N ? row : 0) * p.C;
    T* gr = gx + (row < p.N ? row : 0) * p.C;
    A sum = A(0);
    if (valid) {
      const A a = p.margin - static_cast<A>(xr[y]);
      A coef = static_cast<A>(load_as<double>(g, g_kind, reduction == kNone ? row : 0) / g_div);
      if (p.w != nullptr) coef *= static_cast<A>(p.w[y]);
      if (P == 2) coef *= A(2);
#pragma unroll 4
      for (int64_t c = rg.lane; c < p.C; c += tpr) {
        if (c == y) continue;  // written below, from the group's sum
        const A v = margin_grad<P>(a + static_cast<A>(xr[c]), coef);
        gr[c] = static_cast<T>(v);
        sum += v;
      }
    } else if (row < p.N) {
      for (int64_t c = rg.lane; c < p.C; c += tpr)
        gr[c] = static_cast<T>(std::numeric_limits<A>::quiet_NaN());
    }
    sum = group_total(sum, tpr, scratch);
    if (valid && rg.lane == 0) gr[y] = static_cast<T>(A(0) - sum);
  }
}

// Terms of the reduced loss: the row losses, one unit of weight per row ('mean' divides by N).
template <class A>
struct RowLossTerms {
  const A* row_loss;
  __device__ LossTerms operator()(int64_t row) const {
    return {static_cast<double>(row_loss[row]), 1.0};
  }
};

// About 8 classes per thread: a group inside a warp up to 256 classes, else a block of up to
// kThreads threads per row.
struct RowLaunch {
  int tpr, threads;
  unsigned int grid;
};

RowLaunch row_launch(int64_t rows, int64_t C) {
  int tpr = 1;
  while (tpr < kThreads && static_cast<int64_t>(tpr) * 8 < C) tpr <<= 1;
  RowLaunch l{};
  l.tpr = tpr;
  l.threads = tpr <= 32 ? kThreads : tpr;
  const int64_t rows_per_block = tpr <= 32 ? kThreads / tpr : 1;
  l.grid = grid_for(rows, rows_per_block, 16);
  return l;
}

template <class T>
MarginArgs<T> margin_args(const Tensor& x, const Tensor& tg, const Tensor& w, const Rows& r,
                          double margin) {
  return {x.const_data_ptr<T>(), tg.const_data_ptr<int64_t>(),
          w.defined() ? w.const_data_ptr<T>() : nullptr, r.N, r.C,
          static_cast<acc_t<T>>(margin)};
}

// Calls body(integral_constant<int, P>) for p = 1 or 2.
template <class Body>
void dispatch_p(int64_t p, const Body& body) {
  if (p == 1) body(std::integral_constant<int, 1>());
  else body(std::integral_constant<int, 2>());
}

Tensor multi_margin_loss_cuda(const Tensor& self, const Tensor& target, int64_t p,
                              double margin, const c10::optional<Tensor>& weight,
                              int64_t reduction) {
  const char* op = "fastops.multi_margin_loss";
  const Rows r = check_multi_margin(self, target, p, weight, reduction, op);
  const KernelScope scope(self);
  const Tensor x = self.contiguous();
  const Tensor tg = target.contiguous();
  const Tensor w = weight_or_undefined(weight);
  Tensor loss = reduction == kNone ? at::empty(multi_margin_rows_shape(target, r.N),
                                               self.options())
                                   : at::empty({}, self.options());
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using A = acc_t<scalar_t>;
    const MarginArgs<scalar_t> args = margin_args<scalar_t>(x, tg, w, r, margin);
    Tensor row_loss;
    if (reduction != kNone) row_loss = at::empty({r.N}, self.options().dtype(acc_dtype(
                                                     self.scalar_type())));
    scalar_t* loss_none = reduction == kNone ? loss.mutable_data_ptr<scalar_t>() : nullptr;
    A* rl = reduction == kNone ? nullptr : row_loss.mutable_data_ptr<A>();
    if (r.N > 0) {
      const RowLaunch l = row_launch(r.N, r.C);
      dispatch_p(p, [&](auto p_c) {
        constexpr int P = decltype(p_c)::value;
        margin_forward_rows<scalar_t, P><<<l.grid, l.threads, 0, scope.stream>>>(
            args, loss_none, rl, l.tpr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    if (reduction != kNone) {
      const LossOut<scalar_t> out{loss.mutable_data_ptr<scalar_t>(), nullptr, reduction};
      launch_sum_rows<scalar_t>(RowLossTerms<A>{rl}, r.N, out, self.options(), scope.stream);
    }
  });
  return loss;
}

Tensor multi_margin_loss_backward_cuda(const Tensor& grad_output, const Tensor& self,
                                       const Tensor& target, int64_t p, double margin,
                                       const c10::optional<Tensor>& weight, int64_t reduction) {
  const char* op = "fastops.multi_margin_loss_backward";
  const Rows r = check_multi_margin_backward(grad_output, self, target, p, weight, reduction, op);
  const KernelScope scope(self);
  const Tensor x = self.contiguous();
  const Tensor tg = target.contiguous();
  const Tensor w = weight_or_undefined(weight);
  const Tensor g = grad_output.contiguous();
  Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (r.N == 0) return gx;
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    const MarginArgs<scalar_t> args = margin_args<scalar_t>(x, tg, w, r, margin);
    const RowLaunch l = row_launch(r.N, r.C);
    dispatch_p(p, [&](auto p_c) {
      constexpr int P = decltype(p_c)::value;
      margin_backward_rows<scalar_t, P><<<l.grid, l.threads, 0, scope.stream>>>(
          args, g.const_data_ptr(), dkind(g.scalar_type()), reduction,
          gx.mutable_data_ptr<scalar_t>(), l.tpr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CUDA, m) {
  m.impl("hinge_embedding_loss", &hinge_embedding_loss_cuda);
  m.impl("hinge_embedding_loss_backward", &hinge_embedding_loss_backward_cuda);
  m.impl("multi_margin_loss", &multi_margin_loss_cuda);
  m.impl("multi_margin_loss_backward", &multi_margin_loss_backward_cuda);
}

}  // namespace gpu
}  // namespace fastops
