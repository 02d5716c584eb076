// CPU kernels of the margin losses: hinge_embedding_loss (the binary hinge, elementwise) and
// multi_margin_loss (the multi-class one-vs-rest hinge, one pass over each row).
//
// The math is margin_math.h's, shared with the CUDA kernels: torch's formulas to the
// comparison, so ties at the hinge and NaN inputs give torch's values and gradients.
//
// Determinism: reduced losses are summed over fixed blocks (of elements, or of row losses), then
// the blocks in order, whatever the number of threads; there are no atomics.
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "../loss_checks.h"
#include "../margin_math.h"
#include "cpu_common.h"

namespace fastops {
namespace cpu {
namespace {

using at::Tensor;
using namespace fastops::loss;
using margin::hinge_grad;
using margin::hinge_term;
using margin::margin_grad;
using margin::margin_term;

constexpr int kLanes = 16;              // partial sums of a block, one per SIMD lane
constexpr int64_t kHingeBlock = 16384;  // elements per block of the hinge sum
constexpr int64_t kRowBlock = 4096;     // row losses per block of the multi-margin sum

// Fixed blocks of v[0..n) summed in parallel, then the blocks in order, in double.
template <class A>
double ordered_sum(const A* v, int64_t n) {
  const int64_t nb = (n + kRowBlock - 1) / kRowBlock;
  std::vector<double> part(nb, 0.0);
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double s = 0;
      const int64_t e = std::min(n, (b + 1) * kRowBlock);
      for (int64_t i = b * kRowBlock; i < e; ++i) s += static_cast<double>(v[i]);
      part[b] = s;
    }
  });
  double s = 0;
  for (double p : part) s += p;
  return s;
}

// ---- hinge_embedding_loss --------------------------------------------------------------------

// Calls body(tag) with a value of the target's element type: self's scalar_t, or int64.
template <class T, class Body>
void dispatch_hinge_target(at::ScalarType target_type, const Body& body) {
  if (target_type == at::kLong) body(int64_t{});
  else body(T{});
}

Tensor hinge_embedding_loss_fwd(const Tensor& self, const Tensor& target, double margin,
                                int64_t reduction) {
  const char* op = "fastops.hinge_embedding_loss";
  check_hinge_embedding(self, target, reduction, op);
  const Tensor x = self.contiguous();
  const Tensor t = target.contiguous();
  const int64_t n = x.numel();
  Tensor out = reduction == kNone ? empty_output(x) : at::empty({}, self.options());
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using A = acc_t<scalar_t>;
    const A m = static_cast<A>(margin);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    dispatch_hinge_target<scalar_t>(t.scalar_type(), [&](auto tag) {
      using TT = decltype(tag);
      const TT* tp = t.const_data_ptr<TT>();
      if (reduction == kNone) {
        scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, n, kElementwiseGrain, [&](int64_t b, int64_t e) {
          dispatch_isa([&]() FO_INLINE_LAMBDA {
            for (int64_t i = b; i < e; ++i)
              op_[i] = static_cast<scalar_t>(
                  hinge_term(static_cast<A>(xp[i]), static_cast<A>(tp[i]), m));
          });
        });
        return;
      }
      const int64_t nb = (n + kHingeBlock - 1) / kHingeBlock;
      std::vector<double> part(nb);
      at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
        dispatch_isa([&]() FO_INLINE_LAMBDA {
          for (int64_t blk = b0; blk < b1; ++blk) {
            const int64_t s = blk * kHingeBlock, e = std::min(n, s + kHingeBlock);
            A acc[kLanes];
            for (int j = 0; j < kLanes; ++j) acc[j] = 0;
            int64_t i = s;
            for (; i + kLanes <= e; i += kLanes)
              for (int j = 0; j < kLanes; ++j)
                acc[j] += hinge_term(static_cast<A>(xp[i + j]), static_cast<A>(tp[i + j]), m);
            A tail = 0;
            for (; i < e; ++i)
              tail += hinge_term(static_cast<A>(xp[i]), static_cast<A>(tp[i]), m);
            double sum = static_cast<double>(tail);
            for (int j = 0; j < kLanes; ++j) sum += static_cast<double>(acc[j]);
            part[blk] = sum;
          }
        });
      });
      double total = 0;
      for (int64_t b = 0; b < nb; ++b) total += part[b];
      if (reduction == kMean)  // the mean of nothing is NaN, as torch's
        total = n == 0 ? std::numeric_limits<double>::quiet_NaN() : total / n;
      out.fill_(total);
    });
  });
  return out;
}

