// Hand-written GEMM of the linear layers: C[M, N] = A[M, K] B[K, N], each output element handed
// to an epilogue functor as its tile is written (bias, activation, dtype conversion).
//
// Operands come in one of two layouts each, so that the three products of a linear layer
// (forward x W^T, backward dZ W and dZ^T x) need no transposed copies:
//   A k-major:  A(m, k) = a[m * lda + k]        A mn-major: A(m, k) = a[k * lda + m]
//   B k-major:  B(k, n) = b[n * ldb + k]        B mn-major: B(k, n) = b[k * ldb + n]
//
// Kernels:
//   - float16 / bfloat16 on sm_80+: tensor cores (mma.sync m16n8k16, float accumulation), tiles
//     staged through shared memory by a multi-stage cp.async pipeline and read with ldmatrix.
//     Chosen by the code the build holds for the device, not by the device alone: a build whose
//     code for this GPU comes from a pre-sm_80 virtual architecture (PTX JIT-compiled at load)
//     has no tensor-core body and takes the CUDA-core kernel (the empty body traps if reached).
//   - everything else (float32, float64, 16-bit types on older GPUs): a register-tiled CUDA-core
//     kernel accumulating in acc_t<T>; float32 / float64 tiles reach shared memory through a
//     3-stage cp.async pipeline on sm_80+ (no registers spent on staging), otherwise through
//     registers into double-buffered shared memory.
// Edges (M, N, K not multiples of a tile) are zero-filled in shared memory. The tensor-core
// loader copies with the widest cp.async (16, 8 or 4 bytes) that an operand's pointer and leading
// dimension allow, zero-filling what lies outside the matrix through cp.async's source size;
// only operands aligned to 2 bytes alone (odd leading dimension or pointer) are loaded element by
// element. The CUDA-core loaders take a scalar path for operands that do not allow 16-byte (or
// pack-sized) access.
//
// Split-K: an output of few tiles with a long K (the weight gradient, whose K is the number of
// tokens; small-M forwards) leaves most SMs idle, so K is split into contiguous ranges
// (gemm_plan.h), each block computing one (tile, range) pair into a float (double for float64)
// workspace [splits][M][N]; a second kernel adds the splits of every element in split order and
// calls the epilogue. No atomics anywhere: every output is a fixed-order sum, and the same shape
// and alignment on the same device always gives the same bits.
//
// Epilogue: a copyable functor with `__device__ void operator()(int64_t row, int64_t col,
// acc_t<T> value) const`, called once per in-bounds output element.
#pragma once

#include <atomic>
#include <type_traits>

#include "cuda_common.cuh"
#include "gemm_plan.h"

namespace fastops {
namespace gpu {
namespace gemm {

template <class T>
struct Operand {
  const T* ptr;
  int64_t ld;  // elements between consecutive rows of the layout (see above)
};

// Output tile (tm, tn) of the block: tiles are walked in groups of kGroup tile-rows so that
// blocks running together share their A and B panels in L2.
// The block index is read with a volatile move so that the epilogue can derive its tile again
// instead of keeping it in registers (or spilling it) across the main loop.
__device__ __forceinline__ void tile_of_block(int64_t tiles_m, int64_t tiles_n, int64_t& tm,
                                              int64_t& tn) {
  constexpr int64_t kGroup = 8;
  uint32_t block;
  asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(block));
  const int64_t pid = block;
  const int64_t per_group = kGroup * tiles_n;
  const int64_t group = pid / per_group;
  const int64_t first_m = group * kGroup;
  const int64_t rows = tiles_m - first_m < kGroup ? tiles_m - first_m : kGroup;
  const int64_t in_group = pid - group * per_group;
  tm = first_m + in_group % rows;
  tn = in_group / rows;
}

// ---- PTX helpers (sm_80+: cp.async, ldmatrix, mma) -------------------------------------------

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define FO_GEMM_SM80 1
#endif

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
#ifdef FO_GEMM_SM80
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
#endif
}
// Copies Bytes (4, 8 or 16) bytes to shared memory, of which only the first src_bytes are read
// from src and the rest are zero-filled (src_bytes 0: nothing is read). src is Bytes-aligned.
template <int Bytes>
__device__ __forceinline__ void cp_async_zfill(uint32_t dst, const void* src, int src_bytes) {
#ifdef FO_GEMM_SM80
  if constexpr (Bytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes)
                 : "memory");
  } else {
    static_assert(Bytes == 4 || Bytes == 8, "cp.async copies 4, 8 or 16 bytes");
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(src),
                 "n"(Bytes), "r"(src_bytes)
                 : "memory");
  }
#endif
}
// Copies one element of Bytes (4 or 8) bytes, or zero-fills it when !ok (nothing is read).
template <int Bytes>
__device__ __forceinline__ void cp_async_elem(uint32_t dst, const void* src, bool ok) {
  cp_async_zfill<Bytes>(dst, src, ok ? Bytes : 0);
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef FO_GEMM_SM80
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef FO_GEMM_SM80
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
__device__ __forceinline__ void st_shared16(uint32_t dst, uint32_t a, uint32_t b, uint32_t c,
                                            uint32_t d) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(dst), "r"(a), "r"(b), "r"(c),
               "r"(d)
               : "memory");
}

template <bool Trans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
#ifdef FO_GEMM_SM80
  if constexpr (Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
  }
#endif
}

