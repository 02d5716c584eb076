// Checks the host-side planning of the CUDA linear + cross entropy (csrc/cuda/lce_plan.h) over
// many shapes: the row chunks (every row in exactly one chunk, in order, none empty, a multiple
// of the GEMM tile but the last, the float logits of a chunk within the budget whenever one
// tile of rows fits it, a bounded grid) and the threads of the row kernel. Built and run by
// tests/test_cuda_host_math.py; prints each failure and exits non-zero if there is any.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "cuda/lce_plan.h"

using fastops::gpu::lce::chunk_range;
using fastops::gpu::lce::ChunkPlan;
using fastops::gpu::lce::ChunkRange;
using fastops::gpu::lce::kChunkLogitBytes;
using fastops::gpu::lce::kChunkRowGranule;
using fastops::gpu::lce::kMaxChunkRows;
using fastops::gpu::lce::kMaxRowThreads;
using fastops::gpu::lce::plan_chunks;
using fastops::gpu::lce::row_threads;

namespace {

int failures = 0;

#define EXPECT(cond, ...)                                               \
  do {                                                                  \
    if (!(cond)) {                                                      \
      if (++failures <= 20) {                                           \
        std::printf("%s:%d: %s failed: ", __FILE__, __LINE__, #cond);   \
        std::printf(__VA_ARGS__);                                       \
        std::printf("\n");                                              \
      }                                                                 \
    }                                                                   \
  } while (0)

void check_plan(int64_t N, int64_t V, int64_t bytes, int64_t budget) {
  const ChunkPlan p = plan_chunks(N, V, bytes, budget);
  const auto args = [&] {
    static char buf[200];
    std::snprintf(buf, sizeof buf, "N=%lld V=%lld bytes=%lld budget=%lld -> rows=%lld chunks=%lld",
                  (long long)N, (long long)V, (long long)bytes, (long long)budget,
                  (long long)p.rows, (long long)p.chunks);
    return buf;
  };
  if (N <= 0) {
    EXPECT(p.chunks == 0, "no rows, no chunk: %s", args());
    return;
  }
  EXPECT(p.rows >= 1 && p.rows <= N, "%s", args());
  EXPECT(p.rows <= kMaxChunkRows, "one launch of one block per row: %s", args());
  EXPECT(p.rows == N || p.rows % kChunkRowGranule == 0, "rows off the tile grid: %s", args());
  EXPECT(p.rows >= kChunkRowGranule || p.rows == N, "fewer rows than a tile: %s", args());
  // the budget holds whenever it holds one tile of rows (a row of no classes counts as one)
  const int64_t row_bytes = (V > 0 ? V : 1) * bytes;
  if (kChunkRowGranule * row_bytes <= budget)
    EXPECT(p.rows * row_bytes <= budget, "over the budget: %s", args());
  // ... and is used: one more tile of rows would not fit (unless capped or at N)
  if (p.rows < N && p.rows < kMaxChunkRows && p.rows * row_bytes <= budget)
    EXPECT((p.rows + kChunkRowGranule) * row_bytes > budget, "budget left unused: %s", args());
  // chunk k covers [k rows, min(N, (k + 1) rows)): contiguous, in order, none empty
  EXPECT(p.chunks == (N + p.rows - 1) / p.rows, "%s", args());
  if (p.chunks > 1000000) return;  // the closed form above covers the long plans
  int64_t next = 0;
  for (int64_t k = 0; k < p.chunks; ++k) {
    const ChunkRange r = chunk_range(p, N, k);
    EXPECT(r.first == next && r.count >= 1 && r.count <= p.rows, "chunk %lld [%lld, +%lld): %s",
           (long long)k, (long long)r.first, (long long)r.count, args());
    next = r.first + r.count;
  }
  EXPECT(next == N, "chunks end at %lld: %s", (long long)next, args());
}

void check_chunks() {
  std::vector<int64_t> Ns;
  for (int64_t n = 0; n <= 300; ++n) Ns.push_back(n);
  for (int64_t n = 301; n < (int64_t{1} << 34); n = n * 3 / 2 + 7) Ns.push_back(n);
  const int64_t Vs[] = {0, 1, 2, 7, 10, 100, 1000, 32000, 50257, 128256, 262144, 1 << 20,
                        int64_t{1} << 26};
  const int64_t budgets[] = {0, 1, 4096, int64_t{1} << 20, kChunkLogitBytes,
                             int64_t{1} << 34};
  for (int64_t N : Ns)
    for (int64_t V : Vs)
      for (int64_t bytes : {4, 8})
        for (int64_t budget : budgets) check_plan(N, V, bytes, budget);

  // the shapes the benchmark and the CUDA tests are sized for (default budget)
  EXPECT(plan_chunks(8192, 128256, 4).rows == 512, "LLM head, float logits: %lld",
         (long long)plan_chunks(8192, 128256, 4).rows);
  EXPECT(plan_chunks(8192, 128256, 4).chunks == 16, "LLM head: 16 chunks");
  EXPECT(plan_chunks(16384, 32000, 4).rows == 2048, "memory test shape");
  EXPECT(plan_chunks(16384, 32000, 4).rows * 32000 * 4 * 8 <= int64_t{16384} * 32000 * 4,
         "memory test: the scratch is at most an eighth of the logits");
  EXPECT(plan_chunks(16384, 32000, 8).rows == 1024, "float64 halves the rows");
  EXPECT(plan_chunks(100, 32000, 4).rows == 100, "one chunk for few rows");
  EXPECT(plan_chunks(int64_t{1} << 30, 10, 4).rows == kMaxChunkRows, "tiny V is capped");
  EXPECT(plan_chunks(1000, int64_t{1} << 30, 4).rows == kChunkRowGranule,
         "a huge V still takes a tile of rows");
}

void check_row_threads() {
  int prev = 0;
  for (int64_t V = 0; V < 200000; V = V < 64 ? V + 1 : V * 9 / 8) {
    const int t = row_threads(V);
    EXPECT(t % 32 == 0 && t >= 32 && t <= kMaxRowThreads, "V=%lld threads %d", (long long)V, t);
    EXPECT(t >= prev, "V=%lld: %d threads after %d", (long long)V, t, prev);
    EXPECT(t == 32 || t * 8 <= V, "V=%lld: %d threads, fewer than 8 logits each", (long long)V,
           t);
    EXPECT(t == kMaxRowThreads || 2 * t * 8 > V, "V=%lld: %d threads could double",
           (long long)V, t);
    prev = t;
  }
  EXPECT(row_threads(int64_t{1} << 40) == kMaxRowThreads, "huge V");
  EXPECT(row_threads(-1) == 32, "no classes");
}

}  // namespace

int main() {
  check_chunks();
  check_row_threads();
  if (failures != 0) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
