// CUDA kernels of the activations. The math is the functors of activations.h (the same ones the
// CPU loops use); the argument checks and (outer, channels, inner) layouts are those of
// activation_checks.h, so both devices raise the same errors and give the same shapes.
//
// - Pointwise ops: one grid-stride kernel per direction, 16-byte vector accesses with kUnroll
//   of them in flight per thread when every pointer is 16-byte aligned, scalar accesses
//   otherwise; the last n % kVec elements one per thread.
// - Masked forms (f(x) and a bit mask; backward from the bits): the same, in whole mask bytes
//   per thread (8 elements), so no two threads write one; the last n % 8 elements go to one
//   thread.
// - PReLU: the channel of flat index i is (i / inner) % C. The weight gradient is summed in a
//   fixed partition with no atomics: a first kernel writes partial sums (per segment of a
//   channel's run, or per block of rows and column of the (outer, C * inner) view), a second
//   sums each channel's partials in a fixed order. The partition depends on the shape (and on
//   whether the pointers allow 16-byte access), never on the device: bitwise reproducible.
// - Maxout: each output reads its k members, several outputs per thread with their loads in
//   flight together, 16-byte vectors along the inner positions (or along the members when
//   inner == 1) where the pointers and sizes allow. maxout_backward recomputes the argmax from
//   the input; maxout_with_indices is the forward that also saves it (one byte per output), and
//   maxout_indices_backward scatters grad_output by those bytes.
// Which mask bytes and maxout outputs a thread handles: activation_layout.h (checked on the CPU
// by tests/test_cuda_host_math.py).
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../activation_checks.h"
#include "activation_layout.h"
#include "cuda_common.cuh"

namespace fastops {
namespace gpu {
namespace {

using at::Tensor;
namespace layout = activation_layout;

// Independent vector accesses in flight per thread. The grid-stride loops around them are kept
// rolled (#pragma unroll 1): unrolling them adds only a 64-bit trip-count division.
constexpr int kUnroll = 4;
constexpr int kWarpsPerBlock = kThreads / 32;

// a / b with the (much cheaper) 32-bit division when both operands fit.
__device__ __forceinline__ uint64_t udiv(uint64_t a, uint64_t b) {
  return ((a | b) >> 32) == 0 ? static_cast<uint64_t>(static_cast<uint32_t>(a) /
                                                      static_cast<uint32_t>(b))
                              : a / b;
}
__device__ __forceinline__ int64_t sdiv(int64_t a, int64_t b) {  // a >= 0, b > 0
  return static_cast<int64_t>(udiv(static_cast<uint64_t>(a), static_cast<uint64_t>(b)));
}

inline bool aligned_to(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Calls fn(uint32_t{}) when every index below n fits in 32 bits, else fn(uint64_t{}): the type
// of the divisions a kernel does per element or pack (a 64-bit division is a long subroutine).
template <class Fn>
void with_index_type(int64_t n, const Fn& fn) {
  if (n <= static_cast<int64_t>(UINT32_MAX)) {
    fn(uint32_t{0});
  } else {
    fn(uint64_t{0});
  }
}

template <class acc>
constexpr at::ScalarType acc_scalar_type() {
  return std::is_same<acc, double>::value ? at::kDouble : at::kFloat;
}

// Data to compute type. bfloat16 widens with a shift (exact, as its conversion operator does,
// which goes through memory and costs registers and local-memory spills in unrolled loops).
template <class T>
__device__ __forceinline__ acc_t<T> to_acc(T v) {
  return static_cast<acc_t<T>>(v);
}
__device__ __forceinline__ float to_acc(c10::BFloat16 v) {
  return __uint_as_float(static_cast<uint32_t>(v.x) << 16);
}

// A Pack stored with one instruction. The compiler may split store_pack into one store per
// element when the elements are computed separately (it does in some of these loops), which
// multiplies the write transactions; 16-byte packs therefore go through an explicit v4 store.
template <class T, int N>
__device__ __forceinline__ void store_vec(T* p, const Pack<T, N>& pack) {
  if constexpr (sizeof(T) * N == 16) {
    uint32_t w[4];
    memcpy(w, &pack, 16);
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]),
                 "r"(w[2]), "r"(w[3])
                 : "memory");
  } else {
    store_pack<T, N>(p, pack);
  }
}

// ---- Pointwise activations ------------------------------------------------------------------

template <class F>
struct ForwardOp {
  F f;
  template <class A> __device__ __forceinline__ A operator()(A x) const { return f.forward(x); }
};
template <class F>
struct BackwardOp {
  F f;
  template <class A> __device__ __forceinline__ A operator()(A x, A g) const {
    return f.backward(x, g);
  }
};

// out[i] = op(a[i]) (NIn == 1) or op(a[i], b[i]) (NIn == 2) for i < n, computed in acc_t.
// V elements per access: kVec (every pointer 16-byte aligned) or 1.
template <int V, int NIn, class scalar_t, class Op>
__global__ void __launch_bounds__(kThreads)
    pointwise_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                     scalar_t* __restrict__ out, int64_t n, Op op) {
  using P = Pack<scalar_t, V>;
  const int64_t packs = n / V;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * kUnroll;
#pragma unroll 1
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads * kUnroll + threadIdx.x;
       base < packs; base += stride) {
    P pa[kUnroll], pb[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // every load first, so they are in flight together
      const int64_t p = base + u * kThreads;
      if (p < packs) {
        pa[u] = load_pack<scalar_t, V>(a + p * V);
        if constexpr (NIn == 2) pb[u] = load_pack<scalar_t, V>(b + p * V);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t p = base + u * kThreads;
      if (p < packs) {
        P r;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          if constexpr (NIn == 1) {
            r.v[v] = static_cast<scalar_t>(op(to_acc(pa[u].v[v])));
          } else {
            r.v[v] = static_cast<scalar_t>(op(to_acc(pa[u].v[v]), to_acc(pb[u].v[v])));
          }
        }
        store_vec<scalar_t, V>(out + p * V, r);
      }
    }
  }
  // The n % V elements after the last whole pack (none when V == 1).
  const int64_t i = packs * V + static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (V > 1 && i < n) {
    if constexpr (NIn == 1) {
      out[i] = static_cast<scalar_t>(op(to_acc(a[i])));
    } else {
      out[i] = static_cast<scalar_t>(op(to_acc(a[i]), to_acc(b[i])));
    }
  }
}

template <int NIn, class scalar_t, class Op>
void launch_pointwise(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t n,
                      const Op& op, cudaStream_t stream) {
  if (n == 0) return;
  constexpr int V = kVec<scalar_t>;
  if (aligned16(a, b, out)) {  // b is null (aligned) for NIn == 1
    const unsigned int grid = grid_for(n / V, kThreads * kUnroll);
    pointwise_kernel<V, NIn><<<grid, kThreads, 0, stream>>>(a, b, out, n, op);
  } else {
    const unsigned int grid = grid_for(n, kThreads * kUnroll);
    pointwise_kernel<1, NIn><<<grid, kThreads, 0, stream>>>(a, b, out, n, op);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class F>
Tensor unary_forward(const Tensor& self, const F& f, const char* op) {
  check_floating(self, op, "self");
  KernelScope scope(self);
  const Tensor x = self.contiguous();
  Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    const ForwardOp<F> fwd{params_in_dtype<scalar_t>(f)};
    launch_pointwise<1>(x.const_data_ptr<scalar_t>(), static_cast<const scalar_t*>(nullptr),
                        y.mutable_data_ptr<scalar_t>(), x.numel(), fwd, scope.stream);
  });
  return y;
}

