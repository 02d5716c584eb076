// CPU kernels of the activations: one vectorised, multithreaded loop per direction, applied to
// the functors of activations.h; PReLU (per-channel weight) and Maxout (a reduction over groups
// of channels) have loops of their own.
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../activation_checks.h"
#include "../activations.h"
#include "cpu_common.h"
#include "lanes.h"
#include "mask_bits.h"

namespace fastops {
namespace cpu {
namespace {

using at::Tensor;

template <class F>
Tensor unary_forward(const Tensor& self, const F& f, const char* op) {
  check_floating(self, op, "self");
  const Tensor x = self.contiguous();
  Tensor y = empty_output(x);
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), kElementwiseGrain, [&](int64_t begin, int64_t end) {
      dispatch_isa([&]() FO_INLINE_LAMBDA {
        // a local copy: its parameters are then known not to alias the output
        const F fl = params_in_dtype<scalar_t>(f);
        for (int64_t i = begin; i < end; ++i)
          yp[i] = static_cast<scalar_t>(fl.forward(static_cast<acc>(xp[i])));
      });
    });
  });
  return y;
}

template <class F>
Tensor unary_backward(const Tensor& grad_output, const Tensor& self, const F& f, const char* op) {
  check_unary_backward(grad_output, self, op);
  const Tensor x = self.contiguous();
  const Tensor g = grad_output.contiguous();
  Tensor gx = empty_output(x);
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* op_ = gx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), kElementwiseGrain, [&](int64_t begin, int64_t end) {
      dispatch_isa([&]() FO_INLINE_LAMBDA {
        const F fl = params_in_dtype<scalar_t>(f);
        for (int64_t i = begin; i < end; ++i)
          op_[i] = static_cast<scalar_t>(
              fl.backward(static_cast<acc>(xp[i]), static_cast<acc>(gp[i])));
      });
    });
  });
  return gx;
}

// gg * g * f''(x): the derivative of the backward by its input, for second-order gradients.
template <class F>
Tensor unary_double_backward(const Tensor& grad_grad, const Tensor& grad_output,
                             const Tensor& self, const F& f, const char* op) {
  check_unary_backward(grad_output, self, op);
  check_unary_backward(grad_grad, self, op);
  const Tensor x = self.contiguous();
  const Tensor g = grad_output.contiguous();
  const Tensor gg = grad_grad.contiguous();
  Tensor out = empty_output(x);
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* ggp = gg.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), kElementwiseGrain, [&](int64_t begin, int64_t end) {
      dispatch_isa([&]() FO_INLINE_LAMBDA {
        const F fl = params_in_dtype<scalar_t>(f);
        for (int64_t i = begin; i < end; ++i)
          op_[i] = static_cast<scalar_t>(fl.double_backward(
              static_cast<acc>(xp[i]), static_cast<acc>(gp[i]), static_cast<acc>(ggp[i])));
      });
    });
  });
  return out;
}

// The masked forms of the piecewise-linear activations (see activations.h): the forward also
// writes f.mask(x) packed 8 elements to a byte (bit j of byte i is element 8i + j), and the
// backward needs only those bits, 1/32 of the bytes of a float32 input. float32 and float64 with
// AVX-512 or AVX2 run the functors on SIMD lanes whose comparisons give the bits directly
// (lanes.h). The other dtypes and the baseline ISA run over chunks of kMaskChunk elements
// through a byte per element (mask_bits.h); those loops take restrict pointers: a byte pointer
// may alias anything, and they would not vectorise. f by value: its parameters then cannot
// alias them either.
template <class scalar_t, class F>
FO_ALWAYS_INLINE void masked_forward_chunk(const scalar_t* __restrict x, scalar_t* __restrict y,
                                           uint8_t* __restrict bytes, int64_t n, const F f) {
  using acc = acc_t<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    const acc v = static_cast<acc>(x[i]);
    y[i] = static_cast<scalar_t>(f.forward(v));
    bytes[i] = f.mask(v) ? 1 : 0;
  }
}

template <class scalar_t, class F>
FO_ALWAYS_INLINE void masked_backward_chunk(const scalar_t* __restrict g,
                                            const uint8_t* __restrict bytes,
                                            scalar_t* __restrict gx, int64_t n, const F f) {
  using acc = acc_t<scalar_t>;
  for (int64_t i = 0; i < n; ++i)
    gx[i] = static_cast<scalar_t>(f.backward_masked(bytes[i] != 0, static_cast<acc>(g[i])));
}

