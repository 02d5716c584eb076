// Shared plumbing of the CUDA loss kernels: reading a tensor of any floating dtype through a
// void pointer (grad_output, total_weight: no conversion on the host), class targets checked on
// the device, the incoming gradient, and the deterministic two-stage sum of per-row terms
// (fixed blocks of rows, then the block sums in order, in float64; no atomics).
#pragma once

#include <limits>

#include "../loss_checks.h"
#include "cuda_common.cuh"

namespace fastops {
namespace gpu {

template <class A>
__device__ __forceinline__ A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}

// ---- loads -----------------------------------------------------------------------------------

// The dtype of a tensor read through a void pointer (a grad_output or total_weight of any
// floating dtype, read without converting it on the host).
enum DKind : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

inline DKind dkind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    default:
      TORCH_CHECK(t == at::kBFloat16, "fastops: unexpected dtype ", t);
      return kBF16;
  }
}

template <class A>
__device__ __forceinline__ A load_as(const void* p, int kind, int64_t i) {
  switch (kind) {
    case kF32: return static_cast<A>(static_cast<const float*>(p)[i]);
    case kF64: return static_cast<A>(static_cast<const double*>(p)[i]);
    case kF16: return static_cast<A>(static_cast<float>(static_cast<const c10::Half*>(p)[i]));
    default: return static_cast<A>(static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]));
  }
}

__device__ __forceinline__ int64_t load_target(const void* t, bool byte, int64_t i) {
  return byte ? static_cast<int64_t>(static_cast<const uint8_t*>(t)[i])
              : static_cast<const int64_t*>(t)[i];
}

// Whether a class target is a class to use: false for ignore_index; a target outside [0, C)
// fails a device assertion and is never used as an index.
__device__ __forceinline__ bool target_class(int64_t t, int64_t C, int64_t ignore_index) {
  if (t == ignore_index) return false;
  const bool in_range = t >= 0 && t < C;
  CUDA_KERNEL_ASSERT_MSG(in_range,
                         "fastops: class target out of bounds: expected a class index in [0, C) "
                         "or ignore_index");
  return in_range;
}

// The incoming gradient: per row for reduction 'none', else one value (over total_weight for
// 'mean', in float64 as the CPU kernel).
struct GradIn {
  const void* g;
  int g_kind;
  int64_t reduction;
  const void* tw;  // total_weight (fastops::loss::kMean)
  int tw_kind;
};

template <class A>
__device__ __forceinline__ A grad_scale(const GradIn& gi) {
  if (gi.reduction == fastops::loss::kNone) return A(0);
  const A g0 = load_as<A>(gi.g, gi.g_kind, 0);
  if (gi.reduction != fastops::loss::kMean) return g0;
  return static_cast<A>(static_cast<double>(g0) / load_as<double>(gi.tw, gi.tw_kind, 0));
}

// The incoming gradient as the kernels read it (no host synchronisation: the mean's divisor is
// read on the device).
inline GradIn grad_in(const at::Tensor& g, int64_t reduction, const at::Tensor& tw) {
  GradIn gi{};
  gi.g = g.const_data_ptr();
  gi.g_kind = dkind(g.scalar_type());
  gi.reduction = reduction;
  gi.tw = tw.defined() ? tw.const_data_ptr() : nullptr;
  gi.tw_kind = tw.defined() ? dkind(tw.scalar_type()) : kF64;
  return gi;
}

// ---- deterministic loss sums -----------------------------------------------------------------

constexpr int kReduceThreads = 256;
constexpr int64_t kRowsPerReduceBlock = 2048;

struct LossTerms {
  double loss, weight;
};

// Where a reduction's result goes: loss (reduced: sum, or sum / total weight for 'mean'; null
// for 'none') and total_weight (null: not wanted).
template <class T>
struct LossOut {
  T* loss;
  acc_t<T>* total_weight;
  int64_t reduction;
  // 'mean' over a total weight of 0 is NaN whatever the sum (cross entropy: torch's nll part is
  // then 0 / 0 even where label smoothing adds to the sum); false: the plain quotient (nll_loss,
  // whose weights of both signs can sum to 0 under a nonzero sum: +-inf, as in torch)
  bool zero_weight_is_nan = true;
};

template <class T>
__device__ __forceinline__ void write_loss(const LossOut<T>& o, double loss, double weight) {
  using A = acc_t<T>;
  if (o.total_weight != nullptr) o.total_weight[0] = static_cast<A>(weight);
  if (o.loss != nullptr) {
    const double v = o.reduction != fastops::loss::kMean ? loss
                     : weight == 0 && o.zero_weight_is_nan
                         ? std::numeric_limits<double>::quiet_NaN()
                         : loss / weight;
    o.loss[0] = static_cast<T>(static_cast<A>(v));
  }
}

// Block b sums the terms of rows [b * kRowsPerReduceBlock, ...) in a fixed order; a single
// block writes the result, several write their sums to partials (loss sums, then weight sums)
// for finish_sums.
template <class T, class Terms>
__global__ void __launch_bounds__(kReduceThreads)
    sum_rows(Terms terms, int64_t rows, double* partials, LossOut<T> out) {
  __shared__ double scratch[32];
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * kRowsPerReduceBlock;
  const int64_t b1 = rows < b0 + kRowsPerReduceBlock ? rows : b0 + kRowsPerReduceBlock;
  double l = 0, w = 0;
#pragma unroll 4
  for (int64_t r = b0 + threadIdx.x; r < b1; r += blockDim.x) {
    const LossTerms t = terms(r);
    l += t.loss;
    w += t.weight;
  }
  l = block_sum(l, scratch);
  w = block_sum(w, scratch);
  if (threadIdx.x == 0) {
    if (gridDim.x == 1) {
      write_loss(out, l, w);
    } else {
      partials[blockIdx.x] = l;
      partials[gridDim.x + blockIdx.x] = w;
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kReduceThreads)
    finish_sums(const double* partials, int64_t nparts, LossOut<T> out) {
  __shared__ double scratch[32];
  double l = 0, w = 0;
  for (int64_t i = threadIdx.x; i < nparts; i += blockDim.x) {
    l += partials[i];
    w += partials[nparts + i];
  }
  l = block_sum(l, scratch);
  w = block_sum(w, scratch);
  if (threadIdx.x == 0) write_loss(out, l, w);
}

// Launches sum_rows (and finish_sums when it takes several blocks).
template <class T, class Terms>
void launch_sum_rows(const Terms& terms, int64_t rows, const LossOut<T>& out,
                     const at::TensorOptions& opts, cudaStream_t stream) {
  const int64_t nblocks = rows > 0 ? (rows + kRowsPerReduceBlock - 1) / kRowsPerReduceBlock : 1;
  TORCH_CHECK(nblocks <= std::numeric_limits<int32_t>::max(), "fastops: too many rows (", rows,
              ")");
  at::Tensor partials;
  double* pp = nullptr;
  if (nblocks > 1) {
    partials = at::empty({2 * nblocks}, opts.dtype(at::kDouble));
    pp = partials.mutable_data_ptr<double>();
  }
  sum_rows<T, Terms><<<static_cast<unsigned int>(nblocks), kReduceThreads, 0, stream>>>(
      terms, rows, pp, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (nblocks > 1) {
    finish_sums<T><<<1, kReduceThreads, 0, stream>>>(pp, nblocks, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace gpu
}  // namespace fastops
