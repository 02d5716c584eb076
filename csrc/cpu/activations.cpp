// CPU kernels of the activations: one vectorised, multithreaded loop per direction, applied to
// the functors of activations.h; PReLU (per-channel weight) and Maxout (a reduction over groups
// of channels) have loops of their own.
#include <torch/library.h>

#include <vector>

#include "../activations.h"
#include "cpu_common.h"

namespace fastops {
namespace cpu {
namespace {

using at::Tensor;

template <class F>
Tensor unary_forward(const Tensor& self, const F& f, const char* op) {
  check_floating(self, op, "self");
  const Tensor x = self.contiguous();
  Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), kElementwiseGrain, [&](int64_t begin, int64_t end) {
      dispatch_isa([&]() FO_INLINE_LAMBDA {
        const F fl = f;  // a local copy: its parameters are then known not to alias the output
        for (int64_t i = begin; i < end; ++i)
          yp[i] = static_cast<scalar_t>(fl.forward(static_cast<acc>(xp[i])));
      });
    });
  });
  return y;
}

template <class F>
Tensor unary_backward(const Tensor& grad_output, const Tensor& self, const F& f, const char* op) {
  check_floating(self, op, "self");
  check_floating(grad_output, op, "grad_output");
  check_same_dtype(self, grad_output, op, "self", "grad_output");
  check_same_shape(self, grad_output, op, "self", "grad_output");
  const Tensor x = self.contiguous();
  const Tensor g = grad_output.contiguous();
  Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* op_ = gx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), kElementwiseGrain, [&](int64_t begin, int64_t end) {
      dispatch_isa([&]() FO_INLINE_LAMBDA {
        const F fl = f;
        for (int64_t i = begin; i < end; ++i)
          op_[i] = static_cast<scalar_t>(
              fl.backward(static_cast<acc>(xp[i]), static_cast<acc>(gp[i])));
      });
    });
  });
  return gx;
}

// ---- PReLU ----------------------------------------------------------------------------------
// self is viewed as (outer, C, inner) with the weight indexed by the channel C (C = 1 for a
// single shared weight).

struct ChannelLayout {
  int64_t outer, channels, inner;
};

ChannelLayout prelu_layout(const Tensor& self, const Tensor& weight, const char* op) {
  check_floating(self, op, "self");
  check_floating(weight, op, "weight");
  check_same_dtype(self, weight, op, "self", "weight");
  check_same_device(self, weight, op, "self", "weight");
  TORCH_CHECK(weight.dim() <= 1, op, ": expected weight to be a scalar or 1-D tensor, got a ",
              weight.dim(), "-D tensor");
  const int64_t wn = weight.numel();
  if (wn == 1) return {1, 1, self.numel()};
  TORCH_CHECK(self.dim() > 0, op, ": a 0-d input takes a weight of 1 element, got ", wn);
  const int64_t channels = self.dim() >= 2 ? self.size(1) : 1;
  TORCH_CHECK(wn == channels, op, ": weight has ", wn,
              " elements but the input has ", channels,
              " channels (dim 1); num_parameters must be 1 or the number of channels");
  const int64_t outer = self.dim() >= 1 ? self.size(0) : 1;
  const int64_t inner = channels == 0 || outer == 0 ? 0 : self.numel() / (outer * channels);
  return {outer, channels, inner};
}

Tensor prelu_forward(const Tensor& self, const Tensor& weight) {
  const char* op = "fastops.prelu";
  const ChannelLayout l = prelu_layout(self, weight, op);
  const Tensor x = self.contiguous();
  const Tensor w = weight.contiguous();
  Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const Prelu f;
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    if (l.inner == 1) {  // (N, C): the weight runs along each row
      at::parallel_for(0, l.outer, std::max<int64_t>(1, kElementwiseGrain / std::max<int64_t>(1, l.channels)),
                       [&](int64_t begin, int64_t end) {
        dispatch_isa([&]() FO_INLINE_LAMBDA {
          for (int64_t n = begin; n < end; ++n)
            for (int64_t c = 0; c < l.channels; ++c) {
              const int64_t i = n * l.channels + c;
              yp[i] = static_cast<scalar_t>(
                  f.forward(static_cast<acc>(xp[i]), static_cast<acc>(wp[c])));
            }
        });
      });
    } else {  // one weight per contiguous run of `inner` elements
      at::parallel_for(0, l.outer * l.channels, std::max<int64_t>(1, kElementwiseGrain / std::max<int64_t>(1, l.inner)),
                       [&](int64_t begin, int64_t end) {
        dispatch_isa([&]() FO_INLINE_LAMBDA {
          for (int64_t row = begin; row < end; ++row) {
            const acc wv = static_cast<acc>(wp[row % l.channels]);
            const scalar_t* xr = xp + row * l.inner;
            scalar_t* yr = yp + row * l.inner;
            for (int64_t s = 0; s < l.inner; ++s)
              yr[s] = static_cast<scalar_t>(f.forward(static_cast<acc>(xr[s]), wv));
          }
        });
      });
    }
  });
  return y;
}

