// The math of the elementwise losses, written once for the CPU loops and the CUDA kernels: one
// small functor per loss, over one element of self x, target y and (the logits form only)
// pos_weight p:
//   loss(x, y, p)     -> the element's loss, before its weight and the reduction
//   d_self(x, y, p)   -> d loss / d x
//   d_target(x, y, p) -> d loss / d y
// kPosWeight: whether p is read (else the loops pass 1); kUnitRange: whether x and y must lie in
// [0, 1] (the forward checks it). T is the compute type: float (also for float16/bfloat16
// data) or double. The formulas and their comparisons are torch's, so NaN and infinities come
// out where torch's do.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "activations.h"

namespace fastops {

FO_HD float fo_abs(float v) { return fabsf(v); }
FO_HD double fo_abs(double v) { return fabs(v); }

// ---------------------------------------------------------------------------------------------
// The losses.

// mse_loss: (x - y)^2.
struct MseTerm {
  static constexpr bool kPosWeight = false, kUnitRange = false;
  template <class T> FO_HD T loss(T x, T y, T) const { return (x - y) * (x - y); }
  template <class T> FO_HD T d_self(T x, T y, T) const { return T(2) * (x - y); }
  template <class T> FO_HD T d_target(T x, T y, T) const { return T(-2) * (x - y); }
};

// l1_loss: |x - y|, derivative sign(x - y): 0 where x == y and where x - y is NaN, as torch's
// (0 < d) - (d < 0).
struct L1Term {
  static constexpr bool kPosWeight = false, kUnitRange = false;
  template <class T> FO_HD static T sign(T d) {
    return (T(0) < d ? T(1) : T(0)) - (d < T(0) ? T(1) : T(0));
  }
  template <class T> FO_HD T loss(T x, T y, T) const { return fo_abs(x - y); }
  template <class T> FO_HD T d_self(T x, T y, T) const { return sign(x - y); }
  template <class T> FO_HD T d_target(T x, T y, T) const { return sign(y - x); }
};

}  // namespace fastops
