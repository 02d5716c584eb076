// CUDA kernels of the regression losses: mse_loss. They accept what the CPU kernels accept and
// give the same results (csrc/cpu/regression_losses.cpp is the reference).
//
// Determinism: no floating-point atomics; a reduced loss is summed over fixed chunks of
// elements, then the chunk sums in order, in float64. Same shape, dtype and alignments: same
// bits (the 16-byte path is taken only when every tensor is 16-byte aligned).
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <limits>
#include <tuple>

#include "../loss_checks.h"
#include "loss_common.cuh"

namespace fastops {
namespace gpu {
namespace {

using at::Tensor;
using namespace fastops::loss;

// ---- mse_loss --------------------------------------------------------------------------------

constexpr int64_t kMseChunk = 8192;  // elements per block of the sum (a multiple of every kVec)

template <class T>
__global__ void __launch_bounds__(kThreads)
    mse_none_kernel(const T* x, const T* y, T* out, int64_t n, bool vec) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t npk = vec ? n / V : 0;
  for (int64_t k = first; k < npk; k += stride) {
    const Pack<T, V> px = load_pack<T, V>(x + k * V);
    const Pack<T, V> py = load_pack<T, V>(y + k * V);
    Pack<T, V> o;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const A d = static_cast<A>(px.v[j]) - static_cast<A>(py.v[j]);
      o.v[j] = static_cast<T>(d * d);
    }
    store_pack<T, V>(out + k * V, o);
  }
  for (int64_t i = npk * V + first; i < n; i += stride) {
    const A d = static_cast<A>(x[i]) - static_cast<A>(y[i]);
    out[i] = static_cast<T>(d * d);
  }
}

// Block b sums (x - y)^2 over [b * kMseChunk, ...) in an order fixed by n and vec (16-byte
// packs when x and y are both aligned, else single elements: the same values at another offset
// may round differently); the chunk sums are added in order (finish_sums) unless one block
// covers everything. The "weight" is the element count, so that 'mean' divides by n (0 / 0 =
// NaN for an empty input).
template <class T>
__global__ void __launch_bounds__(kThreads)
    mse_sum_kernel(const T* x, const T* y, int64_t n, bool vec, double* partials,
                   LossOut<T> out) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  __shared__ A scratch[32];
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * kMseChunk;
  const int64_t b1 = n < b0 + kMseChunk ? n : b0 + kMseChunk;
  A acc = A(0);
  const int64_t npk = vec && b1 > b0 ? (b1 - b0) / V : 0;
  for (int64_t k = threadIdx.x; k < npk; k += blockDim.x) {
    const Pack<T, V> px = load_pack<T, V>(x + b0 + k * V);
    const Pack<T, V> py = load_pack<T, V>(y + b0 + k * V);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const A d = static_cast<A>(px.v[j]) - static_cast<A>(py.v[j]);
      acc += d * d;
    }
  }
  for (int64_t i = b0 + npk * V + threadIdx.x; i < b1; i += blockDim.x) {
    const A d = static_cast<A>(x[i]) - static_cast<A>(y[i]);
    acc += d * d;
  }
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

// grad_self = 2 (x - y) g (elementwise g for 'none', else one scale), grad_target = -grad_self;
// either pointer may be null.
template <class T>
__global__ void __launch_bounds__(kThreads)
    mse_backward_kernel(const T* x, const T* y, const T* g_none, GradIn gi, T* gx, T* gy,
                        int64_t n, bool vec) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  A scale = A(0);
  if (gi.reduction != kNone) {
    scale = A(2) * load_as<A>(gi.g, gi.g_kind, 0);
    if (gi.reduction == kMean) scale = static_cast<A>(static_cast<double>(scale) / n);
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t npk = vec ? n / V : 0;
  for (int64_t k = first; k < npk; k += stride) {
    const Pack<T, V> px = load_pack<T, V>(x + k * V);
    const Pack<T, V> py = load_pack<T, V>(y + k * V);
    Pack<T, V> pg;
    if (g_none != nullptr) pg = load_pack<T, V>(g_none + k * V);
    Pack<T, V> ox, oy;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const A d = static_cast<A>(px.v[j]) - static_cast<A>(py.v[j]);
      const A v = g_none != nullptr ? A(2) * d * static_cast<A>(pg.v[j]) : d * scale;
      ox.v[j] = static_cast<T>(v);
      oy.v[j] = static_cast<T>(-v);
    }
    if (gx != nullptr) store_pack<T, V>(gx + k * V, ox);
    if (gy != nullptr) store_pack<T, V>(gy + k * V, oy);
  }
  for (int64_t i = npk * V + first; i < n; i += stride) {
    const A d = static_cast<A>(x[i]) - static_cast<A>(y[i]);
    const A v = g_none != nullptr ? A(2) * d * static_cast<A>(g_none[i]) : d * scale;
    if (gx != nullptr) gx[i] = static_cast<T>(v);
    if (gy != nullptr) gy[i] = static_cast<T>(-v);
  }
}

