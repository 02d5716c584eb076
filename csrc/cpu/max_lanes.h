// Running maxima over lanes, for the softmax-type kernels (cross entropy, linear + cross
// entropy). GCC does not vectorise `a > b ? a : b` over an array (it is not a MAX_EXPR without
// -ffast-math), so the max loops hold vector-extension values: two of 32 bytes, as a 64-byte
// vector without AVX-512 is taken apart lane by lane through the stack (with AVX2 that was
// most of the (3000, 3) cross entropy's forward).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu_common.h"

namespace fastops {
namespace cpu {

// N = 64 / sizeof(A) lanes of the compute type A (float: 16, double: 8).
template <class A>
struct MaxLanes {
  static constexpr int L = 32 / static_cast<int>(sizeof(A));  // lanes per half
  static constexpr int N = 2 * L;
  typedef A Half __attribute__((vector_size(32)));
  Half h[2];

  static FO_ALWAYS_INLINE MaxLanes neg_inf() {
    const Half v = Half{} - std::numeric_limits<A>::infinity();
    return {{v, v}};
  }
  // p[0..N) in A: bfloat16 widened by a shift, other 16-bit types converted lane by lane
  template <class T>
  static FO_ALWAYS_INLINE MaxLanes load(const T* p) {
    MaxLanes v;
    for (int k = 0; k < 2; ++k) {
      if constexpr (std::is_same_v<T, A>) {
        std::memcpy(&v.h[k], p + L * k, sizeof(Half));
      } else if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<A, float>) {
        typedef uint16_t U16 __attribute__((vector_size(16)));  // (L = 8 lanes)
        typedef uint32_t U32 __attribute__((vector_size(32)));
        U16 b;
        std::memcpy(&b, p + L * k, sizeof(b));
        const U32 w = __builtin_convertvector(b, U32) << 16;
        std::memcpy(&v.h[k], &w, sizeof(Half));
      } else {
        for (int j = 0; j < L; ++j) v.h[k][j] = static_cast<A>(p[L * k + j]);
      }
    }
    return v;
  }
  FO_ALWAYS_INLINE void store(A* p) const {
    for (int k = 0; k < 2; ++k) std::memcpy(p + L * k, &h[k], sizeof(Half));
  }
  // lane by lane a > b ? a : b, with a = o: a NaN in o is dropped (m never holds one)
  FO_ALWAYS_INLINE MaxLanes max_with(MaxLanes o) const {
    MaxLanes r;
    for (int k = 0; k < 2; ++k) r.h[k] = o.h[k] > h[k] ? o.h[k] : h[k];
    return r;
  }
  // the max of m and the lanes, lanes in order
  FO_ALWAYS_INLINE A reduce(A m) const {
    for (int j = 0; j < N; ++j) {
      const A v = h[j / L][j % L];
      m = v > m ? v : m;
    }
    return m;
  }
};

// The max of x[0..n) in the compute type A (-inf for none), NaN skipped.
template <class A, class T>
FO_ALWAYS_INLINE A row_max(const T* x, int64_t n) {
  using M = MaxLanes<A>;
  M m = M::neg_inf();
  int64_t i = 0;
  for (; i + M::N <= n; i += M::N) m = m.max_with(M::load(x + i));
  A r = m.reduce(-std::numeric_limits<A>::infinity());
  for (; i < n; ++i) {
    const A v = static_cast<A>(x[i]);
    r = v > r ? v : r;
  }
  return r;
}

}  // namespace cpu
}  // namespace fastops
