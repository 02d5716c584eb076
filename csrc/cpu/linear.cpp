// CPU kernels of linear and the fused linear + activation, built on the GEMM of gemm.h.
//
//   forward:  z = x W^T + b, y = act(z) applied in the GEMM epilogue as each tile is written
//             (maxout: z is written, then reduced over groups of pool_size output features)
//   backward: grad_z = act'(z) * grad_y in one pass that also sums grad_bias (and the PReLU
//             slope gradient) over fixed blocks of rows, then
//             grad_input = grad_z W and grad_weight = grad_z^T x, two GEMMs.
// Every reduction runs over blocks whose bounds depend only on the shapes, summed in a fixed
// order: the results are bitwise reproducible whatever the number of threads.
#include <torch/library.h>

#include <string>
#include <type_traits>
#include <vector>

#include "../activations.h"
#include "../linear_checks.h"
#include "cpu_common.h"
#include "gemm.h"

namespace fastops {
namespace cpu {
namespace {

using at::Tensor;
using gemm::MatView;

struct Identity {
  template <class T> FO_HD T forward(T x) const { return x; }
  template <class T> FO_HD T backward(T, T g) const { return g; }
};

// Rounds a compute-type value to the storage type and back (the identity for float / double),
// so the activation sees the same pre-activation as torch's F.linear followed by the activation.
template <class T, class Acc>
FO_ALWAYS_INLINE Acc round_to(Acc v) {
  if constexpr (std::is_same_v<T, Acc>) return v;
  else return static_cast<Acc>(static_cast<T>(v));
}

// Activation applied in the epilogue, given the output feature index.
template <class F>
struct PointwiseAct {
  F f;
  template <class A> FO_ALWAYS_INLINE A operator()(A z, int64_t) const { return f.forward(z); }
};
template <class Acc>
struct PreluAct {
  const Acc* slope;  // one per output feature
  FO_ALWAYS_INLINE Acc operator()(Acc z, int64_t j) const { return Prelu{}.forward(z, slope[j]); }
};

// out = act(tile + bias) (and preact = tile + bias when preact is not null), row-major, ld.
template <class T, class Acc, class Act>
struct BiasActEpilogue {
  T* out;
  T* preact;
  int64_t ld;
  const Acc* bias;  // N values (zeros without a bias)
  Act act;
  FO_ALWAYS_INLINE void operator()(int64_t i0, int64_t j0, int mr, int nr, const Acc* tile,
                                   int ldt) const {
    const Acc* bj = bias + j0;
    for (int i = 0; i < mr; ++i) {
      const Acc* t = tile + i * ldt;
      T* o = out + (i0 + i) * ld + j0;
      if (preact != nullptr) {
        T* p = preact + (i0 + i) * ld + j0;
        for (int j = 0; j < nr; ++j) {
          const Acc z = round_to<T>(t[j] + bj[j]);
          p[j] = static_cast<T>(z);
          o[j] = static_cast<T>(act(z, j0 + j));
        }
      } else {
        for (int j = 0; j < nr; ++j)
          o[j] = static_cast<T>(act(round_to<T>(t[j] + bj[j]), j0 + j));
      }
    }
  }
};

// out = tile, row-major, ld.
template <class T, class Acc>
struct StoreEpilogue {
  T* out;
  int64_t ld;
  FO_ALWAYS_INLINE void operator()(int64_t i0, int64_t j0, int mr, int nr, const Acc* tile,
                                   int ldt) const {
    for (int i = 0; i < mr; ++i) {
      T* o = out + (i0 + i) * ld + j0;
      const Acc* t = tile + i * ldt;
      for (int j = 0; j < nr; ++j) o[j] = static_cast<T>(t[j]);
    }
  }
};

// C (M x N, contiguous, `out`) = A B through epi; allocates the partial sums when needed.
template <class T, class Epi>
void run_gemm(int64_t M, int64_t N, int64_t K, MatView<T> A, MatView<T> B, T* out,
              const Epi& epi) {
  using Acc = acc_t<T>;
  Acc* partial = nullptr;
  Tensor workspace;
  if (K > gemm::kc_block<Acc>()) {
    if constexpr (std::is_same_v<T, Acc>) {
      partial = out;
    } else {
      workspace = at::empty({M, N}, at::TensorOptions().dtype(at::kFloat));
      partial = workspace.mutable_data_ptr<float>();
    }
  }
  gemm::gemm<Acc>(M, N, K, A, B, partial, N, epi);
}

template <class T>
MatView<T> view_of(const Tensor& t) {  // a 2-D tensor
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1)};
}
template <class T>
MatView<T> transposed_view_of(const Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(1), t.stride(0)};
}

