// Host-side planning of the GEMM of gemm.cuh that needs no CUDA: the split of K over several
// blocks per output tile, and the widest global-memory access an operand allows. Pure functions,
// so that tests/cpp/gemm_plan_test.cpp can check them on any machine.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fastops {
namespace gpu {
namespace gemm {

// K is split in units of this many elements: a multiple of every kernel's k tile (64 for the
// tensor cores, 8 or 16 for the CUDA cores), so that every split starts on a tile boundary.
constexpr int64_t kSplitKGranule = 64;
// Every split but the last computes at least this many granules: fewer would spend the split on
// filling the pipeline.
constexpr int64_t kSplitKMinGranules = 4;
// Upper bound of the splits whatever the GPU: bounds the workspace and the summing pass.
constexpr int kSplitKMaxSplits = 128;

// Split s of `splits` covers granules [s * k_tiles_per_split, min((s + 1) * k_tiles_per_split,
// k_tiles)): contiguous, in order, none empty. splits == 1: no split.
struct SplitK {
  int splits;
  int64_t k_tiles_per_split;
};

// How to split `k_tiles` granules of K for an output of `tiles` block tiles on `sms`
// multiprocessors. Splits only when the tiles leave at least half of the multiprocessors idle,
// and then into about enough splits to give every multiprocessor a block. A function of its
// arguments only, so that the same shape on the same GPU always sums in the same order.
inline SplitK plan_split_k(int64_t tiles, int64_t k_tiles, int sms) {
  const SplitK whole{1, std::max<int64_t>(k_tiles, 0)};
  if (tiles <= 0 || k_tiles <= 0 || sms <= 0 || tiles * 2 > sms) return whole;
  const int64_t wanted = (sms + tiles - 1) / tiles;
  const int64_t by_k = k_tiles / kSplitKMinGranules;
  const int64_t splits = std::min<int64_t>({wanted, by_k, kSplitKMaxSplits});
  if (splits < 2) return whole;
  const int64_t per_split = (k_tiles + splits - 1) / splits;
  // ceil twice: the last split is never empty (and may be shorter than the others)
  return SplitK{static_cast<int>((k_tiles + per_split - 1) / per_split), per_split};
}

// Widest access in bytes (16, 8 or 4) for which an operand's first element (`address`) and its
// row pitch (`ld` elements of `elem_bytes`) are both aligned; elem_bytes when none is.
inline int access_bytes(std::uintptr_t address, int64_t ld, int elem_bytes) {
  for (int width = 16; width > elem_bytes; width /= 2) {
    if (address % width == 0 && (ld * elem_bytes) % width == 0) return width;
  }
  return elem_bytes;
}

}  // namespace gemm
}  // namespace gpu
}  // namespace fastops
