// The math of every activation, written once: a small functor per activation with
//   forward(x)     -> f(x)
//   backward(x, g) -> g * f'(x)   (from the saved input x)
//   double_backward(x, g, gg) -> gg * g * f''(x)   (d/dx of backward, for second order)
// The functors are plain scalar code usable on the host (where the CPU loops vectorise them) and
// on the device. T is the compute type: float (also for float16/bfloat16 data) or double.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FO_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define FO_HD __attribute__((always_inline)) inline
#else
#define FO_HD inline
#endif

namespace fastops {

// ---------------------------------------------------------------------------------------------
// Branch-free float math that the CPU vectoriser can turn into SIMD code (libm calls would stay
// scalar). Double keeps the libm functions: it is the precision used by gradcheck.

FO_HD float fo_bits_to_float(int32_t b) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(b);
#else
  return __builtin_bit_cast(float, b);
#endif
}
FO_HD int32_t fo_float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(f);
#else
  return __builtin_bit_cast(int32_t, f);
#endif
}

// The largest float whose exp is finite in float (ln(FLT_MAX) = 88.7228390..., the next float
// up already rounds to inf), as expf.
constexpr float kExpMax = 88.7228317f;

// p(r) of exp(r) = 1 + r + p(r) r^2 for |r| <= ln 2 / 2 (Cephes expf's polynomial).
FO_HD float fo_exp_poly(float r) {
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  return p * r + 5.0000001201e-1f;
}

// exp(xc) for xc in [-87, kExpMax], about 1 ulp: Cody-Waite range reduction and a degree-6
// polynomial (Cephes expf). Callers clamp and handle what lies outside.
FO_HD float fo_exp_in_range(float xc) {
  const float k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = xc - k * 0.693359375f + k * 2.12194440e-4f;
  const float y = fo_exp_poly(r) * r * r + r + 1.0f;
  // For xc <= kExpMax, k <= 128, and k = 128 only where r < 0, so y < 1: no exponent overflow.
  return fo_bits_to_float(fo_float_to_bits(y) + (static_cast<int32_t>(k) << 23));
}

// exp(x) with expf's overflow: inf exactly where expf gives inf, NaN kept. Below -87 it gives 0
// where expf gives at most 1.7e-38 (subnormal below -87.34): an absolute error at the size of
// float's smallest normal number, and the bit trick above never has to build a subnormal.
FO_HD float fo_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  const float scaled = fo_exp_in_range(x < -87.0f ? -87.0f : (x > kExpMax ? kExpMax : x));
  // NaN falls through both comparisons and is returned as is.
  return x < -87.0f ? 0.0f : (x > kExpMax ? INFINITY : (x != x ? x : scaled));
#endif
}
FO_HD double fo_exp(double x) { return exp(x); }

// expm1(x) = exp(x) - 1 without the cancellation near 0 (torch's ELU takes expm1: elu(-1e-8) is
// -1e-8, not 0). Where fo_exp_in_range's reduction leaves k = 0 (|x| < ln 2 / 2, r = x), its
// polynomial gives p(x) x^2 + x with no 1 added; elsewhere |exp(x) - 1| > 0.29 and the subtraction
// costs at most a bit or two.
FO_HD float fo_expm1(float x) {
#if defined(__CUDA_ARCH__)
  return expm1f(x);
#else
  const float small = fo_exp_poly(x) * x * x + x;
  // NaN fails both comparisons and takes fo_exp, which keeps it
  return ((x > -0.34657359f) & (x < 0.34657359f)) ? small : fo_exp(x) - 1.0f;
#endif
}
FO_HD double fo_expm1(double x) { return expm1(x); }

// tanh(x): odd polynomial near 0 (Cephes tanhf), 1 - 2 / (exp(2|x|) + 1) elsewhere.
FO_HD float fo_tanh(float x) {
#if defined(__CUDA_ARCH__)
  return tanhf(x);
#else
  const float ax = x < 0.0f ? -x : x;
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * x + x;
  const float big_abs = 1.0f - 2.0f / (fo_exp(2.0f * ax) + 1.0f);
  const float big = x < 0.0f ? -big_abs : big_abs;
  return ax < 0.625f ? small : big;
#endif
}
FO_HD double fo_tanh(double x) { return tanh(x); }

