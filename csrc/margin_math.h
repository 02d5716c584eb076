// The math of the margin losses, written once for the CPU and CUDA kernels (A: the compute
// type, float or double). The comparisons are torch's: a hinge is active where its argument is
// strictly positive, so a tie at the hinge is inactive and a NaN is never active.
#pragma once

#include "activations.h"  // FO_HD

namespace fastops {
namespace margin {

// hinge_embedding_loss of one element, torch's composite: where(t != 1, clamp_min(margin - x,
// 0), 0) + where(t != -1, x, 0). The clamp keeps a NaN, as torch's clamp_min does.
template <class A>
FO_HD A hinge_term(A x, A t, A margin) {
  A h = margin - x;
  h = h < A(0) ? A(0) : h;
  return (t != A(1) ? h : A(0)) + (t != A(-1) ? x : A(0));
}

// Its gradient for an incoming g, selected as torch's where and clamp_min backward select it
// (never 0 * g, so an infinite g stays out of the branches it does not reach): g where
// t != -1, minus g where t != 1 and margin - x > 0.
template <class A>
FO_HD A hinge_grad(A x, A t, A margin, A g) {
  const A self_part = t != A(-1) ? g : A(0);
  const A hinge_part = (t != A(1) && margin - x > A(0)) ? g : A(0);
  return self_part - hinge_part;
}

// One class's term of multi_margin_loss for z = (margin - x_y) + x_i (torch's order of
// operations): max(0, z)^P.
template <int P, class A>
FO_HD A margin_term(A z) {
  return z > A(0) ? (P == 1 ? z : z * z) : A(0);
}

// Its gradient for a row coefficient c (w_y g / C, doubled for P = 2): c, or c z, where active.
template <int P, class A>
FO_HD A margin_grad(A z, A c) {
  return z > A(0) ? (P == 1 ? c : c * z) : A(0);
}

}  // namespace margin
}  // namespace fastops
