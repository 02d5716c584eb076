// CUDA kernels of the fully fused MLP (fused_mlp, fused_mlp_backward), after tiny-cuda-nn's
// FullyFusedMLP: z_l = a_{l-1} W_l^T + b_l, a_l = act(z_l), output = out_act(z_{L-1}).
//
// Fused path (float16 / bfloat16 on sm_80+, in and out widths 1..128, hidden width 16..128 in
// steps of 16, at most 16 layers, every layer's weights in shared memory; fused_mlp_plan.h):
//   forward:  one block of 8 warps per 128-row tile (persistent: a block walks tiles blockIdx.x,
//             + gridDim.x, ...), one warp per 16-row strip. The block copies the weights and
//             biases of every layer into shared memory once; then a warp runs its 16 rows
//             through every layer without waiting for the others: mma.sync m16n8k16 with float
//             accumulation, and the accumulator of one layer (bias added, rounded to the dtype,
//             activated, rounded again, as nn.Sequential rounds) packed in registers straight
//             into the A fragments of the next. Only the input rows pass through shared memory
//             (a staging tile per warp, zero-padded to 16 columns).
//   backward: the same structure in reverse with W_l^T in shared memory: the output gradient
//             through out_act' is staged, then per layer grad_a = round(delta_l W_l) and
//             delta_{l-1} = round(act'(z_{l-1}) grad_a), z read from `hidden`. Every delta_l and
//             a_{l-1} = act(z_{l-1}) is written to scratch; then grad_W_l = delta_l^T a_{l-1} and
//             grad_b_l = delta_l^T 1 are GEMMs of gemm.cuh (float accumulation, split-K summed in
//             a fixed order: deterministic, no atomics).
// Layer-by-layer path (float32, float64, other widths, older GPUs, weights beyond shared
// memory): one GEMM of gemm.cuh per layer with the bias, rounding and activation in its epilogue
// (forward), and with act'(z) applied in the epilogue of the grad_a GEMM (backward), then the
// same weight-gradient GEMMs. No CUDA-core fused kernel: float32 takes this path.
#include <torch/library.h>

#include <array>
#include <atomic>
#include <string>
#include <vector>

#include "../fused_mlp_checks.h"
#include "cuda_common.cuh"
#include "fused_mlp_plan.h"
#include "gemm.cuh"
#include "pointwise_switch.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define FO_MLP_SM80 1
#endif

