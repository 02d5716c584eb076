// The CPU loops of the elementwise losses, shared by regression_losses.cpp (mse_loss, l1_loss)
// and binary_losses.cpp (binary_cross_entropy, binary_cross_entropy_with_logits): each loss is
// a functor of loss_functors.h run through the same forward and backward loops.
//
// Operands: self x and target y of one shape, and weight w and pos_weight p expanded to that
// shape and made contiguous only when they are given, so the plain path reads two tensors.
// Determinism: a reduced loss is summed over fixed blocks of elements, each in kLanes partial
// sums, then the blocks in order, whatever the number of threads; there are no atomics.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <limits>
#include <sstream>
#include <tuple>
#include <vector>

#include "../loss_checks.h"
#include "../loss_functors.h"
#include "cpu_common.h"

namespace fastops {
namespace cpu {
namespace elementwise_loss {

using at::Tensor;

template <class T>
struct Operands {
  const T* x;
  const T* y;
  const T* w;  // null without weight
  const T* p;  // null without pos_weight
};

template <class T>
Operands<T> operands(const Tensor& x, const Tensor& y, const Tensor& w, const Tensor& p) {
  return {x.const_data_ptr<T>(), y.const_data_ptr<T>(),
          w.defined() ? w.const_data_ptr<T>() : nullptr,
          p.defined() ? p.const_data_ptr<T>() : nullptr};
}

template <class Term, class T>
FO_ALWAYS_INLINE acc_t<T> pos_weight_at(const Operands<T>& a, int64_t i) {
  if constexpr (Term::kPosWeight) return static_cast<acc_t<T>>(a.p[i]);
  else return acc_t<T>(1);
}

// w[i] * loss at element i (no multiply without weight).
template <class Term, bool kWeighted, class T>
FO_ALWAYS_INLINE acc_t<T> weighted_loss(const Term& term, const Operands<T>& a, int64_t i) {
  using A = acc_t<T>;
  const A l = term.loss(static_cast<A>(a.x[i]), static_cast<A>(a.y[i]),
                        pos_weight_at<Term>(a, i));
  if constexpr (kWeighted) return l * static_cast<A>(a.w[i]);
  else return l;
}

// 1 where x[i] or y[i] lies outside [0, 1] (NaN included), for Terms with kUnitRange; written
// without branches so that the loops stay vectorised.
template <class Term, class T>
FO_ALWAYS_INLINE int out_of_unit_range(const Operands<T>& a, int64_t i) {
  if constexpr (Term::kUnitRange) {
    using A = acc_t<T>;
    const A x = static_cast<A>(a.x[i]), y = static_cast<A>(a.y[i]);
    return !((x >= A(0)) & (x <= A(1)) & (y >= A(0)) & (y <= A(1)));
  } else {
    return 0;
  }
}

// Raises for the first element of x, then of y, outside [0, 1]: torch's message, with the
// element's index and value.
template <class T>
[[noreturn]] void unit_range_error(const Tensor& self, const Operands<T>& a, int64_t n,
                                   const char* op) {
  for (const auto& [name, data, arg] : {std::make_tuple("input", a.x, "self"),
                                        std::make_tuple("target", a.y, "target")}) {
    for (int64_t i = 0; i < n; ++i) {
      const double v = static_cast<double>(data[i]);
      if (v >= 0.0 && v <= 1.0) continue;
      std::ostringstream where;  // the element's index, e.g. self[3, 17]
      where << arg;
      if (self.dim() > 0) {
        std::vector<int64_t> index(self.dim());
        for (int64_t d = self.dim() - 1, rest = i; d >= 0; --d) {
          index[d] = rest % self.size(d);
          rest /= self.size(d);
        }
        where << at::IntArrayRef(index);
      }
      TORCH_CHECK(false, op, ": all elements of ", name, " should be between 0 and 1, got ",
                  where.str(), " = ", v);
    }
  }
  TORCH_CHECK(false, op, ": an element of self or target is outside [0, 1]");
}

// reduction 'none': out[i] = w[i] * loss(i). Returns whether an element was out of range.
template <class Term, bool kWeighted, class T>
bool loss_none(const Term& term, const Operands<T>& a, int64_t n, T* out) {
  std::atomic<bool> bad{false};
  at::parallel_for(0, n, kElementwiseGrain, [&](int64_t b, int64_t e) {
    int flags = 0;
    dispatch_isa([&]() FO_INLINE_LAMBDA {
      for (int64_t i = b; i < e; ++i) {
        out[i] = static_cast<T>(weighted_loss<Term, kWeighted>(term, a, i));
        flags |= out_of_unit_range<Term>(a, i);
      }
    });
    if (flags) bad.store(true, std::memory_order_relaxed);
  });
  return bad.load();
}

constexpr int kLanes = 16;         // partial sums of a block, one per SIMD lane
constexpr int64_t kBlock = 16384;  // elements per block of a reduced loss

// The sum of w[i] * loss(i): fixed blocks of kBlock elements, each summed in kLanes partial
// sums, then the blocks in order, so the result does not depend on the number of threads.
// Returns (sum, whether an element was out of range).
template <class Term, bool kWeighted, class T>
std::pair<acc_t<T>, bool> loss_sum(const Term& term, const Operands<T>& a, int64_t n) {
  using A = acc_t<T>;
  const int64_t nb = (n + kBlock - 1) / kBlock;
  std::vector<A> part(nb);
  std::atomic<bool> bad{false};
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    int flags = 0;
    dispatch_isa([&]() FO_INLINE_LAMBDA {
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t s = blk * kBlock, e = std::min(n, s + kBlock);
        A acc[kLanes];
        for (int j = 0; j < kLanes; ++j) acc[j] = 0;
        // A counted loop over whole groups of lanes: with `i + kLanes <= e` as its test, and
        // -fwrapv (which Python's build flags add), GCC vectorises the outer loop with index
        // vectors and the sum runs 4x slower.
        const int64_t groups = (e - s) / kLanes;
        for (int64_t g = 0; g < groups; ++g)
          for (int j = 0; j < kLanes; ++j) {
            acc[j] += weighted_loss<Term, kWeighted>(term, a, s + g * kLanes + j);
            flags |= out_of_unit_range<Term>(a, s + g * kLanes + j);
          }
        A t = 0;
        for (int j = 0; j < kLanes; ++j) t += acc[j];
        for (int64_t i = s + groups * kLanes; i < e; ++i) {
          t += weighted_loss<Term, kWeighted>(term, a, i);
          flags |= out_of_unit_range<Term>(a, i);
        }
        part[blk] = t;
      }
    });
    if (flags) bad.store(true, std::memory_order_relaxed);
  });
  A total = 0;
  for (int64_t b = 0; b < nb; ++b) total += part[b];
  return {total, bad.load()};
}