template <class F>
std::tuple<Tensor, Tensor> masked_forward(const Tensor& self, const F& f, const char* op) {
  check_floating(self, op, "self");
  const Tensor x = self.contiguous();
  const int64_t n = x.numel();
  Tensor mask = at::empty({mask_bytes(n)}, x.options().dtype(at::kByte));
  Tensor y = empty_output(x);
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    uint8_t* mp = mask.mutable_data_ptr<uint8_t>();
#if defined(FO_HAVE_LANES)
    if constexpr (lanes::kHasLanes<scalar_t>) {
      if (cpu_isa() != Isa::baseline) {
        const F fl = params_in_dtype<scalar_t>(f);
        const bool avx512 = cpu_isa() == Isa::avx512;
        for_mask_bytes(n, [&](int64_t begin, int64_t end) {
          if (avx512) lanes::masked_forward_avx512(fl, xp, yp, mp, begin, end);
          else lanes::masked_forward_avx2(fl, xp, yp, mp, begin, end);
        });
        return;
      }
    }
#endif
    for_mask_bytes(n, [&](int64_t begin, int64_t end) {
      dispatch_isa([&]() FO_INLINE_LAMBDA {
        const F fl = params_in_dtype<scalar_t>(f);
        uint64_t words[kMaskChunk / 8];
        uint8_t* bytes = reinterpret_cast<uint8_t*>(words);
        for (int64_t c = begin; c < end; c += kMaskChunk) {
          const int64_t len = std::min(kMaskChunk, end - c);
          masked_forward_chunk(xp + c, yp + c, bytes, len, fl);
          for (int64_t i = len; i < ((len + 7) & ~int64_t{7}); ++i) bytes[i] = 0;
          pack_words(words, mp + c / 8, (len + 7) / 8);
        }
      });
    });
  });
  return {y, mask};
}

template <class F>
Tensor masked_backward(const Tensor& grad_output, const Tensor& mask, const F& f, const char* op) {
  check_mask_backward(grad_output, mask, op);
  const Tensor g = grad_output.contiguous();
  const Tensor m = mask.contiguous();
  const int64_t n = g.numel();
  Tensor gx = empty_output(g);
  FO_DISPATCH_FLOATING(g.scalar_type(), [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const uint8_t* mp = m.const_data_ptr<uint8_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
#if defined(FO_HAVE_LANES)
    if constexpr (lanes::kHasLanes<scalar_t>) {
      if (cpu_isa() != Isa::baseline) {
        const bool avx512 = cpu_isa() == Isa::avx512;
        for_mask_bytes(n, [&](int64_t begin, int64_t end) {
          if (avx512) lanes::masked_backward_avx512(f, gp, mp, gxp, begin, end);
          else lanes::masked_backward_avx2(f, gp, mp, gxp, begin, end);
        });
        return;
      }
    }
#endif
    for_mask_bytes(n, [&](int64_t begin, int64_t end) {
      dispatch_isa([&]() FO_INLINE_LAMBDA {
        uint64_t words[kMaskChunk / 8];
        for (int64_t c = begin; c < end; c += kMaskChunk) {
          const int64_t len = std::min(kMaskChunk, end - c);
          unpack_words(mp + c / 8, words, (len + 7) / 8);
          masked_backward_chunk(gp + c, reinterpret_cast<const uint8_t*>(words), gxp + c, len, f);
        }
      });
    });
  });
  return gx;
}

// ---- PReLU ----------------------------------------------------------------------------------
// self is viewed as (outer, C, inner) with the weight indexed by the channel C (C = 1 for a
// single shared weight): prelu_layout of activation_checks.h.

