// Checks the host-side GEMM planning of csrc/cuda/gemm_plan.h over many shapes: the split-K plan
// (every k tile in exactly one split, in order, none empty, splits only where they pay, bounded
// splits and workspace) and the access width of the tensor-core loader. Built and run by
// tests/test_cuda_host_math.py; prints each failure and exits non-zero if there is any.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "cuda/gemm_plan.h"

using fastops::gpu::gemm::access_bytes;
using fastops::gpu::gemm::kSplitKGranule;
using fastops::gpu::gemm::kSplitKMaxSplits;
using fastops::gpu::gemm::kSplitKMinGranules;
using fastops::gpu::gemm::plan_split_k;
using fastops::gpu::gemm::SplitK;

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

constexpr int64_t kInt64Max = INT64_MAX;

// The k ranges of a plan in elements, as the kernels compute them from the split index:
// [s k_split, min(K, (s + 1) k_split)), with k_split = K when there is one split.
void check_element_ranges(const SplitK& p, int64_t K) {
  const int64_t k_split = p.splits == 1 ? K : p.k_tiles_per_split * kSplitKGranule;
  int64_t next = 0;
  for (int s = 0; s < p.splits; ++s) {
    const int64_t begin = s * k_split;
    const int64_t end = K - begin < k_split ? K : begin + k_split;
    EXPECT(begin == next, "K=%lld split %d begins at %lld, not %lld", (long long)K, s,
           (long long)begin, (long long)next);
    EXPECT(end > begin || K == 0, "K=%lld split %d is empty", (long long)K, s);
    EXPECT(p.splits == 1 || begin % kSplitKGranule == 0, "K=%lld split %d starts off a granule",
           (long long)K, s);
    next = end;
  }
  EXPECT(next == K, "K=%lld: the splits end at %lld", (long long)K, (long long)next);
}

void check_plan(int64_t tiles, int64_t k_tiles, int sms) {
  const SplitK p = plan_split_k(tiles, k_tiles, sms);
  const auto args = [&] {
    static char buf[160];
    std::snprintf(buf, sizeof buf, "tiles=%lld k_tiles=%lld sms=%d -> splits=%d per=%lld",
                  (long long)tiles, (long long)k_tiles, sms, p.splits,
                  (long long)p.k_tiles_per_split);
    return buf;
  };
  EXPECT(p.splits >= 1 && p.splits <= kSplitKMaxSplits, "%s", args());
  if (p.splits == 1) {
    EXPECT(p.k_tiles_per_split >= k_tiles, "one split covers everything: %s", args());
    return;
  }
  // splits only where the tiles leave most SMs idle, and no more than fill them
  EXPECT(tiles * 2 <= sms, "split with enough tiles: %s", args());
  EXPECT((p.splits - 1) * tiles < sms, "more blocks than needed to fill the SMs: %s", args());
  // granule ranges: [s per, min(k_tiles, (s + 1) per)) cover [0, k_tiles), none empty
  EXPECT(p.k_tiles_per_split >= kSplitKMinGranules, "splits too short: %s", args());
  EXPECT((p.splits - 1) * p.k_tiles_per_split < k_tiles, "last split empty: %s", args());
  EXPECT(p.splits * p.k_tiles_per_split >= k_tiles, "k tiles left out: %s", args());
  int64_t covered = 0;
  for (int s = 0; s < p.splits; ++s) {
    const int64_t begin = s * p.k_tiles_per_split;
    const int64_t end = std::min(k_tiles, begin + p.k_tiles_per_split);
    EXPECT(begin == covered && end > begin, "split %d [%lld, %lld): %s", s, (long long)begin,
           (long long)end, args());
    covered = end;
  }
  EXPECT(covered == k_tiles, "covered %lld: %s", (long long)covered, args());
}