// c += a b for one m16n8k16 tile.
template <class T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
#ifdef FO_GEMM_SM80
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// =============================================================================================
// CUDA-core kernel. 256 threads in 8 warps (4 along M x 2 along N); each thread owns TM x TN
// outputs, split in two halves along each dimension so that its shared-memory reads are
// 16-byte vectors without bank conflicts. Block tile (16 TM) x (16 TN). Shared memory holds
// both operands as [k][m or n] (m / n contiguous), rows padded by 16 bytes.
//
// Two ways to fill it, chosen at compile time per architecture:
//   - float / double on sm_80+: cp.async straight from global memory, k tile 16, 3 stages; no
//     registers spent on staging, so the 8 x 8 float tile keeps two blocks per SM.
//   - otherwise (16-bit types need a conversion; older GPUs have no cp.async): the next k tile
//     (8 deep) is loaded into registers while the current one is computed, double-buffered.

constexpr int kSimtThreads = 256;
constexpr int kSimtBKAsync = 16, kSimtStagesAsync = 3;
constexpr int kSimtBKRegs = 8;

template <class T> struct SimtShape { static constexpr int TM = 8, TN = 8, min_blocks = 2; };
template <> struct SimtShape<double> { static constexpr int TM = 4, TN = 4, min_blocks = 2; };

template <class Acc, int R>
constexpr int simt_stride() { return R + 16 / static_cast<int>(sizeof(Acc)); }

// Dynamic shared memory of simt_gemm_kernel<T>: enough for either way of filling it.
template <class T>
constexpr int simt_smem_bytes() {
  using Acc = acc_t<T>;
  constexpr int rows = simt_stride<Acc, 16 * SimtShape<T>::TM>() +
                       simt_stride<Acc, 16 * SimtShape<T>::TN>();
  constexpr int async = kSimtStagesAsync * kSimtBKAsync * rows * static_cast<int>(sizeof(Acc));
  constexpr int regs = 2 * kSimtBKRegs * rows * static_cast<int>(sizeof(Acc));
  return async > regs ? async : regs;
}

// Register-staged loader: one operand tile (R along m or n, kSimtBKRegs along k). Each thread
// loads CW consecutive elements of memory and stores them converted to Acc.
template <class T, class Acc, int R, bool KMajor>
struct SimtRegLoader {
  static constexpr int BKT = kSimtBKRegs;
  static constexpr int CW = R * BKT / kSimtThreads;
  static constexpr int kStride = simt_stride<Acc, R>();
  static_assert(CW * static_cast<int>(sizeof(Acc)) == 16, "shared stores are 16-byte packs");

  T v[CW];  // kept in the storage type until the shared store
  int r, c;  // k-major: r = m/n in tile, c = k in tile; mn-major: r = k in tile, c = m/n in tile

  __device__ __forceinline__ SimtRegLoader() {
    const int tid = threadIdx.x;
    if constexpr (KMajor) {
      r = tid / (BKT / CW);
      c = (tid % (BKT / CW)) * CW;
    } else {
      r = tid / (R / CW);
      c = (tid % (R / CW)) * CW;
    }
  }

  // Loads the tile at (r0 along m/n, k0 along k); extent = M or N, k_end: the end of the k range.
  __device__ __forceinline__ void load(const Operand<T>& op, bool vec, int64_t r0, int64_t k0,
                                       int64_t extent, int64_t k_end) {
    const T* p;
    int64_t valid;  // elements of this thread's pack inside the matrix
    if constexpr (KMajor) {
      const int64_t row = r0 + r, k = k0 + c;
      p = op.ptr + row * op.ld + k;
      valid = row < extent ? k_end - k : 0;
    } else {
      const int64_t k = k0 + r, col = r0 + c;
      p = op.ptr + k * op.ld + col;
      valid = k < k_end ? extent - col : 0;
    }
    if (vec && valid >= CW) {
      const Pack<T, CW> pk = load_pack<T, CW>(p);
#pragma unroll
      for (int i = 0; i < CW; ++i) v[i] = pk.v[i];
    } else {
#pragma unroll
      for (int i = 0; i < CW; ++i) v[i] = i < valid ? p[i] : static_cast<T>(0);
    }
  }

  __device__ __forceinline__ void store(Acc* s) const {  // s: [BKT][kStride]
    if constexpr (KMajor) {
#pragma unroll
      for (int i = 0; i < CW; ++i) s[(c + i) * kStride + r] = static_cast<Acc>(v[i]);
    } else {
      Pack<Acc, CW> pk;
#pragma unroll
      for (int i = 0; i < CW; ++i) pk.v[i] = static_cast<Acc>(v[i]);
      store_pack<Acc, CW>(s + r * kStride + c, pk);
    }
  }
};

// cp.async loader (T == Acc, sm_80+): one operand tile (R along m or n, kSimtBKAsync along k).
// Elements outside the matrix are zero-filled (source size 0: nothing is read).
template <class T, int R, bool KMajor>
struct SimtAsyncLoader {
  static constexpr int BKT = kSimtBKAsync;
  static constexpr int E = static_cast<int>(sizeof(T));
  static constexpr int VW = 16 / E;  // elements of a 16-byte chunk
  static constexpr int kStride = simt_stride<T, R>();
  // k-major: thread = (row r = tid % R, k run c .. c + KW - 1), copied element by element into
  // the transposed shared layout (a warp writes 32 consecutive rows: no bank conflicts).
  static constexpr int KW = R * BKT / kSimtThreads;
  // mn-major: 16-byte chunks, CPR per k row, each thread PASSES chunks ROWS_PER_PASS apart.
  static constexpr int CPR = R / VW;
  static constexpr int ROWS_PER_PASS = kSimtThreads / CPR;
  static constexpr int PASSES = BKT / ROWS_PER_PASS;
  static_assert(kSimtThreads % R == 0 && (kSimtThreads / R) * KW == BKT, "k-major split");
  static_assert(kSimtThreads % CPR == 0 && PASSES * ROWS_PER_PASS == BKT, "mn-major split");