Tensor hinge_embedding_loss_bwd(const Tensor& grad_output, const Tensor& self,
                                const Tensor& target, double margin, int64_t reduction) {
  const char* op = "fastops.hinge_embedding_loss_backward";
  check_hinge_embedding_backward(grad_output, self, target, reduction, op);
  const Tensor x = self.contiguous();
  const Tensor t = target.contiguous();
  const int64_t n = x.numel();
  Tensor gx = empty_output(x);
  if (n == 0) return gx;
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using A = acc_t<scalar_t>;
    const A m = static_cast<A>(margin);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* gp = gx.mutable_data_ptr<scalar_t>();
    // 'none': the elementwise gradient in the input's dtype; else one scale, divided by n for
    // 'mean' in double and rounded to the input's dtype, as torch's mean backward rounds it
    const Tensor g = reduction == kNone ? grad_output.to(x.scalar_type()).contiguous()
                                        : grad_output.to(at::kDouble);
    const scalar_t* g_none = reduction == kNone ? g.const_data_ptr<scalar_t>() : nullptr;
    double scale = reduction == kNone ? 0.0 : g.const_data_ptr<double>()[0];
    if (reduction == kMean) scale /= static_cast<double>(n);
    const A g_all = static_cast<A>(static_cast<scalar_t>(static_cast<A>(scale)));
    dispatch_hinge_target<scalar_t>(t.scalar_type(), [&](auto tag) {
      using TT = decltype(tag);
      const TT* tp = t.const_data_ptr<TT>();
      at::parallel_for(0, n, kElementwiseGrain, [&](int64_t b, int64_t e) {
        dispatch_isa([&]() FO_INLINE_LAMBDA {
          if (g_none != nullptr) {
            for (int64_t i = b; i < e; ++i)
              gp[i] = static_cast<scalar_t>(hinge_grad(static_cast<A>(xp[i]),
                                                       static_cast<A>(tp[i]), m,
                                                       static_cast<A>(g_none[i])));
          } else {
            for (int64_t i = b; i < e; ++i)
              gp[i] = static_cast<scalar_t>(
                  hinge_grad(static_cast<A>(xp[i]), static_cast<A>(tp[i]), m, g_all));
          }
        });
      });
    });
  });
  return gx;
}

// ---- multi_margin_loss -----------------------------------------------------------------------

// Every target a class index in [0, C), checked before any row is read.
void check_class_targets(const int64_t* t, int64_t n, int64_t C, const char* op) {
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(t[i] >= 0 && t[i] < C, op, ": target out of range: target ", t[i],
                " (at index ", i, ") is not a class index in [0, ", C, ")");
}

// The terms of classes [b, e) of a row (a = margin - x_y) summed into kLanes partial sums.
template <int P, class T, class A>
FO_ALWAYS_INLINE void margin_terms(const T* x, int64_t b, int64_t e, A a, A* acc) {
  int64_t i = b;
  for (; i + kLanes <= e; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      acc[j] += margin_term<P>(a + static_cast<A>(x[i + j]));
    }
  for (; i < e; ++i) {
    acc[0] += margin_term<P>(a + static_cast<A>(x[i]));
  }
}

// The gradients of classes [b, e) of a row, written to g and summed into kLanes partial sums
// (their negated total is the target class's gradient).
template <int P, class T, class A>
FO_ALWAYS_INLINE void margin_grads(const T* x, T* g, int64_t b, int64_t e, A a, A c, A* acc) {
  int64_t i = b;
  for (; i + kLanes <= e; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const A v = margin_grad<P>(a + static_cast<A>(x[i + j]), c);
      g[i + j] = static_cast<T>(v);
      acc[j] += v;
    }
  for (; i < e; ++i) {
    const A v = margin_grad<P>(a + static_cast<A>(x[i]), c);
    g[i] = static_cast<T>(v);
    acc[0] += v;
  }
}

