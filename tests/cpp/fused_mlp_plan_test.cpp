// Checks the shared-memory layout of the fused MLP kernels (csrc/cuda/fused_mlp_plan.h) over many
// shapes: which MLPs are fused, every layer's padded block inside the image and apart from the
// others, 16-byte alignment of what is copied in 16-byte pieces, every B-fragment and A-fragment
// read of the kernels inside its block and free of shared-memory bank conflicts, the chaining of
// one layer's output tiles into the next layer's A fragments, the row tiles covering every row
// once, the kernels' fragment addressing against the PTX layouts of mma.m16n8k16, and one warp's
// forward and input gradient emulated register by register against a plain loop. Built and run
// by tests/test_cuda_host_math.py; prints each failure and exits non-zero
// if there is any.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda/fused_mlp_plan.h"

using namespace fastops::gpu::mlp;

namespace {

int failures = 0;

#define EXPECT(cond, ...)                                             \
  do {                                                                \
    if (!(cond)) {                                                    \
      if (++failures <= 20) {                                         \
        std::printf("%s:%d: %s failed: ", __FILE__, __LINE__, #cond); \
        std::printf(__VA_ARGS__);                                     \
        std::printf("\n");                                            \
      }                                                               \
    }                                                                 \
  } while (0)

constexpr int64_t kH200Smem = 227 * 1024;  // opt-in shared memory of sm_90 (sm_80: 163 KB)

// The 32 lanes of one 32-bit shared load hit 32 distinct banks (lane g = lane / 4, t = lane % 4
// reads the word of element base + g * ld + 2 t: the kernels' B fragments and A fragments).
bool conflict_free(int64_t base, int ld) {
  uint64_t banks = 0;
  for (int g = 0; g < 8; ++g)
    for (int t = 0; t < 4; ++t) banks |= uint64_t{1} << (((base + g * ld + 2 * t) / 2) % 32);
  return banks == 0xffffffffu;
}

// Every read of warp_layer for a layer of kt k16 chunks and nt n8 tiles over a block of `rows`
// rows of pitch ld at element offset off: inside the block, 4-byte aligned, conflict-free.
void check_b_reads(int off, int rows, int ld, int kt, int nt, const char* what, int l) {
  EXPECT(nt * 8 <= rows, "%s layer %d: %d n8 tiles over %d rows", what, l, nt, rows);
  EXPECT(kt * 16 + kRowPad <= ld, "%s layer %d: %d k16 chunks in pitch %d", what, l, kt, ld);
  for (int kc = 0; kc < kt; ++kc)
    for (int j = 0; j < nt; ++j)
      for (int half = 0; half < 2; ++half) {
        const int64_t base = off + int64_t{j} * 8 * ld + kc * 16 + 8 * half;
        EXPECT(base % 2 == 0, "%s layer %d: odd element offset", what, l);
        // the last element read: row j*8+7, column kc*16 + 8 half + 7, inside the real columns
        EXPECT(kc * 16 + 8 * half + 7 < ld - kRowPad, "%s layer %d: read in the row padding",
               what, l);
        // moving along k or by whole n8 tiles (8 ld elements, a multiple of 32 banks when ld is
        // 8 mod 16) shifts every lane alike: the first tile and chunk stand for all
        if (kc == 0 && j == 0)
          EXPECT(conflict_free(base, ld), "%s layer %d: bank conflict (ld %d)", what, l, ld);
        if (j == 0) EXPECT(ld % 16 == 8, "%s layer %d: pitch %d", what, l, ld);
      }
}

void check_plan(int64_t in, int64_t hidden, int64_t out, int64_t layers, bool backward,
                int64_t smem) {
  const FusedPlan p = plan_fused_mlp(in, hidden, out, layers, 2, backward, smem);
  const bool shape_ok = layers >= 1 && layers <= kMaxLayers && in >= 1 && in <= kMaxWidth &&
                        out >= 1 && out <= kMaxWidth &&
                        (layers == 1 || (hidden >= 16 && hidden <= kMaxWidth && hidden % 16 == 0));
  if (!shape_ok) {
    EXPECT(!p.fused, "in %lld hidden %lld out %lld layers %lld fused", (long long)in,
           (long long)hidden, (long long)out, (long long)layers);
    return;
  }
  EXPECT(p.fused == (p.smem_bytes <= smem), "fused iff the image fits");
  EXPECT(p.layers == layers, "layers");
  EXPECT(p.kin_pad >= in && p.kin_pad < in + 16 && p.kin_pad % 16 == 0, "kin_pad %d", p.kin_pad);
  EXPECT(p.out_pad >= out && p.out_pad < out + 16 && p.out_pad % 16 == 0, "out_pad %d",
         p.out_pad);
  EXPECT(p.width % 16 == 0 && p.width >= 16 && p.width <= kMaxWidth, "width %d", p.width);
  // the kernels' register width: the next of 16, 32, 64, 128
  const int reg_width = p.width <= 16 ? 16 : p.width <= 32 ? 32 : p.width <= 64 ? 64 : 128;
  EXPECT(p.image_elems % 8 == 0 && p.stage_ld % 8 == 0, "16-byte pieces");
  std::vector<std::pair<int64_t, int64_t>> regions;
  for (int l = 0; l < p.layers; ++l) {
    const int64_t k = l == 0 ? in : hidden, n = l == layers - 1 ? out : hidden;
    EXPECT(p.k_pad[l] >= k && p.k_pad[l] < k + 16 && p.k_pad[l] % 16 == 0, "k_pad %d", l);
    EXPECT(p.n_pad[l] >= n && p.n_pad[l] < n + 16 && p.n_pad[l] % 16 == 0, "n_pad %d", l);
    EXPECT(p.k_pad[l] <= reg_width && p.n_pad[l] <= reg_width, "layer %d beyond width", l);
    // layer l's A fragments are layer l-1's output tiles (forward) / input tiles (backward)
    if (l > 0) EXPECT(p.k_pad[l] == p.n_pad[l - 1], "chain at layer %d", l);
    EXPECT(p.w_off[l] % 8 == 0, "w_off %d", l);
    const int rows = backward ? p.k_pad[l] : p.n_pad[l];
    const int ld = (backward ? p.n_pad[l] : p.k_pad[l]) + kRowPad;
    regions.push_back({p.w_off[l], p.w_off[l] + int64_t{rows} * ld});
    // forward: kt = k_pad / 16, nt = n_pad / 8; backward: kt = n_pad / 16, nt = k_pad / 8
    if (backward)
      check_b_reads(p.w_off[l], rows, ld, p.n_pad[l] / 16, p.k_pad[l] / 8, "backward", l);
    else
      check_b_reads(p.w_off[l], rows, ld, p.k_pad[l] / 16, p.n_pad[l] / 8, "forward", l);
    if (!backward) {
      EXPECT(p.b_off[l] % 8 == 0, "b_off %d", l);
      regions.push_back({p.b_off[l], p.b_off[l] + p.n_pad[l]});
    }
  }
  for (size_t i = 0; i < regions.size(); ++i) {
    EXPECT(regions[i].first >= 0 && regions[i].second <= p.image_elems, "region %zu outside", i);
    for (size_t j = 0; j < i; ++j)
      EXPECT(regions[i].second <= regions[j].first || regions[j].second <= regions[i].first,
             "regions %zu and %zu overlap", i, j);
  }
  // the staging tile: the first layer's A fragments (forward) / the last layer's (backward)
  const int stage_cols = backward ? p.out_pad : p.kin_pad;
  EXPECT(p.stage_ld == stage_cols + kRowPad, "stage_ld");
  for (int kc = 0; kc < stage_cols / 16; ++kc)
    for (int half = 0; half < 2; ++half)
      for (int rows8 = 0; rows8 < 2; ++rows8)
        EXPECT(conflict_free(int64_t{rows8} * 8 * p.stage_ld + kc * 16 + 8 * half, p.stage_ld),
               "staging tile kc %d", kc);
  EXPECT(p.smem_bytes == (p.image_elems + int64_t{kWarps} * kWarpRows * p.stage_ld) * 2,
         "smem bytes");
}

void check_plans() {
  const int64_t widths[] = {1, 2, 3, 8, 16, 17, 32, 33, 64, 65, 100, 128, 129};
  const int64_t hiddens[] = {0, 8, 15, 16, 32, 48, 64, 100, 112, 128, 144};
  for (int64_t in : widths)
    for (int64_t out : widths)
      for (int64_t hidden : hiddens)
        for (int64_t layers : {0, 1, 2, 5, 16, 17})
          for (bool backward : {false, true})
            for (int64_t smem : {int64_t{48 * 1024}, kH200Smem})
              check_plan(in, hidden, out, layers, backward, smem);
  // 32-bit elements never fuse
  EXPECT(!plan_fused_mlp(32, 64, 16, 5, 4, false, kH200Smem).fused, "float32 fused");
  // the benchmark's MLP (in 32, four hidden layers of 64, out 16) fuses both ways, under 48 KB
  for (bool backward : {false, true}) {
    const FusedPlan p = plan_fused_mlp(32, 64, 16, 5, 2, backward, 48 * 1024);
    EXPECT(p.fused && p.width == 64, "bench MLP: fused %d width %d bytes %lld", p.fused, p.width,
           (long long)p.smem_bytes);
  }
  // every supported hidden width fuses with 4 hidden layers on sm_90's budget (on sm_80's,
  // 163 KB, 128 wide fuses up to 3 layers)
  for (int64_t h = 16; h <= 128; h += 16)
    for (bool backward : {false, true})
      EXPECT(plan_fused_mlp(h, h, h, 5, 2, backward, kH200Smem).fused, "width %lld",
             (long long)h);
  EXPECT(plan_fused_mlp(128, 128, 128, 3, 2, false, 163 * 1024).fused, "128 x 3 on sm_80");
}

// Row tiles: tile * kTileRows + warp * kWarpRows + r covers every row of [0, rows) once.
void check_row_tiles() {
  for (int64_t rows : {int64_t{0}, int64_t{1}, int64_t{15}, int64_t{16}, int64_t{127},
                       int64_t{128}, int64_t{129}, int64_t{1000}, int64_t{4097}}) {
    const int64_t tiles = row_tiles(rows);
    std::vector<int> seen(static_cast<size_t>(rows), 0);
    for (int64_t tile = 0; tile < tiles; ++tile)
      for (int warp = 0; warp < kWarps; ++warp)
        for (int r = 0; r < kWarpRows; ++r) {
          const int64_t row = tile * kTileRows + warp * kWarpRows + r;
          if (row < rows) ++seen[static_cast<size_t>(row)];
        }
    for (int64_t r = 0; r < rows; ++r)
      EXPECT(seen[r] == 1, "rows %lld: row %lld", (long long)rows, (long long)r);
    EXPECT(tiles * kTileRows >= rows && (tiles == 0 || (tiles - 1) * kTileRows < rows),
           "tiles of %lld", (long long)rows);
  }
  EXPECT(row_tiles(int64_t{1} << 40) == (int64_t{1} << 40) / kTileRows, "64-bit rows");
}

// ---- the fragments against the PTX ISA's layouts of mma.m16n8k16 (.f16 / .bf16) ---------------
// lane = 4 g + t; A register r, half e: row g + 8 (r & 1), column 8 (r >> 1) + 2 t + e;
// B register r, half e: k 8 r + 2 t + e, column g; C element c: row g + 8 (c >> 1),
// column 2 t + (c & 1).
int spec_a_row(int r, int g) { return g + 8 * (r & 1); }
int spec_a_col(int r, int e, int t) { return 8 * (r >> 1) + 2 * t + e; }
int spec_b_k(int r, int e, int t) { return 8 * r + 2 * t + e; }
int spec_c_row(int c, int g) { return g + 8 * (c >> 1); }
int spec_c_col(int c, int t) { return 2 * t + (c & 1); }

void check_fragments() {
  const int ld = 40;
  for (int g = 0; g < 8; ++g)
    for (int t = 0; t < 4; ++t) {
      for (int kc = 0; kc < 2; ++kc)
        for (int r = 0; r < 4; ++r) {
          const int off = a_frag_offset(r, kc, g, t, ld);
          EXPECT(off / ld == spec_a_row(r, g) && off % ld == kc * 16 + spec_a_col(r, 0, t),
                 "A register %d of lane %d", r, 4 * g + t);
        }
      for (int j = 0; j < 3; ++j)
        for (int kc = 0; kc < 2; ++kc)
          for (int r = 0; r < 2; ++r) {
            const int off = b_frag_offset(r, j, kc, g, t, ld);
            EXPECT(off / ld == j * 8 + g && off % ld == kc * 16 + spec_b_k(r, 0, t),
                   "B register %d of lane %d", r, 4 * g + t);
          }
      for (int j = 0; j < 4; ++j)
        for (int c = 0; c < 4; ++c) {
          EXPECT(acc_row(c, g) == spec_c_row(c, g) && acc_col(c, j, t) == j * 8 + spec_c_col(c, t),
                 "C element %d of lane %d", c, 4 * g + t);
          // C pair h of tile j becomes A register next_a_reg(j, h) of chunk j / 2: same row,
          // same column of the product's k
          const int r = next_a_reg(j, c >> 1);
          EXPECT(spec_a_row(r, g) == spec_c_row(c, g) &&
                     (j / 2) * 16 + spec_a_col(r, c & 1, t) == j * 8 + spec_c_col(c, t),
                 "C element %d of tile %d to A", c, j);
        }
    }
}

// One warp's 16 rows through an MLP the way the kernels run them: images laid out by the plan,
// registers addressed by the fragment functions, each mma done per the PTX layouts above,
// ReLU between layers; forward output and input gradient against a plain loop.
struct Regs {  // one k16 chunk of A: [register][lane][half]
  float v[4][32][2];
};

void emulate_warp(int in, int hidden, int out, int layers) {
  std::mt19937 gen(in * 1000 + hidden * 10 + layers);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<std::vector<float>> w(layers), b(layers);
  std::vector<int> k(layers), n(layers);
  for (int l = 0; l < layers; ++l) {
    k[l] = l == 0 ? in : hidden;
    n[l] = l == layers - 1 ? out : hidden;
    w[l].resize(static_cast<size_t>(n[l]) * k[l]);
    b[l].resize(n[l]);
    for (auto& x : w[l]) x = u(gen);
    for (auto& x : b[l]) x = u(gen);
  }
  std::vector<float> x(16 * in), gout(16 * out);
  for (auto& v : x) v = u(gen);
  for (auto& v : gout) v = u(gen);

  // the plain reference: z_l, relu between layers, grad_input through relu'
  std::vector<std::vector<float>> z(layers);
  std::vector<float> a = x;
  for (int l = 0; l < layers; ++l) {
    z[l].assign(16 * n[l], 0.f);
    for (int r = 0; r < 16; ++r)
      for (int j = 0; j < n[l]; ++j) {
        float s = b[l][j];
        for (int q = 0; q < k[l]; ++q) s += a[r * k[l] + q] * w[l][j * k[l] + q];
        z[l][r * n[l] + j] = s;
      }
    a.assign(16 * n[l], 0.f);
    for (int i = 0; i < 16 * n[l]; ++i)
      a[i] = l < layers - 1 ? std::max(z[l][i], 0.f) : z[l][i];
  }
  std::vector<float> ref_out = a, d = gout;
  for (int l = layers - 1; l >= 0; --l) {
    std::vector<float> ga(16 * k[l], 0.f);
    for (int r = 0; r < 16; ++r)
      for (int q = 0; q < k[l]; ++q)
        for (int j = 0; j < n[l]; ++j) ga[r * k[l] + q] += d[r * n[l] + j] * w[l][j * k[l] + q];
    if (l > 0)
      for (int i = 0; i < 16 * k[l]; ++i) ga[i] = z[l - 1][i] > 0.f ? ga[i] : 0.f;
    d = ga;
  }
  const std::vector<float> ref_grad_in = d;

  for (bool backward : {false, true}) {
    const FusedPlan p = plan_fused_mlp(in, hidden, out, layers, 2, backward, 1 << 30);
    EXPECT(p.fused, "emulated plan not fused");
    if (!p.fused) return;
    std::vector<float> image(p.image_elems, 0.f);  // as build_image lays it out
    for (int l = 0; l < layers; ++l) {
      const int ld = (backward ? p.n_pad[l] : p.k_pad[l]) + kRowPad;
      for (int j = 0; j < n[l]; ++j)
        for (int q = 0; q < k[l]; ++q)
          image[p.w_off[l] + (backward ? q * ld + j : j * ld + q)] = w[l][j * k[l] + q];
      if (!backward)
        for (int j = 0; j < n[l]; ++j) image[p.b_off[l] + j] = b[l][j];
    }
    // the staging tile: x (forward) or grad_output (backward), zero-padded
    const int cols = backward ? out : in, cols_pad = backward ? p.out_pad : p.kin_pad;
    std::vector<float> stage(16 * p.stage_ld, 0.f);
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < cols; ++c)
        stage[r * p.stage_ld + c] = backward ? gout[r * out + c] : x[r * in + c];
    std::vector<Regs> A(kMaxWidth / 16);
    for (int kc = 0; kc < cols_pad / 16; ++kc)
      for (int lane = 0; lane < 32; ++lane)
        for (int r = 0; r < 4; ++r)
          for (int e = 0; e < 2; ++e)
            A[kc].v[r][lane][e] =
                stage[a_frag_offset(r, kc, lane / 4, lane % 4, p.stage_ld) + e];
    std::vector<float> result(16 * (backward ? in : out), 0.f);
    for (int step = 0; step < layers; ++step) {
      const int l = backward ? layers - 1 - step : step;
      const int ld = (backward ? p.n_pad[l] : p.k_pad[l]) + kRowPad;
      const int kt = (backward ? p.n_pad[l] : p.k_pad[l]) / 16;
      const int nt = (backward ? p.k_pad[l] : p.n_pad[l]) / 8;
      std::vector<float> acc(static_cast<size_t>(nt) * 4 * 32, 0.f);  // [j][c][lane]
      for (int kc = 0; kc < kt; ++kc)
        for (int j = 0; j < nt; ++j) {
          float am[16][16], bm[16][8];
          for (int lane = 0; lane < 32; ++lane) {
            const int g = lane / 4, t = lane % 4;
            for (int r = 0; r < 4; ++r)
              for (int e = 0; e < 2; ++e)
                am[spec_a_row(r, g)][spec_a_col(r, e, t)] = A[kc].v[r][lane][e];
            for (int r = 0; r < 2; ++r)
              for (int e = 0; e < 2; ++e)
                bm[spec_b_k(r, e, t)][g] =
                    image[p.w_off[l] + b_frag_offset(r, j, kc, g, t, ld) + e];
          }
          for (int lane = 0; lane < 32; ++lane)
            for (int c = 0; c < 4; ++c) {
              float s = 0.f;
              for (int q = 0; q < 16; ++q)
                s += am[spec_c_row(c, lane / 4)][q] * bm[q][spec_c_col(c, lane % 4)];
              acc[(j * 4 + c) * 32 + lane] += s;
            }
        }
      const bool final_step = step == layers - 1;
      for (int j = 0; j < nt; ++j)
        for (int lane = 0; lane < 32; ++lane) {
          const int g = lane / 4, t = lane % 4;
          for (int c = 0; c < 4; ++c) {
            const int row = acc_row(c, g), col = acc_col(c, j, t);
            float v = acc[(j * 4 + c) * 32 + lane];
            if (!backward) v += image[p.b_off[l] + col];
            if (final_step) {
              if (col < (backward ? in : out)) result[row * (backward ? in : out) + col] = v;
              continue;
            }
            // the next product's A register: relu (forward) or relu' of z_{l-1} (backward)
            if (!backward) v = std::max(v, 0.f);
            else v = z[l - 1][row * hidden + col] > 0.f ? v : 0.f;
            A[j / 2].v[next_a_reg(j, c >> 1)][lane][c & 1] = v;
          }
        }
    }
    const std::vector<float>& ref = backward ? ref_grad_in : ref_out;
    for (size_t i = 0; i < ref.size(); ++i)
      EXPECT(std::fabs(result[i] - ref[i]) <= 1e-4f * (1.f + std::fabs(ref[i])),
             "%s in %d hidden %d out %d layers %d: element %zu %g vs %g",
             backward ? "backward" : "forward", in, hidden, out, layers, i, result[i], ref[i]);
  }
}

}  // namespace

int main() {
  check_plans();
  check_row_tiles();
  check_fragments();
  for (int layers : {1, 2, 4})
    for (int in : {2, 16, 33})
      for (int hidden : {16, 48})
        for (int out : {3, 16, 17}) emulate_warp(in, hidden, out, layers);
  if (failures != 0) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