namespace fastops {
namespace gpu {

namespace {

using at::Tensor;
using gemm::Operand;
using mlp::FusedPlan;
using mlp::kMaxLayers;
using mlp::kRowPad;
using mlp::kWarpRows;
using mlp::kWarps;

// ---- arguments (checked by fused_mlp_checks.h, shared with the CPU kernels) ----------------

// An activation as the kernels take it: a number for their run-time switch (pointwise_switch.cuh)
// and the parameters of fused_mlp_activation_params.
struct MlpAct {
  int kind;  // PointwiseKind, or kActNone
  double a, b;
};

// name: checked by check_fused_mlp_activations.
MlpAct mlp_act(const std::string& name) {
  if (name == "none") return {kActNone, 0.0, 0.0};
  const FusedMlpActParams p = fused_mlp_activation_params(name);
  return {static_cast<int>(pointwise_kind(name)), p.a, p.b};
}

// ---- fused kernels ---------------------------------------------------------------------------

// Everything a fused kernel needs besides its pointers (a copy of the plan, by value).
struct FusedArgs {
  int64_t rows;
  int layers, in, out, hidden;
  int kin_pad, out_pad, stage_ld, image_elems;
  int k_pad[kMaxLayers], n_pad[kMaxLayers], w_off[kMaxLayers], b_off[kMaxLayers];
  bool has_bias;
  int act, out_act;
  double act_a, act_b, out_a, out_b;
};

// The saved pre-activations z_l of the hidden layers, one (rows, hidden) tensor each (null when
// not saved), as a kernel argument.
template <class T>
struct HiddenPtrs {
  T* z[kMaxLayers];
};

template <class T>
__device__ __forceinline__ uint32_t lds32(const T* p) {  // p: 4-byte aligned shared memory
  return *reinterpret_cast<const uint32_t*>(p);
}

// Two values rounded to T, packed as an f16x2 / bf16x2 register (the first in the low half).
template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T l = static_cast<T>(lo), h = static_cast<T>(hi);
  return (static_cast<uint32_t>(h.x) << 16) | static_cast<uint32_t>(l.x);
}

template <class T>
__device__ __forceinline__ void store2(T* p, float v0, float v1) {  // p: 4-byte aligned
  *reinterpret_cast<uint32_t*>(p) = pack2<T>(v0, v1);
}

// The image (weights, biases) into shared memory: image_elems is a multiple of 8 and both ends
// are 16-byte aligned.
template <class T>
__device__ __forceinline__ void copy_image(T* dst, const T* src, int elems) {
  const uint4* s = reinterpret_cast<const uint4*>(src);
  uint4* d = reinterpret_cast<uint4*>(dst);
  for (int i = threadIdx.x; i < elems / 8; i += blockDim.x) d[i] = s[i];
}

// The A fragment of k16 chunk kc of the warp's staging tile (pitch ld).
template <class T>
__device__ __forceinline__ void load_a_frag(uint32_t (&a)[4], const T* stage, int ld, int kc,
                                            int g, int t) {
#pragma unroll
  for (int r = 0; r < 4; ++r) a[r] = lds32(stage + mlp::a_frag_offset(r, kc, g, t, ld));
}

// acc (16 rows x 8 nt columns) = A (16 x 16 kt) B, B read from the image rows of this layer:
// row n (the product's output column) at b + n * ld, contiguous along k.
template <class T, int W>
__device__ __forceinline__ void warp_layer(float (&acc)[W / 8][4], const uint32_t (&a)[W / 16][4],
                                           const T* b, int ld, int kt, int nt, int g, int t) {
#pragma unroll
  for (int j = 0; j < W / 8; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[j][c] = 0.f;
#pragma unroll
  for (int kc = 0; kc < W / 16; ++kc) {
    if (kc >= kt) break;
#pragma unroll
    for (int j = 0; j < W / 8; ++j) {
      if (j >= nt) break;
      gemm::mma16816<T>(acc[j], a[kc], lds32(b + mlp::b_frag_offset(0, j, kc, g, t, ld)),
                        lds32(b + mlp::b_frag_offset(1, j, kc, g, t, ld)));
    }
  }
}

template <int W> struct FusedOccupancy { static constexpr int blocks = W <= 64 ? 2 : 1; };

template <class T, int W>
__global__ void __launch_bounds__(kWarps * 32, FusedOccupancy<W>::blocks)
    mlp_forward_kernel(const T* __restrict__ x, T* __restrict__ out, HiddenPtrs<T> hidden,
                       T* __restrict__ out_preact, const T* __restrict__ image, FusedArgs p,
                       bool vec_x) {
#ifdef FO_MLP_SM80
  extern __shared__ __align__(16) unsigned char mlp_smem[];
  T* const sw = reinterpret_cast<T*>(mlp_smem);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  T* const stage = sw + p.image_elems + warp * kWarpRows * p.stage_ld;
  copy_image(sw, image, p.image_elems);
  __syncthreads();  // the last block-wide wait: from here on the warps run on their own

  const int64_t tiles = (p.rows + mlp::kTileRows - 1) / mlp::kTileRows;  // row_tiles
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row0 = tile * mlp::kTileRows + warp * kWarpRows;
    if (row0 >= p.rows) continue;

    // the warp's 16 input rows, zero beyond the matrix
    if (vec_x) {  // in % 8 == 0, x 16-byte aligned: 8 elements a load
      const int per_row = p.kin_pad / 8;
      for (int i = lane; i < kWarpRows * per_row; i += 32) {
        const int r = i / per_row, c = (i - r * per_row) * 8;
        const int64_t row = row0 + r;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (row < p.rows && c < p.in) v = *reinterpret_cast<const uint4*>(x + row * p.in + c);
        *reinterpret_cast<uint4*>(stage + r * p.stage_ld + c) = v;
      }
    } else {
      for (int i = lane; i < kWarpRows * p.kin_pad; i += 32) {
        const int r = i / p.kin_pad, c = i - r * p.kin_pad;
        const int64_t row = row0 + r;
        stage[r * p.stage_ld + c] =
            row < p.rows && c < p.in ? x[row * p.in + c] : static_cast<T>(0.f);
      }
    }
    __syncwarp();
    uint32_t a[W / 16][4];
#pragma unroll
    for (int kc = 0; kc < W / 16; ++kc) {
      if (kc * 16 < p.kin_pad) {
        load_a_frag(a[kc], stage, p.stage_ld, kc, g, t);
      } else {
        a[kc][0] = a[kc][1] = a[kc][2] = a[kc][3] = 0u;
      }
    }
    __syncwarp();  // the staging tile is rewritten by the next tile

    for (int l = 0; l < p.layers; ++l) {
      const int nt = p.n_pad[l] / 8;
      float acc[W / 8][4];
      warp_layer<T, W>(acc, a, sw + p.w_off[l], p.k_pad[l] + kRowPad, p.k_pad[l] / 16, nt, g, t);
      const T* bias = sw + p.b_off[l];
      if (l < p.layers - 1) {
        // z = round(acc + b) to `hidden`; the next layer's A fragments = round(act(z)): the
        // C fragment of n8 tiles 2 kc and 2 kc + 1 is the A fragment of k16 chunk kc
        T* const hz = hidden.z[l];
#pragma unroll
        for (int j = 0; j < W / 8; ++j) {
          if (j >= nt) break;
          const int col = mlp::acc_col(0, j, t);
          const float b0 = p.has_bias ? static_cast<float>(bias[col]) : 0.f;
          const float b1 = p.has_bias ? static_cast<float>(bias[col + 1]) : 0.f;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int64_t row = row0 + mlp::acc_row(2 * h, g);
            const float z0 = round_to<T>(acc[j][2 * h] + b0);
            const float z1 = round_to<T>(acc[j][2 * h + 1] + b1);
            if (hz != nullptr && row < p.rows) store2<T>(hz + row * p.hidden + col, z0, z1);
            a[j / 2][mlp::next_a_reg(j, h)] =
                pack2<T>(act_forward<T>(p.act, z0, p.act_a, p.act_b),
                         act_forward<T>(p.act, z1, p.act_a, p.act_b));
          }
        }
      } else {
#pragma unroll
        for (int j = 0; j < W / 8; ++j) {
          if (j >= nt) break;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int64_t row = row0 + mlp::acc_row(2 * h, g);
            if (row >= p.rows) continue;
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int col = mlp::acc_col(e, j, t);
              if (col >= p.out) continue;
              const float b = p.has_bias ? static_cast<float>(bias[col]) : 0.f;
              const float z = round_to<T>(acc[j][2 * h + e] + b);
              const int64_t o = row * p.out + col;
              if (out_preact != nullptr) out_preact[o] = static_cast<T>(z);
              out[o] = static_cast<T>(act_forward<T>(p.out_act, z, p.out_a, p.out_b));
            }
          }
        }
      }
    }
  }
