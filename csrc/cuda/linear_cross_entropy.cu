// CUDA kernels of the fused linear + cross entropy: loss = cross_entropy(input W^T + b) without
// the N x V logits in memory. Same semantics as the CPU kernel (class indices or probabilities,
// class weights, ignore_index, label smoothing, z-loss, soft cap; see the op's schema).
//
// Row chunking on the project's GEMM (gemm.cuh), as Liger-Kernel's fused linear cross entropy:
// the N rows are cut into chunks of `rows` rows (lce_plan.h: a fixed budget of float logits,
// a function of the shape and dtype only), and for each chunk, in order, on the current stream:
//   1. z = x_c W^T + b (then softcap * tanh(z / softcap)) into a float (double) scratch
//      [rows, V], by the GEMM with the bias / soft cap in its epilogue;
//   2. one block per row: log-sum-exp (online max and sum of exponentials), the row loss, lse,
//      and when a gradient is wanted G = dloss/dz_raw in place of the logits (16-bit inputs:
//      into a second scratch in the storage dtype, which the tensor-core GEMMs read); for 'mean'
//      and 'sum' G is taken at unit scale, and step 3 applies the scalar factor (lce_grad_factor);
//   3. grad_input_c = G W (rows of the output of their own), grad_W (+)= G^T x_c into a float
//      accumulator (the weight gradient itself for float / double), grad_b (+)= column sums of
//      G, each sum times the factor in its epilogue.
// The forward with with_grad does 1-3 once (the gradients for grad_loss = 1, the mean's divisor
// known up front from the targets); the backward recomputes 1 from the saved lse and does 2-3
// for a given grad_loss. Apple's Cut Cross-Entropy keeps each logit tile on chip instead (and
// skips the tiles of negligible softmax in the backward); this chunked form is the simple,
// checkable reference a fully fused kernel would be measured against.
//
// Determinism: no atomics. Every sum has a fixed order: the row reductions a fixed tree per
// block size (a function of V), the GEMMs as gemm.cuh (fixed split-K), the weight and bias
// gradients accumulated chunk after chunk in row order, the loss and the mean's divisor summed
// by one block in float64.
//
// Class targets are checked on the device before any is used as an index: one outside [0, V)
// that is not ignore_index fails a device assertion (as torch's nll_loss and fastops'
// cross_entropy) and is never read through.
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../linear_cross_entropy_checks.h"
#include "../loss_checks.h"
#include "gemm.cuh"
#include "lce_plan.h"
#include "loss_common.cuh"

