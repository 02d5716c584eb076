// CUDA kernels of linear and the fused linear + activation, on the GEMM of gemm.cuh. Same
// semantics as csrc/cpu/linear.cpp:
//
//   forward:  z = x W^T + b, y = act(z) applied in the GEMM epilogue as each tile is written
//             (z rounded to the storage dtype first; maxout: z is written, then reduced over
//             groups of pool_size output features by the maxout kernel)
//   backward: one elementwise pass computes grad_z = act'(z) * grad_y (maxout: grad_y routed to
//             the first maximum of its group) and per-(row block, column) partial sums of
//             grad_z (the bias gradient) and of the PReLU slope gradient; a second pass adds the
//             partials of each column in block order. Then grad_input = grad_z W and
//             grad_weight = grad_z^T x, two GEMMs reading grad_z in place.
// No atomics: the row blocks depend on the shapes only and every sum has a fixed order, so the
// results are bitwise reproducible.
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <type_traits>

#include "../linear_checks.h"
#include "cuda_common.cuh"
#include "gemm.cuh"
#include "pointwise_switch.cuh"

namespace fastops {
namespace gpu {

namespace {

using at::Tensor;
using gemm::Operand;

// The activation of the epilogue: a pointwise activation's number (pointwise_switch.cuh), or one
// of these.
constexpr int kActIdentity = kActNone;
constexpr int kActPrelu = -2;

// out[row, col] = act(round(v + bias[col])) and, when preact is set, preact[row, col] =
// round(v + bias[col]); row-major with leading dimension ld.
template <class T>
struct LinearEpilogue {
  using Acc = acc_t<T>;
  T* out;
  T* preact;          // or null
  int64_t ld;
  const T* bias;      // N values, or null
  const T* slope;     // PReLU slopes, or null
  int64_t slope_step; // 0: one slope shared by every feature, 1: one per feature
  int kind;           // PointwiseKind, kActIdentity or kActPrelu
  double a, b;