  int r, c;

  __device__ __forceinline__ SimtAsyncLoader() {
    const int tid = threadIdx.x;
    if constexpr (KMajor) {
      r = tid % R;
      c = (tid / R) * KW;
    } else {
      r = tid / CPR;
      c = (tid % CPR) * VW;
    }
  }

  // Copies the tile at (r0 along m/n, k0 along k) to shared address s ([BKT][kStride]); extent =
  // M or N, k_end: the end of the k range.
  __device__ __forceinline__ void load(uint32_t s, const Operand<T>& op, bool vec, int64_t r0,
                                       int64_t k0, int64_t extent, int64_t k_end) const {
    if constexpr (KMajor) {
      const int64_t row = r0 + r, k = k0 + c;
      const T* p = op.ptr + row * op.ld + k;
      const bool row_ok = row < extent;
      if (row_ok && k + KW <= k_end) {  // the common case: no per-element checks
#pragma unroll
        for (int i = 0; i < KW; ++i) cp_async_elem<E>(s + ((c + i) * kStride + r) * E, p + i, true);
      } else {
#pragma unroll
        for (int i = 0; i < KW; ++i) {
          const bool ok = row_ok && k + i < k_end;
          cp_async_elem<E>(s + ((c + i) * kStride + r) * E, ok ? p + i : op.ptr, ok);
        }
      }
    } else {
      const int64_t col = r0 + c;
      const int64_t cols = extent - col;  // elements of the chunk inside the matrix, if > 0
#pragma unroll
      for (int pass = 0; pass < PASSES; ++pass) {
        const int kr = r + pass * ROWS_PER_PASS;
        const int64_t k = k0 + kr;
        const T* p = op.ptr + k * op.ld + col;
        const int64_t valid = k < k_end ? cols : 0;
        const uint32_t d = s + (kr * kStride + c) * E;
        if (vec && valid >= VW) {
          cp_async16(d, p);
        } else {
#pragma unroll
          for (int i = 0; i < VW; ++i)
            cp_async_elem<E>(d + i * E, i < valid ? p + i : op.ptr, i < valid);
        }
      }
    }
  }
};

// Block (x, y) computes output tile x (tile_of_block) over k in [y k_split, (y + 1) k_split) cut
// at K: the whole of K when there is one split (gridDim.y == 1, k_split >= K).
template <class T, bool AK, bool BK, class Epi>
__global__ void __launch_bounds__(kSimtThreads, SimtShape<T>::min_blocks)
    simt_gemm_kernel(int64_t M, int64_t N, int64_t K, int64_t k_split, Operand<T> A,
                     Operand<T> B, bool vec_a, bool vec_b, int64_t tiles_m, int64_t tiles_n,
                     Epi epi) {
  using Acc = acc_t<T>;
  constexpr int TM = SimtShape<T>::TM, TN = SimtShape<T>::TN;
  constexpr int BM = 16 * TM, BN = 16 * TN;
  constexpr int SA = simt_stride<Acc, BM>(), SB = simt_stride<Acc, BN>();
#ifdef FO_GEMM_SM80
  constexpr bool kAsync = std::is_same_v<T, Acc>;
#else
  constexpr bool kAsync = false;
#endif
  constexpr int BKT = kAsync ? kSimtBKAsync : kSimtBKRegs;
  constexpr int STAGES = kAsync ? kSimtStagesAsync : 2;
  extern __shared__ __align__(16) unsigned char simt_smem[];
  Acc* const As = reinterpret_cast<Acc*>(simt_smem);  // [STAGES][BKT][SA]
  Acc* const Bs = As + STAGES * BKT * SA;              // [STAGES][BKT][SB]

  int64_t tm, tn;
  tile_of_block(tiles_m, tiles_n, tm, tn);
  const int64_t m0 = tm * BM, n0 = tn * BN;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp >> 1, wn = warp & 1;
  const int lr = lane >> 3, lc = lane & 7;
  // first row / column of this thread's two halves, within the tile
  const int row_base = wm * 4 * TM + lr * (TM / 2);
  const int col_base = wn * 8 * TN + lc * (TN / 2);

  Acc acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = Acc(0);

  auto compute = [&](const Acc* as, const Acc* bs) {
#pragma unroll
    for (int k = 0; k < BKT; ++k) {
      Acc a[TM], b[TN];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const Pack<Acc, TM / 2> pa =
            load_pack<Acc, TM / 2>(as + k * SA + row_base + h * 2 * TM);
        const Pack<Acc, TN / 2> pb =
            load_pack<Acc, TN / 2>(bs + k * SB + col_base + h * 4 * TN);
#pragma unroll
        for (int i = 0; i < TM / 2; ++i) a[h * (TM / 2) + i] = pa.v[i];
#pragma unroll
        for (int j = 0; j < TN / 2; ++j) b[h * (TN / 2) + j] = pb.v[j];
      }
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
    }
  };

  // k_begin is a multiple of kSplitKGranule, hence of BKT; loads are bounded by k_end
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * k_split;
  const int64_t k_end = K - k_begin < k_split ? K : k_begin + k_split;
  const int64_t nk = k_end > k_begin ? (k_end - k_begin + BKT - 1) / BKT : 0;
  if constexpr (kAsync) {
    const SimtAsyncLoader<T, BM, AK> la;
    const SimtAsyncLoader<T, BN, BK> lb;
    auto load_stage = [&](int st, int64_t kt) {
      la.load(smem_u32(As + st * BKT * SA), A, vec_a, m0, k_begin + kt * BKT, M, k_end);
      lb.load(smem_u32(Bs + st * BKT * SB), B, vec_b, n0, k_begin + kt * BKT, N, k_end);
    };
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
      if (st < nk) load_stage(st, st);
      cp_async_commit();  // empty groups keep the group count uniform
    }
    int stage = 0;
    for (int64_t kt = 0; kt < nk; ++kt) {
      cp_async_wait<STAGES - 2>();  // tile kt has landed (this thread's copies)
      __syncthreads();              // ... everyone's, and tile kt - 1 is no longer being read
      if (kt + STAGES - 1 < nk) load_stage(stage == 0 ? STAGES - 1 : stage - 1, kt + STAGES - 1);
      cp_async_commit();
      compute(As + stage * BKT * SA, Bs + stage * BKT * SB);
      stage = stage == STAGES - 1 ? 0 : stage + 1;
    }
    cp_async_wait<0>();
  } else {
    SimtRegLoader<T, Acc, BM, AK> la;
    SimtRegLoader<T, Acc, BN, BK> lb;
    if (nk > 0) {
      la.load(A, vec_a, m0, k_begin, M, k_end);
      lb.load(B, vec_b, n0, k_begin, N, k_end);
      la.store(As);
      lb.store(Bs);
    }
    __syncthreads();
    for (int64_t kt = 0; kt < nk; ++kt) {
      const int cur = static_cast<int>(kt & 1);
      const bool more = kt + 1 < nk;
      if (more) {  // in flight while this tile is computed
        la.load(A, vec_a, m0, k_begin + (kt + 1) * BKT, M, k_end);
        lb.load(B, vec_b, n0, k_begin + (kt + 1) * BKT, N, k_end);
      }
      compute(As + cur * BKT * SA, Bs + cur * BKT * SB);
      if (more) {  // the other buffer was last read before the barrier that ended kt - 1
        la.store(As + (cur ^ 1) * BKT * SA);
        lb.store(Bs + (cur ^ 1) * BKT * SB);
      }
      __syncthreads();
    }
  }

  tile_of_block(tiles_m, tiles_n, tm, tn);
  const int64_t em0 = tm * BM, en0 = tn * BN;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t row = em0 + row_base + (i / (TM / 2)) * 2 * TM + i % (TM / 2);
    if (row >= M) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t col = en0 + col_base + (j / (TN / 2)) * 4 * TN + j % (TN / 2);
      if (col < N) epi(row, col, acc[i][j]);
    }
  }
}