template <class F>
Tensor unary_backward(const Tensor& grad_output, const Tensor& self, const F& f, const char* op) {
  check_unary_backward(grad_output, self, op);
  KernelScope scope(self);
  const Tensor x = self.contiguous();
  const Tensor g = grad_output.contiguous();
  Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    const BackwardOp<F> bwd{params_in_dtype<scalar_t>(f)};
    launch_pointwise<2>(x.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
                        gx.mutable_data_ptr<scalar_t>(), x.numel(), bwd, scope.stream);
  });
  return gx;
}

// gg * g * f''(x), for second-order gradients: one element per thread (not a hot path).
template <class scalar_t, class F>
__global__ void __launch_bounds__(kThreads)
    double_backward_kernel(const scalar_t* __restrict__ gg, const scalar_t* __restrict__ g,
                           const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t n,
                           F f) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += stride)
    out[i] = static_cast<scalar_t>(f.double_backward(to_acc(x[i]), to_acc(g[i]), to_acc(gg[i])));
}

template <class F>
Tensor unary_double_backward(const Tensor& grad_grad, const Tensor& grad_output,
                             const Tensor& self, const F& f, const char* op) {
  check_unary_backward(grad_output, self, op);
  check_unary_backward(grad_grad, self, op);
  KernelScope scope(self);
  const Tensor x = self.contiguous();
  const Tensor g = grad_output.contiguous();
  const Tensor gg = grad_grad.contiguous();
  Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.numel();
  if (n == 0) return out;
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    double_backward_kernel<<<grid_for(n, kThreads), kThreads, 0, scope.stream>>>(
        gg.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), n, params_in_dtype<scalar_t>(f));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---- Masked forms of the piecewise-linear activations ------------------------------------
// forward: y = f(x) and the bit mask of f.mask(x) (bit j of byte i is element 8i + j);
// backward: gx = f.backward_masked(bit, g). Each thread takes whole mask bytes (8 elements), so
// no two threads write one, kMaskBytesPerTrip<V> of them per trip with every load issued before
// the first use: kUnroll accesses of V elements in flight, as in the pointwise kernels. V is
// kVec (at most 8) with 16-byte aligned data, else 1. The last n % 8 elements go to one thread.

template <class scalar_t>
constexpr int kMaskVec = kVec<scalar_t> < 8 ? kVec<scalar_t> : 8;
template <int V>
constexpr int kMaskBytesPerTrip = layout::mask_bytes_per_trip(V, kUnroll);

template <int V, class scalar_t, class F>
__global__ void __launch_bounds__(kThreads)
    masked_forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                          uint8_t* __restrict__ mask, int64_t n, F f) {
  constexpr int B = kMaskBytesPerTrip<V>;
  constexpr int Q = layout::kMaskBitsPerByte / V;  // accesses per mask byte
  using P = Pack<scalar_t, V>;
  const int64_t bytes = layout::whole_mask_bytes(n);
  const int64_t stride = layout::trip_stride(gridDim.x, kThreads, B);
#pragma unroll 1
  for (int64_t base = layout::trip_first(blockIdx.x, threadIdx.x, kThreads, B); base < bytes;
       base += stride) {
    P px[B][Q];
#pragma unroll
    for (int b = 0; b < B; ++b) {  // every load first, so they are in flight together
      const int64_t byte = layout::trip_item(base, b, kThreads);
      if (byte < bytes) {
#pragma unroll
        for (int q = 0; q < Q; ++q)
          px[b][q] = load_pack<scalar_t, V>(x + layout::mask_element(byte, q * V));
      }
    }
#pragma unroll
    for (int b = 0; b < B; ++b) {
      const int64_t byte = layout::trip_item(base, b, kThreads);
      if (byte < bytes) {
        uint32_t bits = 0;
#pragma unroll
        for (int q = 0; q < Q; ++q) {
          P py;
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const auto xv = to_acc(px[b][q].v[v]);
            py.v[v] = static_cast<scalar_t>(f.forward(xv));
            bits |= static_cast<uint32_t>(f.mask(xv)) << (q * V + v);
          }
          store_vec<scalar_t, V>(y + layout::mask_element(byte, q * V), py);
        }
        mask[byte] = static_cast<uint8_t>(bits);
      }
    }
  }
  const int64_t tail = layout::mask_tail_begin(n);
  if (blockIdx.x == 0 && threadIdx.x == 0 && tail < n) {
    uint32_t bits = 0;
    for (int64_t i = tail; i < n; ++i) {
      const auto xv = to_acc(x[i]);
      y[i] = static_cast<scalar_t>(f.forward(xv));
      bits |= static_cast<uint32_t>(f.mask(xv)) << (i - tail);
    }
    mask[bytes] = static_cast<uint8_t>(bits);
  }
}

template <int V, class scalar_t, class F>
__global__ void __launch_bounds__(kThreads)
    masked_backward_kernel(const scalar_t* __restrict__ grad, const uint8_t* __restrict__ mask,
                           scalar_t* __restrict__ gx, int64_t n, F f) {
  constexpr int B = kMaskBytesPerTrip<V>;
  constexpr int Q = layout::kMaskBitsPerByte / V;
  using P = Pack<scalar_t, V>;
  const int64_t bytes = layout::whole_mask_bytes(n);
  const int64_t stride = layout::trip_stride(gridDim.x, kThreads, B);
#pragma unroll 1
  for (int64_t base = layout::trip_first(blockIdx.x, threadIdx.x, kThreads, B); base < bytes;
       base += stride) {
    uint32_t bits[B];
    P pg[B][Q];
#pragma unroll
    for (int b = 0; b < B; ++b) {  // every load first, so they are in flight together
      const int64_t byte = layout::trip_item(base, b, kThreads);
      if (byte < bytes) {
        bits[b] = mask[byte];
#pragma unroll
        for (int q = 0; q < Q; ++q)
          pg[b][q] = load_pack<scalar_t, V>(grad + layout::mask_element(byte, q * V));
      }
    }
#pragma unroll
    for (int b = 0; b < B; ++b) {
      const int64_t byte = layout::trip_item(base, b, kThreads);
      if (byte < bytes) {
#pragma unroll
        for (int q = 0; q < Q; ++q) {
          P r;
#pragma unroll
          for (int v = 0; v < V; ++v)
            r.v[v] = static_cast<scalar_t>(
                f.backward_masked(((bits[b] >> (q * V + v)) & 1u) != 0, to_acc(pg[b][q].v[v])));
          store_vec<scalar_t, V>(gx + layout::mask_element(byte, q * V), r);
        }
      }
    }
  }
  const int64_t tail = layout::mask_tail_begin(n);
  if (blockIdx.x == 0 && threadIdx.x == 0 && tail < n) {
    const uint32_t bits = mask[bytes];
    for (int64_t i = tail; i < n; ++i)
      gx[i] = static_cast<scalar_t>(
          f.backward_masked(((bits >> (i - tail)) & 1u) != 0, to_acc(grad[i])));
  }
}

