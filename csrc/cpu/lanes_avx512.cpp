// The masked activations' SIMD lanes with AVX-512 (see lanes.h). Everything from the pragma on is
// compiled for that ISA; the standard headers come first, so only functions that are always
// inlined (the functors, the intrinsics, the lanes) take it. Nothing here runs unless
// activations.cpp has seen the ISA on this CPU.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)  // FO_HAVE_LANES
// GCC 12's intrinsics headers warn about their own placeholder operand (_mm512_undefined_*)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi,bmi2,popcnt")
#define FO_LANES_ISA_FILE
#include "../activations.h"
#include "lanes.h"

namespace fastops {
namespace cpu {
namespace lanes {

// A comparison gives a k-mask: the bits themselves.
template <class K>
struct KMask {
  K k;
};
template <class K> FO_LANE KMask<K> operator!(KMask<K> a) { return {static_cast<K>(~a.k)}; }
template <class K> FO_LANE KMask<K> operator&&(KMask<K> a, KMask<K> b) {
  return {static_cast<K>(a.k & b.k)};
}
template <class K> FO_LANE KMask<K> operator||(KMask<K> a, KMask<K> b) {
  return {static_cast<K>(a.k | b.k)};
}

struct F32x16 {
  using scalar = float;
  using mask = KMask<__mmask16>;
  static constexpr int kWidth = 16;
  __m512 v;
  FO_LANE explicit F32x16(__m512 a) : v(a) {}
  // T(param): the parameter rounded to the lane type, as the scalar code does
  FO_LANE explicit F32x16(double s) : v(_mm512_set1_ps(static_cast<float>(s))) {}
  static FO_LANE F32x16 load(const float* p) { return F32x16(_mm512_loadu_ps(p)); }
  FO_LANE void store(float* p) const { _mm512_storeu_ps(p, v); }
  template <int P> static FO_LANE mask cmp(F32x16 a, F32x16 b) {
    return {_mm512_cmp_ps_mask(a.v, b.v, P)};
  }
  static FO_LANE F32x16 mul(F32x16 a, F32x16 b) { return F32x16(_mm512_mul_ps(a.v, b.v)); }
  static FO_LANE F32x16 select(mask m, F32x16 a, F32x16 b) {
    return F32x16(_mm512_mask_blend_ps(m.k, b.v, a.v));
  }
  static FO_LANE uint32_t bits(mask m) { return m.k; }
  static FO_LANE mask from_bits(uint32_t b) { return {static_cast<__mmask16>(b)}; }
};

struct F64x8 {
  using scalar = double;
  using mask = KMask<__mmask8>;
  static constexpr int kWidth = 8;
  __m512d v;
  FO_LANE explicit F64x8(__m512d a) : v(a) {}
  FO_LANE explicit F64x8(double s) : v(_mm512_set1_pd(s)) {}
  static FO_LANE F64x8 load(const double* p) { return F64x8(_mm512_loadu_pd(p)); }
  FO_LANE void store(double* p) const { _mm512_storeu_pd(p, v); }
  template <int P> static FO_LANE mask cmp(F64x8 a, F64x8 b) {
    return {_mm512_cmp_pd_mask(a.v, b.v, P)};
  }
  static FO_LANE F64x8 mul(F64x8 a, F64x8 b) { return F64x8(_mm512_mul_pd(a.v, b.v)); }
  static FO_LANE F64x8 select(mask m, F64x8 a, F64x8 b) {
    return F64x8(_mm512_mask_blend_pd(m.k, b.v, a.v));
  }
  static FO_LANE uint32_t bits(mask m) { return m.k; }
  static FO_LANE mask from_bits(uint32_t b) { return {static_cast<__mmask8>(b)}; }
};

template <class scalar_t> struct LanesOf;
template <> struct LanesOf<float> { using type = F32x16; };
template <> struct LanesOf<double> { using type = F64x8; };

FO_LANES_ENTRY_POINTS(avx512)

}  // namespace lanes
}  // namespace cpu
}  // namespace fastops

#pragma GCC pop_options
#endif  // x86-64 and GCC