Tensor prelu_forward(const Tensor& self, const Tensor& weight) {
  const char* op = "fastops.prelu";
  const ChannelLayout l = prelu_layout(self, weight, op);
  const Tensor x = self.contiguous();
  const Tensor w = weight.contiguous();
  Tensor y = empty_output(x);
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
// per fixed block of the input, then the blocks in order. Deterministic without atomics.
std::tuple<Tensor, Tensor> prelu_backward(const Tensor& grad_output, const Tensor& self,
                                          const Tensor& weight) {
  const char* op = "fastops.prelu_backward";
  const ChannelLayout l = prelu_layout(self, weight, op);
  check_prelu_grad(grad_output, self, op);
  const Tensor x = self.contiguous();
  const Tensor g = grad_output.contiguous();
  const Tensor w = weight.contiguous();
  Tensor gx = empty_output(x);
  Tensor gw = at::empty_like(w, at::MemoryFormat::Contiguous);
  const Prelu f;
  const int64_t n = x.numel();
  const int64_t C = l.channels;
  // (N, C) rows: blocks of whole rows, the channel running along each row. Otherwise: blocks of
  // kElementwiseGrain elements of the flat input, cut where the channel changes.
  const bool row_major = l.inner == 1 && C > 1;
  const int64_t block = row_major ? std::max<int64_t>(1, kElementwiseGrain / C) : kElementwiseGrain;
  const int64_t extent = row_major ? l.outer : n;
  const int64_t blocks = extent == 0 ? 0 : (extent + block - 1) / block;
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    std::vector<acc> partial(static_cast<size_t>(blocks * C), acc(0));
    at::parallel_for(0, blocks, 1, [&](int64_t bbegin, int64_t bend) {
      dispatch_isa([&]() FO_INLINE_LAMBDA {
        for (int64_t b = bbegin; b < bend; ++b) {
          acc* part = partial.data() + b * C;
          const int64_t begin = b * block, end = std::min(extent, begin + block);
          if (row_major) {
            for (int64_t r = begin; r < end; ++r)
              for (int64_t c = 0; c < C; ++c) {
                const int64_t i = r * C + c;
                const acc xv = static_cast<acc>(xp[i]), gv = static_cast<acc>(gp[i]);
                gxp[i] = static_cast<scalar_t>(f.backward(xv, static_cast<acc>(wp[c]), gv));
                part[c] += f.weight_grad(xv, gv);
              }
            continue;
          }
          for (int64_t seg = begin; seg < end;) {  // runs of one channel
            const int64_t c = (seg / l.inner) % C;
            const int64_t seg_end = std::min(end, (seg / l.inner + 1) * l.inner);
            const acc wv = static_cast<acc>(wp[c]);
            constexpr int kLanes = 16;  // independent partial sums, so the sum vectorises
            acc lanes[kLanes] = {};
            int64_t i = seg;
            for (; i + kLanes <= seg_end; i += kLanes)
              for (int j = 0; j < kLanes; ++j) {
                const acc xv = static_cast<acc>(xp[i + j]), gv = static_cast<acc>(gp[i + j]);
                gxp[i + j] = static_cast<scalar_t>(f.backward(xv, wv, gv));
                lanes[j] += f.weight_grad(xv, gv);
              }
            for (; i < seg_end; ++i) {
              const acc xv = static_cast<acc>(xp[i]), gv = static_cast<acc>(gp[i]);
              gxp[i] = static_cast<scalar_t>(f.backward(xv, wv, gv));
              lanes[0] += f.weight_grad(xv, gv);
            }
            acc sum = 0;
            for (int j = 0; j < kLanes; ++j) sum += lanes[j];
            part[c] += sum;
            seg = seg_end;
          }
        }
      });
    });
    scalar_t* gwp = gw.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < w.numel(); ++c) {
      acc total = 0;
      for (int64_t b = 0; b < blocks; ++b) total += partial[b * C + c];
      gwp[c] = static_cast<scalar_t>(total);
    }
  });
  return {gx, gw};
}

// ---- Maxout ---------------------------------------------------------------------------------
// self viewed as (outer, groups, k, inner); output (outer, groups, inner): maxout_layout of
// activation_checks.h. NaN wins the max, and among equal values the first channel does.

// The max (and argmax) loops run over the k members of a group outermost, so the innermost loop
// runs over many groups (inner == 1: stride-k loads) or over the contiguous `inner` positions.

// The argmax and scatter loops work on runs of at most kMaxoutRun outputs, staged in local
// arrays.
constexpr int64_t kMaxoutRun = 1024;