// Reads a 1-D (or single-element) tensor of any stride into a vector of the compute type;
// `n` values, broadcasting a single element.
template <class T, class Acc>
std::vector<Acc> to_acc_vector(const c10::optional<Tensor>& t, int64_t n) {
  std::vector<Acc> v(static_cast<size_t>(n), Acc(0));
  if (!t.has_value() || !t->defined()) return v;
  const Tensor c = t->contiguous();
  const T* p = c.const_data_ptr<T>();
  const bool single = c.numel() == 1;
  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<Acc>(p[single ? 0 : i]);
  return v;
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
  const Tensor x = input.reshape({d.M, d.K});  // a view whenever the batch dims allow
  Tensor preact = save_preact ? at::empty({d.M, d.N}, input.options())
                              : at::empty({0}, input.options());
  // The GEMM writes z: the output itself, or for maxout the pre-activation that the maxout
  // kernel then reduces.
  Tensor z = act.kind != ActKind::maxout ? at::empty({d.M, act.features}, input.options())
             : save_preact               ? preact
                                         : at::empty({d.M, d.N}, input.options());

  FO_DISPATCH_FLOATING(input.scalar_type(), [&] {
    using T = scalar_t;
    using Acc = acc_t<T>;
    const std::vector<Acc> bias_v = to_acc_vector<T, Acc>(bias, d.N);
    T* zp = z.mutable_data_ptr<T>();
    T* pp = save_preact && act.kind != ActKind::maxout ? preact.mutable_data_ptr<T>() : nullptr;
    const MatView<T> A = view_of<T>(x), B = transposed_view_of<T>(weight);
    if (plain || act.kind == ActKind::maxout) {
      run_gemm<T>(d.M, d.N, d.K, A, B, zp,
                  BiasActEpilogue<T, Acc, PointwiseAct<Identity>>{zp, nullptr, d.N, bias_v.data(),
                                                                 {Identity{}}});
    } else if (act.kind == ActKind::prelu) {
      const std::vector<Acc> slope = to_acc_vector<T, Acc>(act_weight, d.N);
      run_gemm<T>(d.M, d.N, d.K, A, B, zp,
                  BiasActEpilogue<T, Acc, PreluAct<Acc>>{zp, pp, d.N, bias_v.data(),
                                                         {slope.data()}});
    } else {
      with_pointwise<T>(activation, a, b, [&](auto f) {
        using F = decltype(f);
        run_gemm<T>(d.M, d.N, d.K, A, B, zp,
                    BiasActEpilogue<T, Acc, PointwiseAct<F>>{zp, pp, d.N, bias_v.data(), {f}});
      });
    }
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

// ---- backward -----------------------------------------------------------------------------------

// Runs body(r0, r1, part) over fixed blocks of rows [r0, r1) of an M-row matrix, part being
// `nsum` zeroed accumulators of the block, and returns the per-slot sums of the blocks, added
// in block order. The blocks depend on M and the row length only: deterministic.
template <class Acc, class Body>
std::vector<Acc> reduce_row_blocks(int64_t M, int64_t row_len, int64_t nsum, const Body& body) {
  const int64_t rows_per_block =
      std::max<int64_t>(1, kElementwiseGrain / std::max<int64_t>(1, row_len));
  const int64_t blocks = (M + rows_per_block - 1) / rows_per_block;
  std::vector<Acc> part(static_cast<size_t>(blocks * nsum), Acc(0));
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk)
      body(blk * rows_per_block, std::min(M, (blk + 1) * rows_per_block),
           part.data() + blk * nsum);
  });
  std::vector<Acc> total(static_cast<size_t>(nsum), Acc(0));
  at::parallel_for(0, nsum, 4096, [&](int64_t s0, int64_t s1) {
    dispatch_isa([&]() FO_INLINE_LAMBDA {
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const Acc* p = part.data() + blk * nsum;
        for (int64_t s = s0; s < s1; ++s) total[s] += p[s];
      }
    });
  });
  return total;
}