  __device__ __forceinline__ void operator()(int64_t row, int64_t col, Acc v) const {
    if (bias != nullptr) v += static_cast<Acc>(bias[col]);
    const Acc z = round_to<T>(v);
    const int64_t o = row * ld + col;
    if (preact != nullptr) preact[o] = static_cast<T>(z);
    Acc y;
    if (kind == kActIdentity) y = z;
    else if (kind == kActPrelu) y = Prelu{}.forward(z, static_cast<Acc>(slope[col * slope_step]));
    else y = act_forward<T>(kind, z, a, b);
    out[o] = static_cast<T>(y);
  }
};

// out[row, col] = v: the backward GEMMs.
template <class T>
struct StoreEpilogue {
  T* out;
  int64_t ld;
  __device__ __forceinline__ void operator()(int64_t row, int64_t col, acc_t<T> v) const {
    out[row * ld + col] = static_cast<T>(v);
  }
};

template <class T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

Tensor contiguous_or_undefined(const c10::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : Tensor();
}

// ---- forward ------------------------------------------------------------------------------------

// z = x W^T + b and y = act(z); returns (y, z or empty).
std::tuple<Tensor, Tensor> linear_act_impl(const char* op, const Tensor& input,
                                           const Tensor& weight,
                                           const c10::optional<Tensor>& bias, const ActInfo& act,
                                           const std::string& activation, double a, double b,
                                           const c10::optional<Tensor>& act_weight,
                                           bool save_preact, bool plain) {
  const LinearDims d = check_linear(op, input, weight, bias);
  KernelScope scope(input);
  const Tensor x = input.reshape({d.M, d.K}).contiguous();
  const Tensor w = weight.contiguous();
  const Tensor bc = contiguous_or_undefined(bias);
  const Tensor slopes = act.kind == ActKind::prelu ? contiguous_or_undefined(act_weight) : Tensor();
  Tensor preact = save_preact ? at::empty({d.M, d.N}, input.options())
                              : at::empty({0}, input.options());
  // The GEMM writes z: the output itself, or for maxout the pre-activation that the maxout
  // kernel then reduces.
  Tensor z = act.kind != ActKind::maxout ? at::empty({d.M, act.features}, input.options())
             : save_preact               ? preact
                                         : at::empty({d.M, d.N}, input.options());
  int kind = kActIdentity;
  if (!plain && act.kind == ActKind::prelu) kind = kActPrelu;
  if (!plain && act.kind == ActKind::pointwise) kind = static_cast<int>(pointwise_kind(activation));

  FO_DISPATCH_FLOATING(input.scalar_type(), [&] {
    using T = scalar_t;
    LinearEpilogue<T> epi{z.mutable_data_ptr<T>(),
                          save_preact && act.kind != ActKind::maxout && !plain
                              ? preact.mutable_data_ptr<T>()
                              : nullptr,
                          d.N,
                          ptr_or_null<T>(bc),
                          ptr_or_null<T>(slopes),
                          slopes.defined() && slopes.numel() != 1 ? 1 : 0,
                          kind,
                          a,
                          b};
    gemm::gemm<T, true, true>(d.M, d.N, d.K, Operand<T>{x.const_data_ptr<T>(), d.K},
                              Operand<T>{w.const_data_ptr<T>(), d.K}, epi, scope.stream);
  });
  const Tensor out = act.kind == ActKind::maxout ? maxout_forward(z, act.pool) : z;
  return {out.view(with_last_dim(input, act.features)),
          save_preact ? preact.view(with_last_dim(input, d.N)) : preact};
}

Tensor linear_forward(const Tensor& input, const Tensor& weight,
                      const c10::optional<Tensor>& bias) {
  const ActInfo act{ActKind::pointwise, 1, weight.dim() == 2 ? weight.size(0) : 0};
  return std::get<0>(linear_act_impl("fastops.linear", input, weight, bias, act, "", 0, 0,
                                     c10::nullopt, false, true));
}

std::tuple<Tensor, Tensor> linear_act_forward(const Tensor& input, const Tensor& weight,
                                              const c10::optional<Tensor>& bias,
                                              c10::string_view activation, double a, double b,
                                              const c10::optional<Tensor>& act_weight,
                                              bool save_preact) {
  const char* op = "fastops.linear_act";
  const std::string name(activation);
  check_linear(op, input, weight, bias);
  const ActInfo act = check_activation(op, name, a, weight.size(0), input, act_weight);
  return linear_act_impl(op, input, weight, bias, act, name, a, b, act_weight, save_preact,
                         false);
}

// ---- backward: grad_z and the column sums -------------------------------------------------------

enum class GradMode { plain, pointwise, prelu, maxout };

template <class T>
struct GradZArgs {
  using Acc = acc_t<T>;
  const T* g;         // grad_output, M x G, contiguous
  const T* z;         // pre-activation, M x N, contiguous (unused in plain mode)
  T* gz;              // grad_z, M x N, or null when no GEMM needs it
  const T* slope;     // PReLU slopes
  int64_t slope_step; // 0 or 1
  int kind;           // PointwiseKind
  double a, b;
  int64_t pool;       // maxout
  int64_t M, N, G;
  int64_t rows_per_block;
  Acc* part;          // [row blocks][nslots]: grad_z column sums, then the PReLU slope sums
  int64_t nslots;
};

constexpr int kColTile = 32;  // columns of a reduction block (one per lane)
constexpr int kRowLanes = 8;  // warps of a reduction block, striding over its rows

// Block (blockIdx.x, blockIdx.y) covers columns [32 x, 32 x + 32) and rows
// [y * rows_per_block, ...): each thread walks one column with stride 8 rows, then the 8 sums of
// a column are added in warp order. Plain mode: grad_z is grad_output, only summed.
template <class T, GradMode Mode>
__global__ void __launch_bounds__(kColTile * kRowLanes)
    grad_z_kernel(GradZArgs<T> p) {
  using Acc = acc_t<T>;
  __shared__ Acc sums[2][kRowLanes][kColTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColTile + tx;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * p.rows_per_block;
  const int64_t r_end = r_begin + p.rows_per_block < p.M ? r_begin + p.rows_per_block : p.M;
  Acc sb = 0, sw = 0;
  if (col < p.N) {
    Acc slope = 0;
    if constexpr (Mode == GradMode::prelu) slope = static_cast<Acc>(p.slope[col * p.slope_step]);
    int64_t grp = 0, pos = 0;
    if constexpr (Mode == GradMode::maxout) {
      grp = col / p.pool;
      pos = col - grp * p.pool;
    }
    for (int64_t r = r_begin + ty; r < r_end; r += kRowLanes) {
      const int64_t o = r * p.N + col;
      T v;
      if constexpr (Mode == GradMode::plain) {
        v = p.g[o];
      } else if constexpr (Mode == GradMode::pointwise) {
        v = static_cast<T>(act_backward<T>(p.kind, static_cast<Acc>(p.z[o]),
                                           static_cast<Acc>(p.g[o]), p.a, p.b));
      } else if constexpr (Mode == GradMode::prelu) {
        const Acc zv = static_cast<Acc>(p.z[o]), gv = static_cast<Acc>(p.g[o]);
        v = static_cast<T>(Prelu{}.backward(zv, slope, gv));
        sw += Prelu{}.weight_grad(zv, gv);
      } else {  // maxout: the first maximum of the group takes the gradient (NaN wins)
        const T* zr = p.z + r * p.N + grp * p.pool;
        int64_t arg = 0;
        Acc best = static_cast<Acc>(zr[0]);
        for (int64_t t = 1; t < p.pool; ++t) {
          const Acc c = static_cast<Acc>(zr[t]);
          if (maxout_takes(c, best)) {
            best = c;
            arg = t;
          }
        }
        v = arg == pos ? p.g[r * p.G + grp] : static_cast<T>(0);
      }
      if constexpr (Mode != GradMode::plain) {
        if (p.gz != nullptr) p.gz[o] = v;
      }
      sb += static_cast<Acc>(v);
    }
  }
  sums[0][ty][tx] = sb;
  sums[1][ty][tx] = sw;
  __syncthreads();
  if (ty == 0 && col < p.N) {
    Acc tb = 0, tw = 0;
#pragma unroll
    for (int i = 0; i < kRowLanes; ++i) {
      tb += sums[0][i][tx];
      tw += sums[1][i][tx];
    }
    Acc* out = p.part + static_cast<int64_t>(blockIdx.y) * p.nslots;
    out[col] = tb;
    if constexpr (Mode == GradMode::prelu) out[p.N + col] = tw;
  }
}

// Adds the row-block partials of every slot in block order; writes slot n to dst[n] for the
// first `n_out` slots starting at `first`.
template <class T>
__global__ void sum_partials_kernel(const acc_t<T>* part, int64_t blocks, int64_t nslots,
                                    int64_t first, int64_t n_out, T* dst) {
  using Acc = acc_t<T>;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < n_out;
       n += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Acc t = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) t += part[blk * nslots + first + n];
    dst[n] = static_cast<T>(t);
  }
}

// One block: the total of slots [first, first + n) over every row block (the gradient of a
// PReLU slope shared by every feature). Column totals in block order, then a fixed tree.
template <class T>
__global__ void total_partials_kernel(const acc_t<T>* part, int64_t blocks, int64_t nslots,
                                      int64_t first, int64_t n, T* dst) {
  using Acc = acc_t<T>;
  __shared__ Acc scratch[32];
  Acc s = 0;
  for (int64_t c = threadIdx.x; c < n; c += blockDim.x) {
    Acc t = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) t += part[blk * nslots + first + c];
    s += t;
  }
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) dst[0] = static_cast<T>(s);
}

