// CPU kernels of RReLU in training mode (rrelu.h): the seed draw, and one loop for the four
// passes (forward, forward with the bit mask, backward from the input, backward from the mask).
//
// Every pass runs over chunks of kMaskChunk elements, whole bytes of the mask, split among the
// threads by at::parallel_for: first the Philox words of the chunk's groups of 4 elements go to
// a stack buffer, then a vectorised loop turns each word into a slope and applies it. Words
// depend on the element's index only, so the result is the same whatever the number of threads
// and wherever the chunks start. The words are most of the work: with AVX-512 or AVX2 they come
// from intrinsics, 16 or 8 groups at a time (about 1.8x what GCC makes of the scalar code,
// which widens every product to 64 bits); the scalar code serves other CPUs and the ends.
#if defined(__x86_64__) && defined(__GNUC__)
// GCC 12's AVX-512 intrinsics warn about their own placeholder operand (_mm512_undefined_*)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

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

// Words of groups first .. first+count-1 of a slice, 4 per group, into words.
FO_ALWAYS_INLINE void philox_groups(const RReLUSeed seed, uint64_t first, int64_t count,
                                    uint32_t* __restrict words) {
  for (int64_t q = 0; q < count; ++q) {
    uint32_t w[4];
    rrelu_words(seed, first + static_cast<uint64_t>(q), w);
    words[4 * q] = w[0];
    words[4 * q + 1] = w[1];
    words[4 * q + 2] = w[2];
    words[4 * q + 3] = w[3];
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// Philox4x32-10 on L lanes at once: lane i computes group first + i. The low counter word is
// first's plus the lane, so a block whose low word would wrap goes to the scalar code.

// 32x32 -> 64-bit products of every lane: even lanes from mul_epu32 as is, odd lanes shifted down.
FO_TARGET_AVX512 inline void mulhilo16(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

FO_TARGET_AVX512 void philox_groups_avx512(const RReLUSeed seed, uint64_t first, int64_t count,
                                           uint32_t* __restrict words) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t q = 0;
  for (; q + 16 <= count; q += 16) {
    const uint64_t g = first + static_cast<uint64_t>(q);
    if (static_cast<uint32_t>(g) > 0xFFFFFFFFu - 15) {
      philox_groups(seed, g, 16, words + 4 * q);
      continue;
    }
    __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(g)), lane);
    __m512i c1 = _mm512_set1_epi32(static_cast<int>(g >> 32));
    __m512i c2 = _mm512_set1_epi32(static_cast<int>(seed.off0));
    __m512i c3 = _mm512_set1_epi32(static_cast<int>(seed.off1));
    uint32_t k0 = seed.k0, k1 = seed.k1;
    for (int round = 0; round < 10; ++round) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo16(c0, m0, hi0, lo0);
      mulhilo16(c2, m1, hi1, lo1);
      // 0x96: a ^ b ^ c
      c0 = _mm512_ternarylogic_epi32(hi1, c1, _mm512_set1_epi32(static_cast<int>(k0)), 0x96);
      c2 = _mm512_ternarylogic_epi32(hi0, c3, _mm512_set1_epi32(static_cast<int>(k1)), 0x96);
      c1 = lo1;
      c3 = lo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    // word k of lane i -> words[4 * (q + i) + k]: a 4 x 16 transpose
    const __m512i t0 = _mm512_unpacklo_epi32(c0, c1), t1 = _mm512_unpackhi_epi32(c0, c1);
    const __m512i t2 = _mm512_unpacklo_epi32(c2, c3), t3 = _mm512_unpackhi_epi32(c2, c3);
    // per 128-bit block b: u0 holds group 4b, u1 4b+1, u2 4b+2, u3 4b+3
    const __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);
    const __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);
    const __m512i a = _mm512_shuffle_i32x4(u0, u1, 0x44), b = _mm512_shuffle_i32x4(u2, u3, 0x44);
    const __m512i c = _mm512_shuffle_i32x4(u0, u1, 0xEE), d = _mm512_shuffle_i32x4(u2, u3, 0xEE);
    _mm512_storeu_si512(words + 4 * q, _mm512_shuffle_i32x4(a, b, 0x88));
    _mm512_storeu_si512(words + 4 * q + 16, _mm512_shuffle_i32x4(a, b, 0xDD));
    _mm512_storeu_si512(words + 4 * q + 32, _mm512_shuffle_i32x4(c, d, 0x88));
    _mm512_storeu_si512(words + 4 * q + 48, _mm512_shuffle_i32x4(c, d, 0xDD));
  }
  philox_groups(seed, first + static_cast<uint64_t>(q), count - q, words + 4 * q);
}