// Blocks for the masked kernels with V elements per access: at least one, for the tail.
template <int V>
unsigned int masked_grid(int64_t n) {
  return grid_for(std::max<int64_t>(1, layout::whole_mask_bytes(n)),
                  kThreads * kMaskBytesPerTrip<V>);
}

template <class F>
std::tuple<Tensor, Tensor> masked_forward(const Tensor& self, const F& f, const char* op) {
  check_floating(self, op, "self");
  KernelScope scope(self);
  const Tensor x = self.contiguous();
  const int64_t n = x.numel();
  Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  Tensor mask = at::empty({mask_bytes(n)}, x.options().dtype(at::kByte));
  if (n == 0) return {y, mask};
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    constexpr int V = kMaskVec<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    uint8_t* mp = mask.mutable_data_ptr<uint8_t>();
    const F fl = params_in_dtype<scalar_t>(f);
    if (aligned16(xp, yp)) {
      const unsigned int grid = masked_grid<V>(n);
      masked_forward_kernel<V><<<grid, kThreads, 0, scope.stream>>>(xp, yp, mp, n, fl);
    } else {
      const unsigned int grid = masked_grid<1>(n);
      masked_forward_kernel<1><<<grid, kThreads, 0, scope.stream>>>(xp, yp, mp, n, fl);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mask};
}

template <class F>
Tensor masked_backward(const Tensor& grad_output, const Tensor& mask, const F& f, const char* op) {
  check_mask_backward(grad_output, mask, op);
  KernelScope scope(grad_output);
  const Tensor g = grad_output.contiguous();
  const Tensor m = mask.contiguous();
  const int64_t n = g.numel();
  Tensor gx = at::empty_like(g, at::MemoryFormat::Contiguous);
  if (n == 0) return gx;
  FO_DISPATCH_FLOATING(g.scalar_type(), [&] {
    constexpr int V = kMaskVec<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const uint8_t* mp = m.const_data_ptr<uint8_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    if (aligned16(gp, gxp)) {
      const unsigned int grid = masked_grid<V>(n);
      masked_backward_kernel<V><<<grid, kThreads, 0, scope.stream>>>(gp, mp, gxp, n, f);
    } else {
      const unsigned int grid = masked_grid<1>(n);
      masked_backward_kernel<1><<<grid, kThreads, 0, scope.stream>>>(gp, mp, gxp, n, f);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

// ---- PReLU ----------------------------------------------------------------------------------

// y = prelu(x, w[(i / inner) % C]). The channel is divided out once per pack and then walked
// along the pack (a pack may cross a channel boundary when inner is not a multiple of V). I is
// the type of that division: uint32_t when n fits (no 64-bit division subroutine), else uint64_t.
template <int V, class I, class scalar_t>
__global__ void __launch_bounds__(kThreads)
    prelu_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                         scalar_t* __restrict__ y, int64_t n, I inner, I C) {
  using acc = acc_t<scalar_t>;
  using P = Pack<scalar_t, V>;
  const Prelu f;
  const int64_t packs = n / V;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * kUnroll;
#pragma unroll 1
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads * kUnroll + threadIdx.x;
       base < packs; base += stride) {
    P px[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t p = base + u * kThreads;
      if (p < packs) px[u] = load_pack<scalar_t, V>(x + p * V);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t p = base + u * kThreads;
      if (p < packs) {
        const I q = static_cast<I>(p * V) / inner;
        I r = static_cast<I>(p * V) - q * inner;  // position in the channel's run
        I c = q % C;
        acc wv = to_acc(w[c]);
        P py;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          py.v[v] = static_cast<scalar_t>(f.forward(to_acc(px[u].v[v]), wv));
          if (V > 1 && ++r == inner) {
            r = 0;
            c = c + 1 == C ? 0 : c + 1;
            wv = to_acc(w[c]);
          }
        }
        store_vec<scalar_t, V>(y + p * V, py);
      }
    }
  }
  const int64_t i = packs * V + static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (V > 1 && i < n) {
    const acc wv = to_acc(w[(static_cast<I>(i) / inner) % C]);
    y[i] = static_cast<scalar_t>(f.forward(to_acc(x[i]), wv));
  }
}

// Backward where each channel's runs are long (inner >= kLongRun, or one shared weight): the
// rows (o, c) of `inner` elements are cut into segments of kSegment elements, one warp per
// segment; partial[row * segments + s] = the weight gradient of segment s of the row.
constexpr int64_t kLongRun = 512;
constexpr int64_t kSegment = 4096;  // a multiple of every V

template <int V, class scalar_t>
__global__ void __launch_bounds__(kThreads)
    prelu_backward_runs_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                               const scalar_t* __restrict__ w, scalar_t* __restrict__ gx,
                               acc_t<scalar_t>* __restrict__ partial, int64_t rows,
                               int64_t inner, int64_t C, int64_t segments) {
  using acc = acc_t<scalar_t>;
  using P = Pack<scalar_t, V>;
  const Prelu f;
  const int lane = threadIdx.x & 31;
  const int64_t total = rows * segments;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  // t is the same for the whole warp, so every lane reaches the warp_sum.
#pragma unroll 1
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
       t < total; t += warp_stride) {
    const int64_t row = sdiv(t, segments), s = t - row * segments;
    const int64_t start = s * kSegment;
    const int64_t len = inner - start < kSegment ? inner - start : kSegment;
    const int64_t packs = len / V;  // len % V == 0 whenever V > 1 (inner % V == 0)
    const int64_t offset = row * inner + start;
    const acc wv = to_acc(w[row - sdiv(row, C) * C]);
    acc sum = 0;
#pragma unroll 1
    for (int64_t base = lane; base < packs; base += 32 * kUnroll) {
      P px[kUnroll], pg[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t p = base + u * 32;
        if (p < packs) {
          px[u] = load_pack<scalar_t, V>(x + offset + p * V);
          pg[u] = load_pack<scalar_t, V>(g + offset + p * V);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t p = base + u * 32;
        if (p < packs) {
          P pgx;
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const acc xv = to_acc(px[u].v[v]), gv = to_acc(pg[u].v[v]);
            pgx.v[v] = static_cast<scalar_t>(f.backward(xv, wv, gv));
            sum += f.weight_grad(xv, gv);
          }
          store_vec<scalar_t, V>(gx + offset + p * V, pgx);
        }
      }
    }
    sum = warp_sum(sum);
    if (lane == 0) partial[t] = sum;
  }
}