// Row blocks of the column sums: a function of M and N only (determinism), with enough blocks
// to fill the GPU and few enough partials to keep the second pass short.
int64_t rows_per_block(int64_t M, int64_t N) {
  const int64_t col_blocks = (N + kColTile - 1) / kColTile;
  int64_t blocks = (M + 63) / 64;
  const int64_t cap = std::max<int64_t>(16, 4096 / std::max<int64_t>(1, col_blocks));
  blocks = std::max<int64_t>(1, std::min<int64_t>({blocks, cap, 65535}));
  return std::max<int64_t>(1, (M + blocks - 1) / blocks);
}

struct GradZOut {
  Tensor grad_bias;        // (N,) or empty
  Tensor grad_act_weight;  // the shape of act_weight, or empty
};

// Runs grad_z_kernel in `Mode` and the reductions that the mask asks for.
template <class T, GradMode Mode>
GradZOut run_grad_z(const KernelScope& scope, GradZArgs<T> p, bool want_bias,
                    const Tensor& act_weight, bool want_act_weight, const Tensor& like) {
  using Acc = acc_t<T>;
  GradZOut r;
  const auto opts = like.options();
  const auto acc_opts = opts.dtype(std::is_same_v<Acc, double> ? at::kDouble : at::kFloat);
  const bool slope_sums = Mode == GradMode::prelu && want_act_weight;
  p.rows_per_block = rows_per_block(p.M, p.N);
  const int64_t row_blocks = p.M == 0 ? 1 : (p.M + p.rows_per_block - 1) / p.rows_per_block;
  p.nslots = Mode == GradMode::prelu ? 2 * p.N : p.N;
  // partial sums: written whenever the kernel runs, read only for what the mask asks
  const Tensor part = at::empty({row_blocks * p.nslots}, acc_opts);
  p.part = part.mutable_data_ptr<Acc>();
  if (p.N > 0 && (want_bias || slope_sums || p.gz != nullptr)) {
    const dim3 grid(static_cast<unsigned int>((p.N + kColTile - 1) / kColTile),
                    static_cast<unsigned int>(row_blocks));
    grad_z_kernel<T, Mode><<<grid, dim3(kColTile, kRowLanes), 0, scope.stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (want_bias) {
    r.grad_bias = at::empty({p.N}, opts);
    if (p.N > 0) {
      sum_partials_kernel<T><<<grid_for(p.N, kThreads), kThreads, 0, scope.stream>>>(
          p.part, row_blocks, p.nslots, 0, p.N, r.grad_bias.mutable_data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  if (slope_sums) {
    r.grad_act_weight = at::empty(act_weight.sizes(), opts);
    T* dst = r.grad_act_weight.mutable_data_ptr<T>();
    if (act_weight.numel() == 1) {
      // N == 0: no columns, the total is 0
      total_partials_kernel<T><<<1, kThreads, 0, scope.stream>>>(p.part, row_blocks, p.nslots,
                                                                  p.N, p.N, dst);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (p.N > 0) {
      sum_partials_kernel<T><<<grid_for(p.N, kThreads), kThreads, 0, scope.stream>>>(
          p.part, row_blocks, p.nslots, p.N, p.N, dst);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  return r;
}

// grad_input = gz W (M x K) and grad_weight = gz^T x (N x K); gz is M x N contiguous.
template <class T>
void linear_grads(const KernelScope& scope, const T* gz, const Tensor& x, const Tensor& w,
                  const LinearDims& d, Tensor& grad_input, Tensor& grad_weight) {
  if (grad_input.numel() > 0) {  // A = gz k-major (ld N), B = W mn-major (ld K)
    T* gi = grad_input.mutable_data_ptr<T>();
    gemm::gemm<T, true, false>(d.M, d.K, d.N, Operand<T>{gz, d.N},
                               Operand<T>{w.const_data_ptr<T>(), d.K}, StoreEpilogue<T>{gi, d.K},
                               scope.stream);
  }
  if (grad_weight.numel() > 0) {  // A = gz^T mn-major (ld N), B = x mn-major (ld K)
    T* gw = grad_weight.mutable_data_ptr<T>();
    gemm::gemm<T, false, false>(d.N, d.K, d.M, Operand<T>{gz, d.N},
                                Operand<T>{x.const_data_ptr<T>(), d.K}, StoreEpilogue<T>{gw, d.K},
                                scope.stream);
  }
}

std::tuple<Tensor, Tensor, Tensor> linear_backward(const Tensor& grad_output, const Tensor& input,
                                                   const Tensor& weight,
                                                   std::array<bool, 3> output_mask) {
  const char* op = "fastops.linear_backward";
  const LinearDims d = check_linear(op, input, weight, c10::nullopt);
  check_grad_output(op, grad_output, input, d.N);
  KernelScope scope(input);
  const auto opts = input.options();
  Tensor gi = output_mask[0] ? at::empty(input.sizes(), opts) : at::empty({0}, opts);
  Tensor gw = output_mask[1] ? at::empty({d.N, d.K}, opts) : at::empty({0}, opts);
  Tensor gb = at::empty({0}, opts);
  if (!output_mask[0] && !output_mask[1] && !output_mask[2]) return {gi, gw, gb};
  const Tensor g = grad_output.reshape({d.M, d.N}).contiguous();
  const Tensor x = output_mask[1] ? input.reshape({d.M, d.K}).contiguous() : Tensor();
  const Tensor w = output_mask[0] ? weight.contiguous() : Tensor();
  FO_DISPATCH_FLOATING(input.scalar_type(), [&] {
    using T = scalar_t;
    if (output_mask[2]) {
      GradZArgs<T> p{};
      p.g = g.const_data_ptr<T>();
      p.M = d.M;
      p.N = d.N;
      p.G = d.N;
      gb = run_grad_z<T, GradMode::plain>(scope, p, true, Tensor(), false, input).grad_bias;
    }
    linear_grads<T>(scope, g.const_data_ptr<T>(), x, w, d, gi, gw);
  });
  return {gi, gw, gb};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_act_backward(
    const Tensor& grad_output, const Tensor& input, const Tensor& weight, const Tensor& preact,
    c10::string_view activation, double a, double b, const c10::optional<Tensor>& act_weight,
    std::array<bool, 4> output_mask) {
  const char* op = "fastops.linear_act_backward";
  const std::string name(activation);
  const LinearDims d = check_linear(op, input, weight, c10::nullopt);
  const ActInfo act = check_activation(op, name, a, d.N, input, act_weight);
  check_grad_output(op, grad_output, input, act.features);
  check_preact(op, preact, input, d.N);

  const auto opts = input.options();
  Tensor gi = output_mask[0] ? at::empty(input.sizes(), opts) : at::empty({0}, opts);
  Tensor gw = output_mask[1] ? at::empty({d.N, d.K}, opts) : at::empty({0}, opts);
  Tensor gb = at::empty({0}, opts);
  Tensor gaw = at::empty({0}, opts);
  if (!output_mask[0] && !output_mask[1] && !output_mask[2] && !output_mask[3])
    return {gi, gw, gb, gaw};

  KernelScope scope(input);
  const Tensor g = grad_output.contiguous();
  const Tensor z = preact.contiguous();
  const bool need_gz = output_mask[0] || output_mask[1];
  Tensor gz = at::empty({need_gz ? d.M : 0, d.N}, opts);
  const Tensor x = output_mask[1] ? input.reshape({d.M, d.K}).contiguous() : Tensor();
  const Tensor w = output_mask[0] ? weight.contiguous() : Tensor();
  const Tensor slopes = act.kind == ActKind::prelu ? act_weight->contiguous() : Tensor();
  const bool want_aw = output_mask[3] && act.kind == ActKind::prelu;

  FO_DISPATCH_FLOATING(input.scalar_type(), [&] {
    using T = scalar_t;
    GradZArgs<T> p{};
    p.g = g.const_data_ptr<T>();
    p.z = z.const_data_ptr<T>();
    p.gz = need_gz ? gz.mutable_data_ptr<T>() : nullptr;
    p.M = d.M;
    p.N = d.N;
    p.G = act.features;
    p.a = a;
    p.b = b;
    GradZOut r;
    if (act.kind == ActKind::pointwise) {
      p.kind = static_cast<int>(pointwise_kind(name));
      r = run_grad_z<T, GradMode::pointwise>(scope, p, output_mask[2], Tensor(), false, input);
    } else if (act.kind == ActKind::prelu) {
      p.slope = slopes.const_data_ptr<T>();
      p.slope_step = slopes.numel() == 1 ? 0 : 1;
      r = run_grad_z<T, GradMode::prelu>(scope, p, output_mask[2], slopes, want_aw, input);
    } else {
      p.pool = act.pool;
      r = run_grad_z<T, GradMode::maxout>(scope, p, output_mask[2], Tensor(), false, input);
    }
    if (output_mask[2]) gb = r.grad_bias;
    if (want_aw) gaw = r.grad_act_weight;
    if (need_gz) linear_grads<T>(scope, gz.const_data_ptr<T>(), x, w, d, gi, gw);
  });
  return {gi, gw, gb, gaw};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CUDA, m) {
  m.impl("linear", &linear_forward);
  m.impl("linear_backward", &linear_backward);
  m.impl("linear_act", &linear_act_forward);
  m.impl("linear_act_backward", &linear_act_backward);
}

}  // namespace gpu
}  // namespace fastops