FO_TARGET_AVX2 inline void mulhilo8(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

FO_TARGET_AVX2 void philox_groups_avx2(const RReLUSeed seed, uint64_t first, int64_t count,
                                       uint32_t* __restrict words) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t q = 0;
  for (; q + 8 <= count; q += 8) {
    const uint64_t g = first + static_cast<uint64_t>(q);
    if (static_cast<uint32_t>(g) > 0xFFFFFFFFu - 7) {
      philox_groups(seed, g, 8, words + 4 * q);
      continue;
    }
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(g)), lane);
    __m256i c1 = _mm256_set1_epi32(static_cast<int>(g >> 32));
    __m256i c2 = _mm256_set1_epi32(static_cast<int>(seed.off0));
    __m256i c3 = _mm256_set1_epi32(static_cast<int>(seed.off1));
    uint32_t k0 = seed.k0, k1 = seed.k1;
    for (int round = 0; round < 10; ++round) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(c0, m0, hi0, lo0);
      mulhilo8(c2, m1, hi1, lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1),
                            _mm256_set1_epi32(static_cast<int>(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3),
                            _mm256_set1_epi32(static_cast<int>(k1)));
      c1 = lo1;
      c3 = lo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    // a 4 x 8 transpose; per 128-bit half h: u0 holds group 4h, u1 4h+1, u2 4h+2, u3 4h+3
    const __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpackhi_epi32(c0, c1);
    const __m256i t2 = _mm256_unpacklo_epi32(c2, c3), t3 = _mm256_unpackhi_epi32(c2, c3);
    const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
    const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
    __m256i* out = reinterpret_cast<__m256i*>(words + 4 * q);
    _mm256_storeu_si256(out, _mm256_permute2x128_si256(u0, u1, 0x20));
    _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(u2, u3, 0x20));
    _mm256_storeu_si256(out + 2, _mm256_permute2x128_si256(u0, u1, 0x31));
    _mm256_storeu_si256(out + 3, _mm256_permute2x128_si256(u2, u3, 0x31));
  }
  philox_groups(seed, first + static_cast<uint64_t>(q), count - q, words + 4 * q);
}
#endif

using PhiloxGroups = void (*)(RReLUSeed, uint64_t, int64_t, uint32_t*);

void philox_groups_scalar(RReLUSeed seed, uint64_t first, int64_t count, uint32_t* words) {
  dispatch_isa([&]() FO_INLINE_LAMBDA { philox_groups(seed, first, count, words); });
}

PhiloxGroups philox_groups_for_this_cpu() {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (cpu_isa()) {
    case Isa::avx512: return &philox_groups_avx512;
    case Isa::avx2: return &philox_groups_avx2;
    default: break;
  }
#endif
  return &philox_groups_scalar;
}

// Words of the groups covering local indices l0 .. l0+len-1 of one slice: element l0 + j takes
// words[(l0 & 3) + j]. words holds len + 3 rounded up to 4.
inline void fill_words(PhiloxGroups philox, const RReLUSeed seed, int64_t l0, int64_t len,
                       uint32_t* words) {
  philox(seed, static_cast<uint64_t>(l0) >> 2, ((l0 & 3) + len + 3) >> 2, words);
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
  const PhiloxGroups philox = philox_groups_for_this_cpu();
  for_mask_bytes(n, [&](int64_t begin, int64_t end) {
    uint32_t words[kMaskChunk + 8];
    uint32_t joined[kMaskChunk];  // a chunk across slices: each slice's words, in order
    for (int64_t c = begin; c < end; c += kMaskChunk) {
      const int64_t len = std::min(kMaskChunk, end - c);
      const int64_t s = c / slice, l0 = c - s * slice;
      const uint32_t* w;
      if (l0 + len <= slice) {
        fill_words(philox, rrelu_seed_of(seeds + 2 * s), l0, len, words);
        w = words + (l0 & 3);
      } else {
        for (int64_t e = c; e < c + len;) {
          const int64_t si = e / slice, li = e - si * slice;
          const int64_t part = std::min(c + len - e, slice - li);
          fill_words(philox, rrelu_seed_of(seeds + 2 * si), li, part, words);
          std::memcpy(joined + (e - c), words + (li & 3), part * sizeof(uint32_t));
          e += part;
        }
        w = joined;
      }
      dispatch_isa([&]() FO_INLINE_LAMBDA {
        uint64_t packed[kMaskChunk / 8];
        uint8_t* bytes = reinterpret_cast<uint8_t*>(packed);
        if constexpr (P == Pass::mask_backward)
          unpack_words(mask_in + c / 8, packed, (len + 7) / 8);
        constexpr bool reads_bytes = P == Pass::mask_backward;
        rrelu_chunk<P>(a + c, b == nullptr ? nullptr : b + c, reads_bytes ? bytes : nullptr,
                       reads_bytes ? nullptr : bytes, out + c, w, len, f);
        if constexpr (P == Pass::forward_mask) {
          for (int64_t i = len; i < ((len + 7) & ~int64_t{7}); ++i) bytes[i] = 0;
          pack_words(packed, mask_out + c / 8, (len + 7) / 8);
        }
      });
    }
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
