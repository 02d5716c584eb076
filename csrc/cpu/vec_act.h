// The piecewise-linear activations of activations.h on GCC vector types: for epilogues that
// keep a tile's row in vector registers. Their forward, mask and backward_masked use only
// comparisons, !, &&, ||, * and fo_select, which Lanes and LaneMask give lane by lane with the
// same IEEE operations: the results are bitwise the scalar ones.
// Left to the compiler, loops of scalar functor calls over a row of known width were unrolled
// into scalar code (AVX2), or vectorised around a stack copy of the row (AVX-512).
//
// Everything here is inlined into the ISA's target functions (gemm::run_isa), so a vector of W
// lanes becomes that ISA's registers.
#pragma once

#include "../activations.h"
#include "cpu_common.h"
#include "gemm.h"

namespace fastops {
namespace cpu {
namespace vec {

template <class S, int W>
struct Lanes {
  using V = typename gemm::VecT<S, W>::type;
  using U = typename gemm::VecT<S, W>::unaligned;
  using M = decltype(V{} < V{});  // a comparison's lanes: integers of S's size
  V v;
  FO_ALWAYS_INLINE explicit Lanes(V x) : v(x) {}
  // T(c) in a functor: c in every lane, rounded to S as the scalar T(c) is
  FO_ALWAYS_INLINE explicit Lanes(double c) : v(splat(static_cast<S>(c))) {}

  static FO_ALWAYS_INLINE V load(const S* p) { return *reinterpret_cast<const U*>(p); }
  static FO_ALWAYS_INLINE void store(S* p, V x) { *reinterpret_cast<U*>(p) = x; }
  static FO_ALWAYS_INLINE V splat(S c) {
    return __builtin_shuffle(V{c}, M{});  // lane 0 into every lane: one broadcast
  }
};

// A comparison's result: all bits set in the lanes where it holds.
template <class S, int W>
struct LaneMask {
  typename Lanes<S, W>::M m;
};

#define FO_LANES_CMP(op)                                                              \
  template <class S, int W>                                                           \
  FO_ALWAYS_INLINE LaneMask<S, W> operator op(Lanes<S, W> a, Lanes<S, W> b) {         \
    return {a.v op b.v};                                                              \
  }
FO_LANES_CMP(<)
FO_LANES_CMP(<=)
FO_LANES_CMP(>)
FO_LANES_CMP(>=)
#undef FO_LANES_CMP

template <class S, int W>
FO_ALWAYS_INLINE LaneMask<S, W> operator!(LaneMask<S, W> a) {
  return {~a.m};
}
template <class S, int W>
FO_ALWAYS_INLINE LaneMask<S, W> operator&&(LaneMask<S, W> a, LaneMask<S, W> b) {
  return {a.m & b.m};
}
template <class S, int W>
FO_ALWAYS_INLINE LaneMask<S, W> operator||(LaneMask<S, W> a, LaneMask<S, W> b) {
  return {a.m | b.m};
}
template <class S, int W>
FO_ALWAYS_INLINE Lanes<S, W> operator*(Lanes<S, W> a, Lanes<S, W> b) {
  return Lanes<S, W>(a.v * b.v);
}
// activations.h's fo_select(c, a, b), lane by lane (found by argument-dependent lookup)
template <class S, int W>
FO_ALWAYS_INLINE Lanes<S, W> fo_select(LaneMask<S, W> c, Lanes<S, W> a, Lanes<S, W> b) {
  return Lanes<S, W>(c.m ? a.v : b.v);
}

// The piecewise-linear functors (those with a mask), written for lanes.
template <class F>
constexpr bool kPiecewiseLinear = requires(const F& f, float x) { f.mask(x); };

}  // namespace vec
}  // namespace cpu
}  // namespace fastops