// Backward where the channel changes every inner < kLongRun elements: the input viewed as
// (outer, width = C * inner). A tile is `rows_per_lane * rl` rows by `ct` packs of columns;
// thread (lane_row, lane_col) of the block (blockDim = ct * rl) owns one pack of columns and sums
// rows lane_row, lane_row + rl, ...; the rl row lanes are then added in a fixed tree.
// partial[row_block * width + column] = the weight gradient of that column over the tile's rows.
template <int V, class scalar_t>
__global__ void __launch_bounds__(kThreads)
    prelu_backward_columns_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                  const scalar_t* __restrict__ w, scalar_t* __restrict__ gx,
                                  acc_t<scalar_t>* __restrict__ partial, int64_t outer,
                                  int64_t width, int64_t inner, int ct, int rl, int rows_per_lane,
                                  int64_t col_tiles, int64_t tiles) {
  using acc = acc_t<scalar_t>;
  using P = Pack<scalar_t, V>;
  __shared__ acc red[kThreads * V];
  const Prelu f;
  const int nthreads = ct * rl;
  const int lane_col = static_cast<int>(threadIdx.x) % ct;
  const int lane_row = static_cast<int>(threadIdx.x) / ct;
  const int64_t col_packs = width / V;
  const int64_t rows_per_tile = static_cast<int64_t>(rl) * rows_per_lane;
  int first_step = 1;  // half of rl rounded up to a power of two: the tree's first step
  while (2 * first_step < rl) first_step *= 2;
  if (rl == 1) first_step = 0;
  // b is the same for the whole block, so every thread reaches every __syncthreads.
#pragma unroll 1
  for (int64_t b = blockIdx.x; b < tiles; b += gridDim.x) {
    const int64_t row_block = sdiv(b, col_tiles);
    const int64_t pc = (b - row_block * col_tiles) * ct + lane_col;
    const bool active = pc < col_packs;
    const int64_t col0 = pc * V;
    acc wv[V], sum[V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      sum[v] = 0;
      wv[v] = active ? to_acc(w[sdiv(col0 + v, inner)]) : acc(0);
    }
    if (active) {
      const int64_t row0 = row_block * rows_per_tile + lane_row;
      for (int m0 = 0; m0 < rows_per_lane; m0 += kUnroll) {
        P px[kUnroll], pg[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t r = row0 + static_cast<int64_t>(m0 + u) * rl;
          if (m0 + u < rows_per_lane && r < outer) {
            px[u] = load_pack<scalar_t, V>(x + r * width + col0);
            pg[u] = load_pack<scalar_t, V>(g + r * width + col0);
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t r = row0 + static_cast<int64_t>(m0 + u) * rl;
          if (m0 + u < rows_per_lane && r < outer) {
            P pgx;
#pragma unroll
            for (int v = 0; v < V; ++v) {
              const acc xv = to_acc(px[u].v[v]), gv = to_acc(pg[u].v[v]);
              pgx.v[v] = static_cast<scalar_t>(f.backward(xv, wv[v], gv));
              sum[v] += f.weight_grad(xv, gv);
            }
            store_vec<scalar_t, V>(gx + r * width + col0, pgx);
          }
        }
      }
    }
#pragma unroll
    for (int v = 0; v < V; ++v) red[v * nthreads + threadIdx.x] = sum[v];
    __syncthreads();
    for (int step = first_step; step > 0; step >>= 1) {
      if (lane_row < step && lane_row + step < rl) {
#pragma unroll
        for (int v = 0; v < V; ++v)
          red[v * nthreads + threadIdx.x] += red[v * nthreads + threadIdx.x + step * ct];
      }
      __syncthreads();
    }
    if (lane_row == 0 && active) {
#pragma unroll
      for (int v = 0; v < V; ++v)
        partial[row_block * width + col0 + v] = red[v * nthreads + threadIdx.x];
    }
    __syncthreads();  // red is refilled for the next tile
  }
}

// grad_weight[c] = the sum over o < O, k < K of partial[(o * C + c) * K + k], by a group of
// kGroupWarps warps per channel in a fixed order (each thread a fixed stride of the entries, then
// a fixed tree).
template <int kGroupWarps, class scalar_t, class acc>
__global__ void __launch_bounds__(kThreads)
    prelu_weight_grad_kernel(const acc* __restrict__ partial, scalar_t* __restrict__ gw,
                             int64_t O, int64_t C, int64_t K) {
  constexpr int kGroup = 32 * kGroupWarps;
  constexpr int kGroupsPerBlock = kThreads / kGroup;
  static_assert(kGroupsPerBlock * kGroup == kThreads, "groups must tile the block");
  __shared__ acc scratch[32];
  const int t = static_cast<int>(threadIdx.x) % kGroup;
  // Thread t sums entries m = t, t + kGroup, ... of the flattened (o, k); m = o * K + k is
  // stepped without dividing in the loop.
  const int k_small = K <= kGroup ? static_cast<int>(K) : 0;  // divide only when K <= kGroup
  const int64_t o_first = k_small > 0 ? t / k_small : 0, k_first = t - o_first * K;
  const int64_t o_step = k_small > 0 ? kGroup / k_small : 0, k_step = kGroup - o_step * K;
  const int64_t rows = K > 0 ? O : 0;  // no entries at all when K == 0
  // c is the same for the whole group, so every thread of it reaches the reduction.
#pragma unroll 1
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kGroupsPerBlock + threadIdx.x / kGroup;
       c < C; c += static_cast<int64_t>(gridDim.x) * kGroupsPerBlock) {
    acc s = 0;
    int64_t k = k_first;
#pragma unroll 4
    for (int64_t o = o_first; o < rows;) {
      s += partial[(o * C + c) * K + k];
      o += o_step;
      k += k_step;
      if (k >= K) {
        k -= K;
        ++o;
      }
    }
    if constexpr (kGroupWarps == 1) {
      s = warp_sum(s);
    } else {
      s = block_sum(s, scratch);
    }
    if (t == 0) gw[c] = static_cast<scalar_t>(s);
  }
}

