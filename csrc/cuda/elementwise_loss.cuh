// The CUDA kernels of the elementwise losses, shared by regression_losses.cu (mse_loss,
// l1_loss) and binary_losses.cu (binary_cross_entropy, binary_cross_entropy_with_logits): each
// loss is a functor of loss_functors.h run through the same kernels. They accept what the CPU
// loops (cpu/elementwise_loss.h) accept and compute the same formulas.
//
// Operands: self x and target y of one shape, and weight w and pos_weight p expanded to that
// shape and made contiguous only when given. Grid-stride loops move 16-byte packs when every
// pointer is 16-byte aligned (else single elements). Determinism: no floating-point atomics; a
// reduced loss is summed over fixed chunks of elements, then the chunk sums in order, in
// float64. Same shape, dtype and alignments: same bits.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <limits>
#include <tuple>

#include "../loss_checks.h"
#include "../loss_functors.h"
#include "loss_common.cuh"

namespace fastops {
namespace gpu {
namespace elementwise_loss {

using at::Tensor;

template <class T>
struct Operands {
  const T* x;
  const T* y;
  const T* w;  // null without weight
  const T* p;  // null without pos_weight
};

template <class T>
Operands<T> operands(const Tensor& x, const Tensor& y, const Tensor& w, const Tensor& p) {
  return {x.const_data_ptr<T>(), y.const_data_ptr<T>(),
          w.defined() ? w.const_data_ptr<T>() : nullptr,
          p.defined() ? p.const_data_ptr<T>() : nullptr};
}

template <class T>
bool all_aligned16(const Operands<T>& a) {
  return aligned16(a.x, a.y) && (a.w == nullptr || aligned16(a.w)) &&
         (a.p == nullptr || aligned16(a.p));
}

// One element in the compute type; w and p are 1 where absent (a multiply by 1 is exact).
template <class T>
struct Elem {
  acc_t<T> x, y, w, p;
};

template <class Term, class T>
__device__ __forceinline__ Elem<T> load_elem(const Operands<T>& a, int64_t i) {
  using A = acc_t<T>;
  Elem<T> e;
  e.x = static_cast<A>(a.x[i]);
  e.y = static_cast<A>(a.y[i]);
  e.w = a.w != nullptr ? static_cast<A>(a.w[i]) : A(1);
  if constexpr (Term::kPosWeight) e.p = static_cast<A>(a.p[i]);
  else e.p = A(1);
  return e;
}

// Elements [i, i + V) from one 16-byte load per operand.
template <class Term, class T, int V>
__device__ __forceinline__ void load_elems(const Operands<T>& a, int64_t i, Elem<T> (&e)[V]) {
  using A = acc_t<T>;
  const Pack<T, V> px = load_pack<T, V>(a.x + i);
  const Pack<T, V> py = load_pack<T, V>(a.y + i);
  Pack<T, V> pw, pp;
  if (a.w != nullptr) pw = load_pack<T, V>(a.w + i);
  if constexpr (Term::kPosWeight) pp = load_pack<T, V>(a.p + i);
#pragma unroll
  for (int j = 0; j < V; ++j) {
    e[j].x = static_cast<A>(px.v[j]);
    e[j].y = static_cast<A>(py.v[j]);
    e[j].w = a.w != nullptr ? static_cast<A>(pw.v[j]) : A(1);
    if constexpr (Term::kPosWeight) e[j].p = static_cast<A>(pp.v[j]);
    else e[j].p = A(1);
  }
}

// w * loss; the binary cross entropy on probabilities asserts that x and y lie in [0, 1] (a
// value outside gives NaN, never an out-of-range access).
template <class Term, class T>
__device__ __forceinline__ acc_t<T> weighted_loss(const Term& term, const Elem<T>& e) {
  using A = acc_t<T>;
  if constexpr (Term::kUnitRange) {
    CUDA_KERNEL_ASSERT_MSG(e.x >= A(0) && e.x <= A(1) && e.y >= A(0) && e.y <= A(1),
                           "fastops.binary_cross_entropy: all elements of input and target "
                           "should be between 0 and 1");
  }
  return term.loss(e.x, e.y, e.p) * e.w;
}

constexpr int64_t kChunk = 8192;  // elements per block of a reduced loss (a multiple of every kVec)

template <class Term, class T>
__global__ void __launch_bounds__(kThreads)
    loss_none_kernel(Term term, Operands<T> a, T* out, int64_t n, bool vec) {
  constexpr int V = kVec<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t npk = vec ? n / V : 0;
  for (int64_t k = first; k < npk; k += stride) {
    Elem<T> e[V];
    load_elems<Term, T, V>(a, k * V, e);
    Pack<T, V> o;
#pragma unroll
    for (int j = 0; j < V; ++j) o.v[j] = static_cast<T>(weighted_loss<Term, T>(term, e[j]));
    store_pack<T, V>(out + k * V, o);
  }
  for (int64_t i = npk * V + first; i < n; i += stride)
    out[i] = static_cast<T>(weighted_loss<Term, T>(term, load_elem<Term, T>(a, i)));
}

// Block b sums w * loss over [b * kChunk, ...) in an order fixed by n and vec; the chunk sums
// are added in order (finish_sums) unless one block covers everything. The "weight" is the
// element count, so that 'mean' divides by n (0 / 0 = NaN for an empty input), as torch's
// mean does whatever the element weights.
template <class Term, class T>
__global__ void __launch_bounds__(kThreads)
    loss_sum_kernel(Term term, Operands<T> a, int64_t n, bool vec, double* partials,
                    LossOut<T> out) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  __shared__ A scratch[32];
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t b1 = n < b0 + kChunk ? n : b0 + kChunk;
  A acc = A(0);
  const int64_t npk = vec && b1 > b0 ? (b1 - b0) / V : 0;
  for (int64_t k = threadIdx.x; k < npk; k += blockDim.x) {
    Elem<T> e[V];
    load_elems<Term, T, V>(a, b0 + k * V, e);
#pragma unroll
    for (int j = 0; j < V; ++j) acc += weighted_loss<Term, T>(term, e[j]);
  }
  for (int64_t i = b0 + npk * V + threadIdx.x; i < b1; i += blockDim.x)
    acc += weighted_loss<Term, T>(term, load_elem<Term, T>(a, i));
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

// gx = s d_self, gy = s d_target with s = g w (g elementwise for 'none', else one scale: the
// incoming gradient, over n for 'mean'); either output may be null.
template <class Term, class T>
__global__ void __launch_bounds__(kThreads)
    loss_backward_kernel(Term term, Operands<T> a, const T* g_none, GradIn gi, T* gx, T* gy,
                         int64_t n, bool vec) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  A scale = A(0);
  if (gi.reduction != loss::kNone) {
    scale = load_as<A>(gi.g, gi.g_kind, 0);
    if (gi.reduction == loss::kMean) scale = static_cast<A>(static_cast<double>(scale) / n);
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t npk = vec ? n / V : 0;
  for (int64_t k = first; k < npk; k += stride) {
    Elem<T> e[V];
    load_elems<Term, T, V>(a, k * V, e);
    Pack<T, V> pg;
    if (g_none != nullptr) pg = load_pack<T, V>(g_none + k * V);
    Pack<T, V> ox, oy;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const A s = (g_none != nullptr ? static_cast<A>(pg.v[j]) : scale) * e[j].w;
      if (gx != nullptr) ox.v[j] = static_cast<T>(term.d_self(e[j].x, e[j].y, e[j].p) * s);
      if (gy != nullptr) oy.v[j] = static_cast<T>(term.d_target(e[j].x, e[j].y, e[j].p) * s);
    }
    if (gx != nullptr) store_pack<T, V>(gx + k * V, ox);
    if (gy != nullptr) store_pack<T, V>(gy + k * V, oy);
  }
  for (int64_t i = npk * V + first; i < n; i += stride) {
    const Elem<T> e = load_elem<Term, T>(a, i);
    const A s = (g_none != nullptr ? static_cast<A>(g_none[i]) : scale) * e.w;
    if (gx != nullptr) gx[i] = static_cast<T>(term.d_self(e.x, e.y, e.p) * s);
    if (gy != nullptr) gy[i] = static_cast<T>(term.d_target(e.x, e.y, e.p) * s);
  }
}

// The forward op after its checks: w and p expanded to self's shape and contiguous, or
// undefined.
template <class Term>
Tensor forward(const Term& term, const Tensor& self, const Tensor& target, const Tensor& w,
               const Tensor& p, int64_t reduction, const char* op) {
  const KernelScope scope(self);
  const Tensor x = self.contiguous();
  const Tensor y = target.contiguous();
  const int64_t n = x.numel();
  Tensor out = reduction == loss::kNone ? at::empty_like(x, at::MemoryFormat::Contiguous)
                                        : at::empty({}, self.options());
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    const auto a = operands<scalar_t>(x, y, w, p);
    if (reduction == loss::kNone) {
      if (n == 0) return;
      scalar_t* o = out.mutable_data_ptr<scalar_t>();
      const bool vec = all_aligned16(a) && aligned16(o);
      const int64_t work = vec ? (n + kVec<scalar_t> - 1) / kVec<scalar_t> : n;
      loss_none_kernel<Term, scalar_t>
          <<<grid_for(work, kThreads, 8), kThreads, 0, scope.stream>>>(term, a, o, n, vec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const int64_t nblocks = n > 0 ? (n + kChunk - 1) / kChunk : 1;
    TORCH_CHECK(nblocks <= std::numeric_limits<int32_t>::max(), op, ": input too large (", n,
                " elements)");
    Tensor partials;
    double* pp = nullptr;
    if (nblocks > 1) {
      partials = at::empty({2 * nblocks}, self.options().dtype(at::kDouble));
      pp = partials.mutable_data_ptr<double>();
    }
    const LossOut<scalar_t> lo{out.mutable_data_ptr<scalar_t>(), nullptr, reduction};
    loss_sum_kernel<Term, scalar_t>
        <<<static_cast<unsigned int>(nblocks), kThreads, 0, scope.stream>>>(
            term, a, n, all_aligned16(a), pp, lo);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (nblocks > 1) {
      finish_sums<scalar_t><<<1, kReduceThreads, 0, scope.stream>>>(pp, nblocks, lo);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

// The backward op after its checks: (grad_self, grad_target), each empty where output_mask is
// false.
template <class Term>
std::tuple<Tensor, Tensor> backward(const Term& term, const Tensor& grad_output,
                                    const Tensor& self, const Tensor& target, const Tensor& w,
                                    const Tensor& p, int64_t reduction,
                                    std::array<bool, 2> output_mask) {
  const KernelScope scope(self);
  const Tensor x = self.contiguous();
  const Tensor y = target.contiguous();
  const int64_t n = x.numel();
  Tensor gx = output_mask[0] ? at::empty_like(x, at::MemoryFormat::Contiguous) : x.new_empty({0});
  Tensor gy = output_mask[1] ? at::empty_like(x, at::MemoryFormat::Contiguous) : x.new_empty({0});
  if (n == 0 || !(output_mask[0] || output_mask[1])) return {gx, gy};
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    // 'none': the elementwise gradient in the input's dtype, as the CPU loops read it
    const Tensor g = reduction == loss::kNone ? grad_output.to(x.scalar_type()).contiguous()
                                              : grad_output.contiguous();
    const auto a = operands<scalar_t>(x, y, w, p);
    const scalar_t* gn = reduction == loss::kNone ? g.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = output_mask[0] ? gx.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gyp = output_mask[1] ? gy.mutable_data_ptr<scalar_t>() : nullptr;
    const bool vec = all_aligned16(a) && (gn == nullptr || aligned16(gn)) &&
                     (gxp == nullptr || aligned16(gxp)) && (gyp == nullptr || aligned16(gyp));
    const int64_t work = vec ? (n + kVec<scalar_t> - 1) / kVec<scalar_t> : n;
    loss_backward_kernel<Term, scalar_t>
        <<<grid_for(work, kThreads, 8), kThreads, 0, scope.stream>>>(
            term, a, gn, grad_in(g, reduction, Tensor()), gxp, gyp, n, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gx, gy};
}

}  // namespace elementwise_loss
}  // namespace gpu
}  // namespace fastops
