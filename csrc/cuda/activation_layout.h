// Index arithmetic of the activation kernels (activations.cu): which elements, mask bytes and
// maxout outputs a thread handles. Plain integer code for the host and the device, so that
// tests/cpp/activation_layout_test.cpp can check on the CPU that every index is handled exactly
// once and that nothing outside a tensor is read or written.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FO_ACTIVATION_LAYOUT_HD __host__ __device__ __forceinline__
#else
#define FO_ACTIVATION_LAYOUT_HD inline
#endif

namespace fastops {
namespace activation_layout {

// ---- Grid-stride trips ----------------------------------------------------------------------
// A kernel taking `per_thread` items per thread and trip walks `count` items as
//   for (first = trip_first(block, thread, threads, per_thread); first < count;
//        first += trip_stride(blocks, threads, per_thread))
//     item trip_item(first, u, threads) for each u < per_thread that is below count
// Consecutive threads take consecutive items, so each of a thread's accesses is coalesced with
// its warp's, and the per_thread accesses are independent (all in flight together).

FO_ACTIVATION_LAYOUT_HD int64_t trip_first(int64_t block, int64_t thread, int64_t threads,
                                           int per_thread) {
  return block * threads * per_thread + thread;
}
FO_ACTIVATION_LAYOUT_HD int64_t trip_stride(int64_t blocks, int64_t threads, int per_thread) {
  return blocks * threads * per_thread;
}
FO_ACTIVATION_LAYOUT_HD int64_t trip_item(int64_t first, int u, int64_t threads) {
  return first + u * threads;
}
// trip_item held to the last item (count > 0): loads past the end read that one instead, so
// they need no branch; only the stores are guarded (by trip_item < count).
FO_ACTIVATION_LAYOUT_HD int64_t clamped_trip_item(int64_t first, int u, int64_t threads,
                                                  int64_t count) {
  const int64_t item = trip_item(first, u, threads), last = count - 1;
  return item < last ? item : last;  // in the form of a min: one instruction on the GPU
}

// ---- Bit masks of the masked activations ----------------------------------------------------
// Bit j of byte i is element 8i + j. Whole bytes go to one thread each (no two threads write a
// byte); the n % 8 elements of the partial last byte go to a single thread.

constexpr int kMaskBitsPerByte = 8;

FO_ACTIVATION_LAYOUT_HD int64_t whole_mask_bytes(int64_t n) { return n / kMaskBitsPerByte; }
// The first element of the partial last byte (n when there is none).
FO_ACTIVATION_LAYOUT_HD int64_t mask_tail_begin(int64_t n) {
  return whole_mask_bytes(n) * kMaskBitsPerByte;
}
FO_ACTIVATION_LAYOUT_HD int64_t mask_element(int64_t byte, int bit) {
  return byte * kMaskBitsPerByte + bit;
}
// Mask bytes per thread and trip for `packs_in_flight` accesses of `vec` elements per thread
// (a byte is 8 / vec of them; at least one byte).
FO_ACTIVATION_LAYOUT_HD constexpr int mask_bytes_per_trip(int vec, int packs_in_flight) {
  const int bytes = vec * packs_in_flight / kMaskBitsPerByte;
  return bytes > 1 ? bytes : 1;
}

// ---- Maxout -----------------------------------------------------------------------------------
// The input viewed as (rows, k, inner), the output as (rows, inner): output o = row * inner + pos
// takes the k members at maxout_first_member(o) + j * inner, j < k.

// I is the type of the division: uint32_t when every index of the input fits it (a 64-bit
// division is a long subroutine on the GPU), else uint64_t.
template <class I>
FO_ACTIVATION_LAYOUT_HD int64_t maxout_first_member(int64_t out, int64_t k, I inner) {
  const I row = static_cast<I>(out) / inner;
  const I pos = static_cast<I>(out) - row * inner;
  return static_cast<int64_t>(row) * k * static_cast<int64_t>(inner) + static_cast<int64_t>(pos);
}

// Outputs per access along the inner positions: `vec` when the pointers allow 16-byte access
// and inner % vec == 0, so that a pack of vec outputs starting at a multiple of vec lies in one
// row and its member j is vec contiguous elements; else 1.
FO_ACTIVATION_LAYOUT_HD int maxout_planes_width(int64_t inner, int vec, bool aligned) {
  return aligned && inner % vec == 0 ? vec : 1;
}

}  // namespace activation_layout
}  // namespace fastops