void check_split_k() {
  std::vector<int> sms_values = {0, 1, 2, 3, 7, 16, 46, 80, 108, 114, 132, 148, 170, 264, 1000};
  std::vector<int64_t> tile_values;
  for (int64_t t = 0; t <= 160; ++t) tile_values.push_back(t);
  for (int64_t t : std::vector<int64_t>{200, 500, 4096, int64_t{1} << 31, int64_t{1} << 40})
    tile_values.push_back(t);
  std::vector<int64_t> k_values;
  for (int64_t k = 0; k <= 80; ++k) k_values.push_back(k);
  for (int64_t k = 81; k < 2000000; k = k * 5 / 4 + 1) k_values.push_back(k);
  for (int64_t k : std::vector<int64_t>{int64_t{1} << 31, (int64_t{1} << 40) + 7,
                                        kInt64Max / kSplitKGranule})
    k_values.push_back(k);
  for (int sms : sms_values)
    for (int64_t tiles : tile_values)
      for (int64_t k_tiles : k_values) check_plan(tiles, k_tiles, sms);

  // splits == 1 whenever the tiles alone keep at least half of the SMs busy, or K is short
  for (int sms : sms_values) {
    EXPECT(plan_split_k(sms / 2 + 1, 1 << 20, sms).splits == 1, "sms=%d", sms);
    EXPECT(plan_split_k(1, 2 * kSplitKMinGranules - 1, sms).splits == 1, "sms=%d", sms);
  }
  // ... and it does split the shapes it is meant for (one tile, K = 65536 on an H100)
  EXPECT(plan_split_k(1, 65536 / kSplitKGranule, 132).splits > 8, "one tile, long K");

  // element ranges as the kernels see them, and the workspace [splits][M][N] of the split
  // shapes: within int64 and a small multiple of what fills the SMs
  const int64_t tile_shapes[][2] = {{128, 128}, {128, 256}, {64, 64}};
  const int64_t dims[] = {1, 3, 8, 63, 64, 65, 127, 128, 129, 500, 1000, 1024, 4097, 50257,
                          1 << 20, int64_t{1} << 33};
  const int64_t Ks[] = {0, 1, 63, 64, 65, 255, 256, 257, 1000, 1001, 1002, 1004, 4096, 65536,
                        100003, 1 << 24, int64_t{1} << 40};
  for (const auto& shape : tile_shapes)
    for (int64_t M : dims)
      for (int64_t N : dims)
        for (int64_t K : Ks)
          for (int sms : {1, 108, 132, 148}) {
            const int64_t tiles =
                ((M + shape[0] - 1) / shape[0]) * ((N + shape[1] - 1) / shape[1]);
            const int64_t k_tiles = (K + kSplitKGranule - 1) / kSplitKGranule;
            const SplitK p = plan_split_k(tiles, k_tiles, sms);
            check_element_ranges(p, K);
            if (p.splits > 1) {
              const int64_t bound = (sms + tiles) * shape[0] * shape[1];
              EXPECT(M * N <= bound / p.splits, "workspace of %d x %lld x %lld", p.splits,
                     (long long)M, (long long)N);
              EXPECT(M * N <= kInt64Max / 8 / p.splits, "workspace bytes overflow");
            }
          }
}

// 16-bit operands: the widest of 16 / 8 / 4 bytes that the address and row pitch allow, 2 when
// neither does; every 8-element chunk the loader copies (rows of ld elements, chunks 8 elements
// apart) then starts on a multiple of the width.
void check_access_bytes() {
  for (int elem : {2, 4, 8}) {
    for (std::uintptr_t base = 0x10000; base < 0x10000 + 64; base += elem) {
      for (int64_t ld = 1; ld <= 300; ++ld) {
        const int w = access_bytes(base, ld, elem);
        EXPECT(w == elem || w == 4 || w == 8 || w == 16, "width %d", w);
        EXPECT(w >= elem, "width %d below the element size %d", w, elem);
        EXPECT(base % w == 0 && (ld * elem) % w == 0, "base %#lx ld %lld width %d",
               (unsigned long)base, (long long)ld, w);
        if (w < 16) {
          const int wider = 2 * w;
          EXPECT(base % wider != 0 || (ld * elem) % wider != 0,
                 "base %#lx ld %lld: %d bytes would do, got %d", (unsigned long)base,
                 (long long)ld, wider, w);
        }
        if (elem == 2) {
          for (int64_t row = 0; row < 5; ++row)
            for (int64_t chunk = 0; chunk < 40; ++chunk) {
              const std::uintptr_t at =
                  base + static_cast<std::uintptr_t>((row * ld + chunk * 8) * 2);
              EXPECT(at % w == 0, "chunk at %#lx not %d-aligned", (unsigned long)at, w);
            }
        }
      }
    }
  }
  // the shapes of the tests: vocabulary-like odd, 2 mod 8, 4 mod 8, multiples of 8
  EXPECT(access_bytes(0x1000, 50257, 2) == 2, "odd ld");
  EXPECT(access_bytes(0x1000, 1001, 2) == 2, "odd ld");
  EXPECT(access_bytes(0x1000, 1002, 2) == 4, "ld 2 mod 8");
  EXPECT(access_bytes(0x1000, 1004, 2) == 8, "ld 4 mod 8");
  EXPECT(access_bytes(0x1000, 1008, 2) == 16, "ld 0 mod 8");
  EXPECT(access_bytes(0x1002, 1008, 2) == 2, "pointer 2 mod 4");
  EXPECT(access_bytes(0x1004, 1008, 2) == 4, "pointer 4 mod 8");
  EXPECT(access_bytes(0x1008, 1008, 2) == 8, "pointer 8 mod 16");
  EXPECT(access_bytes(0x1000, 1001, 4) == 4, "float, odd ld");
  EXPECT(access_bytes(0x1000, 1002, 4) == 8, "float, ld 2 mod 4");
}

}  // namespace

int main() {
  check_split_k();
  check_access_bytes();
  if (failures != 0) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