// =============================================================================================
// Tensor-core kernel for float16 / bfloat16 (sm_80 and newer).
//
// Block tile BM x BN, k tile 64 (128 bytes of a k-major row), 8 warps of 64 x 64 (or 64 x 32)
// outputs, each a 4 x 8 (4 x 4) grid of m16n8 mma tiles with float accumulators. The big tile
// (128 x 256) serves outputs large enough to give every SM a block, the small one (128 x 128,
// two blocks per SM) the rest. Shared memory holds STAGES tiles of A
// and B; a k-major tile is stored [rows][64], an mn-major one [64][rows], both in 16-byte chunks
// whose index is XORed with (row & 7), so the 8 rows read by each ldmatrix phase and the chunks
// written by each cp.async phase fall in distinct banks.

constexpr int kTcBK = 64;

template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_, int MIN_BLOCKS_>
struct TcConfig {
  static constexpr int BM = BM_, BN = BN_, STAGES = STAGES_;
  static constexpr int MIN_BLOCKS = MIN_BLOCKS_;  // blocks per SM the registers must allow
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // warp tile
  static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int A_BYTES = BM * kTcBK * 2, B_BYTES = BN * kTcBK * 2;
  static constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
  static constexpr int SMEM_BYTES = STAGE_BYTES * STAGES;
  static_assert(WM == 64 && (WN == 64 || WN == 32), "warp tiles of 64 x 64 or 64 x 32");
};
using TcBig = TcConfig<128, 256, 2, 4, 3, 1>;    // warps of 64 x 64; 144 KiB of shared memory
using TcSmall = TcConfig<128, 128, 2, 4, 3, 2>;  // warps of 64 x 32; 96 KiB, two blocks per SM

// One 16-byte chunk of shared memory from the `valid` elements at src (all 8 when valid >= 8,
// none when valid <= 0), zero-filled beyond them, copied in cp.async pieces of Width bytes. Only
// the valid elements are read; pieces with none read nothing and take `safe` (the operand's
// first element) as their source address. src and safe are Width-aligned.
template <int Width>
__device__ __forceinline__ void tc_copy_chunk(uint32_t dst, const uint16_t* src, int64_t valid,
                                              const uint16_t* safe) {
  constexpr int kElems = Width / 2;
#pragma unroll
  for (int piece = 0; piece < 16 / Width; ++piece) {
    const int64_t left = valid - piece * kElems;  // elements of this piece inside, if > 0
    const int bytes = left >= kElems ? Width : left > 0 ? static_cast<int>(left) * 2 : 0;
    cp_async_zfill<Width>(dst + piece * Width, bytes > 0 ? src + piece * kElems : safe, bytes);
  }
}