#else
  // No tensor-core code for this architecture: the host never launches it (fused_compiled);
  // should it ever run, fail loudly rather than leave the output unwritten.
  __trap();
#endif
}

// hidden: z_l of the hidden layers. deltas: (L-1, rows, hidden) delta_l of the hidden layers,
// delta_last (rows, out), acts:
// (L-1, rows, hidden) act(z_l); each null when not wanted. grad_in null: stop at delta_0.
template <class T, int W>
__global__ void __launch_bounds__(kWarps * 32, FusedOccupancy<W>::blocks)
    mlp_backward_kernel(const T* __restrict__ grad_out, HiddenPtrs<const T> hidden,
                        const T* __restrict__ out_preact, T* __restrict__ grad_in,
                        T* __restrict__ deltas, T* __restrict__ delta_last, T* __restrict__ acts,
                        const T* __restrict__ image, FusedArgs p) {
#ifdef FO_MLP_SM80
  extern __shared__ __align__(16) unsigned char mlp_smem[];
  T* const sw = reinterpret_cast<T*>(mlp_smem);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  T* const stage = sw + p.image_elems + warp * kWarpRows * p.stage_ld;
  copy_image(sw, image, p.image_elems);
  __syncthreads();

  const int64_t tiles = (p.rows + mlp::kTileRows - 1) / mlp::kTileRows;  // row_tiles
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row0 = tile * mlp::kTileRows + warp * kWarpRows;
    if (row0 >= p.rows) continue;

    // delta_{L-1} = round(out_act'(z_{L-1}) grad_output), zero beyond the matrix
    for (int i = lane; i < kWarpRows * p.out_pad; i += 32) {
      const int r = i / p.out_pad, c = i - r * p.out_pad;
      const int64_t row = row0 + r;
      float v = 0.f;
      if (row < p.rows && c < p.out) {
        const int64_t o = row * p.out + c;
        v = static_cast<float>(grad_out[o]);
        if (p.out_act != kActNone) {
          v = round_to<T>(act_backward<T>(p.out_act, static_cast<float>(out_preact[o]), v,
                                          p.out_a, p.out_b));
        }
        if (delta_last != nullptr) delta_last[o] = static_cast<T>(v);
      }
      stage[r * p.stage_ld + c] = static_cast<T>(v);
    }
    __syncwarp();
    uint32_t a[W / 16][4];
#pragma unroll
    for (int kc = 0; kc < W / 16; ++kc) {
      if (kc * 16 < p.out_pad) {
        load_a_frag(a[kc], stage, p.stage_ld, kc, g, t);
      } else {
        a[kc][0] = a[kc][1] = a[kc][2] = a[kc][3] = 0u;
      }
    }
    __syncwarp();

    for (int l = p.layers - 1; l >= 0; --l) {
      if (l == 0 && grad_in == nullptr) break;
      // grad of a_{l-1} (16 x k_pad[l]) = delta_l (16 x n_pad[l]) W_l, W_l^T in the image
      const int nt = p.k_pad[l] / 8;
      float acc[W / 8][4];
      warp_layer<T, W>(acc, a, sw + p.w_off[l], p.n_pad[l] + kRowPad, p.n_pad[l] / 16, nt, g, t);
      if (l > 0) {
        const int64_t base = static_cast<int64_t>(l - 1) * p.rows * p.hidden;
        const T* const z = hidden.z[l - 1];
#pragma unroll
        for (int j = 0; j < W / 8; ++j) {
          if (j >= nt) break;
          const int col = mlp::acc_col(0, j, t);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int64_t row = row0 + mlp::acc_row(2 * h, g);
            float d0 = 0.f, d1 = 0.f;
            if (row < p.rows) {
              const int64_t o = base + row * p.hidden + col;
              const float z0 = static_cast<float>(z[row * p.hidden + col]);
              const float z1 = static_cast<float>(z[row * p.hidden + col + 1]);
              d0 = round_to<T>(act_backward<T>(p.act, z0, round_to<T>(acc[j][2 * h]), p.act_a,
                                               p.act_b));
              d1 = round_to<T>(act_backward<T>(p.act, z1, round_to<T>(acc[j][2 * h + 1]),
                                               p.act_a, p.act_b));
              if (deltas != nullptr) store2<T>(deltas + o, d0, d1);
              if (acts != nullptr) {
                store2<T>(acts + o, act_forward<T>(p.act, z0, p.act_a, p.act_b),
                          act_forward<T>(p.act, z1, p.act_a, p.act_b));
              }
            }
            a[j / 2][mlp::next_a_reg(j, h)] = pack2<T>(d0, d1);
          }
        }
      } else {
#pragma unroll
        for (int j = 0; j < W / 8; ++j) {
          if (j >= nt) break;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int64_t row = row0 + mlp::acc_row(2 * h, g);
            if (row >= p.rows) continue;
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int col = mlp::acc_col(e, j, t);
              if (col < p.in) grad_in[row * p.in + col] = static_cast<T>(acc[j][2 * h + e]);
            }
          }
        }
      }
    }
  }
