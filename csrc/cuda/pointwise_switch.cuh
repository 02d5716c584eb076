// The pointwise activations chosen at run time by number (PointwiseKind, or kActNone for the
// identity): one switch over FASTOPS_POINTWISE_ACTIVATIONS for kernels that take the activation
// as an argument instead of a template parameter. T: the storage type, whose rounding
// params_in_dtype applies to the parameters (as torch does).
#pragma once

#include <type_traits>

#include "../activations.h"
#include "../linear_checks.h"

namespace fastops {
namespace gpu {

constexpr int kActNone = -1;

// Rounds a compute-type value to the storage type and back (the identity for float / double):
// where torch's 16-bit layers hand a rounded tensor to the next op.
template <class T, class Acc>
__host__ __device__ __forceinline__ Acc round_to(Acc v) {
  if constexpr (std::is_same_v<T, Acc>) return v;
  else return static_cast<Acc>(static_cast<T>(v));
}

template <class T, class A>
__device__ __forceinline__ A act_forward(int kind, A z, double a, double b) {
  (void)a;
  (void)b;
  switch (kind) {
#define FO_CASE(n, schema_params, cpp_params, make) \
  case static_cast<int>(PointwiseKind::n):          \
    return params_in_dtype<T>(FO_UNPAREN make).forward(z);
    FASTOPS_POINTWISE_ACTIVATIONS(FO_CASE)
#undef FO_CASE
    default:
      return z;
  }
}

// g * f'(z); the identity passes g.
template <class T, class A>
__device__ __forceinline__ A act_backward(int kind, A z, A g, double a, double b) {
  (void)a;
  (void)b;
  switch (kind) {
#define FO_CASE(n, schema_params, cpp_params, make) \
  case static_cast<int>(PointwiseKind::n):          \
    return params_in_dtype<T>(FO_UNPAREN make).backward(z, g);
    FASTOPS_POINTWISE_ACTIVATIONS(FO_CASE)
#undef FO_CASE
    default:
      return g;
  }
}

}  // namespace gpu
}  // namespace fastops