Tensor prelu_forward(const Tensor& self, const Tensor& weight) {
  const char* op = "fastops.prelu";
  const ChannelLayout l = prelu_layout(self, weight, op);
  KernelScope scope(self);
  const Tensor x = self.contiguous();
  const Tensor w = weight.contiguous();
  Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.numel();
  if (n == 0) return y;  // n > 0: inner >= 1 and C >= 1 below
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    constexpr int V = kVec<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    with_index_type(n, [&](auto index) {
      using I = decltype(index);
      const I inner = static_cast<I>(l.inner), C = static_cast<I>(l.channels);
      if (aligned16(xp, yp)) {
        prelu_forward_kernel<V><<<grid_for(n / V, kThreads * kUnroll), kThreads, 0,
                                  scope.stream>>>(xp, wp, yp, n, inner, C);
      } else {
        prelu_forward_kernel<1><<<grid_for(n, kThreads * kUnroll), kThreads, 0, scope.stream>>>(
            xp, wp, yp, n, inner, C);
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<Tensor, Tensor> prelu_backward(const Tensor& grad_output, const Tensor& self,
                                          const Tensor& weight) {
  const char* op = "fastops.prelu_backward";
  const ChannelLayout l = prelu_layout(self, weight, op);
  check_prelu_grad(grad_output, self, op);
  KernelScope scope(self);
  const Tensor x = self.contiguous();
  const Tensor g = grad_output.contiguous();
  const Tensor w = weight.contiguous();
  Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  Tensor gw = at::empty_like(w, at::MemoryFormat::Contiguous);
  const int64_t n = x.numel();
  const int64_t C = l.channels;  // == w.numel()
  if (C == 0) return {gx, gw};   // no weight to reduce into (and then n == 0)
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using acc = acc_t<scalar_t>;
    constexpr int V = kVec<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    // The partial sums of channel c are partial[(o * C + c) * K + k], o < O, k < K. With n == 0
    // there are none and grad_weight is zero.
    int64_t O = 0, K = 0;
    Tensor partial;
    if (n > 0 && l.inner >= kLongRun) {
      const int64_t rows = l.outer * C, segments = ceil_div(l.inner, kSegment);
      O = l.outer;
      K = segments;
      partial = at::empty({rows * segments}, x.options().dtype(acc_scalar_type<acc>()));
      acc* pp = partial.mutable_data_ptr<acc>();
      const unsigned int grid = grid_for(rows * segments, kWarpsPerBlock);
      if (l.inner % V == 0 && aligned16(xp, gp, gxp)) {
        prelu_backward_runs_kernel<V><<<grid, kThreads, 0, scope.stream>>>(
            xp, gp, wp, gxp, pp, rows, l.inner, C, segments);
      } else {
        prelu_backward_runs_kernel<1><<<grid, kThreads, 0, scope.stream>>>(
            xp, gp, wp, gxp, pp, rows, l.inner, C, segments);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (n > 0) {
      const int64_t width = C * l.inner;
      const bool vec = width % V == 0 && aligned16(xp, gp, gxp);
      const int64_t col_packs = width / (vec ? V : 1);
      // Narrow rows: whole rows per row lane (consecutive threads read consecutive memory).
      // Wide rows: tiles 32 packs wide (512 bytes per warp and row), fewer lanes wider when
      // there are fewer than 8 rows.
      int ct, rl;
      if (col_packs <= 128) {
        ct = static_cast<int>(col_packs);
        rl = kThreads / ct;
      } else {
        rl = 1;
        while (rl < 8 && rl < l.outer) rl *= 2;
        ct = kThreads / rl;
      }
      const int64_t col_tiles = ceil_div(col_packs, ct);
      // 4 to 16 rows per lane: enough tiles to fill the GPU (about 1024), few partial sums.
      const int64_t want_row_blocks = ceil_div(1024, col_tiles);
      const int64_t rpl = std::min<int64_t>(
          16, std::max<int64_t>(4, ceil_div(l.outer, rl * want_row_blocks)));
      const int64_t row_blocks = ceil_div(l.outer, rl * rpl);
      O = row_blocks;
      K = l.inner;
      partial = at::empty({row_blocks * width}, x.options().dtype(acc_scalar_type<acc>()));
      acc* pp = partial.mutable_data_ptr<acc>();
      const int64_t tiles = row_blocks * col_tiles;
      const unsigned int grid = grid_for(tiles, 1);
      const int threads = ct * rl;
      if (vec) {
        prelu_backward_columns_kernel<V><<<grid, threads, 0, scope.stream>>>(
            xp, gp, wp, gxp, pp, l.outer, width, l.inner, ct, rl, static_cast<int>(rpl),
            col_tiles, tiles);
      } else {
        prelu_backward_columns_kernel<1><<<grid, threads, 0, scope.stream>>>(
            xp, gp, wp, gxp, pp, l.outer, width, l.inner, ct, rl, static_cast<int>(rpl),
            col_tiles, tiles);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const acc* pp = partial.defined() ? partial.const_data_ptr<acc>() : nullptr;
    scalar_t* gwp = gw.mutable_data_ptr<scalar_t>();
    if (O * K >= 2048) {  // long sums: a block per channel
      prelu_weight_grad_kernel<kWarpsPerBlock><<<grid_for(C, 1), kThreads, 0, scope.stream>>>(
          pp, gwp, O, C, K);
    } else {  // short sums: a warp per channel
      prelu_weight_grad_kernel<1><<<grid_for(C, kWarpsPerBlock), kThreads, 0, scope.stream>>>(
          pp, gwp, O, C, K);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gx, gw};
}

// ---- Maxout ---------------------------------------------------------------------------------
// Two access patterns. inner > 1 ("planes"): member j of output (row, s) is
// x[(row * k + j) * inner + s], so V consecutive s are read as one vector per member.
// inner == 1 ("members"): the k members of output i are x[i * k .. i * k + k - 1], read M at a
// time (M the widest power of two dividing k that the alignment allows, up to 16 bytes).
// A thread's outputs past the end are clamped to the last one, so its loads need no branch (and
// stay in flight together); only the stores are guarded.
//
// With saved indices (maxout_with_indices) the forward kernels also write, per output, the byte
// index of the member its gradient goes to: the member where maxout_takes last fired, i.e. the
// first member equal to the max (the first NaN if there is one), as the backward kernels below
// find it from the input. maxout_indices_backward then reads one byte and one gradient per
// output instead of k inputs.

constexpr int kMaxoutUnroll = 2;   // packs of outputs in flight per thread (planes)
constexpr int kMembersUnroll = 4;  // outputs in flight per thread (members)

// The unsigned integer of N bytes: N saved indices move in one access.
template <int N> struct UintOfBytes;
template <> struct UintOfBytes<1> { using type = uint8_t; };
template <> struct UintOfBytes<2> { using type = uint16_t; };
template <> struct UintOfBytes<4> { using type = uint32_t; };
template <> struct UintOfBytes<8> { using type = uint64_t; };

// N bytes at p (aligned to N) as one store or load: byte v is values[v] (little-endian, as the
// GPU is). The word is built in a register: a byte array filled element by element may be
// stored one byte at a time.
template <int N>
__device__ __forceinline__ void store_bytes(uint8_t* p, const uint32_t (&values)[N]) {
  using W = typename UintOfBytes<N>::type;
  W word = 0;
#pragma unroll
  for (int v = 0; v < N; ++v) word |= static_cast<W>(static_cast<W>(values[v] & 0xffu) << (8 * v));
  *reinterpret_cast<W*>(p) = word;
}
template <int N>
__device__ __forceinline__ void load_bytes(const uint8_t* p, uint32_t (&values)[N]) {
  using W = typename UintOfBytes<N>::type;
  const W word = *reinterpret_cast<const W*>(p);
#pragma unroll
  for (int v = 0; v < N; ++v) values[v] = static_cast<uint32_t>(word >> (8 * v)) & 0xffu;
}

// I: the type of the per-pack division (and of the backward's argmax), uint32_t when the input
// has fewer than 2^32 elements, else uint64_t. Indices: also write the winning members to idx
// (V bytes per pack, aligned to V).
template <int V, bool Indices, class I, class scalar_t>
__global__ void __launch_bounds__(kThreads)
    maxout_planes_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                         uint8_t* __restrict__ idx, int64_t n_out, int64_t k, I inner) {
  using acc = acc_t<scalar_t>;
  using P = Pack<scalar_t, V>;
  const int64_t packs = n_out / V;  // inner % V == 0
  const int64_t stride = layout::trip_stride(gridDim.x, kThreads, kMaxoutUnroll);
#pragma unroll 1
  for (int64_t base = layout::trip_first(blockIdx.x, threadIdx.x, kThreads, kMaxoutUnroll);
       base < packs; base += stride) {
    const scalar_t* src[kMaxoutUnroll];
    acc best[kMaxoutUnroll][V];
    uint32_t arg[kMaxoutUnroll][V];  // read only with Indices
#pragma unroll
    for (int u = 0; u < kMaxoutUnroll; ++u) {
      const int64_t p = layout::clamped_trip_item(base, u, kThreads, packs);
      src[u] = x + layout::maxout_first_member(p * V, k, inner);
      const P a = load_pack<scalar_t, V>(src[u]);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        best[u][v] = to_acc(a.v[v]);
        arg[u][v] = 0;
      }
    }
#pragma unroll 2
    for (int64_t j = 1; j < k; ++j) {
      P a[kMaxoutUnroll];
#pragma unroll
      for (int u = 0; u < kMaxoutUnroll; ++u) a[u] = load_pack<scalar_t, V>(src[u] + j * inner);
#pragma unroll
      for (int u = 0; u < kMaxoutUnroll; ++u) {
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const acc cand = to_acc(a[u].v[v]);
          const bool takes = maxout_takes(cand, best[u][v]);
          best[u][v] = takes ? cand : best[u][v];
          if constexpr (Indices) arg[u][v] = takes ? static_cast<uint32_t>(j) : arg[u][v];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kMaxoutUnroll; ++u) {
      const int64_t p = layout::trip_item(base, u, kThreads);
      if (p < packs) {
        P out;
#pragma unroll
        for (int v = 0; v < V; ++v) out.v[v] = static_cast<scalar_t>(best[u][v]);
        store_vec<scalar_t, V>(y + p * V, out);
        if constexpr (Indices) store_bytes<V>(idx + p * V, arg[u]);
      }
    }
  }
}

template <int M, bool Indices, class scalar_t>
__global__ void __launch_bounds__(kThreads)
    maxout_members_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                          uint8_t* __restrict__ idx, int64_t n_out, int64_t k) {
  using acc = acc_t<scalar_t>;
  using P = Pack<scalar_t, M>;
  const int64_t chunks = k / M;  // k % M == 0
  const int64_t stride = layout::trip_stride(gridDim.x, kThreads, kMembersUnroll);
#pragma unroll 1
  for (int64_t base = layout::trip_first(blockIdx.x, threadIdx.x, kThreads, kMembersUnroll);
       base < n_out; base += stride) {
    const scalar_t* src[kMembersUnroll];
    acc best[kMembersUnroll];
    uint32_t arg[kMembersUnroll];  // read only with Indices
#pragma unroll
    for (int u = 0; u < kMembersUnroll; ++u) {
      src[u] = x + layout::clamped_trip_item(base, u, kThreads, n_out) * k;
      const P a = load_pack<scalar_t, M>(src[u]);
      best[u] = to_acc(a.v[0]);
      arg[u] = 0;
#pragma unroll
      for (int m = 1; m < M; ++m) {
        const acc cand = to_acc(a.v[m]);
        const bool takes = maxout_takes(cand, best[u]);
        best[u] = takes ? cand : best[u];
        if constexpr (Indices) arg[u] = takes ? static_cast<uint32_t>(m) : arg[u];
      }
    }
#pragma unroll 1
    for (int64_t c = 1; c < chunks; ++c) {
      P a[kMembersUnroll];
#pragma unroll
      for (int u = 0; u < kMembersUnroll; ++u) a[u] = load_pack<scalar_t, M>(src[u] + c * M);
#pragma unroll
      for (int u = 0; u < kMembersUnroll; ++u) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const acc cand = to_acc(a[u].v[m]);
          const bool takes = maxout_takes(cand, best[u]);
          best[u] = takes ? cand : best[u];
          if constexpr (Indices) arg[u] = takes ? static_cast<uint32_t>(c * M + m) : arg[u];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kMembersUnroll; ++u) {
      const int64_t i = layout::trip_item(base, u, kThreads);
      if (i < n_out) {
        y[i] = static_cast<scalar_t>(best[u]);
        if constexpr (Indices) idx[i] = static_cast<uint8_t>(arg[u]);
      }
    }
  }
}

// The backward: the argmax is the member where maxout_takes last fired, i.e. the first member
// equal to the max (the first NaN if there is one), which is where the CPU kernel sends the
// gradient. Every member of gx is written: g there, 0 elsewhere.
template <int V, class I, class scalar_t>
__global__ void __launch_bounds__(kThreads)
    maxout_backward_planes_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                  scalar_t* __restrict__ gx, int64_t n_out, int64_t k, I inner) {
  using acc = acc_t<scalar_t>;
  using P = Pack<scalar_t, V>;
  const scalar_t zero = static_cast<scalar_t>(0.0f);
  const int64_t packs = n_out / V;  // inner % V == 0
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * kMaxoutUnroll;
#pragma unroll 1
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads * kMaxoutUnroll + threadIdx.x;
       base < packs; base += stride) {
    int64_t src[kMaxoutUnroll];  // offset of member 0 in x and gx
    acc best[kMaxoutUnroll][V];
    I arg[kMaxoutUnroll][V];
#pragma unroll
    for (int u = 0; u < kMaxoutUnroll; ++u) {
      const int64_t p = min(base + u * kThreads, packs - 1);
      const I row = static_cast<I>(p * V) / inner, pos = static_cast<I>(p * V) - row * inner;
      src[u] = static_cast<int64_t>(row) * k * inner + pos;
      const P a = load_pack<scalar_t, V>(x + src[u]);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        best[u][v] = to_acc(a.v[v]);
        arg[u][v] = 0;
      }
    }
#pragma unroll 2
    for (int64_t j = 1; j < k; ++j) {
      P a[kMaxoutUnroll];
#pragma unroll
      for (int u = 0; u < kMaxoutUnroll; ++u) a[u] = load_pack<scalar_t, V>(x + src[u] + j * inner);
#pragma unroll
      for (int u = 0; u < kMaxoutUnroll; ++u) {
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const acc cand = to_acc(a[u].v[v]);
          const bool takes = maxout_takes(cand, best[u][v]);
          best[u][v] = takes ? cand : best[u][v];
          arg[u][v] = takes ? static_cast<I>(j) : arg[u][v];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kMaxoutUnroll; ++u) {
      const int64_t p = base + u * kThreads;
      if (p < packs) {
        const P pg = load_pack<scalar_t, V>(g + p * V);
        for (int64_t j = 0; j < k; ++j) {
          P out;
#pragma unroll
          for (int v = 0; v < V; ++v) out.v[v] = arg[u][v] == static_cast<I>(j) ? pg.v[v] : zero;
          store_vec<scalar_t, V>(gx + src[u] + j * inner, out);
        }
      }
    }
  }
}

template <int M, class scalar_t>
__global__ void __launch_bounds__(kThreads)
    maxout_backward_members_kernel(const scalar_t* __restrict__ x,
                                   const scalar_t* __restrict__ g, scalar_t* __restrict__ gx,
                                   int64_t n_out, int64_t k) {
  using acc = acc_t<scalar_t>;
  using P = Pack<scalar_t, M>;
  const scalar_t zero = static_cast<scalar_t>(0.0f);
  const int64_t chunks = k / M;  // k % M == 0
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * kMembersUnroll;
#pragma unroll 1
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads * kMembersUnroll + threadIdx.x;
       base < n_out; base += stride) {
    int64_t src[kMembersUnroll];  // offset of member 0 in x and gx
    acc best[kMembersUnroll];
    int64_t arg[kMembersUnroll];
#pragma unroll
    for (int u = 0; u < kMembersUnroll; ++u) {
      src[u] = min(base + u * kThreads, n_out - 1) * k;
      const P a = load_pack<scalar_t, M>(x + src[u]);
      best[u] = to_acc(a.v[0]);
      arg[u] = 0;
#pragma unroll
      for (int m = 1; m < M; ++m) {
        const acc cand = to_acc(a.v[m]);
        const bool takes = maxout_takes(cand, best[u]);
        best[u] = takes ? cand : best[u];
        arg[u] = takes ? m : arg[u];
      }
    }
#pragma unroll 1
    for (int64_t c = 1; c < chunks; ++c) {
      P a[kMembersUnroll];
#pragma unroll
      for (int u = 0; u < kMembersUnroll; ++u) a[u] = load_pack<scalar_t, M>(x + src[u] + c * M);
#pragma unroll
      for (int u = 0; u < kMembersUnroll; ++u) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const acc cand = to_acc(a[u].v[m]);
          const bool takes = maxout_takes(cand, best[u]);
          best[u] = takes ? cand : best[u];
          arg[u] = takes ? c * M + m : arg[u];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kMembersUnroll; ++u) {
      const int64_t i = base + u * kThreads;
      if (i < n_out) {
        const scalar_t gv = g[i];
        for (int64_t c = 0; c < chunks; ++c) {
          P out;
#pragma unroll
          for (int m = 0; m < M; ++m) out.v[m] = c * M + m == arg[u] ? gv : zero;
          store_vec<scalar_t, M>(gx + src[u] + c * M, out);
        }
      }
    }
  }
}

// maxout_indices_backward: every member of gx is written, g at the saved member, 0 elsewhere.
// Per trip a thread first loads the gradients and saved indices of kUnroll accesses of outputs
// (independent loads, all in flight together), then writes their k members. Along the inner
// positions ("planes") V outputs per access; with inner == 1 ("members") one output per access
// and its k members written M at a time. A saved index past the pool is a caller's bug (the CPU
// kernel raises an IndexError): it asserts, and with device asserts compiled out its gradient is
// dropped, never written out of bounds.
template <int V, class I, class scalar_t>
__global__ void __launch_bounds__(kThreads)
    maxout_indices_backward_planes_kernel(const scalar_t* __restrict__ g,
                                          const uint8_t* __restrict__ idx,
                                          scalar_t* __restrict__ gx, int64_t n_out, int64_t k,
                                          I inner) {
  using P = Pack<scalar_t, V>;
  const scalar_t zero = static_cast<scalar_t>(0.0f);
  const int64_t packs = n_out / V;  // inner % V == 0
  const int64_t stride = layout::trip_stride(gridDim.x, kThreads, kUnroll);
#pragma unroll 1
  for (int64_t base = layout::trip_first(blockIdx.x, threadIdx.x, kThreads, kUnroll);
       base < packs; base += stride) {
    P pg[kUnroll];
    uint32_t arg[kUnroll][V];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t p = layout::clamped_trip_item(base, u, kThreads, packs);
      pg[u] = load_pack<scalar_t, V>(g + p * V);
      load_bytes<V>(idx + p * V, arg[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t p = layout::trip_item(base, u, kThreads);
      if (p < packs) {
#pragma unroll
        for (int v = 0; v < V; ++v) CUDA_KERNEL_ASSERT(arg[u][v] < k);
        scalar_t* dst = gx + layout::maxout_first_member(p * V, k, inner);
        for (int64_t j = 0; j < k; ++j) {
          P out;
#pragma unroll
          for (int v = 0; v < V; ++v) out.v[v] = arg[u][v] == j ? pg[u].v[v] : zero;
          store_vec<scalar_t, V>(dst + j * inner, out);
        }
      }
    }
  }
}

template <int M, class scalar_t>
__global__ void __launch_bounds__(kThreads)
    maxout_indices_backward_members_kernel(const scalar_t* __restrict__ g,
                                           const uint8_t* __restrict__ idx,
                                           scalar_t* __restrict__ gx, int64_t n_out, int64_t k) {
  using P = Pack<scalar_t, M>;
  const scalar_t zero = static_cast<scalar_t>(0.0f);
  const int64_t chunks = k / M;  // k % M == 0
  const int64_t stride = layout::trip_stride(gridDim.x, kThreads, kUnroll);
#pragma unroll 1
  for (int64_t base = layout::trip_first(blockIdx.x, threadIdx.x, kThreads, kUnroll);
       base < n_out; base += stride) {
    scalar_t gv[kUnroll];
    uint32_t arg[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = layout::clamped_trip_item(base, u, kThreads, n_out);
      gv[u] = g[i];
      arg[u] = idx[i];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = layout::trip_item(base, u, kThreads);
      if (i < n_out) {
        CUDA_KERNEL_ASSERT(arg[u] < k);
        for (int64_t c = 0; c < chunks; ++c) {
          P out;
#pragma unroll
          for (int m = 0; m < M; ++m) out.v[m] = c * M + m == arg[u] ? gv[u] : zero;
          store_vec<scalar_t, M>(gx + i * k + c * M, out);
        }
      }
    }
  }
}

// Calls fn(std::integral_constant<int, M>) for the widest M <= kVec<scalar_t> (a power of two)
// dividing k with every pointer aligned to M elements.
template <class scalar_t, class Fn>
void with_member_width(int64_t k, std::initializer_list<const void*> ptrs, const Fn& fn) {
  auto fits = [&](int m) {
    if (k % m != 0) return false;
    for (const void* p : ptrs)
      if (!aligned_to(p, m * sizeof(scalar_t))) return false;
    return true;
  };
  if constexpr (kVec<scalar_t> >= 8) {
    if (fits(8)) return fn(std::integral_constant<int, 8>{});
  }
  if constexpr (kVec<scalar_t> >= 4) {
    if (fits(4)) return fn(std::integral_constant<int, 4>{});
  }
  if (fits(2)) return fn(std::integral_constant<int, 2>{});
  fn(std::integral_constant<int, 1>{});
}

// The maxout of x (layout l, n_out outputs) into y, and with Indices the winning members into
// idx. x has n_in elements; n_out > 0.
template <bool Indices, class scalar_t>
void launch_maxout(const scalar_t* xp, scalar_t* yp, uint8_t* ip, const MaxoutLayout& l,
                   int64_t n_in, int64_t n_out, cudaStream_t stream) {
  constexpr int V = kVec<scalar_t>;
  if (l.inner > 1) {
    const bool aligned = aligned16(xp, yp) && (!Indices || aligned_to(ip, V));
    const int width = layout::maxout_planes_width(l.inner, V, aligned);
    const unsigned int grid = grid_for(n_out / width, kThreads * kMaxoutUnroll);
    with_index_type(n_in, [&](auto index) {
      using I = decltype(index);
      const I inner = static_cast<I>(l.inner);
      if (width == V) {
        maxout_planes_kernel<V, Indices><<<grid, kThreads, 0, stream>>>(
            xp, yp, ip, n_out, l.k, inner);
      } else {
        maxout_planes_kernel<1, Indices><<<grid, kThreads, 0, stream>>>(
            xp, yp, ip, n_out, l.k, inner);
      }
    });
  } else {
    with_member_width<scalar_t>(l.k, {xp}, [&](auto width) {
      constexpr int M = decltype(width)::value;
      const unsigned int grid = grid_for(n_out, kThreads * kMembersUnroll);
      maxout_members_kernel<M, Indices><<<grid, kThreads, 0, stream>>>(xp, yp, ip, n_out, l.k);
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Also the maxout of the fused linear (declared in cuda_common.cuh).
Tensor maxout_forward(const Tensor& self, int64_t pool_size) {
  const char* op = "fastops.maxout";
  const MaxoutLayout l = maxout_layout(self, pool_size, op);
  KernelScope scope(self);
  const Tensor x = self.contiguous();
  Tensor y = at::empty(maxout_output_shape(self, l), x.options());
  const int64_t n_out = y.numel();
  if (n_out == 0) return y;
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    launch_maxout<false>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                         static_cast<uint8_t*>(nullptr), l, x.numel(), n_out, scope.stream);
  });
  return y;
}

namespace {

Tensor maxout_backward(const Tensor& grad_output, const Tensor& self, int64_t pool_size) {
  const char* op = "fastops.maxout_backward";
  const MaxoutLayout l = maxout_layout(self, pool_size, op);
  check_maxout_grad(grad_output, self, l, op);
  KernelScope scope(self);
  const Tensor x = self.contiguous();
  const Tensor g = grad_output.contiguous();
  Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n_out = g.numel();
  if (n_out == 0) return gx;  // then gx is empty too
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    constexpr int V = kVec<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    if (l.inner > 1) {
      const bool vec = l.inner % V == 0 && aligned16(xp, gp, gxp);
      const unsigned int grid = grid_for(vec ? n_out / V : n_out, kThreads * kMaxoutUnroll);
      with_index_type(x.numel(), [&](auto index) {
        using I = decltype(index);
        const I inner = static_cast<I>(l.inner);
        if (vec) {
          maxout_backward_planes_kernel<V><<<grid, kThreads, 0, scope.stream>>>(
              xp, gp, gxp, n_out, l.k, inner);
        } else {
          maxout_backward_planes_kernel<1><<<grid, kThreads, 0, scope.stream>>>(
              xp, gp, gxp, n_out, l.k, inner);
        }
      });
    } else {
      with_member_width<scalar_t>(l.k, {xp, gxp}, [&](auto width) {
        constexpr int M = decltype(width)::value;
        maxout_backward_members_kernel<M><<<grid_for(n_out, kThreads * kMembersUnroll), kThreads,
                                            0, scope.stream>>>(xp, gp, gxp, n_out, l.k);
      });
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

std::tuple<Tensor, Tensor> maxout_with_indices(const Tensor& self, int64_t pool_size) {
  const char* op = "fastops.maxout_with_indices";
  const MaxoutLayout l = maxout_layout(self, pool_size, op);
  check_maxout_indexed_pool(pool_size, op);
  KernelScope scope(self);
  const Tensor x = self.contiguous();
  const std::vector<int64_t> shape = maxout_output_shape(self, l);
  Tensor y = at::empty(shape, x.options());
  Tensor idx = at::empty(shape, x.options().dtype(at::kByte));
  const int64_t n_out = y.numel();
  if (n_out == 0) return {y, idx};
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    launch_maxout<true>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                        idx.mutable_data_ptr<uint8_t>(), l, x.numel(), n_out, scope.stream);
  });
  return {y, idx};
}

Tensor maxout_indices_backward(const Tensor& grad_output, const Tensor& indices,
                               int64_t pool_size) {
  const char* op = "fastops.maxout_indices_backward";
  const MaxoutLayout l = maxout_indices_layout(grad_output, indices, pool_size, op);
  KernelScope scope(grad_output);
  const Tensor g = grad_output.contiguous();
  const Tensor idx = indices.contiguous();
  Tensor gx = at::empty(maxout_input_shape(g, l), g.options());
  const int64_t n_in = gx.numel();
  const int64_t n_out = g.numel();
  if (n_in == 0) return gx;  // then there are no outputs either
  FO_DISPATCH_FLOATING(g.scalar_type(), [&] {
    constexpr int V = kVec<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const uint8_t* ip = idx.const_data_ptr<uint8_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    if (l.inner > 1) {
      const bool aligned = aligned16(gp, gxp) && aligned_to(ip, V);
      const int width = layout::maxout_planes_width(l.inner, V, aligned);
      const unsigned int grid = grid_for(n_out / width, kThreads * kUnroll);
      with_index_type(n_in, [&](auto index) {
        using I = decltype(index);
        const I inner = static_cast<I>(l.inner);
        if (width == V) {
          maxout_indices_backward_planes_kernel<V><<<grid, kThreads, 0, scope.stream>>>(
              gp, ip, gxp, n_out, l.k, inner);
        } else {
          maxout_indices_backward_planes_kernel<1><<<grid, kThreads, 0, scope.stream>>>(
              gp, ip, gxp, n_out, l.k, inner);
        }
      });
    } else {
      with_member_width<scalar_t>(l.k, {gxp}, [&](auto width) {
        constexpr int M = decltype(width)::value;
        const unsigned int grid = grid_for(n_out, kThreads * kUnroll);
        maxout_indices_backward_members_kernel<M><<<grid, kThreads, 0, scope.stream>>>(
            gp, ip, gxp, n_out, l.k);
      });
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CUDA, m) {
  FO_IMPL_POINTWISE_ACTIVATIONS()
  m.impl("prelu", &prelu_forward);
  m.impl("prelu_backward", &prelu_backward);
  m.impl("maxout", &maxout_forward);
  m.impl("maxout_backward", &maxout_backward);
  m.impl("maxout_with_indices", &maxout_with_indices);
  m.impl("maxout_indices_backward", &maxout_indices_backward);
}

}  // namespace gpu
}  // namespace fastops