// Calls run(members, in, out, count, si, sj) on runs of at most kMaxoutRun outputs, in parallel
// and inside dispatch_isa (run must be a FO_INLINE_LAMBDA): member j of output i of the run sits
// at in + i * si + j * sj in the input, the output at out + i. members is std::true_type when the
// k members of an output are side by side (inner == 1: si = k, sj = 1), std::false_type when the
// run goes along the contiguous inner positions of one group (si = 1, sj = inner).
template <class Run>
void for_each_maxout_run(const MaxoutLayout& l, const Run& run) {
  const int64_t rows = l.outer * l.groups, k = l.k, inner = l.inner;
  if (inner == 1) {
    const int64_t runs = (rows + kMaxoutRun - 1) / kMaxoutRun;
    at::parallel_for(0, runs, std::max<int64_t>(1, kElementwiseGrain / (k * kMaxoutRun)),
                     [&](int64_t begin, int64_t end) {
      dispatch_isa([&]() FO_INLINE_LAMBDA {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t g0 = r * kMaxoutRun;
          run(std::true_type{}, g0 * k, g0, std::min(kMaxoutRun, rows - g0), k, int64_t{1});
        }
      });
    });
  } else if (inner > 1) {
    const int64_t per_row = (inner + kMaxoutRun - 1) / kMaxoutRun;
    at::parallel_for(0, rows * per_row,
                     std::max<int64_t>(1, kElementwiseGrain / (k * std::min(inner, kMaxoutRun))),
                     [&](int64_t begin, int64_t end) {
      dispatch_isa([&]() FO_INLINE_LAMBDA {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t row = r / per_row, s0 = (r % per_row) * kMaxoutRun;
          run(std::false_type{}, row * k * inner + s0, row * inner + s0,
              std::min(kMaxoutRun, inner - s0), int64_t{1}, inner);
        }
      });
    });
  }
}

// The argmax of each output of a run: the member where maxout_takes last fired, i.e. the first
// maximum (the first NaN if there is one). Each loop runs over the outputs of the run, so it
// vectorises without branches (a branchy loop over the members would mispredict on every
// comparison of random data).
template <class scalar_t, class acc>
FO_ALWAYS_INLINE void maxout_argmax_run(const scalar_t* __restrict x, int64_t count, int64_t k,
                                        int64_t si, int64_t sj, acc* __restrict best,
                                        int32_t* __restrict arg) {
  for (int64_t i = 0; i < count; ++i) {
    best[i] = static_cast<acc>(x[i * si]);
    arg[i] = 0;
  }
  for (int64_t j = 1; j < k; ++j)
    for (int64_t i = 0; i < count; ++i) {
      const acc v = static_cast<acc>(x[i * si + j * sj]);
      const bool takes = maxout_takes(v, best[i]);
      best[i] = takes ? v : best[i];
      arg[i] = takes ? static_cast<int32_t>(j) : arg[i];
    }
}

// The run's outputs from its maxima (restrict: else the stores may alias the stack arrays).
template <class scalar_t, class acc>
FO_ALWAYS_INLINE void maxout_store_values(const acc* __restrict best, scalar_t* __restrict y,
                                          int64_t count) {
  for (int64_t i = 0; i < count; ++i) y[i] = static_cast<scalar_t>(best[i]);
}

// gx of a run: g[i] at member arg[i] of output i, 0 at the others. Members side by side: the
// run's k * count gradients are one block, zeroed in one vectorised fill (it stays in L1), then
// each output stores its gradient at its member (one scalar store per output); a select per
// member would need k interleaved strided stores, which the vectoriser serves badly (3-4x
// slower for k = 3, 4). Along inner positions each member's stores are contiguous, so there the
// select vectorises as it is.
template <bool Members, class scalar_t, class Index>
FO_ALWAYS_INLINE void maxout_scatter_run(const scalar_t* __restrict g,
                                         const Index* __restrict arg, scalar_t* __restrict gx,
                                         int64_t count, int64_t k, int64_t si, int64_t sj) {
  const scalar_t zero = static_cast<scalar_t>(0);
  if constexpr (Members) {
    for (int64_t p = 0; p < count * k; ++p) gx[p] = zero;
    for (int64_t i = 0; i < count; ++i) gx[i * k + arg[i]] = g[i];
  } else {
    for (int64_t j = 0; j < k; ++j)
      for (int64_t i = 0; i < count; ++i)
        gx[i * si + j * sj] = static_cast<int64_t>(arg[i]) == j ? g[i] : zero;
  }
}

}  // namespace

// Also the maxout of the fused linear (declared in cpu_common.h).
Tensor maxout_forward(const Tensor& self, int64_t pool_size) {
  const char* op = "fastops.maxout";
  const MaxoutLayout l = maxout_layout(self, pool_size, op);
  const Tensor x = self.contiguous();
  Tensor y = empty_output(maxout_output_shape(self, l), x.options());
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    for_each_maxout_run(l, [&](auto, int64_t in, int64_t out, int64_t count, int64_t si,
                               int64_t sj) FO_INLINE_LAMBDA {
      acc best[kMaxoutRun];
      int32_t arg[kMaxoutRun];
      maxout_argmax_run(xp + in, count, l.k, si, sj, best, arg);
      maxout_store_values(best, yp + out, count);
    });
  });
  return y;
}