template <class A>
FO_ALWAYS_INLINE A lane_total(const A* acc) {
  A s = 0;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// Calls body(integral_constant<int, P>) for p = 1 or 2.
template <class Body>
void dispatch_p(int64_t p, const Body& body) {
  if (p == 1) body(std::integral_constant<int, 1>());
  else body(std::integral_constant<int, 2>());
}

Tensor multi_margin_loss_fwd(const Tensor& self, const Tensor& target, int64_t p, double margin,
                             const c10::optional<Tensor>& weight, int64_t reduction) {
  const char* op = "fastops.multi_margin_loss";
  const Rows r = check_multi_margin(self, target, p, weight, reduction, op);
  const Tensor x = self.contiguous();
  const Tensor tg = target.contiguous();
  const Tensor w = weight_or_undefined(weight);
  Tensor loss = reduction == kNone ? at::empty(multi_margin_rows_shape(target, r.N),
                                               self.options())
                                   : at::empty({}, self.options());
  const int64_t* tp = tg.const_data_ptr<int64_t>();
  check_class_targets(tp, r.N, r.C, op);
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
    const A m = static_cast<A>(margin);
    const A classes = static_cast<A>(r.C);
    // Row losses: into the output for 'none', else into a buffer summed in order.
    std::vector<A> buf(reduction == kNone ? 0 : r.N);
    scalar_t* outp = reduction == kNone ? loss.mutable_data_ptr<scalar_t>() : nullptr;
    dispatch_p(p, [&](auto p_c) {
      constexpr int P = decltype(p_c)::value;
      at::parallel_for(0, r.N, std::max<int64_t>(1, 32768 / r.C), [&](int64_t b, int64_t e) {
        dispatch_isa([&]() FO_INLINE_LAMBDA {
          for (int64_t n = b; n < e; ++n) {
            const scalar_t* xr = xp + n * r.C;
            const int64_t y = tp[n];
            const A a = m - static_cast<A>(xr[y]);
            A acc[kLanes];
            for (int j = 0; j < kLanes; ++j) acc[j] = 0;
            margin_terms<P>(xr, 0, y, a, acc);  // the target class itself is left out
            margin_terms<P>(xr, y + 1, r.C, a, acc);
            A v = lane_total(acc);
            if (wp != nullptr) v *= static_cast<A>(wp[y]);
            v /= classes;
            if (outp != nullptr) outp[n] = static_cast<scalar_t>(v);
            else buf[n] = v;
          }
        });
      });
    });
    if (reduction != kNone) {
      double s = ordered_sum(buf.data(), r.N);
      // torch's 'mean' divides by the rows; over no rows it is NaN here (torch's kernel
      // leaves the output unwritten)
      if (reduction == kMean) s = r.N == 0 ? std::numeric_limits<double>::quiet_NaN() : s / r.N;
      loss.fill_(s);
    }
  });
  return loss;
}

Tensor multi_margin_loss_bwd(const Tensor& grad_output, const Tensor& self, const Tensor& target,
                             int64_t p, double margin, const c10::optional<Tensor>& weight,
                             int64_t reduction) {
  const char* op = "fastops.multi_margin_loss_backward";
  const Rows r = check_multi_margin_backward(grad_output, self, target, p, weight, reduction, op);
  const Tensor x = self.contiguous();
  const Tensor tg = target.contiguous();
  const Tensor w = weight_or_undefined(weight);
  Tensor gx = empty_output(x);
  if (r.N == 0) return gx;
  const int64_t* tp = tg.const_data_ptr<int64_t>();
  check_class_targets(tp, r.N, r.C, op);
  const Tensor g = grad_output.to(at::kDouble).contiguous();
  const double* gp = g.const_data_ptr<double>();
  // d loss_n / d x_i = w_y g_n / C for an active term (times 2 z for p = 2); 'mean' divides
  // by N as well
  const double g_div = static_cast<double>(r.C) * (reduction == kMean ? r.N : 1);
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    const A m = static_cast<A>(margin);
    dispatch_p(p, [&](auto p_c) {
      constexpr int P = decltype(p_c)::value;
      at::parallel_for(0, r.N, std::max<int64_t>(1, 32768 / r.C), [&](int64_t b, int64_t e) {
        dispatch_isa([&]() FO_INLINE_LAMBDA {
          for (int64_t n = b; n < e; ++n) {
            const scalar_t* xr = xp + n * r.C;
            scalar_t* gr = gxp + n * r.C;
            const int64_t y = tp[n];
            const A a = m - static_cast<A>(xr[y]);
            A c = static_cast<A>(gp[reduction == kNone ? n : 0] / g_div);
            if (wp != nullptr) c *= static_cast<A>(wp[y]);
            if (P == 2) c *= A(2);
            A acc[kLanes];
            for (int j = 0; j < kLanes; ++j) acc[j] = 0;
            margin_grads<P>(xr, gr, 0, y, a, c, acc);
            margin_grads<P>(xr, gr, y + 1, r.C, a, c, acc);
            gr[y] = static_cast<scalar_t>(A(0) - lane_total(acc));  // +0 when nothing is active
          }
        });
      });
    });
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CPU, m) {
  m.impl("hinge_embedding_loss", &hinge_embedding_loss_fwd);
  m.impl("hinge_embedding_loss_backward", &hinge_embedding_loss_bwd);
  m.impl("multi_margin_loss", &multi_margin_loss_fwd);
  m.impl("multi_margin_loss_backward", &multi_margin_loss_bwd);
}

}  // namespace cpu
}  // namespace fastops