Tensor mse_loss_cuda(const Tensor& self, const Tensor& target, int64_t reduction) {
  const char* op = "fastops.mse_loss";
  check_mse(self, target, reduction, op);
  const KernelScope scope(self);
  const Tensor x = self.contiguous();
  const Tensor y = target.contiguous();
  const int64_t n = x.numel();
  Tensor out = reduction == kNone ? at::empty_like(x, at::MemoryFormat::Contiguous)
                                  : at::empty({}, self.options());
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    if (reduction == kNone) {
      if (n == 0) return;
      scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
      const bool vec = aligned16(xp, yp, op_);
      const int64_t work = vec ? (n + kVec<scalar_t> - 1) / kVec<scalar_t> : n;
      mse_none_kernel<scalar_t><<<grid_for(work, kThreads, 8), kThreads, 0, scope.stream>>>(
          xp, yp, op_, n, vec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const int64_t nblocks = n > 0 ? (n + kMseChunk - 1) / kMseChunk : 1;
    TORCH_CHECK(nblocks <= std::numeric_limits<int32_t>::max(), op, ": input too large (", n,
                " elements)");
    Tensor partials;
    double* pp = nullptr;
    if (nblocks > 1) {
      partials = at::empty({2 * nblocks}, self.options().dtype(at::kDouble));
      pp = partials.mutable_data_ptr<double>();
    }
    const LossOut<scalar_t> lo{out.mutable_data_ptr<scalar_t>(), nullptr, reduction};
    mse_sum_kernel<scalar_t><<<static_cast<unsigned int>(nblocks), kThreads, 0, scope.stream>>>(
        xp, yp, n, aligned16(xp, yp), pp, lo);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (nblocks > 1) {
      finish_sums<scalar_t><<<1, kReduceThreads, 0, scope.stream>>>(pp, nblocks, lo);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

std::tuple<Tensor, Tensor> mse_loss_backward_cuda(const Tensor& grad_output, const Tensor& self,
                                                  const Tensor& target, int64_t reduction,
                                                  std::array<bool, 2> output_mask) {
  const char* op = "fastops.mse_loss_backward";
  check_mse_backward(grad_output, self, target, reduction, op);
  const KernelScope scope(self);
  const Tensor x = self.contiguous();
  const Tensor y = target.contiguous();
  const int64_t n = x.numel();
  Tensor gx = output_mask[0] ? at::empty_like(x, at::MemoryFormat::Contiguous) : x.new_empty({0});
  Tensor gy = output_mask[1] ? at::empty_like(x, at::MemoryFormat::Contiguous) : x.new_empty({0});
  if (n == 0 || !(output_mask[0] || output_mask[1])) return {gx, gy};
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    // 'none': the elementwise gradient in the input's dtype, as the CPU kernel reads it.
    const Tensor g = reduction == kNone ? grad_output.to(x.scalar_type()).contiguous()
                                        : grad_output.contiguous();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* gn = reduction == kNone ? g.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = output_mask[0] ? gx.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gyp = output_mask[1] ? gy.mutable_data_ptr<scalar_t>() : nullptr;
    const bool vec = aligned16(xp, yp) && (gn == nullptr || aligned16(gn)) &&
                     (gxp == nullptr || aligned16(gxp)) && (gyp == nullptr || aligned16(gyp));
    const int64_t work = vec ? (n + kVec<scalar_t> - 1) / kVec<scalar_t> : n;
    mse_backward_kernel<scalar_t><<<grid_for(work, kThreads, 8), kThreads, 0, scope.stream>>>(
        xp, yp, gn, grad_in(g, reduction, Tensor()), gxp, gyp, n, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gx, gy};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CUDA, m) {
  m.impl("mse_loss", &mse_loss_cuda);
  m.impl("mse_loss_backward", &mse_loss_backward_cuda);
}

}  // namespace gpu
}  // namespace fastops