// The standard normal CDF Phi(x) and density phi(x) together, sharing one exp(-x^2/2): in float
// with the erfc form of Abramowitz & Stegun 7.1.26 (absolute error below 1e-7), which needs one
// exp and one division where erf and exp separately would need two exps.
FO_HD void fo_normal_cdf_pdf(float x, float& cdf, float& pdf) {
#if defined(__CUDA_ARCH__)
  cdf = normcdff(x);
  pdf = 0.39894228040143267794f * expf(-0.5f * x * x);
#else
  const float z = (x < 0.0f ? -x : x) * 0.70710678118654752440f;
  const float t = 1.0f / (1.0f + 0.3275911f * z);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  // exp(-x^2 / 2): the argument is never positive, and a NaN x gives a NaN result through the
  // x * ... of every caller, so only the underflow needs care (0, so that inf * pdf is NaN as
  // in torch).
  const float nz2 = -z * z;
  const float e = nz2 < -87.0f ? 0.0f : fo_exp_in_range(nz2 < -87.0f ? -87.0f : nz2);
  const float tail = 0.5f * t * p * e;  // Phi(-|x|)
  cdf = x < 0.0f ? tail : 1.0f - tail;
  pdf = 0.39894228040143267794f * e;
#endif
}
FO_HD void fo_normal_cdf_pdf(double x, double& cdf, double& pdf) {
  cdf = 0.5 * erfc(-x * 0.70710678118654752440);
  pdf = 0.39894228040143267794 * exp(-0.5 * x * x);
}

// c ? a : b, written as a call so that the piecewise-linear functors below also run on the SIMD
// lane types of cpu/lanes.h, whose overload selects lane by lane.
template <class T> FO_HD T fo_select(bool c, T a, T b) { return c ? a : b; }

// sigmoid(x) = 1 / (1 + exp(-x)).
template <class T> FO_HD T fo_sigmoid(T x) { return T(1) / (T(1) + fo_exp(-x)); }
// In float on the host: fo_exp's value without its selects, which sat in front of the division
// and made GCC divide twice (a masked division for the NaN lanes, another for the rest); here
// they come after the one division. Below -87, 1 + exp(-87) rounds to 1, as 1 + 0 does: the
// same bits as 1 / (1 + fo_exp(-x)) for every float but NaN, which now comes back as given.
FO_HD float fo_sigmoid(float x) {
#if defined(__CUDA_ARCH__)
  return 1.0f / (1.0f + expf(-x));
#else
  const float nx = -x;
  const float r = 1.0f / (1.0f + fo_exp_in_range(nx < -87.0f ? -87.0f
                                                  : (nx > kExpMax ? kExpMax : nx)));
  // 0 where exp(-x) overflows, as with expf; NaN passes
  return nx > kExpMax ? 0.0f : (x != x ? x : r);
#endif
}

// ---------------------------------------------------------------------------------------------
// The activations. Parameters are stored as float (the compute type of every dtype but double,
// where they are read back exactly as given when they are representable).

// The piecewise-linear activations (Relu, Hardtanh, LeakyRelu, Hardshrink) have a derivative
// that takes one of two values, picked by a predicate of x:
//   mask(x)               -> which of the two
//   backward_masked(m, g) -> g * f'(x) from m alone
// so their forward can save that predicate as one bit per element for backward, instead of the
// input: 1/32 of the bytes of a float32 input to keep and to read back. forward, mask and
// backward_masked are written with fo_select, comparisons, !, &&, || and * only, so that the
// CPU's masked loops can also run them on SIMD lanes (cpu/lanes.h), where mask gives a lane
// mask rather than a bool.
struct Relu {
  template <class T> FO_HD T forward(T x) const {  // keeps NaN
    return fo_select(x <= T(0), T(0), x);
  }
  // true for NaN, whose gradient passes, as in torch
  template <class T> FO_HD auto mask(T x) const { return !(x <= T(0)); }
  template <class M, class T> FO_HD T backward_masked(M m, T g) const {
    return fo_select(m, g, T(0));
  }
  template <class T> FO_HD T backward(T x, T g) const { return backward_masked(mask(x), g); }
  // f'' = 0 (torch: zeros, whatever g and gg hold); so for every piecewise-linear one
  template <class T> FO_HD T double_backward(T, T, T) const { return T(0); }
};

