// CPU kernels of the regression losses: mse_loss.
//
// Determinism: reduced losses are summed over fixed blocks of elements, then the blocks in
// order, whatever the number of threads; there are no atomics.
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <vector>

#include "../loss_checks.h"
#include "cpu_common.h"

namespace fastops {
namespace cpu {
namespace {

using at::Tensor;
using namespace fastops::loss;

constexpr int kLanes = 16;  // partial sums of a block, one per SIMD lane

// ---- mse_loss --------------------------------------------------------------------------------

Tensor mse_loss_fwd(const Tensor& self, const Tensor& target, int64_t reduction) {
  const char* op = "fastops.mse_loss";
  check_mse(self, target, reduction, op);
  const Tensor x = self.contiguous();
  const Tensor y = target.contiguous();
  const int64_t n = x.numel();
  Tensor out = reduction == kNone ? empty_output(x)
                                  : at::empty({}, self.options());
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    if (reduction == kNone) {
      scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, n, kElementwiseGrain, [&](int64_t b, int64_t e) {
        dispatch_isa([&]() FO_INLINE_LAMBDA {
          for (int64_t i = b; i < e; ++i) {
            const A d = static_cast<A>(xp[i]) - static_cast<A>(yp[i]);
            op_[i] = static_cast<scalar_t>(d * d);
          }
        });
      });
      return;
    }
    // Fixed blocks of kMseBlock elements, each summed in kLanes partial sums, then the blocks
    // in order: the same result for any number of threads.
    constexpr int64_t kMseBlock = 16384;
    const int64_t nb = (n + kMseBlock - 1) / kMseBlock;
    std::vector<A> part(nb);
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      dispatch_isa([&]() FO_INLINE_LAMBDA {
        for (int64_t blk = b0; blk < b1; ++blk) {
          const int64_t s = blk * kMseBlock, e = std::min(n, s + kMseBlock);
          A acc[kLanes];
          for (int j = 0; j < kLanes; ++j) acc[j] = 0;
          int64_t i = s;
          for (; i + kLanes <= e; i += kLanes)
            for (int j = 0; j < kLanes; ++j) {
              const A d = static_cast<A>(xp[i + j]) - static_cast<A>(yp[i + j]);
              acc[j] += d * d;
            }
          A t = 0;
          for (int j = 0; j < kLanes; ++j) t += acc[j];
          for (; i < e; ++i) {
            const A d = static_cast<A>(xp[i]) - static_cast<A>(yp[i]);
            t += d * d;
          }
          part[blk] = t;
        }
      });
    });
    A total = 0;
    for (int64_t b = 0; b < nb; ++b) total += part[b];
    if (reduction == kMean) total = n == 0 ? std::numeric_limits<A>::quiet_NaN() : total / n;
    out.fill_(static_cast<double>(total));
  });
  return out;
}

std::tuple<Tensor, Tensor> mse_loss_bwd(const Tensor& grad_output, const Tensor& self,
                                        const Tensor& target, int64_t reduction,
                                        std::array<bool, 2> output_mask) {
  const char* op = "fastops.mse_loss_backward";
  check_mse_backward(grad_output, self, target, reduction, op);
  const Tensor x = self.contiguous();
  const Tensor y = target.contiguous();
  const int64_t n = x.numel();
  // Only the gradients asked for are written: the target rarely needs one.
  Tensor gx = output_mask[0] ? empty_output(x) : x.new_empty({0});
  Tensor gy = output_mask[1] ? empty_output(x) : x.new_empty({0});
  if (n == 0) return {gx, gy};
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using A = acc_t<scalar_t>;
    const Tensor g = reduction == kNone ? grad_output.to(x.scalar_type()).contiguous()
                                        : grad_output.to(acc_dtype(x.scalar_type()));
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* gxp = output_mask[0] ? gx.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gyp = output_mask[1] ? gy.mutable_data_ptr<scalar_t>() : nullptr;
    if (reduction == kNone) {
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      at::parallel_for(0, n, kElementwiseGrain, [&](int64_t b, int64_t e) {
        dispatch_isa([&]() FO_INLINE_LAMBDA {
          for (int64_t i = b; i < e; ++i) {
            const A v = A(2) * (static_cast<A>(xp[i]) - static_cast<A>(yp[i])) *
                        static_cast<A>(gp[i]);
            if (gxp) gxp[i] = static_cast<scalar_t>(v);  // loop-invariant: unswitched
            if (gyp) gyp[i] = static_cast<scalar_t>(-v);
          }
        });
      });
    } else {
      A scale = A(2) * g.const_data_ptr<A>()[0];
      if (reduction == kMean) scale = static_cast<A>(static_cast<double>(scale) / n);
      at::parallel_for(0, n, kElementwiseGrain, [&](int64_t b, int64_t e) {
        dispatch_isa([&]() FO_INLINE_LAMBDA {
          for (int64_t i = b; i < e; ++i) {
            const A v = (static_cast<A>(xp[i]) - static_cast<A>(yp[i])) * scale;
            if (gxp) gxp[i] = static_cast<scalar_t>(v);  // loop-invariant: unswitched
            if (gyp) gyp[i] = static_cast<scalar_t>(-v);
          }
        });
      });
    }
  });
  return {gx, gy};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CPU, m) {
  m.impl("mse_loss", &mse_loss_fwd);
  m.impl("mse_loss_backward", &mse_loss_bwd);
}

}  // namespace cpu
}  // namespace fastops