// Copies this thread's chunks of one operand tile (R rows along m or n, 64 along k) into
// shared memory. `width` (bytes) is the widest access the operand's pointer and leading
// dimension allow (access_bytes); a chunk starts a multiple of 8 elements into its row (tile
// origins and k ranges are multiples of 64), so its pieces are width-aligned. Widths 16, 8 and
// 4: cp.async, zero-filling what lies outside the matrix or the k range. Width 2: element by
// element through registers (a zero store outside).
template <int R, bool KMajor, int THREADS>
struct TcTileLoader {
  static constexpr int CPR = KMajor ? kTcBK / 8 : R / 8;  // 16-byte chunks per shared row
  static constexpr int ROWS_PER_PASS = THREADS / CPR;
  static constexpr int PASSES = R * kTcBK / 8 / THREADS;
  static_assert(THREADS % CPR == 0 && PASSES * THREADS * 8 == R * kTcBK, "tile split");

  const uint16_t* base;  // this thread's first chunk at k = 0
  int64_t ld;
  int64_t contig_left;  // mn-major: elements of the matrix from the thread's chunk on
  int64_t rows_left;    // k-major: rows of the matrix from the thread's first row on
  int srow, schunk;     // the thread's first shared row and its (unswizzled) chunk

  __device__ __forceinline__ TcTileLoader(const uint16_t* p, int64_t ld_, int64_t r0,
                                          int64_t extent) {
    const int tid = threadIdx.x;
    srow = tid / CPR;
    schunk = tid % CPR;
    ld = ld_;
    if constexpr (KMajor) {
      base = p + (r0 + srow) * ld + schunk * 8;
      rows_left = extent - r0 - srow;
      contig_left = 0;
    } else {
      base = p + static_cast<int64_t>(srow) * ld + r0 + schunk * 8;
      contig_left = extent - r0 - schunk * 8;
      rows_left = 0;
    }
  }

  __device__ __forceinline__ uint32_t dst_of(uint32_t smem, int i) const {
    const int row = srow + i * ROWS_PER_PASS;  // shared row
    return smem + (row * CPR + (schunk ^ (row & 7))) * 16;
  }
  __device__ __forceinline__ const uint16_t* src_of(int i, int64_t k0) const {
    return KMajor ? base + static_cast<int64_t>(i) * ROWS_PER_PASS * ld + k0
                  : base + (k0 + i * ROWS_PER_PASS) * ld;
  }

  template <int Width>
  __device__ __forceinline__ void copy_inside(uint32_t smem, int64_t k0,
                                              const uint16_t* safe) const {
#pragma unroll
    for (int i = 0; i < PASSES; ++i) {
      if constexpr (Width == 16) cp_async16(dst_of(smem, i), src_of(i, k0));
      else tc_copy_chunk<Width>(dst_of(smem, i), src_of(i, k0), 8, safe);
    }
  }

  // The tile at k0 of a k range that ends at k_end; safe: the operand's first element.
  __device__ __forceinline__ void load(uint32_t smem, int64_t k0, int64_t k_end, int width,
                                       const uint16_t* safe) const {
    // Interior tiles: every chunk of this thread is inside the matrix.
    const bool inside = KMajor
                            ? (k0 + kTcBK <= k_end && rows_left > (PASSES - 1) * ROWS_PER_PASS)
                            : (k0 + kTcBK <= k_end && contig_left >= 8);
    if (inside) {
      switch (width) {
        case 16: return copy_inside<16>(smem, k0, safe);
        case 8: return copy_inside<8>(smem, k0, safe);
        case 4: return copy_inside<4>(smem, k0, safe);
        default: break;
      }
    }
    // Edge tiles and 2-byte operands, chunk by chunk (kept rolled: rare, and it keeps the main
    // loop's code small).
#pragma unroll 1
    for (int i = 0; i < PASSES; ++i) {
      const int row = srow + i * ROWS_PER_PASS;
      const uint32_t dst = dst_of(smem, i);
      const uint16_t* src = src_of(i, k0);
      const int64_t valid =
          KMajor ? ((i * ROWS_PER_PASS < rows_left) ? k_end - k0 - schunk * 8 : 0)
                 : ((k0 + row < k_end) ? contig_left : 0);
      if (width == 16) {
        tc_copy_chunk<16>(dst, src, valid, safe);
      } else if (width == 8) {
        tc_copy_chunk<8>(dst, src, valid, safe);
      } else if (width == 4) {
        tc_copy_chunk<4>(dst, src, valid, safe);
      } else if (valid <= 0) {
        st_shared16(dst, 0u, 0u, 0u, 0u);
      } else {
        uint32_t w[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const uint32_t lo = 2 * e < valid ? src[2 * e] : 0u;
          const uint32_t hi = 2 * e + 1 < valid ? src[2 * e + 1] : 0u;
          w[e] = lo | (hi << 16);
        }
        st_shared16(dst, w[0], w[1], w[2], w[3]);
      }
    }
  }
};