// The weight gradient is summed in a fixed order whatever the number of threads: partial sums
// over fixed blocks of `outer`, then the blocks in order. Deterministic without atomics.
std::tuple<Tensor, Tensor> prelu_backward(const Tensor& grad_output, const Tensor& self,
                                          const Tensor& weight) {
  const char* op = "fastops.prelu_backward";
  const ChannelLayout l = prelu_layout(self, weight, op);
  check_floating(grad_output, op, "grad_output");
  check_same_dtype(self, grad_output, op, "self", "grad_output");
  check_same_shape(self, grad_output, op, "self", "grad_output");
  const Tensor x = self.contiguous();
  const Tensor g = grad_output.contiguous();
  const Tensor w = weight.contiguous();
  Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  Tensor gw = at::empty_like(w, at::MemoryFormat::Contiguous);
  const Prelu f;
  // Rows of `inner` elements; each block holds whole rows and about kElementwiseGrain elements.
  const int64_t rows = l.outer * l.channels;
  const int64_t rows_per_block =
      std::max<int64_t>(1, kElementwiseGrain / std::max<int64_t>(1, l.inner));
  const int64_t blocks = rows == 0 ? 0 : (rows + rows_per_block - 1) / rows_per_block;
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    std::vector<acc> partial(static_cast<size_t>(blocks * l.channels), acc(0));
    at::parallel_for(0, blocks, 1, [&](int64_t bbegin, int64_t bend) {
      dispatch_isa([&]() FO_INLINE_LAMBDA {
        for (int64_t b = bbegin; b < bend; ++b) {
          acc* part = partial.data() + b * l.channels;
          const int64_t rend = std::min(rows, (b + 1) * rows_per_block);
          for (int64_t row = b * rows_per_block; row < rend; ++row) {
            const int64_t c = row % l.channels;
            const acc wv = static_cast<acc>(wp[c]);
            const scalar_t* xr = xp + row * l.inner;
            const scalar_t* gr = gp + row * l.inner;
            scalar_t* gxr = gxp + row * l.inner;
            acc sum = 0;
            for (int64_t s = 0; s < l.inner; ++s) {
              const acc xv = static_cast<acc>(xr[s]);
              const acc gv = static_cast<acc>(gr[s]);
              gxr[s] = static_cast<scalar_t>(f.backward(xv, wv, gv));
              sum += f.weight_grad(xv, gv);
            }
            part[c] += sum;
          }
        }
      });
    });
    scalar_t* gwp = gw.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < l.channels; ++c) {
      acc total = 0;
      for (int64_t b = 0; b < blocks; ++b) total += partial[b * l.channels + c];
      gwp[c] = static_cast<scalar_t>(total);
    }
    if (blocks == 0)
      for (int64_t c = 0; c < w.numel(); ++c) gwp[c] = static_cast<scalar_t>(0);
  });
  return {gx, gw};
}

// ---- Maxout ---------------------------------------------------------------------------------
// self viewed as (outer, groups, k, inner); output (outer, groups, inner). NaN wins the max, and
// among equal values the first channel does, as torch.max does.

struct MaxoutLayout {
  int64_t outer, groups, k, inner;
};

MaxoutLayout maxout_layout(const Tensor& self, int64_t pool_size, const char* op) {
  check_floating(self, op, "self");
  TORCH_CHECK(self.dim() >= 2, op, ": expected an input of at least 2 dims (N, C, ...), got ",
              self.dim(), " dims");
  TORCH_CHECK(pool_size >= 1, op, ": pool_size must be positive, got ", pool_size);
  const int64_t channels = self.size(1);
  TORCH_CHECK(channels % pool_size == 0, op, ": the number of channels (dim 1) must be divisible "
              "by pool_size, got ", channels, " channels and pool_size ", pool_size);
  const int64_t outer = self.size(0);
  const int64_t inner = outer * channels == 0 ? 0 : self.numel() / (outer * channels);
  return {outer, channels / pool_size, pool_size, inner};
}

