// SIMD lanes for the masked activations: the float32 and float64 forms of NAME_with_mask and
// NAME_mask_backward with AVX-512 (lanes_avx512.cpp) or AVX2 (lanes_avx2.cpp). The functors of
// activations.h run unchanged on vector types, one vector at a time, and their comparisons give
// the saved bit mask directly: with AVX-512 a comparison is a k-mask, one bit per lane, already
// in the mask's format (element i at bit i % 8 of byte i / 8), stored as is and read back as is
// by the backward's masked moves; with AVX2 _mm256_movemask_* of a comparison gives the bits,
// and the backward spreads them back over the lanes. The same IEEE operations as the scalar
// loops, lane by lane: the results are bit-identical. The byte-per-element loops of
// activations.cpp serve the other dtypes and the baseline ISA.
//
// Why files of their own: each is compiled under `#pragma GCC target` for its ISA, so that the
// functors, instantiated there on the vector types, can inline the intrinsics. (Run through
// dispatch_isa's target clones instead, the functors would be functions without a target
// attribute, and GCC refuses to inline an intrinsic into those.) Only headers whose functions
// are all inlined are read under the pragma, so nothing compiled for AVX-512 or AVX2 is shared
// with the code that runs on other CPUs.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FO_HAVE_LANES 1

namespace fastops {
namespace cpu {
namespace lanes {

// The dtypes with lane types; the others (float16, bfloat16) take the byte loops.
template <class scalar_t>
constexpr bool kHasLanes = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;

// Elements [begin, end) of x, with begin a multiple of 8: whole bytes of the mask, except the
// last byte of the tensor. Instantiated in lanes_avx512.cpp / lanes_avx2.cpp for every functor
// of FASTOPS_MASKED_ACTIVATIONS (a missing one fails to link); call only on a CPU with the ISA.
template <class scalar_t, class F>
void masked_forward_avx512(const F& f, const scalar_t* x, scalar_t* y, uint8_t* mask,
                           int64_t begin, int64_t end);
template <class scalar_t, class F>
void masked_forward_avx2(const F& f, const scalar_t* x, scalar_t* y, uint8_t* mask,
                         int64_t begin, int64_t end);
template <class scalar_t, class F>
void masked_backward_avx512(const F& f, const scalar_t* g, const uint8_t* mask, scalar_t* gx,
                            int64_t begin, int64_t end);
template <class scalar_t, class F>
void masked_backward_avx2(const F& f, const scalar_t* g, const uint8_t* mask, scalar_t* gx,
                          int64_t begin, int64_t end);

#if defined(FO_LANES_ISA_FILE)
// ---- for the ISA files: the loops, on a lane type V ---------------------------------------
// V: kWidth lanes of V::scalar; V::mask, the result of a comparison; V::load, store, cmp<P>,
// mul, select(m, a, b) (lane by lane m ? a : b), bits(m) (lane j at bit j), from_bits.

#define FO_LANE __attribute__((always_inline)) inline

// The operators the functors use (found by argument-dependent lookup). C++'s comparisons are
// the ordered, quiet ones: false where either side is NaN.
template <class V> using if_lanes = std::enable_if_t<(V::kWidth > 0), typename V::mask>;
template <class V> FO_LANE if_lanes<V> operator<(V a, V b) {
  return V::template cmp<_CMP_LT_OQ>(a, b);
}
template <class V> FO_LANE if_lanes<V> operator<=(V a, V b) {
  return V::template cmp<_CMP_LE_OQ>(a, b);
}
template <class V> FO_LANE if_lanes<V> operator>(V a, V b) {
  return V::template cmp<_CMP_GT_OQ>(a, b);
}
template <class V> FO_LANE if_lanes<V> operator>=(V a, V b) {
  return V::template cmp<_CMP_GE_OQ>(a, b);
}
template <class V, class = if_lanes<V>> FO_LANE V operator*(V a, V b) { return V::mul(a, b); }
// the lanes' form of activations.h's fo_select(c, a, b)
template <class V> FO_LANE V fo_select(typename V::mask m, V a, V b) {
  return V::select(m, a, b);
}

// Each step takes 16 elements (1, 2 or 4 vectors) and 2 bytes of the mask; the last < 16
// elements run the functor on scalars.
constexpr int64_t kStep = 16;

template <class V, class F>
FO_LANE void masked_forward_range(const F& f, const typename V::scalar* __restrict x,
                                  typename V::scalar* __restrict y, uint8_t* __restrict mask,
                                  int64_t begin, int64_t end) {
  constexpr int kVectors = kStep / V::kWidth;
  int64_t i = begin;
  for (; i + kStep <= end; i += kStep) {
    uint32_t bits = 0;
    for (int q = 0; q < kVectors; ++q) {
      const V v = V::load(x + i + q * V::kWidth);
      f.forward(v).store(y + i + q * V::kWidth);
      bits |= V::bits(f.mask(v)) << (q * V::kWidth);
    }
    const uint16_t word = static_cast<uint16_t>(bits);
    std::memcpy(mask + (i >> 3), &word, sizeof(word));
  }
  if (i == end) return;
  uint32_t bits = 0;
  for (int64_t j = i; j < end; ++j) {
    y[j] = f.forward(x[j]);
    bits |= static_cast<uint32_t>(f.mask(x[j]) ? 1 : 0) << (j - i);
  }
  for (int64_t b = 0; b < (end - i + 7) / 8; ++b)
    mask[(i >> 3) + b] = static_cast<uint8_t>(bits >> (8 * b));
}

template <class V, class F>
FO_LANE void masked_backward_range(const F& f, const typename V::scalar* __restrict g,
                                   const uint8_t* __restrict mask,
                                   typename V::scalar* __restrict gx, int64_t begin,
                                   int64_t end) {
  constexpr int kVectors = kStep / V::kWidth;
  int64_t i = begin;
  for (; i + kStep <= end; i += kStep) {
    uint16_t word;
    std::memcpy(&word, mask + (i >> 3), sizeof(word));
    for (int q = 0; q < kVectors; ++q) {
      const typename V::mask m = V::from_bits(uint32_t{word} >> (q * V::kWidth));
      f.backward_masked(m, V::load(g + i + q * V::kWidth)).store(gx + i + q * V::kWidth);
    }
  }
  for (int64_t j = i; j < end; ++j)
    gx[j] = f.backward_masked(((mask[j >> 3] >> (j & 7)) & 1) != 0, g[j]);
}

// Defines NAME_forward_ISA / NAME_backward_ISA on the lane type LanesOf<scalar_t>::type of the
// file, and instantiates them for every masked functor and both dtypes.
#define FO_LANES_ENTRY_POINTS(isa)                                                           \
  template <class scalar_t, class F>                                                          \
  void masked_forward_##isa(const F& f, const scalar_t* x, scalar_t* y, uint8_t* mask,        \
                            int64_t begin, int64_t end) {                                     \
    masked_forward_range<typename LanesOf<scalar_t>::type>(f, x, y, mask, begin, end);        \
  }                                                                                           \
  template <class scalar_t, class F>                                                          \
  void masked_backward_##isa(const F& f, const scalar_t* g, const uint8_t* mask, scalar_t* gx, \
                             int64_t begin, int64_t end) {                                    \
    masked_backward_range<typename LanesOf<scalar_t>::type>(f, g, mask, gx, begin, end);      \
  }                                                                                           \
  FO_LANES_INSTANTIATE(isa, float, Relu)                                                      \
  FO_LANES_INSTANTIATE(isa, float, Hardtanh)                                                  \
  FO_LANES_INSTANTIATE(isa, float, LeakyRelu)                                                 \
  FO_LANES_INSTANTIATE(isa, float, Hardshrink)                                                \
  FO_LANES_INSTANTIATE(isa, double, Relu)                                                     \
  FO_LANES_INSTANTIATE(isa, double, Hardtanh)                                                 \
  FO_LANES_INSTANTIATE(isa, double, LeakyRelu)                                                \
  FO_LANES_INSTANTIATE(isa, double, Hardshrink)
#define FO_LANES_INSTANTIATE(isa, scalar_t, F)                                                \
  template void masked_forward_##isa<scalar_t, F>(const F&, const scalar_t*, scalar_t*,       \
                                                  uint8_t*, int64_t, int64_t);                \
  template void masked_backward_##isa<scalar_t, F>(const F&, const scalar_t*, const uint8_t*, \
                                                   scalar_t*, int64_t, int64_t);
#endif  // FO_LANES_ISA_FILE

}  // namespace lanes
}  // namespace cpu
}  // namespace fastops
#endif  // x86-64 and GCC
