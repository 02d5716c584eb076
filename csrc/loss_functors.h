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

// ---------------------------------------------------------------------------------------------
// Branch-free float log and log1p that the CPU loops vectorise (libm's stay scalar); double and
// the device keep the library functions.

// log(x): x = 2^e m with m in [sqrt(1/2), sqrt(2)), log(1 + (m - 1)) by Cephes logf's
// polynomial (about 1 ulp). Subnormals are scaled up first; 0 -> -inf, inf -> inf, x < 0 and
// NaN -> NaN, as logf.
FO_HD float fo_log(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  const bool subnormal = x < 1.17549435e-38f;
  const float xs = subnormal ? x * 8388608.0f : x;  // 2^23
  const int32_t bits = fo_float_to_bits(xs);
  float e = static_cast<float>(((bits >> 23) & 0xff) - 126) - (subnormal ? 23.0f : 0.0f);
  float m = fo_bits_to_float((bits & 0x007fffff) | 0x3f000000);  // [0.5, 1)
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1.0f : e;
  m = low ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float p = 7.0376836292e-2f;
  p = p * m - 1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m - 1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m - 1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m - 2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  float r = p * m * z;
  r += -2.12194440e-4f * e;
  r += -0.5f * z;
  r = m + r + 0.693359375f * e;
  // one comparison per select: combined conditions keep GCC from vectorising the callers
  r = x == std::numeric_limits<float>::infinity() ? x : r;
  r = x == 0.0f ? -std::numeric_limits<float>::infinity() : r;
  return x >= 0.0f ? r : std::numeric_limits<float>::quiet_NaN();  // x < 0 and NaN
#endif
}
FO_HD double fo_log(double x) { return log(x); }

// log1p(u) = log(w) * u / (w - 1) with w = 1 + u rounded (Goldberg): the division puts back
// what the rounding of 1 + u lost, so small u keeps full relative precision.
FO_HD float fo_log1p(float u) {
#if defined(__CUDA_ARCH__)
  return log1pf(u);
#else
  const float w = 1.0f + u;
  const float r = fo_log(w) * (u / (w - 1.0f));
  return w == 1.0f ? u : (w == std::numeric_limits<float>::infinity() ? w : r);
#endif
}
FO_HD double fo_log1p(double u) { return log1p(u); }

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

// binary_cross_entropy on probabilities x: -(y log x + (1 - y) log(1 - x)) with each log
// clamped at -100, as torch; the derivative by x is (x - y) / max((1 - x) x, 1e-12) (torch's
// EPSILON), by y torch's -logit(x) (the unclamped logs: +-inf at x = 0 and 1).
struct BceTerm {
  static constexpr bool kPosWeight = false, kUnitRange = true;
  template <class T> FO_HD static T clamp_log(T v) { return v < T(-100) ? T(-100) : v; }
  template <class T> FO_HD static bool in_unit_range(T v) { return v >= T(0) && v <= T(1); }
  template <class T> FO_HD T loss(T x, T y, T) const {
    return (y - T(1)) * clamp_log(fo_log1p(-x)) - y * clamp_log(fo_log(x));
  }
  template <class T> FO_HD T d_self(T x, T y, T) const {
    const T d = (T(1) - x) * x;
    return (x - y) / (d < T(1e-12) ? T(1e-12) : d);
  }
  template <class T> FO_HD T d_target(T x, T, T) const { return -fo_log(x / (T(1) - x)); }
};

// binary_cross_entropy_with_logits: (1 - y) x - (1 + (p - 1) y) log_sigmoid(x), with
// log_sigmoid(x) = min(x, 0) - log1p(exp(-|x|)): one pass, no overflow for any x. Without
// pos_weight (kPosWeight false) the p terms drop out as in torch's formulas, not as p = 1.
template <bool kHasPosWeight>
struct BceLogitsTerm {
  static constexpr bool kPosWeight = kHasPosWeight, kUnitRange = false;
  template <class T> FO_HD static T softplus_tail(T x) {  // log1p(exp(-|x|))
    return fo_log1p(fo_exp(-fo_abs(x)));
  }
  // The x terms combined before adding: -p y x for x < 0, (1 - y) x for x >= 0, so that a
  // large |x| loses no digits to the cancellation of (1 - y) x against (1 + (p - 1) y) x.
  // x = -inf stays NaN, as torch's -inf + inf.
  template <class T> FO_HD T loss(T x, T y, T p) const {
    const T tail = softplus_tail(x);
    T v;
    if constexpr (kHasPosWeight)
      v = (x < T(0) ? -(p * y) * x : (T(1) - y) * x) + (T(1) + (p - T(1)) * y) * tail;
    else
      v = (x < T(0) ? -y * x : (T(1) - y) * x) + tail;
    return x == -std::numeric_limits<T>::infinity() ? std::numeric_limits<T>::quiet_NaN() : v;
  }
  template <class T> FO_HD T d_self(T x, T y, T p) const {
    if constexpr (kHasPosWeight) {
      const T py = p * y;
      return (py + T(1) - y) * fo_sigmoid(x) - py;
    } else {
      return fo_sigmoid(x) - y;
    }
  }
  // torch's: log_sigmoid(-x) - p log_sigmoid(x), or -x without pos_weight
  template <class T> FO_HD T d_target(T x, T, T p) const {
    if constexpr (kHasPosWeight) {
      const T tail = softplus_tail(x);
      return ((x > T(0) ? -x : T(0)) - tail) - p * ((x < T(0) ? x : T(0)) - tail);
    } else {
      return -x;
    }
  }
};

}  // namespace fastops