template <class T>
FO_ALWAYS_INLINE bool maxout_takes(T candidate, T best) {
  return candidate > best || (candidate != candidate && best == best);
}

Tensor maxout_forward(const Tensor& self, int64_t pool_size) {
  const char* op = "fastops.maxout";
  const MaxoutLayout l = maxout_layout(self, pool_size, op);
  const Tensor x = self.contiguous();
  std::vector<int64_t> out_shape(self.sizes().begin(), self.sizes().end());
  out_shape[1] = l.groups;
  Tensor y = at::empty(out_shape, x.options());
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const int64_t rows = l.outer * l.groups;
    at::parallel_for(0, rows, std::max<int64_t>(1, kElementwiseGrain / std::max<int64_t>(1, l.k * l.inner)),
                     [&](int64_t begin, int64_t end) {
      dispatch_isa([&]() FO_INLINE_LAMBDA {
        for (int64_t row = begin; row < end; ++row) {
          const scalar_t* xr = xp + row * l.k * l.inner;
          scalar_t* yr = yp + row * l.inner;
          for (int64_t s = 0; s < l.inner; ++s) {
            acc best = static_cast<acc>(xr[s]);
            for (int64_t j = 1; j < l.k; ++j) {
              const acc v = static_cast<acc>(xr[j * l.inner + s]);
              best = maxout_takes(v, best) ? v : best;
            }
            yr[s] = static_cast<scalar_t>(best);
          }
        }
      });
    });
  });
  return y;
}

Tensor maxout_backward(const Tensor& grad_output, const Tensor& self, int64_t pool_size) {
  const char* op = "fastops.maxout_backward";
  const MaxoutLayout l = maxout_layout(self, pool_size, op);
  check_floating(grad_output, op, "grad_output");
  check_same_dtype(self, grad_output, op, "self", "grad_output");
  std::vector<int64_t> out_shape(self.sizes().begin(), self.sizes().end());
  out_shape[1] = l.groups;
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(out_shape), op,
              ": expected grad_output of shape ", at::IntArrayRef(out_shape), ", got ",
              grad_output.sizes());
  const Tensor x = self.contiguous();
  const Tensor g = grad_output.contiguous();
  Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    const int64_t rows = l.outer * l.groups;
    at::parallel_for(0, rows, std::max<int64_t>(1, kElementwiseGrain / std::max<int64_t>(1, l.k * l.inner)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* xr = xp + row * l.k * l.inner;
        const scalar_t* gr = gp + row * l.inner;
        scalar_t* gxr = gxp + row * l.k * l.inner;
        for (int64_t s = 0; s < l.inner; ++s) {
          int64_t arg = 0;
          acc best = static_cast<acc>(xr[s]);
          for (int64_t j = 1; j < l.k; ++j) {
            const acc v = static_cast<acc>(xr[j * l.inner + s]);
            if (maxout_takes(v, best)) {
              best = v;
              arg = j;
            }
          }
          for (int64_t j = 0; j < l.k; ++j)
            gxr[j * l.inner + s] = j == arg ? gr[s] : static_cast<scalar_t>(0);
        }
      }
    });
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CPU, m) {
#define FO_IMPL_ACTIVATION(name, schema_params, cpp_params, make)                          \
  m.impl(#name, [](const Tensor& self FO_UNPAREN cpp_params) {                              \
    return unary_forward(self, FO_UNPAREN make, "fastops." #name);                          \
  });                                                                                        \
  m.impl(#name "_backward", [](const Tensor& grad_output, const Tensor& self FO_UNPAREN cpp_params) { \
    return unary_backward(grad_output, self, FO_UNPAREN make, "fastops." #name "_backward"); \
  });
  FASTOPS_POINTWISE_ACTIVATIONS(FO_IMPL_ACTIVATION)
#undef FO_IMPL_ACTIVATION
  m.impl("prelu", &prelu_forward);
  m.impl("prelu_backward", &prelu_backward);
  m.impl("maxout", &maxout_forward);
  m.impl("maxout_backward", &maxout_backward);
}

}  // namespace cpu
}  // namespace fastops
