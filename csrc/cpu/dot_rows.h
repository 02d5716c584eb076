// Dot products of a few rows against a few weight rows, every SIMD lane busy.
//
// A layer of a few outputs NL (the spiral net's 100 -> 3, a regression head's 1) would use NL
// of the W lanes of a broadcast tile (A broadcast, W^T in vectors). dot_rows takes the products
// along k instead: R = W / NL rows at a time, R x NL vector accumulators whose lanes are then
// summed by a tree of two-vector shuffles that leaves the sum of accumulator p in lane p (lanes
// past R x NL hold zeros).
#pragma once

#include <cstdint>
#include <type_traits>

#include "gemm.h"

namespace fastops {
namespace cpu {

template <int W>
constexpr int bit_reversed(int p) {
  int r = 0;
  for (int b = 1; b < W; b <<= 1, p >>= 1) r = (r << 1) | (p & 1);
  return r;
}

// v[p] for p < H from v[2p], v[2p + 1]: per group of 2H lanes, lanes [0, H) of the result hold
// the pairwise sums of the group in v[2p], lanes [H, 2H) those in v[2p + 1]. From H = W / 2
// down to 1, lane i of v[0] ends with the sum of the lanes of v[bit_reversed(i)].
template <class Acc, int W, int H>
FO_ALWAYS_INLINE void fold_lanes(typename gemm::VecT<Acc, W>::type* v) {
  using Int = std::conditional_t<sizeof(Acc) == 4, int32_t, int64_t>;
  using M = typename gemm::VecT<Int, W>::type;
  M lo, hi;
#pragma GCC unroll 16
  for (int i = 0; i < W; ++i) {
    const int g = i / (2 * H), t = i % (2 * H);
    lo[i] = t < H ? 2 * H * g + t : W + 2 * H * g + t - H;
    hi[i] = lo[i] + H;
  }
#pragma GCC unroll 16
  for (int p = 0; p < H; ++p)
    v[p] = __builtin_shuffle(v[2 * p], v[2 * p + 1], lo) +
           __builtin_shuffle(v[2 * p], v[2 * p + 1], hi);
  if constexpr (H > 1) fold_lanes<Acc, W, H / 2>(v);
}

// out[i * NL + j] = sum_{k < kp} rows[i][k] w[j * kp + k] for i < R = W / NL; one vector store,
// so out has room for W values. kp is a multiple of W, the columns past the layer's inputs zero
// in both operands.
template <class Acc, int W, int NL>
FO_ALWAYS_INLINE void dot_rows(int64_t kp, const Acc* const* rows, const Acc* w, Acc* out) {
  using V = typename gemm::VecT<Acc, W>::type;
  using VU = typename gemm::VecT<Acc, W>::unaligned;
  constexpr int R = W / NL;
  V acc[W];
#pragma GCC unroll 16
  for (int p = 0; p < W; ++p) acc[p] = V{};
  for (int64_t k = 0; k < kp; k += W) {
    V wv[NL];
#pragma GCC unroll 4
    for (int j = 0; j < NL; ++j) wv[j] = *reinterpret_cast<const VU*>(w + j * kp + k);
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const V av = *reinterpret_cast<const VU*>(rows[i] + k);
#pragma GCC unroll 4
      for (int j = 0; j < NL; ++j) acc[i * NL + j] += av * wv[j];
    }
  }
  V v[W];
#pragma GCC unroll 16
  for (int p = 0; p < W; ++p) v[bit_reversed<W>(p)] = acc[p];
  fold_lanes<Acc, W, W / 2>(v);
  *reinterpret_cast<VU*>(out) = v[0];
}

}  // namespace cpu
}  // namespace fastops
