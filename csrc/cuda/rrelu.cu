// CUDA kernels of RReLU in training mode (rrelu.h): the seed draw, and one grid-stride kernel for
// the four passes (forward, forward with the bit mask, backward from the input, backward from the
// mask), on the Philox words and slopes of rrelu.h, so a seed row gives the same slopes here as
// on the CPU.
//
// Each thread takes octets: 8 consecutive elements, one byte of the mask (no byte shared between
// threads), 2 Philox groups of 4 words. The data move in 16-byte packs when every pointer is
// 16-byte aligned, one element at a time otherwise; the last, partial octet element by element.
// With a seed row per slice along dim 0 (vmap's per-sample draws) every element finds its own row
// and group: a rare path that computes 4 times the Philox words it needs.
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <tuple>

#include "../activation_checks.h"
#include "../rrelu.h"
#include "cuda_common.cuh"

namespace fastops {
namespace gpu {
namespace {

using at::Tensor;

enum class Pass { forward, forward_mask, backward, mask_backward };

// Data to compute type; bfloat16 widens with a shift (exact, and without the round trip through
// memory of its conversion operator).
template <class T>
__device__ __forceinline__ acc_t<T> to_acc(T v) {
  return static_cast<acc_t<T>>(v);
}
__device__ __forceinline__ float to_acc(c10::BFloat16 v) {
  return __uint_as_float(static_cast<uint32_t>(v.x) << 16);
}

// The seed rows of a call: row s serves the elements of slice s, `slice` elements each (all n
// when there is one row).
struct SeedRows {
  const int64_t* rows;
  int64_t slice;
};

// The words of octet o (elements 8o .. 8o+7 of n): groups 2o and 2o+1 of the single row, or each
// element's own group in its slice's row.
template <bool kSlices>
__device__ __forceinline__ void octet_words(const SeedRows& seeds, const RReLUSeed& row0,
                                            int64_t o, int64_t n, uint32_t w[8]) {
  if constexpr (!kSlices) {
    rrelu_words(row0, 2 * static_cast<uint64_t>(o), w);
    rrelu_words(row0, 2 * static_cast<uint64_t>(o) + 1, w + 4);
  } else {
#pragma unroll 1
    for (int v = 0; v < 8; ++v) {
      const int64_t i = 8 * o + v;
      if (i >= n) break;
      const int64_t s = i / seeds.slice, local = i - s * seeds.slice;
      uint32_t g[4];
      rrelu_words(rrelu_seed_of(seeds.rows + 2 * s), static_cast<uint64_t>(local) >> 2, g);
      w[v] = g[local & 3];
    }
  }
}

// One element j of an octet: a is the input (forward) or grad_output (backward), b the input of
// the backward from the input; bits the octet's mask byte.
template <Pass P, class acc>
__device__ __forceinline__ acc rrelu_element(acc a, acc b, uint32_t bits_in, int j, acc r,
                                             uint32_t& bits_out) {
  if constexpr (P == Pass::forward || P == Pass::forward_mask) {
    if constexpr (P == Pass::forward_mask) bits_out |= static_cast<uint32_t>(RReLU::mask(a)) << j;
    return RReLU::forward(a, r);
  } else if constexpr (P == Pass::backward) {
    return RReLU::backward(b, a, r);
  } else {
    return RReLU::backward_masked(((bits_in >> j) & 1u) != 0, a, r);
  }
}

// V elements per access: kVec (at most 8, every pointer 16-byte aligned) or 1.
template <int V, bool kSlices, Pass P, class scalar_t>
__global__ void __launch_bounds__(kThreads)
    rrelu_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                 const uint8_t* __restrict__ mask_in, uint8_t* __restrict__ mask_out,
                 scalar_t* __restrict__ out, int64_t n, SeedRows seeds, RReLU f) {
  using acc = acc_t<scalar_t>;
  constexpr bool kReadsB = P == Pass::backward;
  const RReLUSeed row0 = rrelu_seed_of(seeds.rows);
  const int64_t octets = (n + 7) / 8;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
#pragma unroll 1
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; o < octets;
       o += stride) {
    uint32_t w[8];
    octet_words<kSlices>(seeds, row0, o, n, w);
    const int64_t base = 8 * o;
    const uint32_t bits_in = P == Pass::mask_backward ? mask_in[o] : 0u;
    uint32_t bits_out = 0;
    if (base + 8 <= n) {
      Pack<scalar_t, V> pa[8 / V], pb[8 / V];
#pragma unroll
      for (int q = 0; q < 8 / V; ++q) {  // every load first, so they are in flight together
        pa[q] = load_pack<scalar_t, V>(a + base + q * V);
        if constexpr (kReadsB) pb[q] = load_pack<scalar_t, V>(b + base + q * V);
      }
#pragma unroll
      for (int q = 0; q < 8 / V; ++q) {
        Pack<scalar_t, V> r;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const int j = q * V + v;
          const acc bv = kReadsB ? to_acc(pb[q].v[v]) : acc(0);
          r.v[v] = static_cast<scalar_t>(rrelu_element<P>(
              to_acc(pa[q].v[v]), bv, bits_in, j, f.slope<acc>(w[j]), bits_out));
        }
        store_pack<scalar_t, V>(out + base + q * V, r);
      }
    } else {
      for (int j = 0; j < n - base; ++j) {
        const acc bv = kReadsB ? to_acc(b[base + j]) : acc(0);
        out[base + j] = static_cast<scalar_t>(
            rrelu_element<P>(to_acc(a[base + j]), bv, bits_in, j, f.slope<acc>(w[j]), bits_out));
      }
    }
    if constexpr (P == Pass::forward_mask) mask_out[o] = static_cast<uint8_t>(bits_out);
  }
}

