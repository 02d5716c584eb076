// The masked activations' SIMD lanes with AVX2 (see lanes.h). Everything from the pragma on is
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
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
#define FO_LANES_ISA_FILE
#include "../activations.h"
#include "lanes.h"

namespace fastops {
namespace cpu {
namespace lanes {

// A comparison gives a vector of all-ones / all-zeros lanes; movemask takes the bits.
struct VMask8f {
  __m256 m;
};
struct VMask4d {
  __m256d m;
};
FO_LANE VMask8f operator!(VMask8f a) {
  return {_mm256_xor_ps(a.m, _mm256_castsi256_ps(_mm256_set1_epi32(-1)))};
}
FO_LANE VMask8f operator&&(VMask8f a, VMask8f b) {
  return {_mm256_and_ps(a.m, b.m)};
}
FO_LANE VMask8f operator||(VMask8f a, VMask8f b) {
  return {_mm256_or_ps(a.m, b.m)};
}
FO_LANE VMask4d operator!(VMask4d a) {
  return {_mm256_xor_pd(a.m, _mm256_castsi256_pd(_mm256_set1_epi32(-1)))};
}
FO_LANE VMask4d operator&&(VMask4d a, VMask4d b) {
  return {_mm256_and_pd(a.m, b.m)};
}
FO_LANE VMask4d operator||(VMask4d a, VMask4d b) {
  return {_mm256_or_pd(a.m, b.m)};
}

struct F32x8 {
  using scalar = float;
  using mask = VMask8f;
  static constexpr int kWidth = 8;
  __m256 v;
  FO_LANE explicit F32x8(__m256 a) : v(a) {}
  FO_LANE explicit F32x8(double s) : v(_mm256_set1_ps(static_cast<float>(s))) {}
  static FO_LANE F32x8 load(const float* p) { return F32x8(_mm256_loadu_ps(p)); }
  FO_LANE void store(float* p) const { _mm256_storeu_ps(p, v); }
  template <int P> static FO_LANE mask cmp(F32x8 a, F32x8 b) {
    return {_mm256_cmp_ps(a.v, b.v, P)};
  }
  static FO_LANE F32x8 mul(F32x8 a, F32x8 b) { return F32x8(_mm256_mul_ps(a.v, b.v)); }
  static FO_LANE F32x8 select(mask m, F32x8 a, F32x8 b) {
    return F32x8(_mm256_blendv_ps(b.v, a.v, m.m));
  }
  static FO_LANE uint32_t bits(mask m) { return static_cast<uint32_t>(_mm256_movemask_ps(m.m)); }
  // lane j all-ones where bit j of b is set
  static FO_LANE mask from_bits(uint32_t b) {
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i set = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(b)), lane_bit);
    return {_mm256_castsi256_ps(_mm256_cmpeq_epi32(set, lane_bit))};
  }
};

struct F64x4 {
  using scalar = double;
  using mask = VMask4d;
  static constexpr int kWidth = 4;
  __m256d v;
  FO_LANE explicit F64x4(__m256d a) : v(a) {}
  FO_LANE explicit F64x4(double s) : v(_mm256_set1_pd(s)) {}
  static FO_LANE F64x4 load(const double* p) { return F64x4(_mm256_loadu_pd(p)); }
  FO_LANE void store(double* p) const { _mm256_storeu_pd(p, v); }
  template <int P> static FO_LANE mask cmp(F64x4 a, F64x4 b) {
    return {_mm256_cmp_pd(a.v, b.v, P)};
  }
  static FO_LANE F64x4 mul(F64x4 a, F64x4 b) { return F64x4(_mm256_mul_pd(a.v, b.v)); }
  static FO_LANE F64x4 select(mask m, F64x4 a, F64x4 b) {
    return F64x4(_mm256_blendv_pd(b.v, a.v, m.m));
  }
  static FO_LANE uint32_t bits(mask m) { return static_cast<uint32_t>(_mm256_movemask_pd(m.m)); }
  static FO_LANE mask from_bits(uint32_t b) {
    const __m256i lane_bit = _mm256_setr_epi64x(1, 2, 4, 8);
    const __m256i set = _mm256_and_si256(_mm256_set1_epi64x(static_cast<int64_t>(b)), lane_bit);
    return {_mm256_castsi256_pd(_mm256_cmpeq_epi64(set, lane_bit))};
  }
};

template <class scalar_t> struct LanesOf;
template <> struct LanesOf<float> { using type = F32x8; };
template <> struct LanesOf<double> { using type = F64x4; };

FO_LANES_ENTRY_POINTS(avx2)

}  // namespace lanes
}  // namespace cpu
}  // namespace fastops

#pragma GCC pop_options
#endif  // x86-64 and GCC
