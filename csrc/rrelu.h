// RReLU in training mode: the slope of every element is drawn uniformly from [lower, upper], and
// the backward must see the very slopes the forward drew. Rather than keep them (torch keeps a
// noise tensor of the input's size and dtype), fastops draws them from a counter-based generator
// (Philox4x32-10, Salmon et al. 2011, as curand and torch's CUDA generator): the slope of an
// element is a pure function of a per-call seed and of the element's index, which the forward
// and the backward compute alike, on any number of CPU threads or CUDA threads, with no state
// shared between them. The backward then needs the seed (16 bytes) and the bit mask of x <= 0.
//
// Exactly: a seed row is (key, offset), two int64. Element e (its flat index in the contiguous
// input, or in its slice along dim 0 when there is a seed row per slice) takes 32-bit word
// e % 4 of Philox4x32-10 with key (key low, key high 32 bits) and counter
// (e / 4 low, e / 4 high, offset low, offset high). From word w:
//   float, float16, bfloat16 (computed in float): with l, h the bounds rounded to float and
//     d = h - l in float, slope = min(h, float(double(l) + (w >> 8) * 2^-24 * double(d))):
//     the product is exact in double (24-bit by 24-bit), so the result does not depend on
//     whether the compiler fuses it into an FMA: 2^24 evenly spaced fractions of [l, h], each
//     rounded (twice: to double, then to float).
//   float64: slope = min(h, fma(w * 2^-32, h - l, l)): 2^32 evenly spaced fractions, rounded
//     once.
// lower == upper gives that value exactly. The element's output is x * slope where x <= 0 and
// x elsewhere (NaN passes, as in torch), its gradient grad * slope and grad.
//
// The seed rows come from rrelu_seed, from the default generator of the device, so that
// torch.manual_seed reproduces them: on the CPU a fresh 64-bit key per call (offset 0, or the
// sample's index for a row per sample); on CUDA the generator's seed (XOR a constant) and its
// Philox offset, which each call advances, as torch's dropout takes them.
#pragma once

#include <cmath>
#include <cstdint>

#include "activations.h"

namespace fastops {

// Philox4x32-10 of (counter c, key k), in place: the 4 output words replace the counter. Checked
// against the known-answer vectors of Random123 (tests/test_rrelu.py).
FO_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
#if defined(__CUDA_ARCH__)
    const uint32_t hi0 = __umulhi(0xD2511F53u, c[0]), lo0 = 0xD2511F53u * c[0];
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c[2]), lo1 = 0xCD9E8D57u * c[2];
#else
    const uint64_t p0 = uint64_t{0xD2511F53u} * c[0], p1 = uint64_t{0xCD9E8D57u} * c[2];
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
#endif
    const uint32_t c1 = c[1], c3 = c[3];
    c[0] = hi1 ^ c1 ^ k0;
    c[1] = lo1;
    c[2] = hi0 ^ c3 ^ k1;
    c[3] = lo0;
    k0 += 0x9E3779B9u;  // the key schedule (Weyl sequence) of Philox
    k1 += 0xBB67AE85u;
  }
}

// One seed row, (key, offset), as the kernels read it.
struct RReLUSeed {
  uint32_t k0, k1, off0, off1;
};
FO_HD RReLUSeed rrelu_seed_of(const int64_t* row) {
  const uint64_t key = static_cast<uint64_t>(row[0]), off = static_cast<uint64_t>(row[1]);
  return {static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32),
          static_cast<uint32_t>(off), static_cast<uint32_t>(off >> 32)};
}

// The 4 words of group g (elements 4g .. 4g+3 of a slice) into w.
FO_HD void rrelu_words(const RReLUSeed& s, uint64_t g, uint32_t w[4]) {
  w[0] = static_cast<uint32_t>(g);
  w[1] = static_cast<uint32_t>(g >> 32);
  w[2] = s.off0;
  w[3] = s.off1;
  philox4x32_10(w, s.k0, s.k1);
}

// Slopes from words, and the element math, in compute type T (float or double).
struct RReLU {
  float lower_f, upper_f, range_f;
  double lower_d, upper_d, range_d;

  RReLU(double lower, double upper)
      : lower_f(static_cast<float>(lower)),
        upper_f(static_cast<float>(upper)),
        range_f(static_cast<float>(upper) - static_cast<float>(lower)),
        lower_d(lower),
        upper_d(upper),
        range_d(upper - lower) {}

  FO_HD float slope(uint32_t w, float) const {
    const double u = static_cast<double>(w >> 8) * 0x1p-24;
    const float r = static_cast<float>(static_cast<double>(lower_f) + u * range_f);
    return r < upper_f ? r : upper_f;
  }
  FO_HD double slope(uint32_t w, double) const {
    const double r = fma(static_cast<double>(w) * 0x1p-32, range_d, lower_d);
    return r < upper_d ? r : upper_d;
  }
  template <class T> FO_HD T slope(uint32_t w) const { return slope(w, T{}); }

  // torch's comparison: a slope where x <= 0, so NaN passes (and 0 takes a slope, as -0.0 does)
  template <class T> FO_HD static bool mask(T x) { return !(x <= T(0)); }
  template <class T> FO_HD static T forward(T x, T r) { return x <= T(0) ? x * r : x; }
  template <class T> FO_HD static T backward_masked(bool m, T g, T r) { return m ? g : g * r; }
  template <class T> FO_HD static T backward(T x, T g, T r) {
    return backward_masked(mask(x), g, r);
  }
};

}  // namespace fastops