template <Pass P, class scalar_t>
void launch(const scalar_t* a, const scalar_t* b, const uint8_t* mask_in, uint8_t* mask_out,
            scalar_t* out, int64_t n, const Tensor& rows, int64_t row_count, const RReLU& f,
            cudaStream_t stream) {
  if (n == 0) return;
  constexpr int V = kVec<scalar_t> < 8 ? kVec<scalar_t> : 8;
  const SeedRows seeds{rows.const_data_ptr<int64_t>(), n / row_count};
  const unsigned int grid = grid_for((n + 7) / 8, kThreads);
  const bool vec = aligned16(a, b, out);  // b is null (aligned) but for the backward from input
  if (row_count == 1) {
    if (vec) {
      rrelu_kernel<V, false, P><<<grid, kThreads, 0, stream>>>(a, b, mask_in, mask_out, out, n,
                                                                seeds, f);
    } else {
      rrelu_kernel<1, false, P><<<grid, kThreads, 0, stream>>>(a, b, mask_in, mask_out, out, n,
                                                                seeds, f);
    }
  } else {
    rrelu_kernel<1, true, P><<<grid, kThreads, 0, stream>>>(a, b, mask_in, mask_out, out, n,
                                                             seeds, f);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// XORed into the generator's seed: keeps these Philox streams apart from the curand streams that
// torch's CUDA ops draw with the same seed and offsets (their counter holds a thread index where
// this one holds the offset).
constexpr uint64_t kKeyTag = 0x9E3779B97F4A7C15ULL;

__global__ void seed_rows_kernel(at::PhiloxCudaState state, int64_t* rows, int64_t count) {
  const auto seed_offset = at::cuda::philox::unpack(state);
  const uint64_t key = std::get<0>(seed_offset) ^ kKeyTag, offset = std::get<1>(seed_offset);
  for (int64_t s = threadIdx.x; s < count; s += blockDim.x) {
    rows[2 * s] = static_cast<int64_t>(key);
    rows[2 * s + 1] = static_cast<int64_t>(offset + static_cast<uint64_t>(s));
  }
}

// The seed and offset of the device's default CUDA generator, taken as torch's dropout takes them
// (under the generator's mutex, graph-safe: read in the kernel when a CUDA graph is captured), so
// torch.manual_seed makes the draw reproducible. The generator's offset advances past the rows'.
Tensor rrelu_seed(const Tensor& self, int64_t samples) {
  TORCH_CHECK(samples >= 0, "fastops.rrelu_seed: samples must be >= 0, got ", samples);
  KernelScope scope(self);
  const int64_t count = std::max<int64_t>(samples, 1);
  at::PhiloxCudaState state;
  {
    at::Generator gen = at::cuda::detail::getDefaultCUDAGenerator(self.get_device());
    std::lock_guard<std::mutex> lock(gen.mutex());
    // torch's generators take offsets in multiples of 4; each row takes one
    state = gen.get<at::CUDAGeneratorImpl>()->philox_cuda_state((count + 3) / 4 * 4);
  }
  const auto options = self.options().dtype(at::kLong);
  Tensor rows = samples == 0 ? at::empty({2}, options) : at::empty({samples, 2}, options);
  seed_rows_kernel<<<1, 128, 0, scope.stream>>>(state, rows.mutable_data_ptr<int64_t>(), count);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return rows;
}

Tensor rrelu_seeded(const Tensor& self, const Tensor& seed, double lower, double upper) {
  const char* op = "fastops.rrelu_seeded";
  check_floating(self, op, "self");
  check_rrelu_bounds(lower, upper, op);
  const int64_t row_count = rrelu_seed_rows(self, seed, op);
  KernelScope scope(self);
  const Tensor x = self.contiguous(), rows = seed.contiguous();
  Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    launch<Pass::forward>(x.const_data_ptr<scalar_t>(), static_cast<const scalar_t*>(nullptr),
                          nullptr, nullptr, y.mutable_data_ptr<scalar_t>(), x.numel(), rows,
                          row_count, RReLU(lower, upper), scope.stream);
  });
  return y;
}

