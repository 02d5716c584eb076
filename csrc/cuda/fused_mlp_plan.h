// Host-side layout of the fully fused MLP kernels (fused_mlp.cu) that needs no CUDA: which MLPs
// the fused tensor-core kernels take, and where every layer's weights and biases lie in the
// shared-memory image that each block copies in once. Pure functions, so that
// tests/cpp/fused_mlp_plan_test.cpp can check them on any machine.
//
// Layer l has K_l inputs and N_l outputs (K_0 = in, N_{L-1} = out, hidden width otherwise), both
// zero-padded to multiples of 16 (Kp_l, Np_l): the k16 step of mma.m16n8k16, and the n16 pairs
// of n8 tiles that hand one layer's output to the next layer as its A fragments.
//   forward image:  W_l as [Np_l rows][Kp_l + 8]  (row n = output feature, contiguous along k),
//                   then the biases, Np_l each.
//   backward image: W_l^T as [Kp_l rows][Np_l + 8] (row k = input feature, contiguous along n).
// Both are the B operand of the product in the same form: row = output column of the product,
// contiguous along its reduction. The 8 extra elements (16 bytes) per row shift consecutive rows
// by 4 banks (row pitch = an odd multiple of 4 words), so the 8 rows x 4 words that a warp reads
// for one B fragment fall in 32 distinct banks. Each warp also has a staging tile of its 16 rows
// (the input in the forward, the output gradient in the backward), padded the same way.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__CUDACC__)
#define FO_MLP_HD __host__ __device__ __forceinline__
#else
#define FO_MLP_HD inline
#endif

namespace fastops {
namespace gpu {
namespace mlp {

constexpr int kWarps = 8;        // warps of a block
constexpr int kWarpRows = 16;    // rows of a warp: the m16 of the MMA
constexpr int kTileRows = kWarps * kWarpRows;
constexpr int kMaxWidth = 128;   // widest layer (padded) of the fused kernels
constexpr int kMaxLayers = 16;   // layers of the fused kernels (kernel-argument arrays)
constexpr int kRowPad = 8;       // elements added to every shared row (see above)

inline int64_t pad16(int64_t n) { return (n + 15) / 16 * 16; }

struct FusedPlan {
  bool fused = false;  // false: the MLP takes the layer-by-layer path
  int width = 0;       // the kernel's widest padded layer: its register tiles (16 .. 128)
  int layers = 0;
  int kin_pad = 0, out_pad = 0;
  int k_pad[kMaxLayers] = {}, n_pad[kMaxLayers] = {};
  int w_off[kMaxLayers] = {};  // element offset of layer l's weights in the image
  int b_off[kMaxLayers] = {};  // of its biases (forward image only)
  int image_elems = 0;         // a multiple of 8: copied in 16-byte pieces
  int stage_ld = 0;            // row pitch of a warp's staging tile
  int64_t smem_bytes = 0;      // image + kWarps staging tiles
};

// The plan of an MLP with `layers` layers (in -> hidden -> ... -> out), elements of elem_bytes,
// for the forward image or the backward one, on a device whose blocks may use smem_limit bytes
// of shared memory. Fused only for 16-bit elements, in and out in [1, 128], hidden width a
// multiple of 16 in [16, 128] (ignored when layers == 1), at most kMaxLayers layers, and an image
// that fits in shared memory.
inline FusedPlan plan_fused_mlp(int64_t in, int64_t hidden, int64_t out, int64_t layers,
                                int elem_bytes, bool backward, int64_t smem_limit) {
  FusedPlan p;
  if (elem_bytes != 2 || layers < 1 || layers > kMaxLayers) return p;
  if (in < 1 || in > kMaxWidth || out < 1 || out > kMaxWidth) return p;
  if (layers > 1 && (hidden < 16 || hidden > kMaxWidth || hidden % 16 != 0)) return p;
  p.layers = static_cast<int>(layers);
  p.kin_pad = static_cast<int>(pad16(in));
  p.out_pad = static_cast<int>(pad16(out));
  int64_t off = 0;
  for (int l = 0; l < p.layers; ++l) {
    p.k_pad[l] = l == 0 ? p.kin_pad : static_cast<int>(hidden);
    p.n_pad[l] = l == p.layers - 1 ? p.out_pad : static_cast<int>(hidden);
    p.width = std::max({p.width, p.k_pad[l], p.n_pad[l]});
    p.w_off[l] = static_cast<int>(off);
    off += backward ? int64_t{p.k_pad[l]} * (p.n_pad[l] + kRowPad)
                    : int64_t{p.n_pad[l]} * (p.k_pad[l] + kRowPad);
  }
  if (!backward) {
    for (int l = 0; l < p.layers; ++l) {
      p.b_off[l] = static_cast<int>(off);
      off += p.n_pad[l];
    }
  }
  p.image_elems = static_cast<int>(off);  // every term is a multiple of 8
  p.stage_ld = (backward ? p.out_pad : p.kin_pad) + kRowPad;
  p.smem_bytes = (off + int64_t{kWarps} * kWarpRows * p.stage_ld) * elem_bytes;
  p.fused = p.smem_bytes <= smem_limit;
  return p;
}

// ---- the fragments of mma.m16n8k16 as the kernels address them (lane = 4 g + t) -------------
// A (16 x 16, k16 chunk kc of a row-major tile of pitch ld): register r holds the pair of
// elements at this offset and the next.
FO_MLP_HD int a_frag_offset(int r, int kc, int g, int t, int ld) {
  return (g + 8 * (r & 1)) * ld + kc * 16 + 8 * (r >> 1) + 2 * t;
}
// B (16 x 8, n8 tile j, k16 chunk kc) from an image block whose row n is the product's output
// column n, contiguous along k: register r holds the pair at this offset and the next.
FO_MLP_HD int b_frag_offset(int r, int j, int kc, int g, int t, int ld) {
  return (j * 8 + g) * ld + kc * 16 + 8 * r + 2 * t;
}
// Accumulator element c (0..3) of n8 tile j: its row in the warp's 16 rows, and its column.
FO_MLP_HD int acc_row(int c, int g) { return g + 8 * (c >> 1); }
FO_MLP_HD int acc_col(int c, int j, int t) { return j * 8 + 2 * t + (c & 1); }
// The accumulator pair (c = 2 h, 2 h + 1) of n8 tile j is register next_a_reg(j, h) of the A
// fragment of k16 chunk j / 2 of the next product: no trip through shared memory.
FO_MLP_HD int next_a_reg(int j, int h) { return (j & 1) * 2 + h; }

// Row tiles of a batch of `rows`: each block takes tiles blockIdx.x, + gridDim.x, ...
inline int64_t row_tiles(int64_t rows) { return (rows + kTileRows - 1) / kTileRows; }

}  // namespace mlp
}  // namespace gpu
}  // namespace fastops

#undef FO_MLP_HD
