// CPU kernels of RReLU in training mode (rrelu.h): the seed draw, and one loop for the four
// passes (forward, forward with the bit mask, backward from the input, backward from the mask).
//
// Every pass runs over chunks of kMaskChunk elements, whole bytes of the mask, split among the
// threads by at::parallel_for: first a vectorised loop computes the Philox words of the chunk's
// groups of 4 elements into a stack buffer, then a vectorised loop turns each word into a slope
// and applies it. Words depend on the element's index only, so the result is the same whatever
// the number of threads and wherever the chunks start.
#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <mutex>

#include "../activation_checks.h"
#include "../rrelu.h"
#include "cpu_common.h"
#include "mask_bits.h"

namespace fastops {
namespace cpu {
namespace {

using at::Tensor;

enum class Pass { forward, forward_mask, backward, mask_backward };

// Words of the groups covering local indices l0 .. l0+len-1 of one slice: element l0 + j takes
// words[(l0 & 3) + j]. words holds len + 3 rounded up to 4.
FO_ALWAYS_INLINE void fill_words(const RReLUSeed seed, int64_t l0, int64_t len,
                                 uint32_t* __restrict words) {
  const uint64_t first = static_cast<uint64_t>(l0) >> 2;
  const int64_t groups = ((l0 & 3) + len + 3) >> 2;
  for (int64_t q = 0; q < groups; ++q) {
    uint32_t w[4];
    rrelu_words(seed, first + static_cast<uint64_t>(q), w);
    words[4 * q] = w[0];
    words[4 * q + 1] = w[1];
    words[4 * q + 2] = w[2];
    words[4 * q + 3] = w[3];
  }
}

// Elements 0 .. len-1 of a chunk, element j with word w[j]. a is the input (forward) or
// grad_output (backward), b the input for the backward from the input.
template <Pass P, class scalar_t>
FO_ALWAYS_INLINE void rrelu_chunk(const scalar_t* __restrict a, const scalar_t* __restrict b,
                                  const uint8_t* __restrict bytes_in,
                                  uint8_t* __restrict bytes_out, scalar_t* __restrict out,
                                  const uint32_t* __restrict w, int64_t len, const RReLU f) {
  using acc = acc_t<scalar_t>;
  for (int64_t j = 0; j < len; ++j) {
    const acc r = f.slope<acc>(w[j]);
    const acc v = static_cast<acc>(a[j]);
    if constexpr (P == Pass::forward || P == Pass::forward_mask) {
      out[j] = static_cast<scalar_t>(RReLU::forward(v, r));
      if constexpr (P == Pass::forward_mask) bytes_out[j] = RReLU::mask(v) ? 1 : 0;
    } else if constexpr (P == Pass::backward) {
      out[j] = static_cast<scalar_t>(RReLU::backward(static_cast<acc>(b[j]), v, r));
    } else {
      out[j] = static_cast<scalar_t>(RReLU::backward_masked(bytes_in[j] != 0, v, r));
    }
  }
}

// One pass over n elements with `rows` seed rows (a row per slice of n / rows elements).
template <Pass P, class scalar_t>
void run(const RReLU& f, const int64_t* seeds, int64_t rows, int64_t n, const scalar_t* a,
         const scalar_t* b, const uint8_t* mask_in, uint8_t* mask_out, scalar_t* out) {
  if (n == 0) return;
  const int64_t slice = n / rows;
  for_mask_bytes(n, [&](int64_t begin, int64_t end) {
    dispatch_isa([&]() FO_INLINE_LAMBDA {
      uint32_t words[kMaskChunk + 8];
      uint32_t joined[kMaskChunk];  // a chunk across slices: each slice's words, in order
      uint64_t packed[kMaskChunk / 8];
      uint8_t* bytes = reinterpret_cast<uint8_t*>(packed);
      for (int64_t c = begin; c < end; c += kMaskChunk) {
        const int64_t len = std::min(kMaskChunk, end - c);
        const int64_t s = c / slice, l0 = c - s * slice;
        const uint32_t* w;
        if (l0 + len <= slice) {
          fill_words(rrelu_seed_of(seeds + 2 * s), l0, len, words);
          w = words + (l0 & 3);
        } else {
          for (int64_t e = c; e < c + len;) {
            const int64_t si = e / slice, li = e - si * slice;
            const int64_t part = std::min(c + len - e, slice - li);
            fill_words(rrelu_seed_of(seeds + 2 * si), li, part, words);
            std::memcpy(joined + (e - c), words + (li & 3), part * sizeof(uint32_t));
            e += part;
          }
          w = joined;
        }
        if constexpr (P == Pass::mask_backward)
          unpack_words(mask_in + c / 8, packed, (len + 7) / 8);
        constexpr bool reads_bytes = P == Pass::mask_backward;
        rrelu_chunk<P>(a + c, b == nullptr ? nullptr : b + c, reads_bytes ? bytes : nullptr,
                       reads_bytes ? nullptr : bytes, out + c, w, len, f);
        if constexpr (P == Pass::forward_mask) {
          for (int64_t i = len; i < ((len + 7) & ~int64_t{7}); ++i) bytes[i] = 0;
          pack_words(packed, mask_out + c / 8, (len + 7) / 8);
        }
      }
    });
  });
}

// The default CPU generator's next 64 bits, under its mutex as every torch op takes them, so
// torch.manual_seed makes the draw reproducible.
Tensor rrelu_seed(const Tensor& self, int64_t samples) {
  TORCH_CHECK(samples >= 0, "fastops.rrelu_seed: samples must be >= 0, got ", samples);
  uint64_t key;
  {
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    key = gen.get<at::CPUGeneratorImpl>()->random64();
  }
  const auto options = self.options().dtype(at::kLong);
  Tensor seed = samples == 0 ? at::empty({2}, options) : at::empty({samples, 2}, options);
  // one key; the samples' rows differ by offset, which keeps their counters apart
  int64_t* p = seed.mutable_data_ptr<int64_t>();
  for (int64_t s = 0; s < std::max<int64_t>(samples, 1); ++s) {
    p[2 * s] = static_cast<int64_t>(key);
    p[2 * s + 1] = s;
  }
  return seed;
}

Tensor rrelu_seeded(const Tensor& self, const Tensor& seed, double lower, double upper) {
  const char* op = "fastops.rrelu_seeded";
  check_floating(self, op, "self");
  check_rrelu_bounds(lower, upper, op);
  const int64_t rows = rrelu_seed_rows(self, seed, op);
  const Tensor x = self.contiguous(), s = seed.contiguous();
  Tensor y = empty_output(x);
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    run<Pass::forward, scalar_t>(RReLU(lower, upper), s.const_data_ptr<int64_t>(), rows,
                                 x.numel(), x.const_data_ptr<scalar_t>(), nullptr, nullptr,
                                 nullptr, y.mutable_data_ptr<scalar_t>());
  });
  return y;
}

std::tuple<Tensor, Tensor> rrelu_seeded_with_mask(const Tensor& self, const Tensor& seed,
                                                  double lower, double upper) {
  const char* op = "fastops.rrelu_seeded_with_mask";
  check_floating(self, op, "self");
  check_rrelu_bounds(lower, upper, op);
  const int64_t rows = rrelu_seed_rows(self, seed, op);
  const Tensor x = self.contiguous(), s = seed.contiguous();
  Tensor y = empty_output(x);
  Tensor mask = at::empty({mask_bytes(x.numel())}, x.options().dtype(at::kByte));
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    run<Pass::forward_mask, scalar_t>(RReLU(lower, upper), s.const_data_ptr<int64_t>(), rows,
                                      x.numel(), x.const_data_ptr<scalar_t>(), nullptr, nullptr,
                                      mask.mutable_data_ptr<uint8_t>(),
                                      y.mutable_data_ptr<scalar_t>());
  });
  return {y, mask};
}