#else
  __trap();
#endif
}

FusedArgs fused_args(const FusedPlan& plan, const FusedMlpDims& d, const MlpAct& act,
                     const MlpAct& out_act) {
  FusedArgs p{};
  p.rows = d.N;
  p.layers = plan.layers;
  p.in = static_cast<int>(d.in_features);
  p.out = static_cast<int>(d.out_features);
  p.hidden = static_cast<int>(d.hidden);
  p.kin_pad = plan.kin_pad;
  p.out_pad = plan.out_pad;
  p.stage_ld = plan.stage_ld;
  p.image_elems = plan.image_elems;
  for (int l = 0; l < plan.layers; ++l) {
    p.k_pad[l] = plan.k_pad[l];
    p.n_pad[l] = plan.n_pad[l];
    p.w_off[l] = plan.w_off[l];
    p.b_off[l] = plan.b_off[l];
  }
  p.has_bias = d.has_bias;
  p.act = act.kind;
  p.act_a = act.a;
  p.act_b = act.b;
  p.out_act = out_act.kind;
  p.out_a = out_act.a;
  p.out_b = out_act.b;
  return p;
}

// The shared-memory image of the plan, built with copies into a zeroed buffer: W_l (forward)
// or W_l^T (backward) into the top-left corner of its padded block, then the biases (forward;
// bias_list: one per layer, or empty when there are none).
Tensor build_image(const FusedPlan& plan, at::TensorList weights,
                   const std::vector<Tensor>& bias_list, bool backward,
                   const at::TensorOptions& opts) {
  Tensor image = at::zeros({plan.image_elems}, opts);
  for (int l = 0; l < plan.layers; ++l) {
    const Tensor& w = weights[l];  // (out_l, in_l)
    const int64_t rows = backward ? plan.k_pad[l] : plan.n_pad[l];
    const int64_t ld = (backward ? plan.n_pad[l] : plan.k_pad[l]) + kRowPad;
    const Tensor block = image.narrow(0, plan.w_off[l], rows * ld).view({rows, ld});
    const Tensor src = backward ? w.t() : w;
    block.narrow(0, 0, src.size(0)).narrow(1, 0, src.size(1)).copy_(src);
    if (!backward && !bias_list.empty()) {
      image.narrow(0, plan.b_off[l], w.size(0)).copy_(bias_list[l]);
    }
  }
  return image;
}