// Block (x, y) computes output tile x (tile_of_block) over k in [y k_split, (y + 1) k_split) cut
// at K, as simt_gemm_kernel. width_a / width_b: the operands' access widths (TcTileLoader).
template <class T, class Cfg, bool AK, bool BK, class Epi>
__global__ void __launch_bounds__(Cfg::THREADS, Cfg::MIN_BLOCKS)
    tc_gemm_kernel(int64_t M, int64_t N, int64_t K, int64_t k_split, Operand<T> A, Operand<T> B,
                   int width_a, int width_b, int64_t tiles_m, int64_t tiles_n, Epi epi) {
#ifdef FO_GEMM_SM80
  constexpr int BM = Cfg::BM, BN = Cfg::BN, STAGES = Cfg::STAGES, THREADS = Cfg::THREADS;
  constexpr int MT = Cfg::WM / 16;  // m16 tiles per warp
  constexpr int NT = Cfg::WN / 8;   // n8 tiles per warp
  constexpr int NP = NT / 2;        // ldmatrix.x4 loads of B per k step (two n8 tiles each)
  extern __shared__ __align__(128) unsigned char tc_smem[];
  const uint32_t smem = smem_u32(tc_smem);

  int64_t tm, tn;
  tile_of_block(tiles_m, tiles_n, tm, tn);
  const int64_t m0 = tm * BM, n0 = tn * BN;

  // k_begin is a multiple of kSplitKGranule, hence of kTcBK; loads are bounded by k_end
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * k_split;
  const int64_t k_end = K - k_begin < k_split ? K : k_begin + k_split;
  const uint16_t* const a16 = reinterpret_cast<const uint16_t*>(A.ptr);
  const uint16_t* const b16 = reinterpret_cast<const uint16_t*>(B.ptr);
  const TcTileLoader<BM, AK, THREADS> la(a16, A.ld, m0, M);
  const TcTileLoader<BN, BK, THREADS> lb(b16, B.ld, n0, N);
  auto load_stage = [&](int stage, int64_t kt) {
    const uint32_t s = smem + stage * Cfg::STAGE_BYTES;
    la.load(s, k_begin + kt * kTcBK, k_end, width_a, a16);
    lb.load(s + Cfg::A_BYTES, k_begin + kt * kTcBK, k_end, width_b, b16);
  };

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp / Cfg::WARPS_N, wn = warp % Cfg::WARPS_N;
  const int l7 = lane & 7, l8 = (lane >> 3) & 1, l16 = lane >> 4;

  // Per-lane byte offsets of the rows this lane hands to ldmatrix, inside a stage; the k step
  // adds 16 rows (mn-major) or picks the chunk (k-major). Which lanes address which 8 x 8
  // matrix follows the fragment layouts of mma.m16n8k16:
  //  A k-major:  rows (lane & 15) of the m16 tile, k chunk 2 ks + l16.
  //  A mn-major: k rows l7 + 8 l16, m chunk 2 i + l8 (read transposed).
  //  B k-major:  n rows l7 + 8 l16 of the n16 pair, k chunk 2 ks + l8.
  //  B mn-major: k rows l7 + 8 l8, n chunk 2 jp + l16 (read transposed).
  // Every row of a tile holds its chunks XOR-swizzled by (row & 7), which is l7 here.
  uint32_t a_off[MT];
  uint32_t b_off[NP];
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    if constexpr (AK) {
      a_off[i] = (wm * Cfg::WM + i * 16 + (lane & 15)) * (kTcBK * 2);
    } else {
      const int chunk = wm * (Cfg::WM / 8) + 2 * i + l8;
      a_off[i] = (l7 + 8 * l16) * (BM * 2) + (chunk ^ l7) * 16;
    }
  }
#pragma unroll
  for (int jp = 0; jp < NP; ++jp) {
    if constexpr (BK) {
      b_off[jp] = (wn * Cfg::WN + jp * 16 + l7 + 8 * l16) * (kTcBK * 2);
    } else {
      const int chunk = wn * (Cfg::WN / 8) + 2 * jp + l16;
      b_off[jp] = (l7 + 8 * l8) * (BN * 2) + (chunk ^ l7) * 16;
    }
  }

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.f;

  const int64_t nk = k_end > k_begin ? (k_end - k_begin + kTcBK - 1) / kTcBK : 0;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nk) load_stage(s, s);
    cp_async_commit();  // empty groups keep the group count uniform
  }

  int stage = 0;
  for (int64_t kt = 0; kt < nk; ++kt) {
    cp_async_wait<STAGES - 2>();  // tile kt has landed (this thread's copies)
    __syncthreads();              // ... everyone's, and tile kt - 1 is no longer being read
    {
      const int64_t next = kt + STAGES - 1;
      const int next_stage = stage == 0 ? STAGES - 1 : stage - 1;  // the stage of tile kt - 1
      if (next < nk) load_stage(next_stage, next);
      cp_async_commit();
    }
    const uint32_t sa = smem + stage * Cfg::STAGE_BYTES;
    const uint32_t sb = sa + Cfg::A_BYTES;
#pragma unroll
    for (int ks = 0; ks < kTcBK / 16; ++ks) {
      uint32_t af[MT][4];
      uint32_t bf[NT][2];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const uint32_t addr = AK ? sa + a_off[i] + (((2 * ks + l16) ^ l7) * 16)
                                 : sa + a_off[i] + ks * 16 * (BM * 2);
        ldmatrix_x4<!AK>(af[i], addr);
      }
#pragma unroll
      for (int jp = 0; jp < NP; ++jp) {
        const uint32_t addr = BK ? sb + b_off[jp] + (((2 * ks + l8) ^ l7) * 16)
                                 : sb + b_off[jp] + ks * 16 * (BN * 2);
        uint32_t r[4];
        ldmatrix_x4<!BK>(r, addr);
        bf[2 * jp][0] = r[0];
        bf[2 * jp][1] = r[1];
        bf[2 * jp + 1][0] = r[2];
        bf[2 * jp + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) mma16816<T>(acc[i][j], af[i], bf[j][0], bf[j][1]);
    }
    stage = stage == STAGES - 1 ? 0 : stage + 1;
  }
  cp_async_wait<0>();

  // c0, c1: (row g, cols 2t, 2t+1); c2, c3: (row g + 8, same cols); g = lane / 4, t = lane % 4
  tile_of_block(tiles_m, tiles_n, tm, tn);
  const int64_t row0 = tm * BM + wm * Cfg::WM + (lane >> 2);
  const int64_t col0 = tn * BN + wn * Cfg::WN + (lane & 3) * 2;
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = row0 + i * 16 + h * 8;
      if (row >= M) continue;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int64_t col = col0 + j * 8;
        if (col < N) epi(row, col, acc[i][j][2 * h]);
        if (col + 1 < N) epi(row, col + 1, acc[i][j][2 * h + 1]);
      }
    }
  }