Tensor rrelu_seeded_backward(const Tensor& grad_output, const Tensor& self, const Tensor& seed,
                             double lower, double upper) {
  const char* op = "fastops.rrelu_seeded_backward";
  check_unary_backward(grad_output, self, op);
  check_rrelu_bounds(lower, upper, op);
  const int64_t rows = rrelu_seed_rows(self, seed, op);
  const Tensor x = self.contiguous(), g = grad_output.contiguous(), s = seed.contiguous();
  Tensor gx = empty_output(x);
  FO_DISPATCH_FLOATING(x.scalar_type(), [&] {
    run<Pass::backward, scalar_t>(RReLU(lower, upper), s.const_data_ptr<int64_t>(), rows,
                                  x.numel(), g.const_data_ptr<scalar_t>(),
                                  x.const_data_ptr<scalar_t>(), nullptr, nullptr,
                                  gx.mutable_data_ptr<scalar_t>());
  });
  return gx;
}

Tensor rrelu_seeded_mask_backward(const Tensor& grad_output, const Tensor& mask,
                                  const Tensor& seed, double lower, double upper) {
  const char* op = "fastops.rrelu_seeded_mask_backward";
  check_mask_backward(grad_output, mask, op);
  check_rrelu_bounds(lower, upper, op);
  const int64_t rows = rrelu_seed_rows(grad_output, seed, op, "grad_output");
  const Tensor g = grad_output.contiguous(), m = mask.contiguous(), s = seed.contiguous();
  Tensor gx = empty_output(g);
  FO_DISPATCH_FLOATING(g.scalar_type(), [&] {
    run<Pass::mask_backward, scalar_t>(RReLU(lower, upper), s.const_data_ptr<int64_t>(), rows,
                                       g.numel(), g.const_data_ptr<scalar_t>(), nullptr,
                                       m.const_data_ptr<uint8_t>(), nullptr,
                                       gx.mutable_data_ptr<scalar_t>());
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CPU, m) {
  m.impl("rrelu_seed", &rrelu_seed);
  m.impl("rrelu_seeded", &rrelu_seeded);
  m.impl("rrelu_seeded_backward", &rrelu_seeded_backward);
  m.impl("rrelu_seeded_with_mask", &rrelu_seeded_with_mask);
  m.impl("rrelu_seeded_mask_backward", &rrelu_seeded_mask_backward);
}

}  // namespace cpu
}  // namespace fastops
