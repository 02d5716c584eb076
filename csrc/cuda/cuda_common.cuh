// Shared plumbing for the CUDA kernels: launch configuration, 16-byte vector access, warp and
// block reductions. Every launch runs on the current stream under a device guard
// (`KernelScope`) and is followed by C10_CUDA_KERNEL_LAUNCH_CHECK().
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../activations.h"
#include "../checks.h"
#include "../dispatch.h"

namespace fastops {
namespace gpu {

// The device of `t` made current for the scope, and its current stream.
struct KernelScope {
  explicit KernelScope(const at::Tensor& t)
      : guard(t.device()), stream(c10::cuda::getCurrentCUDAStream(t.get_device())) {}
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;
};

// Streaming multiprocessors of the current device (cached per device).
int num_sms();
// The compute capability of the current device as major * 10 + minor (cached per device).
int compute_capability();

constexpr int kThreads = 256;  // block size of the elementwise and row kernels

// Blocks for a grid-stride loop over `work` items of `per_block` each: enough to fill every SM
// a few times over, never more than the work needs.
inline unsigned int grid_for(int64_t work, int64_t per_block, int blocks_per_sm = 4) {
  const int64_t needed = (work + per_block - 1) / per_block;
  const int64_t cap = static_cast<int64_t>(num_sms()) * blocks_per_sm;
  const int64_t blocks = needed < cap ? needed : cap;
  return static_cast<unsigned int>(blocks < 1 ? 1 : blocks);
}

// ---------------------------------------------------------------------------------------------
// 16-byte vector access: kVec<T> elements of T move in one load or store instruction.

template <class T> constexpr int kVec = 16 / static_cast<int>(sizeof(T));

template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <class T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}
template <class T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& pack) {
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

// Whether every pointer is aligned for 16-byte access.
template <class... Ptrs>
inline bool aligned16(const Ptrs*... ptrs) {
  return ((reinterpret_cast<uintptr_t>(ptrs) % 16 == 0) && ...);
}

// ---------------------------------------------------------------------------------------------
// Reductions. Fixed shapes and orders: the same input always gives the same bits.

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// max that propagates NaN (as torch.max): a NaN in either operand gives NaN, so a reduction
// built on it is NaN as soon as one value is, whichever lane holds it.
template <class T>
__device__ __forceinline__ T nan_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}

template <class T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v = nan_max(__shfl_xor_sync(0xffffffffu, v, offset), v);
  return v;
}

// Sum over the block; every thread gets the result. `scratch` holds 32 values in shared memory.
// Must be reached by every thread of the block.
template <class T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : T(0);
  return warp_sum(v);
}

// Kernels one op family lends another: maxout over dim 1 (activations.cu), which the fused
// linear + maxout applies to its pre-activation.
at::Tensor maxout_forward(const at::Tensor& self, int64_t pool_size);

}  // namespace gpu
}  // namespace fastops