// Both sides are computed and one is selected: a branch that alone read alpha kept the CPU
// loops from becoming vector code (the read could not be moved out of the branch).
struct Elu {
  double alpha;
  template <class T> FO_HD T forward(T x) const {
    const T a = T(alpha);
    return fo_select(x > T(0), x, a * fo_expm1(x));
  }
  // torch's comparisons: a NaN input passes g, and f'' is taken as 0 at x = 0 and at NaN
  template <class T> FO_HD T backward(T x, T g) const {
    const T a = T(alpha);
    return fo_select(x <= T(0), g * a * fo_exp(x), g);
  }
  template <class T> FO_HD T double_backward(T x, T g, T gg) const {
    const T a = T(alpha);
    return fo_select(x < T(0), gg * g * a * fo_exp(x), T(0));
  }
};

// GELU with approximate='none': x * Phi(x), Phi the standard normal CDF.
struct Gelu {
  template <class T> FO_HD T forward(T x) const {
    T cdf, pdf;
    fo_normal_cdf_pdf(x, cdf, pdf);
    return x * cdf;
  }
  template <class T> FO_HD T backward(T x, T g) const {
    T cdf, pdf;
    fo_normal_cdf_pdf(x, cdf, pdf);
    return g * (cdf + x * pdf);
  }
  // f'' = 2 phi + x phi' = phi (2 - x^2)
  template <class T> FO_HD T double_backward(T x, T g, T gg) const {
    T cdf, pdf;
    fo_normal_cdf_pdf(x, cdf, pdf);
    return gg * g * pdf * (T(2) - x * x);
  }
};

// GELU with approximate='tanh': 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), computed
// as x * sigmoid(2u), the same value without the cancellation of 1 + tanh(u) for u << 0.
struct GeluTanh {
  template <class T> FO_HD T forward(T x) const {
    const T u2 = T(2 * 0.79788456080286535588) * (x + T(0.044715) * x * x * x);
    return x * fo_sigmoid(u2);
  }
  template <class T> FO_HD T backward(T x, T g) const {
    const T x2 = x * x;
    const T u2 = T(2 * 0.79788456080286535588) * (x + T(0.044715) * x2 * x);
    const T du2 = T(2 * 0.79788456080286535588) * (T(1) + T(3 * 0.044715) * x2);
    const T s = fo_sigmoid(u2);
    return g * (s + x * s * (T(1) - s) * du2);
  }
  // f' = s + x s' u2', s' = s (1 - s), so f'' = s' (2 u2' + x (1 - 2 s) u2'^2 + x u2'')
  template <class T> FO_HD T double_backward(T x, T g, T gg) const {
    const T x2 = x * x;
    const T u2 = T(2 * 0.79788456080286535588) * (x + T(0.044715) * x2 * x);
    const T du2 = T(2 * 0.79788456080286535588) * (T(1) + T(3 * 0.044715) * x2);
    const T d2u2 = T(2 * 0.79788456080286535588 * 6 * 0.044715) * x;
    const T s = fo_sigmoid(u2);
    const T ds = s * (T(1) - s);
    return gg * g * ds * (T(2) * du2 + x * (T(1) - T(2) * s) * du2 * du2 + x * d2u2);
  }
};

struct Hardtanh {
  double min_val, max_val;
  template <class T> FO_HD T forward(T x) const {  // keeps NaN
    return fo_select(x < T(min_val), T(min_val), fo_select(x > T(max_val), T(max_val), x));
  }
  // torch zeroes the gradient where x <= min_val or x >= max_val only: a NaN passes it
  template <class T> FO_HD auto mask(T x) const {
    return !(x <= T(min_val) || x >= T(max_val));
  }
  template <class M, class T> FO_HD T backward_masked(M m, T g) const {
    return fo_select(m, g, T(0));
  }
  template <class T> FO_HD T backward(T x, T g) const { return backward_masked(mask(x), g); }
  template <class T> FO_HD T double_backward(T, T, T) const { return T(0); }
};

struct LeakyRelu {
  double negative_slope;
  template <class T> FO_HD T forward(T x) const {
    return fo_select(x > T(0), x, x * T(negative_slope));
  }
  template <class T> FO_HD auto mask(T x) const { return x > T(0); }
  template <class M, class T> FO_HD T backward_masked(M m, T g) const {
    return fo_select(m, g, g * T(negative_slope));
  }
  template <class T> FO_HD T backward(T x, T g) const { return backward_masked(mask(x), g); }
  template <class T> FO_HD T double_backward(T, T, T) const { return T(0); }
};