// Whether kernel has its body in the code the current device runs (a build whose code for this
// GPU is PTX of a pre-sm_80 virtual architecture has none; see gemm.cuh). Cached per device.
template <class Kernel>
bool fused_compiled(Kernel kernel, std::atomic<int> (&cache)[gemm::kMaxCachedDevices]) {
  const int device = gemm::cached_device_index();
  int v = cache[device].load(std::memory_order_relaxed);
  if (v == 0) {
    cudaFuncAttributes attr{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    v = attr.ptxVersion >= 80 ? 2 : 1;
    cache[device].store(v, std::memory_order_relaxed);
  }
  return v == 2;
}

template <class Kernel>
unsigned int fused_grid(Kernel kernel, int64_t smem, int64_t rows) {
  // The kernel's limit is the device's (the plan is checked against it), not this call's size:
  // the attribute is per kernel, and another thread launching it for a larger net in between
  // must not find it lowered.
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      gemm::max_smem_optin()));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kWarps * 32,
                                                               static_cast<size_t>(smem)));
  const int64_t cap = static_cast<int64_t>(num_sms()) * std::max(per_sm, 1);
  return static_cast<unsigned int>(std::min(mlp::row_tiles(rows), cap));
}

// Calls fn(std::integral_constant<int, W>) with the register width W (16, 32, 64 or 128) of the
// fused kernels that covers the plan's widest layer.
template <class Fn>
void with_width(int width, const Fn& fn) {
  if (width <= 16) return fn(std::integral_constant<int, 16>{});
  if (width <= 32) return fn(std::integral_constant<int, 32>{});
  if (width <= 64) return fn(std::integral_constant<int, 64>{});
  return fn(std::integral_constant<int, 128>{});
}

template <class T>
constexpr bool kTensorCoreType =
    std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;

// The plan of the fused kernels for this MLP on the current device; plan.fused false when the
// layer-by-layer path must run it.
template <class T, bool Backward>
FusedPlan fused_plan(const FusedMlpDims& d) {
  FusedPlan plan;
  if constexpr (kTensorCoreType<T>) {
    if (compute_capability() < 80) return plan;
    plan = mlp::plan_fused_mlp(d.in_features, d.hidden, d.out_features, d.layers, sizeof(T),
                               Backward, gemm::max_smem_optin());
    if (!plan.fused) return plan;
    with_width(plan.width, [&](auto w) {
      static std::atomic<int> cache[gemm::kMaxCachedDevices];
      constexpr int W = decltype(w)::value;
      if constexpr (Backward) plan.fused = fused_compiled(mlp_backward_kernel<T, W>, cache);
      else plan.fused = fused_compiled(mlp_forward_kernel<T, W>, cache);
    });
  }
  return plan;
}

// ---- layer-by-layer path: epilogues of gemm.cuh ---------------------------------------------

// out[row, col] = act(z), z = round(v + bias[col]), also to preact when set; pitch ld.
template <class T>
struct LayerForwardEpilogue {
  using Acc = acc_t<T>;
  T* out;
  T* preact;  // or null
  int64_t ld;
  const T* bias;  // or null
  int kind;
  double a, b;
  __device__ __forceinline__ void operator()(int64_t row, int64_t col, Acc v) const {
    if (bias != nullptr) v += static_cast<Acc>(bias[col]);
    const Acc z = round_to<T>(v);
    const int64_t o = row * ld + col;
    if (preact != nullptr) preact[o] = static_cast<T>(z);
    out[o] = static_cast<T>(act_forward<T>(kind, z, a, b));
  }
};

// v: the gradient of a_{l-1}; delta_{l-1} = round(act'(z) round(v)) and, when act_out is set,
// act_out = act(z), the input of layer l that its weight gradient needs; pitch ld.
template <class T>
struct LayerBackwardEpilogue {
  using Acc = acc_t<T>;
  const T* z;
  T* delta;
  T* act_out;  // or null
  int64_t ld;
  int kind;
  double a, b;
  __device__ __forceinline__ void operator()(int64_t row, int64_t col, Acc v) const {
    const int64_t o = row * ld + col;
    const Acc zv = static_cast<Acc>(z[o]);
    delta[o] = static_cast<T>(act_backward<T>(kind, zv, round_to<T>(v), a, b));
    if (act_out != nullptr) act_out[o] = static_cast<T>(act_forward<T>(kind, zv, a, b));
  }
};

