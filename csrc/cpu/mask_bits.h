// The bit masks that the masked activations save for backward (one bit per element, element i
// at bit i % 8 of byte i / 8; see activation_checks.h), on the CPU: packing bytes of 0/1 into
// bits and back, and the parallel loop that hands each thread whole bytes of the mask.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "../activation_checks.h"
#include "cpu_common.h"

namespace fastops {
namespace cpu {

// Elements per chunk of the masked loops: a vectorised loop between the data and one byte per
// element in a stack buffer, then a loop packing (or unpacking) 8 of those bytes per 64-bit word.
constexpr int64_t kMaskChunk = 512;  // a multiple of 8

// 8 bytes of 0/1 (a little-endian word) -> 8 bits, and back; loops over whole words vectorise.
FO_ALWAYS_INLINE void pack_words(const uint64_t* __restrict words, uint8_t* __restrict bits,
                                 int64_t n) {
  for (int64_t k = 0; k < n; ++k)
    bits[k] = static_cast<uint8_t>((words[k] * 0x0102040810204080ULL) >> 56);
}

FO_ALWAYS_INLINE void unpack_words(const uint8_t* __restrict bits, uint64_t* __restrict words,
                                   int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const uint64_t e = (bits[k] * 0x0101010101010101ULL) & 0x8040201008040201ULL;
    words[k] = ((e + 0x7F7F7F7F7F7F7F7FULL) & 0x8080808080808080ULL) >> 7;
  }
}

// Elements [8 * b0, min(n, 8 * b1)): whole bytes of the mask, so threads never share one.
template <class Body>
void for_mask_bytes(int64_t n, const Body& body) {
  at::parallel_for(0, mask_bytes(n), kElementwiseGrain / 8, [&](int64_t b0, int64_t b1) {
    body(8 * b0, std::min(n, 8 * b1));
  });
}

}  // namespace cpu
}  // namespace fastops
