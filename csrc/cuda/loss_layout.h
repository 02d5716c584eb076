// Thread layout of the loss kernels for inputs viewed as (N, C, S) with S > 1 (classes S
// elements apart): which (n, s, class slice) each thread of a block handles. Integer arithmetic
// only, shared by csrc/cuda/softmax_cross_entropy.cu and a CPU test
// (tests/cpp/loss_layout_test.cpp).
//
// A tile is sx neighbouring positions s of one n. A block holds tiles_per_block consecutive
// tiles side by side, sx * tiles_per_block "columns" (one (tile, position) each), times cy class
// slices: thread tid = column + columns * slice, column = position + sx * tile_in_block, so that
// neighbouring threads read neighbouring positions (coalesced along s). Slice j takes the
// classes j, j + cy, j + 2 cy, ...; the cy slices of a column are merged by a fixed tree (cy is
// a power of two). Tile group g is the tiles [g * tiles_per_block, (g + 1) * tiles_per_block);
// block b takes the groups b, b + gridDim.x, ...
//
// - S fits in one tile: a tile is a whole n (sx = S) and a block packs as many of them as fit,
//   so that small C and S still keep the threads of a block busy.
// - S does not fit: sx is a power of two below S, a block holds one tile (sx * cy = 256).
//
// cy, the slices of a row, depends only on (C, S, element size); so does every sum over a row:
// its bits do not change with N, the grid size or where the tensor starts in memory.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FO_LOSS_LAYOUT_HD __host__ __device__ __forceinline__
#else
#define FO_LOSS_LAYOUT_HD inline
#endif

namespace fastops {
namespace loss_layout {

constexpr int kSpatialMaxThreadsLog2 = 8;
constexpr int kSpatialMaxThreads = 1 << kSpatialMaxThreadsLog2;  // block size limit
constexpr int kSpatialClassesPerSlice = 16;  // about this many classes per slice
constexpr int kSpatialMaxSlicesLog2 = 5;     // at most 32 slices when positions compete for room
constexpr int kSectorBytes = 32;             // neighbouring positions a tile reads at least

// Smallest l with 2^l >= v (0 for v <= 1), saturating at 62.
FO_LOSS_LAYOUT_HD int ceil_log2(int64_t v) {
  int l = 0;
  while (l < 62 && (int64_t(1) << l) < v) ++l;
  return l;
}

FO_LOSS_LAYOUT_HD int min_int(int a, int b) { return a < b ? a : b; }

struct SpatialLayout {
  int64_t N, C, S;
  int sx;                // positions per tile: S (a tile is a whole n) or a power of two < S
  int cy;                // class slices, a power of two
  int tiles_per_block;   // tiles side by side in a block (1 unless sx == S)
  int columns;           // sx * tiles_per_block
  int threads;           // columns * cy, at most kSpatialMaxThreads: the block size
  int64_t tiles_per_n;   // ceil(S / sx)
  int64_t tiles;         // N * tiles_per_n
  int64_t groups;        // ceil(tiles / tiles_per_block): the blocks' work items
};

// elem_size: bytes per element (the sector rule: a tile spans at least 32 bytes where S
// allows). Slices of about 16 classes; positions take the rest of 256 threads, at least a
// sector's worth where S allows; when a whole n fits, the spare room packs more n.
FO_LOSS_LAYOUT_HD SpatialLayout spatial_layout(int64_t N, int64_t C, int64_t S, int elem_size) {
  const int s_log2 = min_int(ceil_log2(S), kSpatialMaxThreadsLog2);
  const int sector_log2 = min_int(ceil_log2(kSectorBytes / elem_size), s_log2);
  const int want_cy_log2 =
      ceil_log2((C + kSpatialClassesPerSlice - 1) / kSpatialClassesPerSlice);
  const int cy_log2 = min_int(min_int(want_cy_log2, kSpatialMaxSlicesLog2),
                              kSpatialMaxThreadsLog2 - sector_log2);
  const int sx_log2 = min_int(kSpatialMaxThreadsLog2 - cy_log2, s_log2);
  SpatialLayout l{};
  l.N = N;
  l.C = C;
  l.S = S;
  // More slices where positions leave room (a short S with many classes), never more than the
  // classes ask for.
  l.cy = 1 << min_int(want_cy_log2, kSpatialMaxThreadsLog2 - sx_log2);
  if (S <= (int64_t(1) << sx_log2)) {
    l.sx = static_cast<int>(S < 1 ? 1 : S);
    l.tiles_per_n = 1;
    l.tiles_per_block = kSpatialMaxThreads / (l.sx * l.cy);  // >= 1: sx * cy <= 256
  } else {
    l.sx = 1 << sx_log2;
    l.tiles_per_n = (S + l.sx - 1) / l.sx;
    l.tiles_per_block = 1;
  }
  l.columns = l.sx * l.tiles_per_block;
  l.threads = l.columns * l.cy;
  l.tiles = N * l.tiles_per_n;
  l.groups = (l.tiles + l.tiles_per_block - 1) / l.tiles_per_block;
  return l;
}

// Thread tid's place in its block.
struct SpatialThread {
  int column;         // its (tile, position) slot, < columns: slice 0's thread of it is `column`
  int slice;          // class slice, < cy
  int tile_in_block;  // < tiles_per_block
  int position;       // position within the tile, < sx
};

FO_LOSS_LAYOUT_HD SpatialThread spatial_thread(const SpatialLayout& l, int tid) {
  SpatialThread t;
  t.slice = tid / l.columns;
  t.column = tid - t.slice * l.columns;
  t.tile_in_block = t.column / l.sx;
  t.position = t.column - t.tile_in_block * l.sx;
  return t;
}

// Where a thread works in tile group `group`. An invalid one (past the last tile, or past S
// in a partial tile) has no row: n = s = row = base = 0, and it must read nothing.
struct SpatialPos {
  int64_t n, s;
  int64_t row;   // n * S + s: the index of the row's target, loss and lse
  int64_t base;  // n * C * S + s: class c of the row is at base + c * S
  bool valid;
};

FO_LOSS_LAYOUT_HD SpatialPos spatial_pos(const SpatialLayout& l, const SpatialThread& t,
                                    int64_t group) {
  const int64_t tile = group * l.tiles_per_block + t.tile_in_block;
  int64_t n = l.tiles_per_n == 1 ? tile : tile / l.tiles_per_n;
  int64_t s = (tile - n * l.tiles_per_n) * l.sx + t.position;
  const bool valid = tile < l.tiles && s < l.S;
  if (!valid) n = s = 0;
  return {n, s, n * l.S + s, n * l.C * l.S + s, valid};
}

// Blocks for `work` items: at most `cap` and the CUDA grid limit, at least 1.
inline unsigned int grid_size(int64_t work, int64_t cap) {
  constexpr int64_t kMaxGrid = 2147483647;  // gridDim.x limit
  int64_t g = work < cap ? work : cap;
  if (g > kMaxGrid) g = kMaxGrid;
  return static_cast<unsigned int>(g < 1 ? 1 : g);
}

}  // namespace loss_layout
}  // namespace fastops