namespace fastops {

namespace gpu {
namespace {

using at::Tensor;
using gemm::Operand;
using namespace fastops::loss;

// ---- device math -----------------------------------------------------------------------------

// float: the hardware exp (about 2 ulp near 0, where the softmax terms that matter lie), as the
// cross_entropy kernels; double: libm.
__device__ __forceinline__ float dexp(float x) { return __expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }
__device__ __forceinline__ float dtanh(float x) { return tanhf(x); }
__device__ __forceinline__ double dtanh(double x) { return tanh(x); }

// Folds v into the running max m and sum s of exp(value - m). A NaN never becomes the max but
// makes the sum NaN; +inf gives exp(inf - inf) = NaN. While the max is -inf every value so far
// was -inf or NaN: shifted by 0 instead (0 or NaN, never the NaN of -inf - -inf).
template <class A>
__device__ __forceinline__ void lse_fold(A v, A& m, A& s) {
  if (v > m) {
    if (m != neg_inf<A>()) s *= dexp(m - v);
    m = v;
  }
  s += dexp(v - (m == neg_inf<A>() ? A(0) : m));
}

// Block-wide max and sums, every thread gets the result; fixed order (warp butterflies, then
// the warp results in warp order). smem: 32 * K values; reached by every thread of the block.
template <class A>
__device__ __forceinline__ A block_max(A v, A* smem) {
  v = warp_max(v);
  const int warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();  // smem may still be read by a previous call
  if ((threadIdx.x & 31) == 0) smem[warp] = v;
  __syncthreads();
  A t = smem[0];
  for (int i = 1; i < nw; ++i) t = nan_max(smem[i], t);
  return t;
}

template <int K, class A>
__device__ __forceinline__ void block_sums(A (&v)[K], A* smem) {
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  const int warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();
  if ((threadIdx.x & 31) == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) smem[warp * K + k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    A t = smem[k];
    for (int i = 1; i < nw; ++i) t += smem[i * K + k];
    v[k] = t;
  }
}

// ---- GEMM epilogues --------------------------------------------------------------------------

// z[row, col] = softcap(v + bias[col]) in the accumulation type (never rounded to 16 bits).
template <class T>
struct LogitsEpilogue {
  using A = acc_t<T>;
  A* z;
  int64_t ld;
  const T* bias;  // or null
  A softcap;      // 0: none
  __device__ __forceinline__ void operator()(int64_t row, int64_t col, A v) const {
    if (bias != nullptr) v += static_cast<A>(bias[col]);
    if (softcap > A(0)) v = softcap * dtanh(v / softcap);
    z[row * ld + col] = v;
  }
};

// out[row, col] = factor v: the rows of grad_input of one chunk (factor: lce_grad_factor's).
template <class T>
struct StoreEpilogue {
  T* out;
  int64_t ld;
  const acc_t<T>* factor;
  __device__ __forceinline__ void operator()(int64_t row, int64_t col, acc_t<T> v) const {
    out[row * ld + col] = static_cast<T>(v * *factor);
  }
};

// out[row, col] (+)= factor v: the weight gradient over the chunks. The GEMM calls the epilogue
// once per element and the chunks run one after another on one stream: no two writers ever meet.
template <class A>
struct AccumulateEpilogue {
  A* out;
  int64_t ld;
  bool add;  // false for the first chunk
  const A* factor;
  __device__ __forceinline__ void operator()(int64_t row, int64_t col, A v) const {
    const int64_t o = row * ld + col;
    v *= *factor;
    out[o] = add ? out[o] + v : v;
  }
};

// ---- the scalar factor of the gradient -------------------------------------------------------

// For 'mean' and 'sum' the chunk gradient holds the unit-scale values (the incoming gradient
// taken as 1), and the gradient GEMMs and column sums multiply their float sums by the incoming
// gradient (over the divisor for 'mean'): a 16-bit chunk gradient then neither flushes to zero
// (the mean's 1 / N times a small probability is below float16's range) nor overflows (a loss
// scale). A factor that is not finite (a mean over no weight) is folded into the rows instead,
// as the unfused ops do, so that the ignored rows keep their zero gradient. 'none' folds each
// row's own incoming gradient into its row.
template <class A>
struct GradFactor {
  A rows, sums;  // their product is the factor
};

template <class A>
__device__ __forceinline__ GradFactor<A> grad_factor(const GradIn& gi) {
  const A gn = grad_scale<A>(gi);
  return isfinite(gn) ? GradFactor<A>{A(1), gn} : GradFactor<A>{gn, A(1)};
}

template <class A>
__global__ void lce_grad_factor(GradIn gi, A* factor) {
  *factor = gi.reduction == kNone ? A(1) : grad_factor<A>(gi).sums;
}

// ---- the mean's divisor and the class weights' sum ---------------------------------------------

constexpr int kTotalsThreads = 256;

// One block. out[0]: the divisor of 'mean' (the sum of w[t] over the non-ignored class targets,
// or N for probability targets); out[1]: the sum of the class weights (V without weights).
// Checks every class target on the device before the chunks read any.
template <class T>
__global__ void __launch_bounds__(kTotalsThreads)
    lce_totals(const int64_t* tgt, int64_t N, const T* w, int64_t V, int64_t ignore_index,
               double* out) {
  __shared__ double scratch[32];
  double d = 0, ws = 0;
  if (tgt != nullptr) {
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
      const int64_t t = tgt[i];
      if (target_class(t, V, ignore_index)) d += w != nullptr ? static_cast<double>(w[t]) : 1.0;
    }
  }
  if (w != nullptr)
    for (int64_t c = threadIdx.x; c < V; c += blockDim.x) ws += static_cast<double>(w[c]);
  d = block_sum(d, scratch);
  ws = block_sum(ws, scratch);
  if (threadIdx.x == 0) {
    out[0] = tgt != nullptr ? d : static_cast<double>(N);
    out[1] = w != nullptr ? ws : static_cast<double>(V);
  }
}

// ---- one block per row -----------------------------------------------------------------------

// kHard: class targets; kSmooth: class targets with label smoothing; kSoft: class probabilities
// (label smoothing folded into their terms).
enum LceMode : int { kHard = 0, kSmooth = 1, kSoft = 2 };

template <class T>
struct RowArgs {
  using A = acc_t<T>;
  const A* z;            // chunk logits [rows][V]
  T* g;                  // chunk gradient [rows][V] (may be z itself), or null: no gradient
  const int64_t* tgt;    // class targets (N,) (kHard, kSmooth)
  const T* y;            // probability targets (N, V) (kSoft)
  const T* w;            // class weights (V,) or null
  const double* totals;  // lce_totals' output
  int64_t V, ignore_index;
  A om_eps, eps_c;       // 1 - label_smoothing, label_smoothing / V
  A z_loss, softcap;
  A* lse_out;            // forward: lse (N,)
  T* loss_none;          // forward 'none': the loss (N,), else null
  A* row_loss;           // forward 'mean' / 'sum': the row terms (N,), else null
  const A* lse_in;       // backward: the forward's lse (N,)
  GradIn gi;             // the incoming gradient (forward: 1)
};

// The probability target term (y (1 - eps) + eps / V) w_c of class c.
template <class T, class A>
__device__ __forceinline__ A soft_term(const RowArgs<T>& p, const T* yr, int64_t c) {
  A u = static_cast<A>(yr[c]) * p.om_eps + p.eps_c;
  if (p.w != nullptr) u *= static_cast<A>(p.w[c]);
  return u;
}

// Row r0 + blockIdx.x (chunk row blockIdx.x). Forward (Fwd): lse, the row loss and, when p.g
// is set, the gradient; backward: the gradient from the saved lse. The gradient of logit c is
//   gn * (exp(z_c - lse) * coef - cw * u_c - [c == t] tterm) * (1 - (z_c / softcap)^2)
// with u_c = w_c (label smoothing) or the probability target term, gn the incoming gradient of
// the row for 'none' (else 1, the GEMMs' epilogues applying the factor, or the factor itself
// when it is not finite: grad_factor) and the last factor only with a soft cap. The target
// logit is read before the first barrier: once every thread has passed it, the gradient may
// overwrite the logits in place (each thread then reads and writes only its own elements).
template <class T, int MODE, bool Fwd>
__global__ void __launch_bounds__(lce::kMaxRowThreads)
    lce_rows(RowArgs<T> p, int64_t r0) {
  using A = acc_t<T>;
  __shared__ A smem[32 * 3];
  const int64_t lr = blockIdx.x;
  const int64_t row = r0 + lr;
  const int64_t V = p.V;
  const int tid = threadIdx.x, nt = blockDim.x;
  const A* zr = p.z + lr * V;
  T* gr = p.g != nullptr ? p.g + lr * V : nullptr;
  const T* yr = MODE == kSoft ? p.y + row * V : nullptr;

  int64_t t = -1;  // the target class (never a valid column for kSoft)
  A wt = A(1), zt = A(0);
  if constexpr (MODE != kSoft) {
    const int64_t tv = p.tgt[row];
    // the same row for the whole block: every thread takes the same branch
    if (!target_class(tv, V, p.ignore_index)) {
      if constexpr (Fwd) {
        if (tid == 0) {
          p.lse_out[row] = A(0);
          if (p.loss_none != nullptr) p.loss_none[row] = static_cast<T>(0);
          else p.row_loss[row] = A(0);
        }
      }
      if (gr != nullptr)
        for (int64_t c = tid; c < V; c += nt) gr[c] = static_cast<T>(0);
      return;
    }
    t = tv;
    if (p.w != nullptr) wt = static_cast<A>(p.w[t]);
    if constexpr (Fwd) zt = zr[t];
  }

  A lse, ysum = A(0);
  if constexpr (Fwd) {
    A m = neg_inf<A>(), s = A(0), dot = A(0);
    for (int64_t c = tid; c < V; c += nt) {
      const A v = zr[c];
      lse_fold(v, m, s);
      if constexpr (MODE == kSmooth) dot += p.w != nullptr ? static_cast<A>(p.w[c]) * v : v;
      if constexpr (MODE == kSoft) {
        const A u = soft_term<T, A>(p, yr, c);
        ysum += u;
        dot += u * v;
      }
    }
    const A M = block_max(m, smem);
    // this thread's sum moved to the row max (kept as is when equal: -inf stays 0, not NaN)
    A r[3] = {m == M ? s : s * dexp(m - M), dot, ysum};
    block_sums(r, smem);
    const A log_s = dlog(r[0]);
    lse = M + log_s;
    dot = r[1];
    ysum = r[2];
    A loss;
    if constexpr (MODE == kSoft) {
      loss = lse * ysum - dot;
    } else {
      // lse - z_t as (max - z_t) + log(sum): exact when z_t is the max (confident rows)
      const A nll = wt * ((M - zt) + log_s);
      if constexpr (MODE == kHard) {
        loss = nll;
      } else {
        const A wsum = static_cast<A>(p.totals[1]);
        loss = p.om_eps * nll + p.eps_c * (wsum * lse - dot);
      }
    }
    if (p.z_loss != A(0)) loss += p.z_loss * lse * lse;
    if (tid == 0) {
      p.lse_out[row] = lse;
      if (p.loss_none != nullptr) p.loss_none[row] = static_cast<T>(loss);
      else p.row_loss[row] = loss;
    }
  } else {
    lse = p.lse_in[row];
    if constexpr (MODE == kSoft) {
      if (gr != nullptr) {
        for (int64_t c = tid; c < V; c += nt) ysum += soft_term<T, A>(p, yr, c);
        A r[1] = {ysum};
        block_sums(r, smem);
        ysum = r[0];
      }
    }
  }
  if (gr == nullptr) return;

  const A gn = p.gi.reduction == kNone ? load_as<A>(p.gi.g, p.gi.g_kind, row)
                                       : grad_factor<A>(p.gi).rows;
  const A zl2 = p.z_loss != A(0) ? A(2) * p.z_loss * lse : A(0);
  A coef, cw = A(0), tterm = A(0);
  if constexpr (MODE == kHard) {
    coef = gn * (wt + zl2);
    tterm = gn * wt;
  } else if constexpr (MODE == kSmooth) {
    coef = gn * (p.om_eps * wt + p.eps_c * static_cast<A>(p.totals[1]) + zl2);
    cw = gn * p.eps_c;
    tterm = gn * p.om_eps * wt;
  } else {
    coef = gn * (ysum + zl2);
    cw = gn;
  }
  const bool capped = p.softcap > A(0);
  const A inv_cap = capped ? A(1) / p.softcap : A(0);
  for (int64_t c = tid; c < V; c += nt) {
    const A v = zr[c];
    A d = dexp(v - lse) * coef;
    if constexpr (MODE == kSmooth) d -= p.w != nullptr ? cw * static_cast<A>(p.w[c]) : cw;
    if constexpr (MODE == kSoft) d -= cw * soft_term<T, A>(p, yr, c);
    if (c == t) d -= tterm;
    if (capped) {
      const A q = v * inv_cap;  // tanh of the raw logit over the cap
      d *= A(1) - q * q;
    }
    gr[c] = static_cast<T>(d);
  }
}

// ---- the bias gradient -----------------------------------------------------------------------

constexpr int kColTile = 32;  // columns of a block (one per lane)
constexpr int kRowLanes = 8;  // warps of a block, striding over the rows

// acc[col] (+)= factor * sum over the chunk rows of g[row, col]: each warp sums every 8th row in
// order, then the 8 partial sums are added in warp order.
template <class T>
__global__ void __launch_bounds__(kColTile * kRowLanes)
    lce_col_sums(const T* g, int64_t rows, int64_t V, const acc_t<T>* factor, acc_t<T>* acc,
                 bool add) {
  using A = acc_t<T>;
  __shared__ A sums[kRowLanes][kColTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColTile + tx;
  A s = A(0);
  if (col < V)
    for (int64_t r = ty; r < rows; r += kRowLanes) s += static_cast<A>(g[r * V + col]);
  sums[ty][tx] = s;
  __syncthreads();
  if (ty == 0 && col < V) {
    A total = sums[0][tx];
#pragma unroll
    for (int i = 1; i < kRowLanes; ++i) total += sums[i][tx];
    total *= *factor;
    acc[col] = add ? acc[col] + total : total;
  }
}

// ---- the reduced loss ------------------------------------------------------------------------

// One block: the row terms summed in float64 in a fixed order, over the divisor for 'mean'
// (0 / 0 = NaN as in torch when every target is ignored).
template <class T>
__global__ void __launch_bounds__(kReduceThreads)
    lce_finish(const acc_t<T>* row_loss, int64_t N, const double* totals, int64_t reduction,
               T* out) {
  __shared__ double scratch[32];
  double l = 0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) l += static_cast<double>(row_loss[i]);
  l = block_sum(l, scratch);
  if (threadIdx.x == 0) write_loss<T>(LossOut<T>{out, nullptr, reduction}, l, totals[0]);
}

// ---- host ------------------------------------------------------------------------------------

struct LceParams {
  int64_t reduction, ignore_index;
  double label_smoothing, z_loss, softcap;
};

template <class Body>
void dispatch_mode(int mode, const Body& body) {
  switch (mode) {
    case kHard: body(std::integral_constant<int, kHard>()); break;
    case kSmooth: body(std::integral_constant<int, kSmooth>()); break;
    default: body(std::integral_constant<int, kSoft>()); break;
  }
}

at::ScalarType acc_scalar(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

Tensor contiguous_or_undefined(const c10::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : Tensor();
}

template <class T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// The tensors of one pass over the chunks (contiguous), and what it writes.
struct Pass {
  Tensor x, w, b, target, cw;  // b, cw: undefined when absent
  bool soft;
  Tensor totals;                // lce_totals' output (2 doubles)
  // forward outputs (undefined in the backward)
  Tensor lse_out, loss_none, row_loss;
  Tensor lse_in;                // backward input
  Tensor grad_in;               // the incoming gradient (forward: a double 1)
  // gradients wanted (undefined: not wanted): grad_input (N, H); the weight and bias gradients'
  // accumulators in the accumulation dtype (the gradients themselves for float / double)
  Tensor gi, acc_w, acc_b;
};

// Launches lce_totals: the mean's divisor and the class weights' sum, and the device check of
// every class target.
template <class T>
Tensor run_totals(const KernelScope& scope, const Pass& s, int64_t N, int64_t V,
                  int64_t ignore_index) {
  Tensor totals = at::empty({2}, s.x.options().dtype(at::kDouble));
  lce_totals<T><<<1, kTotalsThreads, 0, scope.stream>>>(
      s.soft ? nullptr : s.target.const_data_ptr<int64_t>(), N, ptr_or_null<T>(s.cw), V,
      ignore_index, totals.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return totals;
}

// Every chunk in order: logits, the row kernel, then the gradient GEMMs and column sums that
// the pass wants.
template <class T, bool Fwd>
void run_chunks(const KernelScope& scope, Pass& s, const LceParams& prm) {
  using A = acc_t<T>;
  const int64_t N = s.x.size(0), H = s.x.size(1), V = s.w.size(0);
  const bool want_g = s.gi.defined() || s.acc_w.defined() || s.acc_b.defined();
  const lce::ChunkPlan plan = lce::plan_chunks(N, V, static_cast<int64_t>(sizeof(A)));

  if (plan.chunks > 0) {
    const auto acc_opts = s.x.options().dtype(acc_scalar(s.x.scalar_type()));
    Tensor z = at::empty({plan.rows, V}, acc_opts);
    // the gradient in place of the logits when the GEMMs read the accumulation type, else in
    // the storage dtype for the tensor cores
    Tensor g = want_g && !std::is_same_v<T, A> ? at::empty({plan.rows, V}, s.x.options())
                                                : Tensor();
    A* zp = z.mutable_data_ptr<A>();
    T* gp = nullptr;
    if (want_g) {
      if constexpr (std::is_same_v<T, A>) gp = zp;
      else gp = g.mutable_data_ptr<T>();
    }

    RowArgs<T> p{};
    p.z = zp;
    p.g = gp;
    p.tgt = s.soft ? nullptr : s.target.const_data_ptr<int64_t>();
    p.y = s.soft ? s.target.const_data_ptr<T>() : nullptr;
    p.w = ptr_or_null<T>(s.cw);
    p.totals = s.totals.const_data_ptr<double>();
    p.V = V;
    p.ignore_index = prm.ignore_index;
    p.om_eps = static_cast<A>(1.0 - prm.label_smoothing);
    p.eps_c = V > 0 ? static_cast<A>(prm.label_smoothing / static_cast<double>(V)) : A(0);
    p.z_loss = static_cast<A>(prm.z_loss);
    p.softcap = static_cast<A>(prm.softcap);
    if constexpr (Fwd) {
      p.lse_out = s.lse_out.mutable_data_ptr<A>();
      p.loss_none = s.loss_none.defined() ? s.loss_none.mutable_data_ptr<T>() : nullptr;
      p.row_loss = s.row_loss.defined() ? s.row_loss.mutable_data_ptr<A>() : nullptr;
    } else {
      p.lse_in = s.lse_in.const_data_ptr<A>();
    }
    Tensor factor;
    const A* fp = nullptr;
    if (want_g) {
      p.gi = grad_in(s.grad_in, prm.reduction, s.totals);
      factor = at::empty({1}, acc_opts);
      lce_grad_factor<A><<<1, 1, 0, scope.stream>>>(p.gi, factor.mutable_data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      fp = factor.const_data_ptr<A>();
    }

    const int mode = s.soft ? kSoft : prm.label_smoothing > 0 ? kSmooth : kHard;
    const int threads = lce::row_threads(V);
    const T* xp = s.x.const_data_ptr<T>();
    const T* wp = s.w.const_data_ptr<T>();
    const LogitsEpilogue<T> logits{zp, V, ptr_or_null<T>(s.b), p.softcap};
    TORCH_CHECK(V / kColTile < std::numeric_limits<int32_t>::max(),
                "fastops.linear_cross_entropy: too many classes (", V, ")");
    const unsigned int col_blocks = static_cast<unsigned int>((V + kColTile - 1) / kColTile);

    for (int64_t k = 0; k < plan.chunks; ++k) {
      const lce::ChunkRange r = lce::chunk_range(plan, N, k);
      const T* xc = xp + r.first * H;
      // 1. logits: A = x_c k-major (ld H), B = W k-major (ld H)
      gemm::gemm<T, true, true>(r.count, V, H, Operand<T>{xc, H}, Operand<T>{wp, H}, logits,
                                scope.stream);
      // 2. lse, loss, gradient of the logits (r.count <= kMaxChunkRows blocks)
      dispatch_mode(mode, [&](auto mode_c) {
        lce_rows<T, decltype(mode_c)::value, Fwd>
            <<<static_cast<unsigned int>(r.count), threads, 0, scope.stream>>>(p, r.first);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      if (!want_g) continue;
      // 3. grad_input_c = G W: A = G k-major (ld V), B = W mn-major (ld H)
      if (s.gi.defined()) {
        T* out = s.gi.mutable_data_ptr<T>() + r.first * H;
        gemm::gemm<T, true, false>(r.count, H, V, Operand<T>{gp, V}, Operand<T>{wp, H},
                                   StoreEpilogue<T>{out, H, fp}, scope.stream);
      }
      // grad_W (+)= G^T x_c: A = G^T mn-major (ld V), B = x_c mn-major (ld H)
      if (s.acc_w.defined()) {
        gemm::gemm<T, false, false>(V, H, r.count, Operand<T>{gp, V}, Operand<T>{xc, H},
                                    AccumulateEpilogue<A>{s.acc_w.mutable_data_ptr<A>(), H, k > 0,
                                                          fp},
                                    scope.stream);
      }
      if (s.acc_b.defined() && V > 0) {
        lce_col_sums<T><<<col_blocks, dim3(kColTile, kRowLanes), 0, scope.stream>>>(
            gp, r.count, V, fp, s.acc_b.mutable_data_ptr<A>(), k > 0);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  } else {
    // no rows: nothing accumulated
    if (s.acc_w.defined()) s.acc_w.zero_();
    if (s.acc_b.defined()) s.acc_b.zero_();
  }
}

// The contiguous operands of a pass.
Pass make_pass(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
               const Tensor& target, const c10::optional<Tensor>& class_weight) {
  Pass s;
  s.x = input.contiguous();
  s.w = weight.contiguous();
  s.b = contiguous_or_undefined(bias);
  s.target = target.contiguous();
  s.cw = contiguous_or_undefined(class_weight);
  s.soft = target.is_floating_point();
  return s;
}

// Gradient outputs of a pass: grad_input, and for the weight and bias the tensor to return and
// the accumulator the chunks add into (the same tensor for float / double).
struct GradOuts {
  Tensor gi, gw, gb;
};

GradOuts alloc_grads(Pass& s, bool want_gi, bool want_gw, bool want_gb) {
  const auto opts = s.x.options();
  const auto acc_opts = opts.dtype(acc_scalar(s.x.scalar_type()));
  const bool same = acc_scalar(s.x.scalar_type()) == s.x.scalar_type();
  const int64_t N = s.x.size(0), H = s.x.size(1), V = s.w.size(0);
  GradOuts o;
  o.gi = want_gi ? at::empty({N, H}, opts) : at::empty({0}, opts);
  o.gw = want_gw ? at::empty({V, H}, opts) : at::empty({0}, opts);
  o.gb = want_gb ? at::empty({V}, opts) : at::empty({0}, opts);
  if (want_gi) s.gi = o.gi;
  if (want_gw) s.acc_w = same ? o.gw : at::empty({V, H}, acc_opts);
  if (want_gb) s.acc_b = same ? o.gb : at::empty({V}, acc_opts);
  return o;
}

// The 16-bit gradients from their float accumulators.
void finish_grads(const Pass& s, GradOuts& o) {
  if (s.acc_w.defined() && !s.acc_w.is_same(o.gw)) o.gw.copy_(s.acc_w);
  if (s.acc_b.defined() && !s.acc_b.is_same(o.gb)) o.gb.copy_(s.acc_b);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_cross_entropy_cuda(
    const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
    const Tensor& target, const c10::optional<Tensor>& class_weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
    bool with_grad) {
  check_linear_cross_entropy(input, weight, bias, target, class_weight, reduction,
                             label_smoothing, z_loss, softcap, "fastops.linear_cross_entropy");
  const KernelScope scope(input);
  Pass s = make_pass(input, weight, bias, target, class_weight);
  const int64_t N = s.x.size(0), V = s.w.size(0);
  const auto opts = s.x.options();
  const auto acc_opts = opts.dtype(acc_scalar(s.x.scalar_type()));
  const bool grads = with_grad && reduction != kNone;
  GradOuts o = alloc_grads(s, grads, grads, grads && s.b.defined());
  s.lse_out = at::empty({N}, acc_opts);
  Tensor loss;
  if (reduction == kNone) {
    loss = at::empty({N}, opts);
    s.loss_none = loss;
  } else {
    loss = at::empty({}, opts);
    s.row_loss = at::empty({N}, acc_opts);
  }
  if (grads) s.grad_in = at::ones({1}, opts.dtype(at::kDouble));
  const LceParams prm{reduction, ignore_index, label_smoothing, z_loss, softcap};
  FO_DISPATCH_FLOATING(s.x.scalar_type(), [&] {
    using T = scalar_t;
    s.totals = run_totals<T>(scope, s, N, V, ignore_index);
    run_chunks<T, true>(scope, s, prm);
    if (reduction != kNone) {
      lce_finish<T><<<1, kReduceThreads, 0, scope.stream>>>(
          s.row_loss.const_data_ptr<acc_t<T>>(), N, s.totals.const_data_ptr<double>(),
          reduction, loss.mutable_data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  finish_grads(s, o);
  return {loss, s.lse_out, o.gi, o.gw, o.gb};
}

std::tuple<Tensor, Tensor, Tensor> linear_cross_entropy_backward_cuda(
    const Tensor& grad_loss, const Tensor& input, const Tensor& weight,
    const c10::optional<Tensor>& bias, const Tensor& target,
    const c10::optional<Tensor>& class_weight, const Tensor& lse, int64_t reduction,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
    std::array<bool, 3> output_mask) {
  check_linear_cross_entropy_backward(grad_loss, input, weight, bias, target, class_weight, lse,
                                      reduction, label_smoothing, z_loss, softcap,
                                      "fastops.linear_cross_entropy_backward");
  const KernelScope scope(input);
  Pass s = make_pass(input, weight, bias, target, class_weight);
  const bool has_bias = s.b.defined();
  GradOuts o = alloc_grads(s, output_mask[0], output_mask[1], output_mask[2] && has_bias);
  if (!s.gi.defined() && !s.acc_w.defined() && !s.acc_b.defined()) return {o.gi, o.gw, o.gb};
  const int64_t N = s.x.size(0), V = s.w.size(0);
  s.lse_in = lse.contiguous();
  s.grad_in = grad_loss.contiguous();
  const LceParams prm{reduction, ignore_index, label_smoothing, z_loss, softcap};
  FO_DISPATCH_FLOATING(s.x.scalar_type(), [&] {
    using T = scalar_t;
    s.totals = run_totals<T>(scope, s, N, V, ignore_index);
    run_chunks<T, false>(scope, s, prm);
  });
  finish_grads(s, o);
  return {o.gi, o.gw, o.gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CUDA, m) {
  m.impl("linear_cross_entropy", &linear_cross_entropy_cuda);
  m.impl("linear_cross_entropy_backward", &linear_cross_entropy_backward_cuda);
}

}  // namespace gpu
}  // namespace fastops