// The forward op after its checks: w and p expanded to self's shape and contiguous, or
// undefined.
template <class Term>
Tensor forward(const Term& term, const Tensor& self, const Tensor& target, const Tensor& w,
               const Tensor& p, int64_t reduction, const char* op) {
  using loss::kMean;
  using loss::kNone;
  const Tensor x = self.contiguous();
  const Tensor y = target.contiguous();
  const int64_t n = x.numel();
  Tensor out = reduction == kNone ? empty_output(x) : at::empty({}, self.options());
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using A = acc_t<scalar_t>;
    const auto a = operands<scalar_t>(x, y, w, p);
    bool bad;
    if (reduction == kNone) {
      scalar_t* o = out.mutable_data_ptr<scalar_t>();
      bad = w.defined() ? loss_none<Term, true>(term, a, n, o)
                        : loss_none<Term, false>(term, a, n, o);
    } else {
      A total;
      std::tie(total, bad) = w.defined() ? loss_sum<Term, true>(term, a, n)
                                         : loss_sum<Term, false>(term, a, n);
      if (reduction == kMean) total = n == 0 ? std::numeric_limits<A>::quiet_NaN() : total / n;
      out.fill_(static_cast<double>(total));
    }
    if (bad) unit_range_error(x, a, n, op);
  });
  return out;
}

// gx[i] = s d_self(i) and gy[i] = s d_target(i) with s = g[i] w[i] (kElementwiseGrad: the
// incoming gradient of reduction 'none') or scale w[i]; gx or gy is null when not wanted.
template <class Term, bool kWeighted, bool kElementwiseGrad, class T>
void loss_backward(const Term& term, const Operands<T>& a, int64_t n, const T* g,
                   acc_t<T> scale, T* gx, T* gy) {
  using A = acc_t<T>;
  at::parallel_for(0, n, kElementwiseGrain, [&](int64_t b, int64_t e) {
    dispatch_isa([&]() FO_INLINE_LAMBDA {
      for (int64_t i = b; i < e; ++i) {
        const A x = static_cast<A>(a.x[i]), y = static_cast<A>(a.y[i]);
        const A p = pos_weight_at<Term>(a, i);
        A s = kElementwiseGrad ? static_cast<A>(g[i]) : scale;
        if constexpr (kWeighted) s *= static_cast<A>(a.w[i]);
        // loop-invariant tests: unswitched
        if (gx) gx[i] = static_cast<T>(term.d_self(x, y, p) * s);
        if (gy) gy[i] = static_cast<T>(term.d_target(x, y, p) * s);
      }
    });
  });
}

// The backward op after its checks: (grad_self, grad_target), each empty where output_mask is
// false.
template <class Term>
std::tuple<Tensor, Tensor> backward(const Term& term, const Tensor& grad_output,
                                    const Tensor& self, const Tensor& target, const Tensor& w,
                                    const Tensor& p, int64_t reduction,
                                    std::array<bool, 2> output_mask) {
  using loss::kMean;
  using loss::kNone;
  const Tensor x = self.contiguous();
  const Tensor y = target.contiguous();
  const int64_t n = x.numel();
  // Only the gradients asked for are written: the target rarely needs one.
  Tensor gx = output_mask[0] ? empty_output(x) : x.new_empty({0});
  Tensor gy = output_mask[1] ? empty_output(x) : x.new_empty({0});
  if (n == 0 || !(output_mask[0] || output_mask[1])) return {gx, gy};
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using A = acc_t<scalar_t>;
    const auto a = operands<scalar_t>(x, y, w, p);
    scalar_t* gxp = output_mask[0] ? gx.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gyp = output_mask[1] ? gy.mutable_data_ptr<scalar_t>() : nullptr;
    if (reduction == kNone) {
      const Tensor g = grad_output.to(x.scalar_type()).contiguous();
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      if (w.defined()) loss_backward<Term, true, true>(term, a, n, gp, A(0), gxp, gyp);
      else loss_backward<Term, false, true>(term, a, n, gp, A(0), gxp, gyp);
    } else {
      const Tensor g = grad_output.to(loss::acc_dtype(x.scalar_type()));
      A scale = g.const_data_ptr<A>()[0];
      if (reduction == kMean) scale = static_cast<A>(static_cast<double>(scale) / n);
      const scalar_t* none = nullptr;
      if (w.defined()) loss_backward<Term, true, false>(term, a, n, none, scale, gxp, gyp);
      else loss_backward<Term, false, false>(term, a, n, none, scale, gxp, gyp);
    }
  });
  return {gx, gy};
}

}  // namespace elementwise_loss
}  // namespace cpu
}  // namespace fastops
