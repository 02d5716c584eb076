// Host-side planning of the CUDA linear + cross entropy (linear_cross_entropy.cu) that needs no
// CUDA: how the N rows are cut into chunks whose logits live in one scratch buffer, and how many
// threads reduce one row. Pure functions, so that tests/cpp/lce_plan_test.cpp can check them on
// any machine.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fastops {
namespace gpu {
namespace lce {

// Chunk rows are a multiple of this (the M tile of the big tensor-core GEMM), so that only the
// last chunk has a ragged edge.
constexpr int64_t kChunkRowGranule = 128;
// Bytes of float (double) logits one chunk may hold. The chunk also holds its gradient in the
// storage dtype for 16-bit inputs (half as much again). The budget sets the K (chunk rows) of
// the weight-gradient GEMM, which reads and writes its float accumulator once per chunk: 8 V H
// bytes for 2 rows V H flops, i.e. rows / 4 flops per byte (128 at V = 128256, where 256 MiB
// gives 512 rows), while the scratch stays a fixed size however large N grows.
constexpr int64_t kChunkLogitBytes = int64_t(256) << 20;
// Upper bound of the chunk rows whatever the vocabulary (a tiny V would otherwise give one chunk
// of every row: the scratch would grow with N).
constexpr int64_t kMaxChunkRows = int64_t(1) << 16;

// Chunk k of `chunks` covers rows [k * rows, min(N, (k + 1) * rows)): contiguous, in order, none
// empty. N == 0: no chunk.
struct ChunkPlan {
  int64_t rows;
  int64_t chunks;
};

// The chunks of N rows of V logits of logit_bytes each (4 for float, 8 for double), for a budget
// of budget_bytes. A function of its arguments only: the same shape and dtype always accumulate
// the weight gradient over the same chunks, in the same order (determinism).
inline ChunkPlan plan_chunks(int64_t N, int64_t V, int64_t logit_bytes,
                             int64_t budget_bytes = kChunkLogitBytes) {
  if (N <= 0) return ChunkPlan{0, 0};
  const int64_t per_row = std::max<int64_t>(V, 1) * std::max<int64_t>(logit_bytes, 1);
  int64_t rows = std::max<int64_t>(budget_bytes, 0) / per_row;
  rows = rows / kChunkRowGranule * kChunkRowGranule;
  rows = std::min(std::max(rows, kChunkRowGranule), kMaxChunkRows);
  rows = std::min(rows, N);
  return ChunkPlan{rows, (N + rows - 1) / rows};
}

// Rows [first, first + count) of chunk k.
struct ChunkRange {
  int64_t first, count;
};
inline ChunkRange chunk_range(const ChunkPlan& p, int64_t N, int64_t k) {
  const int64_t first = k * p.rows;
  return ChunkRange{first, std::min(p.rows, N - first)};
}

// Threads of the block that reduces one row of V logits: a warp for short rows, up to
// kMaxRowThreads (a multiple of 32) with at least about 8 logits each for long ones.
constexpr int kMaxRowThreads = 512;
inline int row_threads(int64_t V) {
  int threads = 32;
  while (threads < kMaxRowThreads && static_cast<int64_t>(threads) * 2 * 8 <= V) threads *= 2;
  return threads;
}

}  // namespace lce
}  // namespace gpu
}  // namespace fastops