// Sigmoid and Tanh have a derivative that is a polynomial of their output y:
//   backward_from_output(y, g) -> g * f'(x)
// so their autograd saves the output (as torch's does) and its backward is a memory-bound
// multiply instead of an exp and a division per element.
struct Sigmoid {
  template <class T> FO_HD T forward(T x) const { return fo_sigmoid(x); }
  template <class T> FO_HD T backward_from_output(T y, T g) const { return g * y * (T(1) - y); }
  template <class T> FO_HD T backward(T x, T g) const {
    return backward_from_output(fo_sigmoid(x), g);
  }
  // d/dy of backward_from_output
  template <class T> FO_HD T output_double_backward(T y, T g, T gg) const {
    return gg * g * (T(1) - T(2) * y);
  }
  template <class T> FO_HD T double_backward(T x, T g, T gg) const {
    const T y = fo_sigmoid(x);
    return output_double_backward(y, g, gg) * y * (T(1) - y);
  }
};
struct Tanh {
  template <class T> FO_HD T forward(T x) const { return fo_tanh(x); }
  template <class T> FO_HD T backward_from_output(T y, T g) const { return g * (T(1) - y * y); }
  template <class T> FO_HD T backward(T x, T g) const {
    return backward_from_output(fo_tanh(x), g);
  }
  template <class T> FO_HD T output_double_backward(T y, T g, T gg) const {
    return T(-2) * gg * g * y;
  }
  template <class T> FO_HD T double_backward(T x, T g, T gg) const {
    const T y = fo_tanh(x);
    return output_double_backward(y, g, gg) * (T(1) - y * y);
  }
};
// NAME_output_backward's functor: the pointwise backward loops call backward(saved, g), here
// with the saved tensor being the output.
template <class F> struct FromOutput {
  F f;
  template <class T> FO_HD T backward(T y, T g) const { return f.backward_from_output(y, g); }
  template <class T> FO_HD T double_backward(T y, T g, T gg) const {
    return f.output_double_backward(y, g, gg);
  }
};
template <class F> FO_HD FromOutput<F> from_output(const F& f) { return FromOutput<F>{f}; }

struct Hardshrink {
  double lambd;
  template <class T> FO_HD T forward(T x) const {  // keeps NaN
    return fo_select(x >= T(-lambd) && x <= T(lambd), T(0), x);
  }
  template <class T> FO_HD auto mask(T x) const {  // true for NaN, whose gradient passes
    return !(x >= T(-lambd) && x <= T(lambd));
  }
  template <class M, class T> FO_HD T backward_masked(M m, T g) const {
    return fo_select(m, g, T(0));
  }
  template <class T> FO_HD T backward(T x, T g) const { return backward_masked(mask(x), g); }
  template <class T> FO_HD T double_backward(T, T, T) const { return T(0); }
};

// torch compares hardshrink's lambd after rounding it to the input's dtype; fastops does the same
// so float16/bfloat16 inputs next to the threshold give torch's answer. Every other functor keeps
// its parameters as given.
template <class scalar_t, class F> FO_HD F params_in_dtype(const F& f) { return f; }
template <class scalar_t> FO_HD Hardshrink params_in_dtype(const Hardshrink& f) {
  return Hardshrink{static_cast<double>(static_cast<scalar_t>(f.lambd))};
}

// Maxout's comparison: does candidate replace the current best? NaN wins, and among equal values
// the first does, as with torch.max. | and & rather than || and &&: no branches to mispredict.
template <class T> FO_HD bool maxout_takes(T candidate, T best) {
  return (candidate > best) | ((candidate != candidate) & (best == best));
}

// PReLU: the slope comes per element (per channel) from a weight tensor.
struct Prelu {
  template <class T> FO_HD T forward(T x, T w) const { return x > T(0) ? x : w * x; }
  template <class T> FO_HD T backward(T x, T w, T g) const { return x > T(0) ? g : w * g; }
  // contribution of one element to d loss / d weight
  template <class T> FO_HD T weight_grad(T x, T g) const { return x > T(0) ? T(0) : x * g; }
};

// The pointwise activations, one line each:
//   X(op name, extra schema arguments, the same as C++ parameters, functor built from them)
// The C++ parameters are always named a and b, so the fused linear+activation op, which takes
// (a, b) for every activation, builds its functor from the same expression. The masked ones
// (functors with mask/backward_masked) also get NAME_with_mask and NAME_mask_backward ops, the
// output ones (backward_from_output) NAME_output_backward(grad_output, output): their autograd
// uses these. The input ones save the input and call NAME_backward.
#define FASTOPS_MASKED_ACTIVATIONS(X)                                                        \
  X(relu, "", (), (Relu{}))                                                                 \
  X(hardtanh, ", float min_val, float max_val", (, double a, double b), (Hardtanh{a, b}))   \
  X(leaky_relu, ", float negative_slope", (, double a), (LeakyRelu{a}))                     \
  X(hardshrink, ", float lambd", (, double a), (Hardshrink{a}))

