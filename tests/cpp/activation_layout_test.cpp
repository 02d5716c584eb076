// The index arithmetic of the CUDA activation kernels (csrc/cuda/activation_layout.h), walked on
// the CPU the way the kernels walk it, for every thread of a grid: each element, mask byte and
// maxout output is handled exactly once, and nothing outside a tensor is read or written.
// Prints "ok", or the first failures and exits 1. Built and run by
// tests/test_cuda_host_math.py.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "cuda/activation_layout.h"

namespace L = fastops::activation_layout;

namespace {

int failures = 0;

#define EXPECT(cond, ...)                                                  \
  do {                                                                     \
    if (!(cond)) {                                                         \
      if (failures < 20) {                                                 \
        std::printf("%s:%d: %s fails for ", __FILE__, __LINE__, #cond);    \
        std::printf(__VA_ARGS__);                                          \
        std::printf("\n");                                                 \
      }                                                                    \
      ++failures;                                                          \
    }                                                                      \
  } while (0)

// The kernels' constants (activations.cu): accesses in flight per thread of the pointwise and
// masked kernels and of maxout_indices_backward, and outputs per thread of the maxout forward.
constexpr int kUnroll = 4;
constexpr int kMaxoutUnroll = 2;
constexpr int kMembersUnroll = 4;

// As mask_bytes of activation_checks.h: the size of the mask tensor.
int64_t mask_tensor_bytes(int64_t n) { return (n + 7) / 8; }

struct Grid {
  int64_t blocks, threads;
};

// Calls visit(first) for each trip of each thread of the grid over `count` items.
template <class Visit>
void for_each_trip(const Grid& grid, int per_thread, int64_t count, const Visit& visit) {
  for (int64_t block = 0; block < grid.blocks; ++block)
    for (int64_t thread = 0; thread < grid.threads; ++thread)
      for (int64_t first = L::trip_first(block, thread, grid.threads, per_thread); first < count;
           first += L::trip_stride(grid.blocks, grid.threads, per_thread))
        visit(block, thread, first);
}

bool all_once(const std::vector<int>& counts) {
  for (int c : counts)
    if (c != 1) return false;
  return true;
}

// ---- masked_forward_kernel / masked_backward_kernel -----------------------------------------
// The forward reads x and writes y at the same elements and writes one mask byte per whole
// byte; the backward reads the byte and grad there and writes gx: one walk checks both.
void check_masked(int64_t n, int vec, const Grid& grid) {
  const int bytes_per_trip = L::mask_bytes_per_trip(vec, kUnroll);
  const int accesses = L::kMaskBitsPerByte / vec;
  const int64_t whole = L::whole_mask_bytes(n);
  std::vector<int> element_writes(n, 0), byte_writes(mask_tensor_bytes(n), 0);
  std::vector<int64_t> byte_writer(mask_tensor_bytes(n), -1);
  // kUnroll accesses in flight per thread, as the pointwise kernels (more where a byte needs more)
  EXPECT(bytes_per_trip * accesses == (accesses > kUnroll ? accesses : kUnroll),
         "vec %d: %d bytes per trip", vec, bytes_per_trip);
  EXPECT(L::mask_tail_begin(n) == whole * 8 && n - L::mask_tail_begin(n) < 8, "n %lld",
         static_cast<long long>(n));
  for_each_trip(grid, bytes_per_trip, whole, [&](int64_t block, int64_t thread, int64_t first) {
    for (int b = 0; b < bytes_per_trip; ++b) {
      const int64_t byte = L::trip_item(first, b, grid.threads);
      if (byte >= whole) continue;  // the kernels' guard
      EXPECT(byte >= 0, "byte %lld", static_cast<long long>(byte));
      const int64_t writer = block * grid.threads + thread;
      EXPECT(byte_writer[byte] == -1 || byte_writer[byte] == writer,
             "n %lld: byte %lld written by two threads", static_cast<long long>(n),
             static_cast<long long>(byte));
      byte_writer[byte] = writer;
      ++byte_writes[byte];
      for (int q = 0; q < accesses; ++q) {
        const int64_t start = L::mask_element(byte, q * vec);
        EXPECT(start % vec == 0, "vec %d: access at %lld", vec, static_cast<long long>(start));
        for (int v = 0; v < vec; ++v) {
          const int64_t e = start + v;
          const int bit = q * vec + v;  // the bit the kernels give element e
          EXPECT(e >= 0 && e < n && e == 8 * byte + bit, "n %lld vec %d: element %lld",
                 static_cast<long long>(n), vec, static_cast<long long>(e));
          if (e >= 0 && e < n) ++element_writes[e];
        }
      }
    }
  });
  // the partial last byte: block 0, thread 0
  const int64_t tail = L::mask_tail_begin(n);
  if (tail < n) {
    EXPECT(whole < mask_tensor_bytes(n), "n %lld", static_cast<long long>(n));
    EXPECT(byte_writer[whole] == -1, "n %lld: tail byte shared", static_cast<long long>(n));
    ++byte_writes[whole];
    for (int64_t i = tail; i < n; ++i) {
      EXPECT(i - tail < 8 && i == 8 * whole + (i - tail), "n %lld: tail element %lld",
             static_cast<long long>(n), static_cast<long long>(i));
      ++element_writes[i];
    }
  }
  EXPECT(all_once(element_writes), "n %lld vec %d grid %lldx%lld: elements",
         static_cast<long long>(n), vec, static_cast<long long>(grid.blocks),
         static_cast<long long>(grid.threads));
  EXPECT(all_once(byte_writes), "n %lld vec %d grid %lldx%lld: mask bytes",
         static_cast<long long>(n), vec, static_cast<long long>(grid.blocks),
         static_cast<long long>(grid.threads));
}

// The grid masked_grid gives when the GPU has room for every block (grid_for caps it lower on
// a small GPU; the smaller grids below stand for that).
int64_t full_grid(int64_t items, int64_t per_block) {
  const int64_t needed = (items + per_block - 1) / per_block;
  return needed < 1 ? 1 : needed;
}

void check_all_masked() {
  std::vector<int64_t> sizes;
  for (int64_t n = 0; n <= 600; ++n) sizes.push_back(n);
  for (int64_t n : {8191, 8192, 8193, 16389, 24589, 65543, 100003}) sizes.push_back(n);
  for (int vec : {1, 2, 4, 8}) {
    const int per_block = 256 * L::mask_bytes_per_trip(vec, kUnroll);
    for (int64_t n : sizes) {
      const int64_t whole = L::whole_mask_bytes(n);
      for (const Grid grid : {Grid{1, 32}, Grid{3, 4}, Grid{2, 256},
                              Grid{full_grid(whole, per_block), 256}}) {
        if (n > 600 && grid.threads < 256) continue;  // many trips of a tiny grid: slow, no news
        check_masked(n, vec, grid);
      }
    }
  }
  // 64-bit sizes: the arithmetic at the far end of a mask of more than 2^32 bytes
  for (int64_t n : {(int64_t{1} << 35) + 5, (int64_t{1} << 40) + 8, (int64_t{1} << 40) + 7}) {
    const int64_t whole = L::whole_mask_bytes(n);
    EXPECT(L::mask_element(whole - 1, 7) == L::mask_tail_begin(n) - 1, "n %lld",
           static_cast<long long>(n));
    EXPECT(whole == n / 8 && mask_tensor_bytes(n) - whole == (n % 8 != 0), "n %lld",
           static_cast<long long>(n));
  }
}

// ---- maxout along the inner positions ------------------------------------------------------
// maxout_planes_kernel (forward, with or without saved indices; kMaxoutUnroll per thread) and
// maxout_indices_backward_planes_kernel (kUnroll per thread): packs of `width` outputs, member j
// of a pack at maxout_first_member + j * inner. The forward reads each input once and writes each
// output (and index) once; the backward writes each element of gx once.
template <class I>
void check_planes(int64_t rows, int64_t k, int64_t inner, int vec, bool aligned,
                  int per_thread, const Grid& grid) {
  const int64_t n_out = rows * inner, n_in = n_out * k;
  const int width = L::maxout_planes_width(inner, vec, aligned);
  EXPECT(width == 1 || (width == vec && aligned && n_out % width == 0), "inner %lld vec %d",
         static_cast<long long>(inner), vec);
  const int64_t packs = n_out / width;
  EXPECT(packs * width == n_out, "inner %lld width %d", static_cast<long long>(inner), width);
  std::vector<int> member_writes(n_in, 0), output_writes(n_out, 0);
  const I inner_i = static_cast<I>(inner);
  for_each_trip(grid, per_thread, packs, [&](int64_t, int64_t, int64_t first) {
    for (int u = 0; u < per_thread; ++u) {  // the loads, clamped to the last pack
      const int64_t p = L::clamped_trip_item(first, u, grid.threads, packs);
      EXPECT(p >= 0 && p < packs, "pack %lld of %lld", static_cast<long long>(p),
             static_cast<long long>(packs));
      const int64_t start = L::maxout_first_member(p * width, k, inner_i);
      EXPECT(start % width == 0, "width %d: access at %lld", width,
             static_cast<long long>(start));
      for (int64_t j = 0; j < k; ++j)
        for (int v = 0; v < width; ++v) {
          const int64_t at = start + j * inner + v;
          EXPECT(at >= 0 && at < n_in, "read %lld of %lld", static_cast<long long>(at),
                 static_cast<long long>(n_in));
        }
    }
    for (int u = 0; u < per_thread; ++u) {  // the stores, guarded
      const int64_t p = L::trip_item(first, u, grid.threads);
      if (p >= packs) continue;
      const int64_t start = L::maxout_first_member(p * width, k, inner_i);
      for (int v = 0; v < width; ++v) {
        const int64_t out = p * width + v;
        const int64_t row = out / inner, pos = out % inner;
        EXPECT(out < n_out, "output %lld", static_cast<long long>(out));
        if (out >= n_out) continue;
        ++output_writes[out];
        for (int64_t j = 0; j < k; ++j) {
          const int64_t at = start + j * inner + v;  // member j of output `out`
          EXPECT(at == (row * k + j) * inner + pos, "rows %lld k %lld inner %lld: output %lld",
                 static_cast<long long>(rows), static_cast<long long>(k),
                 static_cast<long long>(inner), static_cast<long long>(out));
          if (at >= 0 && at < n_in) ++member_writes[at];
        }
      }
    }
  });
  EXPECT(all_once(output_writes) && all_once(member_writes),
         "rows %lld k %lld inner %lld vec %d aligned %d grid %lldx%lld",
         static_cast<long long>(rows), static_cast<long long>(k), static_cast<long long>(inner),
         vec, aligned, static_cast<long long>(grid.blocks), static_cast<long long>(grid.threads));
}

// ---- maxout with the members side by side (inner == 1) ---------------------------------------
// maxout_members_kernel (kMembersUnroll per thread) and maxout_indices_backward_members_kernel
// (kUnroll per thread): output i's members are i * k + c * width + m, width | k.
void check_members(int64_t rows, int64_t k, int width, int per_thread, const Grid& grid) {
  const int64_t n_out = rows, n_in = rows * k, chunks = k / width;
  std::vector<int> member_writes(n_in, 0), output_writes(n_out, 0);
  for_each_trip(grid, per_thread, n_out, [&](int64_t, int64_t, int64_t first) {
    for (int u = 0; u < per_thread; ++u) {
      const int64_t i = L::clamped_trip_item(first, u, grid.threads, n_out);
      EXPECT(i >= 0 && i < n_out && i * k == L::maxout_first_member(i, k, uint32_t{1}),
             "output %lld", static_cast<long long>(i));
      for (int64_t c = 0; c < chunks; ++c) {
        EXPECT((i * k + c * width) % width == 0, "width %d", width);
        EXPECT(i * k + c * width + width <= n_in, "read past %lld", static_cast<long long>(n_in));
      }
    }
    for (int u = 0; u < per_thread; ++u) {
      const int64_t i = L::trip_item(first, u, grid.threads);
      if (i >= n_out) continue;
      ++output_writes[i];
      for (int64_t c = 0; c < chunks; ++c)
        for (int m = 0; m < width; ++m) ++member_writes[i * k + c * width + m];
    }
  });
  EXPECT(all_once(output_writes) && all_once(member_writes),
         "rows %lld k %lld width %d grid %lldx%lld", static_cast<long long>(rows),
         static_cast<long long>(k), width, static_cast<long long>(grid.blocks),
         static_cast<long long>(grid.threads));
}

void check_all_maxout() {
  const Grid grids[] = {{1, 32}, {2, 7}, {3, 256}};
  for (int64_t rows : {1, 2, 3, 5})
    for (int64_t k : {1, 2, 3, 4, 6, 7, 8})
      for (int64_t inner : {2, 3, 5, 7, 8, 16, 24, 33, 64})
        for (int vec : {1, 2, 4, 8})
          for (bool aligned : {true, false})
            for (const Grid& grid : grids)
              for (int per_thread : {kMaxoutUnroll, kUnroll}) {
                check_planes<uint32_t>(rows, k, inner, vec, aligned, per_thread, grid);
                if (rows == 3 && vec == 4)
                  check_planes<uint64_t>(rows, k, inner, vec, aligned, per_thread, grid);
              }
  for (int64_t inner : {2, 3, 8})  // the largest pool a byte index holds
    for (int vec : {1, 8}) check_planes<uint32_t>(2, 256, inner, vec, true, kUnroll, grids[2]);
  // enough outputs for several trips of a full-width grid
  for (int vec : {1, 4, 8}) {
    check_planes<uint32_t>(37, 3, 1024, vec, true, kMaxoutUnroll, Grid{2, 256});
    check_planes<uint32_t>(37, 3, 1024, vec, true, kUnroll, Grid{2, 256});
  }

  for (int64_t rows : {1, 2, 3, 31, 255, 256, 257, 1000, 2051})
    for (int64_t k : {1, 2, 3, 4, 6, 8, 12, 16, 256})
      for (int width : {1, 2, 4, 8}) {
        if (k % width != 0) continue;
        for (const Grid& grid : grids) {
          check_members(rows, k, width, kMembersUnroll, grid);
          check_members(rows, k, width, kUnroll, grid);
        }
      }

  // The 32-bit division where the host picks it (every index of the input below 2^32, up to
  // UINT32_MAX itself) and the 64-bit one beyond: the offsets of the last outputs and a stride
  // through the rest, against 64-bit arithmetic.
  struct Big {
    int64_t rows, k, inner;
  };
  for (const Big& b : {Big{65537, 3, 21845}, Big{2, 256, 8388607}, Big{65535, 2, 32768}}) {
    const int64_t n_out = b.rows * b.inner, n_in = n_out * b.k;
    EXPECT(n_in <= int64_t{UINT32_MAX}, "n_in %lld", static_cast<long long>(n_in));
    for (int64_t out = n_out - 1; out >= 0; out -= (out > n_out - 4096 ? 1 : 9973)) {
      const int64_t want = (out / b.inner * b.k) * b.inner + out % b.inner;
      const int64_t got = L::maxout_first_member(out, b.k, static_cast<uint32_t>(b.inner));
      EXPECT(got == want && got + (b.k - 1) * b.inner < n_in, "output %lld of %lld",
             static_cast<long long>(out), static_cast<long long>(n_out));
    }
  }
  for (const Big& b : {Big{3, 2, (int64_t{1} << 31) + 5}, Big{(int64_t{1} << 20) + 3, 5, 4099}}) {
    const int64_t n_out = b.rows * b.inner, n_in = n_out * b.k;
    EXPECT(n_in > int64_t{UINT32_MAX}, "n_in %lld", static_cast<long long>(n_in));
    for (int64_t out = n_out - 1; out >= 0; out -= (out > n_out - 4096 ? 1 : 1000003)) {
      const int64_t want = (out / b.inner * b.k) * b.inner + out % b.inner;
      const int64_t got = L::maxout_first_member(out, b.k, static_cast<uint64_t>(b.inner));
      EXPECT(got == want && got + (b.k - 1) * b.inner < n_in, "output %lld of %lld",
             static_cast<long long>(out), static_cast<long long>(n_out));
    }
  }
}

}  // namespace

int main() {
  check_all_masked();
  check_all_maxout();
  if (failures > 0) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