template <class T, class Acc>
Tensor sums_to_tensor(const std::vector<Acc>& sums, int64_t offset, int64_t n,
                      const Tensor& like) {
  Tensor t = at::empty({n}, like.options());
  T* p = t.mutable_data_ptr<T>();
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(sums[offset + i]);
  return t;
}

// grad_input = gz W (M x K) and grad_weight = gz^T x (N x K), gz being M x N (any strides).
template <class T>
void linear_grads(const MatView<T>& gz, const Tensor& x, const Tensor& weight,
                  const LinearDims& d, bool want_input, bool want_weight, Tensor& grad_input,
                  Tensor& grad_weight) {
  using Acc = acc_t<T>;
  if (want_input) {
    T* gi = grad_input.mutable_data_ptr<T>();
    run_gemm<T>(d.M, d.K, d.N, gz, view_of<T>(weight), gi, StoreEpilogue<T, Acc>{gi, d.K});
  }
  if (want_weight) {
    T* gw = grad_weight.mutable_data_ptr<T>();
    const MatView<T> gzt{gz.data, gz.cs, gz.rs};
    run_gemm<T>(d.N, d.K, d.M, gzt, view_of<T>(x), gw, StoreEpilogue<T, Acc>{gw, d.K});
  }
}

std::tuple<Tensor, Tensor, Tensor> linear_backward(const Tensor& grad_output, const Tensor& input,
                                                   const Tensor& weight,
                                                   std::array<bool, 3> output_mask) {
  const char* op = "fastops.linear_backward";
  const LinearDims d = check_linear(op, input, weight, c10::nullopt);
  check_grad_output(op, grad_output, input, d.N);
  const Tensor x = input.reshape({d.M, d.K});
  const Tensor g = grad_output.reshape({d.M, d.N});
  const auto opts = input.options();
  Tensor gi = output_mask[0] ? at::empty(input.sizes(), opts) : at::empty({0}, opts);
  Tensor gw = output_mask[1] ? at::empty({d.N, d.K}, opts) : at::empty({0}, opts);
  Tensor gb = at::empty({0}, opts);
  FO_DISPATCH_FLOATING(input.scalar_type(), [&] {
    using T = scalar_t;
    using Acc = acc_t<T>;
    if (output_mask[2]) {
      const Tensor gc = g.contiguous();
      const T* gp = gc.const_data_ptr<T>();
      const int64_t N = d.N;
      const std::vector<Acc> sums = reduce_row_blocks<Acc>(d.M, N, N, [&](int64_t r0, int64_t r1,
                                                                       Acc* part) {
        dispatch_isa([&]() FO_INLINE_LAMBDA {
          for (int64_t m = r0; m < r1; ++m)
            for (int64_t n = 0; n < N; ++n) part[n] += static_cast<Acc>(gp[m * N + n]);
        });
      });
      gb = sums_to_tensor<T>(sums, 0, N, input);
    }
    linear_grads<T>(view_of<T>(g), x, weight, d, output_mask[0], output_mask[1], gi, gw);
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
  const Tensor x = input.reshape({d.M, d.K});
  Tensor gi = output_mask[0] ? at::empty(input.sizes(), opts) : at::empty({0}, opts);
  Tensor gw = output_mask[1] ? at::empty({d.N, d.K}, opts) : at::empty({0}, opts);
  Tensor gb = at::empty({0}, opts);
  Tensor gaw = at::empty({0}, opts);
  if (!output_mask[0] && !output_mask[1] && !output_mask[2] && !output_mask[3])
    return {gi, gw, gb, gaw};

  const Tensor g = grad_output.contiguous();
  const Tensor z = preact.contiguous();
  const bool need_gz = output_mask[0] || output_mask[1];
  Tensor gz = at::empty({need_gz ? d.M : 0, d.N}, opts);
  const int64_t N = d.N, G = act.features;
  // slots: N for grad_bias, then the PReLU slope gradient (N slots, folded to 1 if shared)
  const int64_t nsum = act.kind == ActKind::prelu ? 2 * N : N;

  FO_DISPATCH_FLOATING(input.scalar_type(), [&] {
    using T = scalar_t;
    using Acc = acc_t<T>;
    const T* gp = g.const_data_ptr<T>();
    const T* zp = z.const_data_ptr<T>();
    T* gzp = need_gz ? gz.mutable_data_ptr<T>() : nullptr;
    std::vector<Acc> sums;
    if (act.kind == ActKind::pointwise) {
      with_pointwise<T>(name, a, b, [&](auto f) {
        sums = reduce_row_blocks<Acc>(d.M, N, nsum, [&](int64_t r0, int64_t r1, Acc* part) {
          dispatch_isa([&]() FO_INLINE_LAMBDA {
            for (int64_t m = r0; m < r1; ++m) {
              const T* zr = zp + m * N;
              const T* gr = gp + m * N;
              if (gzp != nullptr) {
                T* o = gzp + m * N;
                for (int64_t n = 0; n < N; ++n) {
                  const T v = static_cast<T>(
                      f.backward(static_cast<Acc>(zr[n]), static_cast<Acc>(gr[n])));
                  o[n] = v;
                  part[n] += static_cast<Acc>(v);
                }
              } else {
                for (int64_t n = 0; n < N; ++n)
                  part[n] += static_cast<Acc>(static_cast<T>(
                      f.backward(static_cast<Acc>(zr[n]), static_cast<Acc>(gr[n]))));
              }
            }
          });
        });
      });
    } else if (act.kind == ActKind::prelu) {
      const std::vector<Acc> slope = to_acc_vector<T, Acc>(act_weight, N);
      const Acc* sl = slope.data();
      const Prelu f;
      sums = reduce_row_blocks<Acc>(d.M, N, nsum, [&](int64_t r0, int64_t r1, Acc* part) {
        Acc* wpart = part + N;
        dispatch_isa([&]() FO_INLINE_LAMBDA {
          for (int64_t m = r0; m < r1; ++m) {
            const T* zr = zp + m * N;
            const T* gr = gp + m * N;
            for (int64_t n = 0; n < N; ++n) {
              const Acc zv = static_cast<Acc>(zr[n]), gv = static_cast<Acc>(gr[n]);
              const T v = static_cast<T>(f.backward(zv, sl[n], gv));
              if (gzp != nullptr) gzp[m * N + n] = v;
              part[n] += static_cast<Acc>(v);
              wpart[n] += f.weight_grad(zv, gv);
            }
          }
        });
      });
    } else {  // maxout: the gradient goes to the first maximum of each group (NaN wins)
      const int64_t k = act.pool;
      sums = reduce_row_blocks<Acc>(d.M, N, nsum, [&](int64_t r0, int64_t r1, Acc* part) {
        for (int64_t m = r0; m < r1; ++m)
          for (int64_t grp = 0; grp < G; ++grp) {
            const T* zr = zp + m * N + grp * k;
            int64_t arg = 0;
            Acc best = static_cast<Acc>(zr[0]);
            for (int64_t t = 1; t < k; ++t) {
              const Acc v = static_cast<Acc>(zr[t]);
              if (maxout_takes(v, best)) {
                best = v;
                arg = t;
              }
            }
            const T gv = gp[m * G + grp];
            if (gzp != nullptr)
              for (int64_t t = 0; t < k; ++t)
                gzp[m * N + grp * k + t] = t == arg ? gv : static_cast<T>(0);
            part[grp * k + arg] += static_cast<Acc>(gv);
          }
      });
    }
    if (output_mask[2]) gb = sums_to_tensor<T>(sums, 0, N, input);
    if (output_mask[3] && act.kind == ActKind::prelu) {
      const Tensor& w = *act_weight;
      gaw = at::empty(w.sizes(), opts);
      T* p = gaw.mutable_data_ptr<T>();
      if (w.numel() == 1) {
        Acc total = 0;
        for (int64_t n = 0; n < N; ++n) total += sums[N + n];
        p[0] = static_cast<T>(total);
      } else {
        for (int64_t n = 0; n < N; ++n) p[n] = static_cast<T>(sums[N + n]);
      }
    }
    if (need_gz) {
      const MatView<T> gzv{gz.const_data_ptr<T>(), N, 1};
      linear_grads<T>(gzv, x, weight, d, output_mask[0], output_mask[1], gi, gw);
    }
  });
  return {gi, gw, gb, gaw};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CPU, m) {
  m.impl("linear", &linear_forward);
  m.impl("linear_backward", &linear_backward);
  m.impl("linear_act", &linear_act_forward);
  m.impl("linear_act_backward", &linear_act_backward);
}

}  // namespace cpu
}  // namespace fastops