#define FASTOPS_INPUT_ACTIVATIONS(X)                                                        \
  X(elu, ", float alpha", (, double a), (Elu{a}))                                           \
  X(gelu, "", (), (Gelu{}))                                                                 \
  X(gelu_tanh, "", (), (GeluTanh{}))

#define FASTOPS_OUTPUT_ACTIVATIONS(X)                                                        \
  X(sigmoid, "", (), (Sigmoid{}))                                                           \
  X(tanh, "", (), (Tanh{}))

#define FASTOPS_POINTWISE_ACTIVATIONS(X) \
  FASTOPS_MASKED_ACTIVATIONS(X)          \
  FASTOPS_INPUT_ACTIVATIONS(X)           \
  FASTOPS_OUTPUT_ACTIVATIONS(X)

#define FO_UNPAREN(...) __VA_ARGS__

// The kernels of every pointwise activation for one device, registered from inside a
// TORCH_LIBRARY_IMPL(fastops, KEY, m) block. The CPU and the CUDA file each define
// unary_forward, unary_backward, unary_double_backward, masked_forward and masked_backward
// (functor-templated) for their
// device and expand FO_IMPL_POINTWISE_ACTIVATIONS() there.
#define FO_IMPL_UNARY_KERNELS(name, schema_params, cpp_params, make)                          \
  m.impl(#name, [](const at::Tensor& self FO_UNPAREN cpp_params) {                            \
    return unary_forward(self, FO_UNPAREN make, "fastops." #name);                            \
  });                                                                                          \
  m.impl(#name "_backward",                                                                   \
         [](const at::Tensor& grad_output, const at::Tensor& self FO_UNPAREN cpp_params) {      \
           return unary_backward(grad_output, self, FO_UNPAREN make,                             \
                                 "fastops." #name "_backward");                                  \
         });                                                                                   \
  m.impl(#name "_double_backward",                                                            \
         [](const at::Tensor& grad_grad, const at::Tensor& grad_output,                        \
            const at::Tensor& self FO_UNPAREN cpp_params) {                                    \
           return unary_double_backward(grad_grad, grad_output, self, FO_UNPAREN make,           \
                                        "fastops." #name "_double_backward");                    \
         });
#define FO_IMPL_MASKED_KERNELS(name, schema_params, cpp_params, make)                         \
  m.impl(#name "_with_mask", [](const at::Tensor& self FO_UNPAREN cpp_params) {               \
    return masked_forward(self, FO_UNPAREN make, "fastops." #name "_with_mask");             \
  });                                                                                          \
  m.impl(#name "_mask_backward",                                                              \
         [](const at::Tensor& grad_output, const at::Tensor& mask FO_UNPAREN cpp_params) {      \
           return masked_backward(grad_output, mask, FO_UNPAREN make,                            \
                                  "fastops." #name "_mask_backward");                            \
         });
#define FO_IMPL_OUTPUT_KERNELS(name, schema_params, cpp_params, make)                         \
  m.impl(#name "_output_backward",                                                            \
         [](const at::Tensor& grad_output, const at::Tensor& output FO_UNPAREN cpp_params) {    \
           return unary_backward(grad_output, output, from_output(FO_UNPAREN make),              \
                                 "fastops." #name "_output_backward");                           \
         });                                                                                   \
  m.impl(#name "_output_double_backward",                                                     \
         [](const at::Tensor& grad_grad, const at::Tensor& grad_output,                        \
            const at::Tensor& output FO_UNPAREN cpp_params) {                                  \
           return unary_double_backward(grad_grad, grad_output, output,                          \
                                        from_output(FO_UNPAREN make),                            \
                                        "fastops." #name "_output_double_backward");             \
         });
#define FO_IMPL_POINTWISE_ACTIVATIONS()                     \
  FASTOPS_POINTWISE_ACTIVATIONS(FO_IMPL_UNARY_KERNELS) \
  FASTOPS_MASKED_ACTIVATIONS(FO_IMPL_MASKED_KERNELS)   \
  FASTOPS_OUTPUT_ACTIVATIONS(FO_IMPL_OUTPUT_KERNELS)

}  // namespace fastops