std::tuple<Tensor, Tensor> rrelu_seeded_with_mask(const Tensor& self, const Tensor& seed,
                                                  double lower, double upper) {
  const char* op = "fastops.rrelu_seeded_with_mask";
  check_floating(self, op, "self");
  check_rrelu_bounds(lower, upper, op);
  const int64_t row_count = rrelu_seed_rows(self, seed, op);
  KernelScope scope(self);
  const Tensor x = self.contiguous(), rows = seed.contiguous();
  Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  Tensor mask = at::empty({mask_bytes(x.numel())}, x.options().dtype(at::kByte));
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    launch<Pass::forward_mask>(x.const_data_ptr<scalar_t>(),
                               static_cast<const scalar_t*>(nullptr), nullptr,
                               mask.mutable_data_ptr<uint8_t>(), y.mutable_data_ptr<scalar_t>(),
                               x.numel(), rows, row_count, RReLU(lower, upper), scope.stream);
  });
  return {y, mask};
}

Tensor rrelu_seeded_backward(const Tensor& grad_output, const Tensor& self, const Tensor& seed,
                             double lower, double upper) {
  const char* op = "fastops.rrelu_seeded_backward";
  check_unary_backward(grad_output, self, op);
  check_rrelu_bounds(lower, upper, op);
  const int64_t row_count = rrelu_seed_rows(self, seed, op);
  KernelScope scope(self);
  const Tensor x = self.contiguous(), g = grad_output.contiguous(), rows = seed.contiguous();
  Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    launch<Pass::backward>(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), nullptr,
                           nullptr, gx.mutable_data_ptr<scalar_t>(), x.numel(), rows, row_count,
                           RReLU(lower, upper), scope.stream);
  });
  return gx;
}

Tensor rrelu_seeded_mask_backward(const Tensor& grad_output, const Tensor& mask,
                                  const Tensor& seed, double lower, double upper) {
  const char* op = "fastops.rrelu_seeded_mask_backward";
  check_mask_backward(grad_output, mask, op);
  check_rrelu_bounds(lower, upper, op);
  const int64_t row_count = rrelu_seed_rows(grad_output, seed, op, "grad_output");
  KernelScope scope(grad_output);
  const Tensor g = grad_output.contiguous(), m = mask.contiguous(), rows = seed.contiguous();
  Tensor gx = at::empty_like(g, at::MemoryFormat::Contiguous);
  FO_DISPATCH_FLOATING(g.scalar_type(), [&] {
    launch<Pass::mask_backward>(g.const_data_ptr<scalar_t>(),
                                static_cast<const scalar_t*>(nullptr),
                                m.const_data_ptr<uint8_t>(), nullptr,
                                gx.mutable_data_ptr<scalar_t>(), g.numel(), rows, row_count,
                                RReLU(lower, upper), scope.stream);
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CUDA, m) {
  m.impl("rrelu_seed", &rrelu_seed);
  m.impl("rrelu_seeded", &rrelu_seeded);
  m.impl("rrelu_seeded_backward", &rrelu_seeded_backward);
  m.impl("rrelu_seeded_with_mask", &rrelu_seeded_with_mask);
  m.impl("rrelu_seeded_mask_backward", &rrelu_seeded_mask_backward);
}

}  // namespace gpu
}  // namespace fastops
