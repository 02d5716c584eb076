// The S > 1 thread layout of the CUDA loss kernels (csrc/cuda/loss_layout.h), checked on the CPU
// by running its arithmetic for every thread of every block of a simulated grid. Built and run
// by tests/test_cuda_host_math.py; prints "ok" and exits 0 when every check holds.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda/loss_layout.h"

using namespace fastops::loss_layout;

namespace {

int failures = 0;
char current_case[160] = "";

#define CHECK(cond)                                                                    \
  do {                                                                                 \
    if (!(cond)) {                                                                     \
      if (++failures <= 20) {                                                          \
        std::printf("FAILED %s: %s (line %d)\n", current_case, #cond, __LINE__);      \
      }                                                                                \
      return;                                                                          \
    }                                                                                  \
  } while (0)

bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Calls visit(class, k) for the classes a slice reads, k-th in the kernels' order: unrolled
// steps of u classes, then the rest one at a time.
template <class Visit>
void for_slice_classes(int64_t C, int cy, int slice, int u, Visit&& visit) {
  int64_t c = slice, k = 0;
  for (; c + static_cast<int64_t>(u - 1) * cy < C; c += static_cast<int64_t>(u) * cy) {
    for (int j = 0; j < u; ++j) visit(c + static_cast<int64_t>(j) * cy, k++);
  }
  for (; c < C; c += cy) visit(c, k++);
}

// Fields and bounds of one layout, and that it is a function of its arguments alone.
void check_layout(const SpatialLayout& l, int64_t N, int64_t C, int64_t S, int elem) {
  CHECK(l.N == N && l.C == C && l.S == S);
  CHECK(l.sx >= 1 && l.cy >= 1 && l.tiles_per_block >= 1);
  CHECK(is_pow2(l.cy));
  CHECK(l.columns == l.sx * l.tiles_per_block);
  CHECK(l.threads == l.columns * l.cy);
  CHECK(l.threads >= 1 && l.threads <= kSpatialMaxThreads);
  CHECK(l.tiles_per_n == (S + l.sx - 1) / l.sx);
  CHECK(l.tiles == N * l.tiles_per_n);
  CHECK(l.groups == (l.tiles + l.tiles_per_block - 1) / l.tiles_per_block);
  // Either a tile is a whole n (and a block packs as many as fit), or a block is one full tile
  // of a power-of-two width.
  if (l.sx == S) {
    CHECK(l.tiles_per_n == 1);
    CHECK(l.threads + l.sx * l.cy > kSpatialMaxThreads);
  } else {
    CHECK(l.sx < S && is_pow2(l.sx) && l.tiles_per_block == 1);
    CHECK(l.threads == kSpatialMaxThreads);
  }
  // Coalescing: a tile spans a 32-byte sector of positions where S allows.
  const int64_t sector = kSectorBytes / elem;
  CHECK(l.sx >= (S < sector ? S : sector));
  // No more slices than about one per 16 classes ask for.
  const int64_t want = next_pow2((C + kSpatialClassesPerSlice - 1) / kSpatialClassesPerSlice);
  CHECK(l.cy <= (want > 1 ? want : 1));
  const SpatialLayout again = spatial_layout(N, C, S, elem);
  CHECK(again.sx == l.sx && again.cy == l.cy && again.tiles_per_block == l.tiles_per_block &&
        again.groups == l.groups && again.threads == l.threads);
}

// Thread coordinates: the inverse of tid = position + sx * tile_in_block + columns * slice,
// and the tree partners of the slice merge.
void check_threads(const SpatialLayout& l) {
  for (int tid = 0; tid < l.threads; ++tid) {
    const SpatialThread t = spatial_thread(l, tid);
    CHECK(t.slice >= 0 && t.slice < l.cy);
    CHECK(t.column >= 0 && t.column < l.columns);
    CHECK(t.position >= 0 && t.position < l.sx);
    CHECK(t.tile_in_block >= 0 && t.tile_in_block < l.tiles_per_block);
    CHECK(t.column == t.position + l.sx * t.tile_in_block);
    CHECK(tid == t.column + l.columns * t.slice);
    if (tid + 1 < l.threads) {
      const SpatialThread next = spatial_thread(l, tid + 1);
      if (next.slice == t.slice && next.tile_in_block == t.tile_in_block) {
        CHECK(next.position == t.position + 1);  // neighbouring threads, neighbouring positions
      }
    }
    // The merge: slice j < h takes slice j + h of its column, for h = cy / 2, ..., 1.
    for (int h = l.cy >> 1; h > 0; h >>= 1) {
      if (t.slice < h) {
        const int partner = tid + h * l.columns;
        CHECK(partner < l.threads);
        const SpatialThread p = spatial_thread(l, partner);
        CHECK(p.column == t.column && p.slice == t.slice + h);
      }
    }
  }
}

// Where each class of each row goes under one grid: the slice that reads it and its place in
// that slice's order. A row is a whole (n, s); per element: slice * 2^20 + index.
struct Assignment {
  std::vector<int64_t> element_owner;  // -1: not read
  std::vector<int> row_writes;         // slice-0 threads of each row (the result's writer)
};

void simulate(const SpatialLayout& l, unsigned int grid, int unroll, Assignment& out) {
  const int64_t elements = l.N * l.C * l.S;
  const int64_t rows = l.N * l.S;
  out.element_owner.assign(static_cast<size_t>(elements), -1);
  out.row_writes.assign(static_cast<size_t>(rows), 0);
  std::vector<int64_t> row_column(static_cast<size_t>(rows), -1);
  CHECK(grid >= 1);
  for (unsigned int block = 0; block < grid; ++block) {
    for (int64_t group = block; group < l.groups; group += grid) {
      for (int tid = 0; tid < l.threads; ++tid) {
        const SpatialThread t = spatial_thread(l, tid);
        const SpatialPos p = spatial_pos(l, t, group);
        if (!p.valid) {
          CHECK(p.n == 0 && p.s == 0 && p.row == 0 && p.base == 0);
          continue;
        }
        CHECK(p.n >= 0 && p.n < l.N && p.s >= 0 && p.s < l.S);
        CHECK(p.row == p.n * l.S + p.s && p.row < rows);
        CHECK(p.base == p.n * l.C * l.S + p.s);
        // All slices of a row share one (group, column): the tree merges exactly them.
        const int64_t where = group * l.columns + t.column;
        int64_t& rc = row_column[static_cast<size_t>(p.row)];
        CHECK(rc == -1 || rc == where);
        rc = where;
        if (t.slice == 0) ++out.row_writes[static_cast<size_t>(p.row)];
        bool reads_ok = true;
        for_slice_classes(l.C, l.cy, t.slice, unroll, [&](int64_t c, int64_t k) {
          const int64_t at = p.base + c * l.S;
          const bool ok = c >= 0 && c < l.C && c % l.cy == t.slice && at >= 0 &&
                          at < elements && at == (p.n * l.C + c) * l.S + p.s;
          if (!ok || out.element_owner[static_cast<size_t>(at)] != -1) {  // read once
            reads_ok = false;
            return;
          }
          out.element_owner[static_cast<size_t>(at)] = (static_cast<int64_t>(t.slice) << 20) + k;
        });
        CHECK(reads_ok);
      }
    }
  }
  for (int64_t i = 0; i < elements; ++i) CHECK(out.element_owner[static_cast<size_t>(i)] >= 0);
  for (int64_t r = 0; r < rows; ++r) CHECK(out.row_writes[static_cast<size_t>(r)] == 1);
}

// Every (n, s, class) read exactly once under several grids, with the same slice and order
// (a row's sums do not depend on the grid), and the same per-row partition for every N.
void check_shape(int64_t N, int64_t C, int64_t S, int elem) {
  std::snprintf(current_case, sizeof(current_case), "(N, C, S) = (%lld, %lld, %lld), %d bytes",
                static_cast<long long>(N), static_cast<long long>(C), static_cast<long long>(S),
                elem);
  const int before = failures;
  const SpatialLayout l = spatial_layout(N, C, S, elem);
  check_layout(l, N, C, S, elem);
  check_threads(l);
  if (failures != before) return;
  const int unroll = elem == 8 ? 2 : 4;  // kSpatialUnroll
  const unsigned int full = grid_size(l.groups, 132 * 64);
  Assignment first, other;
  simulate(l, full, unroll, first);
  for (unsigned int grid : {1u, 3u}) {
    if (grid >= full || failures != before) continue;
    simulate(l, grid, unroll, other);
    if (failures != before) return;
    CHECK(other.element_owner == first.element_owner);
  }
  // A row's partition depends on (C, S, element size) only: N = 1 gives the first row's.
  const SpatialLayout one = spatial_layout(1, C, S, elem);
  CHECK(one.cy == l.cy);
  Assignment single;
  simulate(one, 1, unroll, single);
  if (failures != before) return;
  for (int64_t i = 0; i < C * S; ++i) {
    CHECK(single.element_owner[static_cast<size_t>(i)] ==
          first.element_owner[static_cast<size_t>(i)]);
  }
}

// Threads with a row and a class to read, over the block size limit, in a full tile group.
double busy_fraction(int64_t C, int64_t S, int elem) {
  const SpatialLayout l = spatial_layout(1 << 20, C, S, elem);
  int busy = 0;
  for (int tid = 0; tid < l.threads; ++tid) {
    const SpatialThread t = spatial_thread(l, tid);
    if (spatial_pos(l, t, 0).valid && t.slice < C) ++busy;
  }
  return static_cast<double>(busy) / kSpatialMaxThreads;
}

void check_small_shapes_keep_threads_busy() {
  const int64_t shapes[][2] = {{5, 3}, {10, 7}, {2, 5}, {3, 2}, {16, 2}, {41, 7}, {100, 3}};
  for (const auto& cs : shapes) {
    for (int elem : {2, 4, 8}) {
      std::snprintf(current_case, sizeof(current_case), "busy (C, S) = (%lld, %lld), %d bytes",
                    static_cast<long long>(cs[0]), static_cast<long long>(cs[1]), elem);
      CHECK(busy_fraction(cs[0], cs[1], elem) >= 0.8);
    }
  }
}

// 64-bit sizes: no overflow in the layout, the grid stays within CUDA's limit, and the last
// tile group addresses the last elements and nothing past them.
void check_huge(int64_t N, int64_t C, int64_t S, int elem) {
  std::snprintf(current_case, sizeof(current_case), "huge (N, C, S) = (%lld, %lld, %lld)",
                static_cast<long long>(N), static_cast<long long>(C), static_cast<long long>(S));
  const SpatialLayout l = spatial_layout(N, C, S, elem);
  check_layout(l, N, C, S, elem);
  const unsigned int grid = grid_size(l.groups, int64_t(1) << 40);
  CHECK(grid >= 1 && grid <= 2147483647u);
  CHECK(static_cast<int64_t>(grid) <= l.groups);
  const int64_t elements = N * C * S;
  bool saw_last = false;
  for (int64_t group = l.groups - 2; group < l.groups; ++group) {
    if (group < 0) continue;
    for (int tid = 0; tid < l.threads; ++tid) {
      const SpatialThread t = spatial_thread(l, tid);
      const SpatialPos p = spatial_pos(l, t, group);
      if (!p.valid) continue;
      CHECK(p.row < N * S && p.base + (C - 1) * S < elements);
      if (p.n == N - 1 && p.s == S - 1) saw_last = true;
    }
  }
  CHECK(saw_last);
}

}  // namespace

int main() {
  const int64_t Ns[] = {1, 2, 3, 7, 64, 65, 129, 1000};
  const int64_t Cs[] = {0, 1, 2, 3, 5, 10, 16, 17, 31, 33, 100, 255, 257, 1000, 5000};
  const int64_t Ss[] = {2,  3,  4,  5,   7,   8,   9,   15,  16,   17,  31,
                        32, 33, 63, 100, 255, 256, 257, 300, 1000, 4097};
  int cases = 0;
  for (int elem : {2, 4, 8}) {
    for (int64_t N : Ns) {
      for (int64_t C : Cs) {
        for (int64_t S : Ss) {
          if (N * (C > 0 ? C : 1) * S > 60000) continue;  // a few seconds in all
          check_shape(N, C, S, elem);
          ++cases;
        }
      }
    }
  }
  const int64_t named[][3] = {{65536, 5, 3}, {4097, 10, 7}, {3, 2, 5}, {1, 3, 2}, {2, 5000, 3}};
  for (const auto& s : named) {
    check_shape(s[0], s[1], s[2], 4);
    ++cases;
  }
  check_small_shapes_keep_threads_busy();
  check_huge(int64_t(3) << 30, 5, 3, 4);
  check_huge(int64_t(1) << 40, 5, 300, 2);
  check_huge(5, int64_t(1) << 31, 3, 4);
  check_huge(2, 3, int64_t(1) << 33, 8);
  if (failures > 0) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("ok: %d shapes\n", cases);
  return 0;
}