namespace {

Tensor maxout_backward(const Tensor& grad_output, const Tensor& self, int64_t pool_size) {
  const char* op = "fastops.maxout_backward";
  const MaxoutLayout l = maxout_layout(self, pool_size, op);
  check_maxout_grad(grad_output, self, l, op);
  const Tensor x = self.contiguous();
  const Tensor g = grad_output.contiguous();
  Tensor gx = empty_output(x);
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    for_each_maxout_run(l, [&](auto members, int64_t in, int64_t out, int64_t count, int64_t si,
                               int64_t sj) FO_INLINE_LAMBDA {
      acc best[kMaxoutRun];
      int32_t arg[kMaxoutRun];
      maxout_argmax_run(xp + in, count, l.k, si, sj, best, arg);
      maxout_scatter_run<decltype(members)::value>(gp + out, arg, gxp + in, count, l.k, si, sj);
    });
  });
  return gx;
}

// ---- Maxout with saved indices --------------------------------------------------------------
// The forward also writes, per output, the member its gradient goes to; the backward scatters
// grad_output by it, reading one byte per output instead of the k inputs.

template <class scalar_t, class acc>
FO_ALWAYS_INLINE void maxout_store_run(const acc* __restrict best, const int32_t* __restrict arg,
                                       scalar_t* __restrict y, uint8_t* __restrict idx,
                                       int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    y[i] = static_cast<scalar_t>(best[i]);
    idx[i] = static_cast<uint8_t>(arg[i]);
  }
}

std::tuple<Tensor, Tensor> maxout_with_indices(const Tensor& self, int64_t pool_size) {
  const char* op = "fastops.maxout_with_indices";
  const MaxoutLayout l = maxout_layout(self, pool_size, op);
  check_maxout_indexed_pool(pool_size, op);
  const Tensor x = self.contiguous();
  const std::vector<int64_t> shape = maxout_output_shape(self, l);
  Tensor y = empty_output(shape, x.options());
  Tensor idx = at::empty(shape, x.options().dtype(at::kByte));
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    uint8_t* ip = idx.mutable_data_ptr<uint8_t>();
    for_each_maxout_run(l, [&](auto, int64_t in, int64_t out, int64_t count, int64_t si,
                               int64_t sj) FO_INLINE_LAMBDA {
      acc best[kMaxoutRun];
      int32_t arg[kMaxoutRun];
      maxout_argmax_run(xp + in, count, l.k, si, sj, best, arg);
      maxout_store_run(best, arg, yp + out, ip + out, count);
    });
  });
  return {y, idx};
}

Tensor maxout_indices_backward(const Tensor& grad_output, const Tensor& indices,
                               int64_t pool_size) {
  const char* op = "fastops.maxout_indices_backward";
  const MaxoutLayout l = maxout_indices_layout(grad_output, indices, pool_size, op);
  const Tensor g = grad_output.contiguous();
  const Tensor idx = indices.contiguous();
  Tensor gx = empty_output(maxout_input_shape(g, l), g.options());
  // An index past the pool would make the scatter write outside its block: each run checks its
  // indices first (a vectorised max over bytes it reads anyway) and the call then raises.
  std::atomic<bool> out_of_range{false};
  FO_DISPATCH_FLOATING(g.scalar_type(), [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const uint8_t* ip = idx.const_data_ptr<uint8_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    for_each_maxout_run(l, [&](auto members, int64_t in, int64_t out, int64_t count,
                               int64_t si, int64_t sj) FO_INLINE_LAMBDA {
      uint8_t top = 0;
      for (int64_t i = 0; i < count; ++i) top = std::max(top, ip[out + i]);
      if (top >= l.k) {
        out_of_range.store(true, std::memory_order_relaxed);
        return;
      }
      maxout_scatter_run<decltype(members)::value>(gp + out, ip + out, gxp + in, count, l.k, si,
                                                   sj);
    });
  });
  TORCH_CHECK_INDEX(!out_of_range.load(), op, ": indices must be below pool_size (", pool_size,
                    "); they are the ones maxout_with_indices returns");
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CPU, m) {
  FO_IMPL_POINTWISE_ACTIVATIONS()
  m.impl("prelu", &prelu_forward);
  m.impl("prelu_backward", &prelu_backward);
  m.impl("maxout", &maxout_forward);
  m.impl("maxout_backward", &maxout_backward);
  m.impl("maxout_with_indices", &maxout_with_indices);
  m.impl("maxout_indices_backward", &maxout_indices_backward);
}

}  // namespace cpu
}  // namespace fastops