#else
  // No tensor-core code for this architecture: the host never launches it (tc_kernel_compiled);
  // should it ever run, fail loudly rather than leave the output unwritten.
  __trap();
#endif
}

// =============================================================================================
// Split-K: the partial sums of every split go to a workspace [splits][M][N], then one pass adds
// them in split order.

// Epilogue of the split blocks: split blockIdx.y writes its partial sums to its own slice.
template <class Acc>
struct SplitPartialStore {
  Acc* parts;     // [splits][M][N]
  int64_t n;      // N
  int64_t slice;  // M N
  __device__ __forceinline__ void operator()(int64_t row, int64_t col, Acc v) const {
    parts[static_cast<int64_t>(blockIdx.y) * slice + row * n + col] = v;
  }
};

// Adds the splits of every output element in order s = 0, 1, ..., splits - 1 and hands the
// total to the epilogue, once per element.
template <class Acc, class Epi>
__global__ void __launch_bounds__(kThreads)
    split_k_sum_kernel(const Acc* __restrict__ parts, int splits, int64_t M, int64_t N,
                       Epi epi) {
  const int64_t total = M * N;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Acc sum = parts[i];
    for (int s = 1; s < splits; ++s) sum += parts[s * total + i];
    const int64_t row = i / N;
    epi(row, i - row * N, sum);
  }
}

// =============================================================================================
// Host side.

constexpr int kMaxCachedDevices = 64;

// The current device, as an index into the per-device caches below.
inline int cached_device_index() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  TORCH_CHECK(device >= 0 && device < kMaxCachedDevices, "fastops: CUDA device index ", device,
              " beyond the ", kMaxCachedDevices, " supported");
  return device;
}

// Largest dynamic shared memory a block may opt in to on the current device (cached).
inline int max_smem_optin() {
  static std::atomic<int> cache[kMaxCachedDevices];
  const int device = cached_device_index();
  int v = cache[device].load(std::memory_order_relaxed);
  if (v == 0) {
    C10_CUDA_CHECK(
        cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    cache[device].store(v, std::memory_order_relaxed);
  }
  return v;
}

// Whether this tensor-core kernel has its body in the code that the current device runs. The
// runtime runs the build's best match for the device: a build without an sm_80+ target gives an
// sm_80+ GPU PTX of an older virtual architecture (ptxVersion = that __CUDA_ARCH__ / 10), JIT-
// compiled with the body left out. Cached per device, in one cache per instantiation.
template <class T, class Cfg, bool AK, bool BK, class Epi>
bool tc_kernel_compiled() {
  static std::atomic<int> cache[kMaxCachedDevices];  // 0: not asked yet, 1: no, 2: yes
  const int device = cached_device_index();
  int v = cache[device].load(std::memory_order_relaxed);
  if (v == 0) {
    cudaFuncAttributes attr{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, tc_gemm_kernel<T, Cfg, AK, BK, Epi>));
    v = attr.ptxVersion >= 80 ? 2 : 1;
    cache[device].store(v, std::memory_order_relaxed);
  }
  return v == 2;
}