template <class T>
struct StoreEpilogue {
  T* out;
  int64_t ld;
  __device__ __forceinline__ void operator()(int64_t row, int64_t col, acc_t<T> v) const {
    out[row * ld + col] = static_cast<T>(v);
  }
};

// delta = round(out_act'(z) g), elementwise over n contiguous values.
template <class T>
__global__ void __launch_bounds__(kThreads)
    output_delta_kernel(const T* __restrict__ g, const T* __restrict__ z, T* __restrict__ delta,
                        int64_t n, int kind, double a, double b) {
  using Acc = acc_t<T>;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    delta[i] = static_cast<T>(
        act_backward<T>(kind, static_cast<Acc>(z[i]), static_cast<Acc>(g[i]), a, b));
  }
}

template <class T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.const_data_ptr<T>() : nullptr;
}

// ---- forward ---------------------------------------------------------------------------------

std::tuple<Tensor, std::vector<Tensor>, Tensor> fused_mlp_forward(
    const Tensor& input, at::TensorList weights, const c10::List<std::optional<Tensor>>& biases,
    c10::string_view activation, c10::string_view output_activation, bool save_for_backward) {
  const char* op = "fastops.fused_mlp";
  const std::string act_name(activation), out_act_name(output_activation);
  const FusedMlpDims d = check_fused_mlp(op, input, weights, biases);
  check_fused_mlp_activations(op, act_name, out_act_name);
  const std::vector<Tensor> bias_list = fused_mlp_biases(biases);
  const MlpAct act = mlp_act(act_name), out_act = mlp_act(out_act_name);
  KernelScope scope(input);
  const auto opts = input.options();
  Tensor out = at::empty({d.N, d.out_features}, opts);
  std::vector<Tensor> hidden;
  if (save_for_backward)
    for (int64_t l = 0; l + 1 < d.layers; ++l) hidden.push_back(at::empty({d.N, d.hidden}, opts));
  Tensor out_preact = save_for_backward && out_act.kind != kActNone
                          ? at::empty({d.N, d.out_features}, opts)
                          : at::empty({0}, opts);
  if (d.N == 0) return {out, hidden, out_preact};
  const Tensor x = input.contiguous();

  FO_DISPATCH_FLOATING(input.scalar_type(), [&] {
    using T = scalar_t;
    std::vector<T*> hid(d.layers, nullptr);  // z_l, or null when not saved
    for (size_t l = 0; l < hidden.size(); ++l) hid[l] = hidden[l].mutable_data_ptr<T>();
    T* const zo = out_preact.numel() > 0 ? out_preact.mutable_data_ptr<T>() : nullptr;
    const FusedPlan plan = fused_plan<T, false>(d);
    if constexpr (kTensorCoreType<T>) {
      if (plan.fused) {
        const Tensor image = build_image(plan, weights, bias_list, false, opts);
        const FusedArgs p = fused_args(plan, d, act, out_act);
        const T* xp = x.const_data_ptr<T>();
        const bool vec_x = d.in_features % 8 == 0 && aligned16(xp);
        HiddenPtrs<T> hz{};
        for (int l = 0; l < plan.layers; ++l) hz.z[l] = hid[l];
        with_width(plan.width, [&](auto w) {
          auto kernel = mlp_forward_kernel<T, decltype(w)::value>;
          const unsigned int grid = fused_grid(kernel, plan.smem_bytes, d.N);
          kernel<<<grid, kWarps * 32, plan.smem_bytes, scope.stream>>>(
              xp, out.mutable_data_ptr<T>(), hz, zo, image.const_data_ptr<T>(), p, vec_x);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        return;
      }
    }
    // layer by layer: a_l in one of two buffers, z_l straight into its tensor of `hidden`
    Tensor bufs[2];
    const T* a_prev = x.const_data_ptr<T>();
    for (int64_t l = 0; l < d.layers; ++l) {
      const Tensor w = weights[l].contiguous();
      const Tensor bias = d.has_bias ? bias_list[l].contiguous() : Tensor();
      const int64_t K = w.size(1), N = w.size(0);
      const bool last = l == d.layers - 1;
      Tensor& buf = bufs[l % 2];
      if (!last && !buf.defined()) buf = at::empty({d.N, d.hidden}, opts);
      T* const preact = last ? zo : hid[l];
      LayerForwardEpilogue<T> epi{last ? out.mutable_data_ptr<T>() : buf.mutable_data_ptr<T>(),
                                  preact,
                                  N,
                                  ptr_or_null<T>(bias),
                                  last ? out_act.kind : act.kind,
                                  last ? out_act.a : act.a,
                                  last ? out_act.b : act.b};
      gemm::gemm<T, true, true>(d.N, N, K, Operand<T>{a_prev, K},
                                Operand<T>{w.const_data_ptr<T>(), K}, epi, scope.stream);
      if (!last) a_prev = buf.const_data_ptr<T>();
    }
  });
  return {out, hidden, out_preact};
}

// ---- backward --------------------------------------------------------------------------------

// grad_W_l = delta_l^T a_prev and grad_b_l = delta_l^T 1 (rows: the reduction), as wanted.
template <class T>
void layer_param_grads(const KernelScope& scope, const FusedMlpDims& d, const T* delta, int64_t N,
                       const T* a_prev, int64_t K, const T* ones, Tensor& grad_w,
                       Tensor& grad_b) {
  if (grad_w.defined() && grad_w.numel() > 0) {
    gemm::gemm<T, false, false>(N, K, d.N, Operand<T>{delta, N}, Operand<T>{a_prev, K},
                                StoreEpilogue<T>{grad_w.mutable_data_ptr<T>(), K}, scope.stream);
  }
  if (grad_b.defined() && grad_b.numel() > 0) {
    gemm::gemm<T, false, false>(N, 1, d.N, Operand<T>{delta, N}, Operand<T>{ones, 1},
                                StoreEpilogue<T>{grad_b.mutable_data_ptr<T>(), 1}, scope.stream);
  }
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> fused_mlp_backward(
    const Tensor& grad_output, const Tensor& input, at::TensorList weights,
    const c10::List<std::optional<Tensor>>& biases, at::TensorList hidden,
    const Tensor& out_preact, c10::string_view activation, c10::string_view output_activation,
    std::array<bool, 3> output_mask) {
  const char* op = "fastops.fused_mlp_backward";
  const std::string act_name(activation), out_act_name(output_activation);
  const FusedMlpDims d = check_fused_mlp(op, input, weights, biases);
  check_fused_mlp_activations(op, act_name, out_act_name);
  check_fused_mlp_backward(op, d, input, grad_output, hidden, out_preact, out_act_name);
  const MlpAct act = mlp_act(act_name), out_act = mlp_act(out_act_name);

  KernelScope scope(input);
  const auto opts = input.options();
  Tensor grad_in = output_mask[0] ? at::empty({d.N, d.in_features}, opts) : at::empty({0}, opts);
  std::vector<Tensor> grad_w, grad_b;  // distinct empty tensors where not wanted (no aliasing)
  for (int64_t l = 0; l < d.layers; ++l) {
    grad_w.push_back(output_mask[1] ? at::empty(weights[l].sizes(), opts) : at::empty({0}, opts));
    grad_b.push_back(output_mask[2] && d.has_bias ? at::empty({weights[l].size(0)}, opts)
                                                  : at::empty({0}, opts));
  }
  const bool any = output_mask[0] || output_mask[1] || (output_mask[2] && d.has_bias);
  if (!any) return {grad_in, grad_w, grad_b};

  const bool want_params = output_mask[1] || (output_mask[2] && d.has_bias);
  const Tensor g = grad_output.contiguous();
  const Tensor x = input.contiguous();
  std::vector<Tensor> z;  // z_l of the hidden layers
  for (const Tensor& h : hidden) z.push_back(h.contiguous());
  const Tensor zo = out_act.kind != kActNone ? out_preact.contiguous() : Tensor();
  const Tensor ones = output_mask[2] && d.has_bias ? at::ones({d.N, 1}, opts) : Tensor();

  FO_DISPATCH_FLOATING(input.scalar_type(), [&] {
    using T = scalar_t;
    if (d.N == 0) {  // sums over no rows
      for (auto& t : grad_w) t.zero_();
      for (auto& t : grad_b) t.zero_();
      return;
    }
    const T* onesp = ptr_or_null<T>(ones);
    const FusedPlan plan = fused_plan<T, true>(d);
    if constexpr (kTensorCoreType<T>) {
      if (plan.fused) {
        // every delta_l and a_{l-1} to scratch, then the parameter GEMMs
        Tensor deltas, acts, delta_last;
        if (want_params) {
          deltas = at::empty({d.layers - 1, d.N, d.hidden}, opts);
          delta_last = at::empty({d.N, d.out_features}, opts);
        }
        if (output_mask[1]) acts = at::empty({d.layers - 1, d.N, d.hidden}, opts);
        const Tensor image = build_image(plan, weights, {}, true, opts);
        const FusedArgs p = fused_args(plan, d, act, out_act);
        auto data_or_null = [](Tensor& t) -> T* {
          return t.defined() && t.numel() > 0 ? t.mutable_data_ptr<T>() : nullptr;
        };
        T* const dp = data_or_null(deltas);
        T* const ap = data_or_null(acts);
        T* const dl = data_or_null(delta_last);
        HiddenPtrs<const T> hz{};
        for (size_t l = 0; l < z.size(); ++l) hz.z[l] = z[l].const_data_ptr<T>();
        with_width(plan.width, [&](auto w) {
          auto kernel = mlp_backward_kernel<T, decltype(w)::value>;
          const unsigned int grid = fused_grid(kernel, plan.smem_bytes, d.N);
          kernel<<<grid, kWarps * 32, plan.smem_bytes, scope.stream>>>(
              g.const_data_ptr<T>(), hz, ptr_or_null<T>(zo),
              output_mask[0] ? grad_in.mutable_data_ptr<T>() : nullptr, dp, dl, ap,
              image.const_data_ptr<T>(), p);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        if (!want_params) return;
        for (int64_t l = 0; l < d.layers; ++l) {
          const bool last = l == d.layers - 1;
          const T* delta = last ? dl : dp + l * d.N * d.hidden;
          const T* a_prev =
              l == 0 ? x.const_data_ptr<T>()
                     : (ap != nullptr ? ap + (l - 1) * d.N * d.hidden : nullptr);
          layer_param_grads<T>(scope, d, delta, weights[l].size(0), a_prev, weights[l].size(1),
                               onesp, grad_w[l], grad_b[l]);
        }
        return;
      }
    }

    // layer by layer, in reverse: delta_l in one of two buffers (delta_{L-1} may be
    // grad_output itself), a_{l-1} recomputed from z_{l-1} in the grad_a GEMM's epilogue
    const T* delta = g.const_data_ptr<T>();
    Tensor delta_out;
    if (out_act.kind != kActNone) {
      delta_out = at::empty({d.N, d.out_features}, opts);
      const int64_t n = d.N * d.out_features;
      if (n > 0) {
        output_delta_kernel<T><<<grid_for(n, kThreads), kThreads, 0, scope.stream>>>(
            delta, zo.const_data_ptr<T>(), delta_out.mutable_data_ptr<T>(), n, out_act.kind,
            out_act.a, out_act.b);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      delta = delta_out.const_data_ptr<T>();
    }
    Tensor bufs[2];
    const Tensor a_buf = d.layers > 1 && output_mask[1] ? at::empty({d.N, d.hidden}, opts)
                                                        : Tensor();
    for (int64_t l = d.layers - 1; l >= 0; --l) {
      const Tensor w = weights[l].contiguous();
      const int64_t K = w.size(1), N = w.size(0);
      const T* a_prev = x.const_data_ptr<T>();
      const T* next = nullptr;
      if (l > 0) {
        Tensor& buf = bufs[l % 2];
        if (!buf.defined()) buf = at::empty({d.N, d.hidden}, opts);
        T* const ap = a_buf.defined() ? a_buf.mutable_data_ptr<T>() : nullptr;
        LayerBackwardEpilogue<T> epi{z[l - 1].const_data_ptr<T>(),
                                     buf.mutable_data_ptr<T>(),
                                     ap,
                                     K,
                                     act.kind,
                                     act.a,
                                     act.b};
        gemm::gemm<T, true, false>(d.N, K, N, Operand<T>{delta, N},
                                   Operand<T>{w.const_data_ptr<T>(), K}, epi, scope.stream);
        a_prev = ap;
        next = buf.const_data_ptr<T>();
      } else if (output_mask[0]) {
        gemm::gemm<T, true, false>(d.N, K, N, Operand<T>{delta, N},
                                   Operand<T>{w.const_data_ptr<T>(), K},
                                   StoreEpilogue<T>{grad_in.mutable_data_ptr<T>(), K},
                                   scope.stream);
      }
      layer_param_grads<T>(scope, d, delta, N, a_prev, K, onesp, grad_w[l], grad_b[l]);
      delta = next;
    }
  });
  return {grad_in, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CUDA, m) {
  m.impl("fused_mlp", &fused_mlp_forward);
  m.impl("fused_mlp_backward", &fused_mlp_backward);
}

}  // namespace gpu
}  // namespace fastops

#undef FO_MLP_SM80