template <class T>
inline bool aligned_ld(const Operand<T>& op, int elems) {
  return reinterpret_cast<uintptr_t>(op.ptr) % (elems * sizeof(T)) == 0 && op.ld % elems == 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline unsigned int grid_of_tiles(int64_t tiles) {
  TORCH_CHECK(tiles <= 0x7fffffff, "fastops.linear: the output has too many tiles (", tiles,
              ") for one launch");
  return static_cast<unsigned int>(tiles);
}

// One launch over every output tile and `splits` k ranges of k_split elements (k_split = K,
// splits = 1: no split).
template <class T, class Cfg, bool AK, bool BK, class Epi>
void launch_tc(int64_t M, int64_t N, int64_t K, int64_t k_split, int splits, const Operand<T>& A,
               const Operand<T>& B, const Epi& epi, cudaStream_t stream) {
  const int64_t tiles_m = ceil_div(M, Cfg::BM), tiles_n = ceil_div(N, Cfg::BN);
  const dim3 grid(grid_of_tiles(tiles_m * tiles_n), static_cast<unsigned int>(splits));
  auto kernel = tc_gemm_kernel<T, Cfg, AK, BK, Epi>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      Cfg::SMEM_BYTES));
  constexpr int kElem = static_cast<int>(sizeof(T));
  const int width_a = access_bytes(reinterpret_cast<uintptr_t>(A.ptr), A.ld, kElem);
  const int width_b = access_bytes(reinterpret_cast<uintptr_t>(B.ptr), B.ld, kElem);
  kernel<<<grid, Cfg::THREADS, Cfg::SMEM_BYTES, stream>>>(M, N, K, k_split, A, B, width_a,
                                                          width_b, tiles_m, tiles_n, epi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class T, bool AK, bool BK, class Epi>
void launch_simt(int64_t M, int64_t N, int64_t K, int64_t k_split, int splits,
                 const Operand<T>& A, const Operand<T>& B, const Epi& epi, cudaStream_t stream) {
  constexpr int TM = SimtShape<T>::TM, TN = SimtShape<T>::TN;
  constexpr int kSmem = simt_smem_bytes<T>();
  const int64_t tiles_m = ceil_div(M, 16 * TM), tiles_n = ceil_div(N, 16 * TN);
  const dim3 grid(grid_of_tiles(tiles_m * tiles_n), static_cast<unsigned int>(splits));
  auto kernel = simt_gemm_kernel<T, AK, BK, Epi>;
  if constexpr (kSmem > 48 * 1024) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  }
  // 16-byte vectors: packs of 16 / sizeof(T) elements for cp.async (float / double), of
  // TM / 2 elements for the register loads (16-bit types)
  const int vec = std::is_same_v<T, acc_t<T>> ? 16 / static_cast<int>(sizeof(T)) : TM / 2;
  kernel<<<grid, kSimtThreads, kSmem, stream>>>(M, N, K, k_split, A, B, aligned_ld(A, vec),
                                                aligned_ld(B, vec), tiles_m, tiles_n, epi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs `launch(k_split, splits, epilogue)` as `plan` says: one split straight into epi, or
// plan.splits into a workspace whose splits split_k_sum_kernel then adds into epi.
template <class T, class Epi, class Launch>
void run_planned(const SplitK& plan, int64_t M, int64_t N, int64_t K, const Epi& epi,
                 cudaStream_t stream, const Launch& launch) {
  if (plan.splits <= 1) return launch(K, 1, epi);
  using Acc = acc_t<T>;
  // The caching allocator orders the workspace's reuse on the current stream: it must be ours.
  TORCH_INTERNAL_ASSERT(stream == c10::cuda::getCurrentCUDAStream().stream(),
                        "fastops gemm: split-K runs on the current stream only");
  const at::Tensor parts =
      at::empty({plan.splits, M, N}, at::TensorOptions()
                                         .dtype(std::is_same_v<Acc, double> ? at::kDouble
                                                                            : at::kFloat)
                                         .device(at::kCUDA, c10::cuda::current_device()));
  Acc* const p = parts.mutable_data_ptr<Acc>();
  launch(plan.k_tiles_per_split * kSplitKGranule, plan.splits,
         SplitPartialStore<Acc>{p, N, M * N});
  split_k_sum_kernel<Acc, Epi>
      <<<grid_for(M * N, kThreads), kThreads, 0, stream>>>(p, plan.splits, M, N, epi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// C[M, N] = A B through epi, on `stream`, the current stream of the current device (the caller
// holds the device guard). AK / BK: whether A / B are k-major (see the top of this file).
// Nothing is launched for an empty output; K = 0 hands zeros to the epilogue.
template <class T, bool AK, bool BK, class Epi>
void gemm(int64_t M, int64_t N, int64_t K, const Operand<T>& A, const Operand<T>& B,
          const Epi& epi, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return;
  const int sms = num_sms();
  const int64_t k_tiles = ceil_div(K, kSplitKGranule);
  if constexpr (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>) {
    if (compute_capability() >= 80) {
      using Partial = SplitPartialStore<acc_t<T>>;
      const int smem = max_smem_optin();
      // The big tile when it still gives every SM a block; the small one, split along K when
      // it leaves SMs idle, for small outputs.
      const int64_t big_tiles = ceil_div(M, TcBig::BM) * ceil_div(N, TcBig::BN);
      if (smem >= TcBig::SMEM_BYTES && big_tiles >= sms &&
          tc_kernel_compiled<T, TcBig, AK, BK, Epi>())
        return launch_tc<T, TcBig, AK, BK>(M, N, K, K, 1, A, B, epi, stream);
      const SplitK plan =
          plan_split_k(ceil_div(M, TcSmall::BM) * ceil_div(N, TcSmall::BN), k_tiles, sms);
      if (smem >= TcSmall::SMEM_BYTES &&
          (plan.splits > 1 ? tc_kernel_compiled<T, TcSmall, AK, BK, Partial>()
                           : tc_kernel_compiled<T, TcSmall, AK, BK, Epi>())) {
        return run_planned<T>(plan, M, N, K, epi, stream,
                              [&](int64_t k_split, int splits, const auto& e) {
                                launch_tc<T, TcSmall, AK, BK>(M, N, K, k_split, splits, A, B, e,
                                                              stream);
                              });
      }
    }
  }
  constexpr int BM = 16 * SimtShape<T>::TM, BN = 16 * SimtShape<T>::TN;
  const SplitK plan = plan_split_k(ceil_div(M, BM) * ceil_div(N, BN), k_tiles, sms);
  run_planned<T>(plan, M, N, K, epi, stream, [&](int64_t k_split, int splits, const auto& e) {
    launch_simt<T, AK, BK>(M, N, K, k_split, splits, A, B, e, stream);
  });
}

}  // namespace gemm
}  // namespace gpu
}  // namespace fastops

#undef FO_GEMM_SM80
