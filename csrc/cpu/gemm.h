// A hand-written GEMM for the CPU kernels: C = A * B with a fused epilogue.
//
// Layout of the computation (the Goto / BLIS scheme):
//   for each block of NC columns of B                      (B panel: KC x NC, shared, in L3)
//     for each block of KC rows of B (the k dimension)
//       pack the B panel into NR-wide micro-panels          (parallel over micro-panels)
//       for each task = (block of MC rows of A, run of B micro-panels)   (parallel over tasks)
//         pack the A block into MR-high micro-panels        (thread-local, in L2)
//         for each B micro-panel (KC x NR, stays in L1), for each A micro-panel:
//           micro-kernel: an MR x NR tile of accumulators in registers, KC rank-1 updates
//           the tile is added to the partial sums of the previous k blocks, and on the last k
//           block handed to the epilogue (bias, activation, dtype conversion, store).
//
// Packing reads any strides (so transposed and sliced operands cost no copy) and converts
// float16 / bfloat16 to float; the compute type is float, or double for double. The
// micro-kernel is written with GCC vector extensions and inlined into AVX-512, AVX2 and
// baseline clones (see cpu_common.h), each with its own tile shape. Every index is 64-bit.
//
// The partial sums of a k block live in a caller-given buffer of the compute type, which is
// the output itself when the output has the compute type; only needed when K > KC.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>

#include "cpu_common.h"

namespace fastops {
namespace cpu {
namespace gemm {

// A strided matrix operand: element (r, c) is data[r * rs + c * cs].
template <class T>
struct MatView {
  const T* data;
  int64_t rs, cs;
};

// Tile shape and block sizes per (compute type, ISA). NR = NV vectors of W lanes.
// MR x NV accumulators + NV B vectors + 1 broadcast must fit the register file
// (32 zmm with AVX-512, 16 ymm / xmm otherwise). The A block (MC x KC) stays in L2 (1 MB on
// the Zen 5 this was tuned on) together with the B micro-panel (KC x NR), which streams from
// L2 fast enough at one FMA per cycle; a long KC saves passes of the partial sums through memory
// (measured at 1024^3 fp32, 2 threads: KC 256 / 512 / 1024 gave about 185 / 190 / 200 GFLOP/s).
template <class Acc, Isa I> struct Config;
template <> struct Config<float, Isa::avx512> {
  static constexpr int W = 16, MR = 12, NV = 2;
  static constexpr int64_t KC = 1024, MC = 132, NC = 3072;
};
template <> struct Config<float, Isa::avx2> {
  static constexpr int W = 8, MR = 6, NV = 2;
  static constexpr int64_t KC = 512, MC = 96, NC = 3072;
};
template <> struct Config<float, Isa::baseline> {
  static constexpr int W = 4, MR = 4, NV = 2;
  static constexpr int64_t KC = 256, MC = 64, NC = 2048;
};
template <> struct Config<double, Isa::avx512> {
  static constexpr int W = 8, MR = 12, NV = 2;
  static constexpr int64_t KC = 512, MC = 96, NC = 2048;
};
template <> struct Config<double, Isa::avx2> {
  static constexpr int W = 4, MR = 6, NV = 2;
  static constexpr int64_t KC = 192, MC = 72, NC = 2048;
};
template <> struct Config<double, Isa::baseline> {
  static constexpr int W = 2, MR = 4, NV = 2;
  static constexpr int64_t KC = 192, MC = 64, NC = 2048;
};

template <class T, int W>
struct VecT {
  typedef T type __attribute__((vector_size(sizeof(T) * W), may_alias));
  typedef T unaligned __attribute__((vector_size(sizeof(T) * W), aligned(alignof(T)), may_alias));
};

constexpr int64_t kAlign = 64;

FO_ALWAYS_INLINE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
FO_ALWAYS_INLINE int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// A 64-byte aligned scratch buffer that grows and is reused. One per thread and purpose
// (packing buffers are thread_local), so a GEMM allocates nothing in steady state.
struct Scratch {
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  std::unique_ptr<void, Free> mem;
  size_t bytes = 0;
  void* get(size_t want) {
    if (want > bytes) {
      const size_t rounded = static_cast<size_t>(round_up(static_cast<int64_t>(want), kAlign));
      void* p = std::aligned_alloc(kAlign, rounded);
      TORCH_CHECK(p != nullptr, "fastops gemm: out of memory allocating ", rounded,
                  " bytes of packing buffer");
      mem.reset(p);
      bytes = rounded;
    }
    return mem.get();
  }
};

// A W x W block transposed in registers: out row k = lanes (in row 0, k), (in row 1, k), ...
// log2(W) rounds of the perfect shuffle (interleave the halves of the rows i and i + W/2) turn
// the rows into the columns; each interleave is one two-source permute with AVX-512. This is
// what makes the packing of a transposed operand (W^T in x W^T, or rows of A contiguous along
// k) cost a fraction of a cycle per element instead of a scalar gather.
template <class V, size_t... I>
FO_ALWAYS_INLINE V interleave_lo(V a, V b, std::index_sequence<I...>) {
  return __builtin_shufflevector(a, b, (I / 2 + (I % 2) * sizeof...(I))...);
}
template <class V, size_t... I>
FO_ALWAYS_INLINE V interleave_hi(V a, V b, std::index_sequence<I...>) {
  return __builtin_shufflevector(a, b, (sizeof...(I) / 2 + I / 2 + (I % 2) * sizeof...(I))...);
}
template <int W, class V>
FO_ALWAYS_INLINE void transpose_in_registers(V (&r)[W]) {
  constexpr auto idx = std::make_index_sequence<W>();
#pragma GCC unroll 8
  for (int round = 1; round < W; round *= 2) {
    V t[W];
#pragma GCC unroll 16
    for (int i = 0; i < W / 2; ++i) {
      t[2 * i] = interleave_lo(r[i], r[i + W / 2], idx);
      t[2 * i + 1] = interleave_hi(r[i], r[i + W / 2], idx);
    }
#pragma GCC unroll 16
    for (int i = 0; i < W; ++i) r[i] = t[i];
  }
}

// dst[k * ldd + i] = src[i * lds + k] for i < rows (<= W), k < W: rows contiguous along k
// become columns. Lanes past rows are not written (the rows past it read as zeros).
template <int W, class Acc>
FO_ALWAYS_INLINE void transpose_block(const Acc* src, int64_t lds, int rows, Acc* dst,
                                      int64_t ldd) {
  using V = typename VecT<Acc, W>::type;
  using VU = typename VecT<Acc, W>::unaligned;
  V r[W];
#pragma GCC unroll 16
  for (int i = 0; i < W; ++i)
    r[i] = i < rows ? *reinterpret_cast<const VU*>(src + i * lds) : V{};
  transpose_in_registers<W>(r);
#pragma GCC unroll 16
  for (int k = 0; k < W; ++k) {
    if (rows == W) *reinterpret_cast<VU*>(dst + k * ldd) = r[k];
    else std::memcpy(dst + k * ldd, &r[k], sizeof(Acc) * rows);
  }
}

// Packs rows [0, mc) x cols [0, kc) of A into MR-high micro-panels: panel p holds
// out[p * MR * kc + k * MR + i] = A(p * MR + i, k), zero rows past mc. W: the ISA's lanes.
template <int MR, int W, class Acc, class T>
FO_ALWAYS_INLINE void pack_a(const T* a, int64_t rs, int64_t cs, int64_t mc, int64_t kc,
                             Acc* __restrict out) {
  for (int64_t ip = 0; ip < mc; ip += MR) {
    const int64_t mr = std::min<int64_t>(MR, mc - ip);
    Acc* __restrict o = out + ip * kc;
    const T* ap = a + ip * rs;
    if (mr == MR && cs == 1) {
      // rows contiguous along k: transposed W x W blocks at a time
      int64_t k0 = 0;
      if constexpr (std::is_same_v<T, Acc>) {
        for (; k0 + W <= kc; k0 += W)
#pragma GCC unroll 4
          for (int i0 = 0; i0 < MR; i0 += W)
            transpose_block<W>(ap + i0 * rs + k0, rs, std::min(W, MR - i0), o + k0 * MR + i0,
                               MR);
      }
      for (int i = 0; i < MR; ++i)
        for (int64_t k = k0; k < kc; ++k) o[k * MR + i] = static_cast<Acc>(ap[i * rs + k]);
    } else if (mr == MR && rs == 1) {
      for (int64_t k = 0; k < kc; ++k)
        for (int i = 0; i < MR; ++i) o[k * MR + i] = static_cast<Acc>(ap[k * cs + i]);
    } else {
      for (int64_t k = 0; k < kc; ++k) {
        for (int64_t i = 0; i < mr; ++i) o[k * MR + i] = static_cast<Acc>(ap[i * rs + k * cs]);
        for (int64_t i = mr; i < MR; ++i) o[k * MR + i] = Acc(0);
      }
    }
  }
}

// Packs rows [0, kc) x cols [0, nc) of B into NR-wide micro-panels: panel p holds
// out[p * NR * kc + k * NR + j] = B(k, p * NR + j), zero columns past nc. W: the ISA's lanes.
template <int NR, int W, class Acc, class T>
FO_ALWAYS_INLINE void pack_b_panel(const T* b, int64_t rs, int64_t cs, int64_t nr, int64_t kc,
                                   Acc* __restrict o) {
  if (nr == NR && cs == 1) {
    for (int64_t k = 0; k < kc; ++k)
      for (int j = 0; j < NR; ++j) o[k * NR + j] = static_cast<Acc>(b[k * rs + j]);
  } else if (nr == NR && rs == 1) {
    // columns contiguous along k (B = W^T in the forward pass): transposed W x W blocks, W
    // columns at a time (W sequential streams for the hardware prefetcher, not NR)
    int64_t k0 = 0;
    if constexpr (std::is_same_v<T, Acc>) {
      const int64_t kv = kc / W * W;
      for (int j0 = 0; j0 < NR; j0 += W)
        for (int64_t k = 0; k < kv; k += W)
          transpose_block<W>(b + j0 * cs + k, cs, W, o + k * NR + j0, NR);
      k0 = kv;
    }
    for (int j = 0; j < NR; ++j)
      for (int64_t k = k0; k < kc; ++k) o[k * NR + j] = static_cast<Acc>(b[j * cs + k]);
  } else {
    for (int64_t k = 0; k < kc; ++k) {
      for (int64_t j = 0; j < nr; ++j) o[k * NR + j] = static_cast<Acc>(b[k * rs + j * cs]);
      for (int64_t j = nr; j < NR; ++j) o[k * NR + j] = Acc(0);
    }
  }
}

// Packs all of B (kc x n, rows contiguous: element (k, j) at b[k * rs + j]) into NR-wide
// micro-panels as pack_b_panel does, walking B row by row so the reads are sequential (the
// hardware prefetcher follows them) where panel by panel they would stride across B's rows.
template <int NR, int W, class Acc, class T>
FO_ALWAYS_INLINE void pack_b_rowwise(const T* b, int64_t rs, int64_t n, int64_t kc,
                                     Acc* __restrict o) {
  using VU = typename VecT<Acc, W>::unaligned;
  const int64_t full = n / NR * NR;
  for (int64_t k = 0; k < kc; ++k) {
    const T* row = b + k * rs;
    for (int64_t j0 = 0; j0 < full; j0 += NR) {
      Acc* dst = o + j0 * kc + k * NR;
      if constexpr (std::is_same_v<T, Acc>) {
#pragma GCC unroll 4
        for (int v = 0; v < NR / W; ++v)
          *reinterpret_cast<VU*>(dst + v * W) = *reinterpret_cast<const VU*>(row + j0 + v * W);
      } else {
        for (int j = 0; j < NR; ++j) dst[j] = static_cast<Acc>(row[j0 + j]);
      }
    }
    if (full < n) {
      Acc* dst = o + full * kc + k * NR;
      for (int64_t j = 0; j < NR; ++j)
        dst[j] = full + j < n ? static_cast<Acc>(row[full + j]) : Acc(0);
    }
  }
}

// Prefetches a set of rows (rows of row_bytes, stride bytes apart) into L2 a few cache lines
// per step, spread over a loop of `steps` steps: the next block's operands arrive while this
// block computes, instead of stalling the packing or the tiles that first touch them.
struct Prefetcher {
  const char* base = nullptr;
  int64_t stride = 0, row_bytes = 0, rows = 0, per_step = 0, r = 0, off = 0;
  Prefetcher() = default;
  Prefetcher(const void* p, int64_t nrows, int64_t row_b, int64_t stride_b, int64_t steps)
      : base(static_cast<const char*>(p)), stride(stride_b), row_bytes(row_b), rows(nrows) {
    per_step = ceil_div(ceil_div(row_bytes, 64) * rows, std::max<int64_t>(steps, 1));
  }
  FO_ALWAYS_INLINE void step() {
    for (int64_t n = 0; n < per_step && r < rows; ++n) {
      __builtin_prefetch(base + r * stride + off, 0, 2);
      off += 64;
      if (off >= row_bytes) {
        off = 0;
        ++r;
      }
    }
  }
};

// One MR x NR tile: c = (c_in or 0) + sum_k ap[k * MR + i] * bp[k * NR + j], with MR x NV
// vector accumulators. c_in (row stride ldi) is read when not null; the result goes to c_out
// (row stride ldo), e.g. the partial sums themselves or a local tile.
template <class Acc, int W, int MR, int NV>
FO_ALWAYS_INLINE void micro_kernel(int64_t kc, const Acc* __restrict ap, const Acc* __restrict bp,
                                   const Acc* c_in, int64_t ldi, Acc* c_out, int64_t ldo) {
  using V = typename VecT<Acc, W>::type;
  using VU = typename VecT<Acc, W>::unaligned;
  constexpr int NR = W * NV;
  V c[MR][NV];
  if (c_in != nullptr) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[i][v] = *reinterpret_cast<const VU*>(c_in + i * ldi + v * W);
  } else {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[i][v] = V{};
  }
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    V b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = *reinterpret_cast<const V*>(bp + k * NR + v * W);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const V a = ap[k * MR + i] - V{};  // broadcast
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[i][v] += a * b[v];
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) *reinterpret_cast<VU*>(c_out + i * ldo + v * W) = c[i][v];
}

#if defined(__x86_64__) && defined(__GNUC__)
template <Isa I, class Body>
FO_ALWAYS_INLINE void run_isa(const Body& body) {
  if constexpr (I == Isa::avx512) run_avx512(body);
  else if constexpr (I == Isa::avx2) run_avx2(body);
  else run_baseline(body);
}
#else
template <Isa I, class Body>
FO_ALWAYS_INLINE void run_isa(const Body& body) { body(); }
#endif

// The epilogue as the driver sees it: a function compiled for the driver's ISA, called once
// per finished tile (so the driver is compiled once per dtype and ISA, not once per epilogue).
template <class Acc>
struct EpilogueRef {
  using Fn = void (*)(const void* self, int64_t i0, int64_t j0, int mr, int nr, const Acc* tile,
                      int ldt);
  const void* self;
  Fn fn;
};

template <Isa I, class Acc, class Epi>
void epilogue_thunk(const void* self, int64_t i0, int64_t j0, int mr, int nr, const Acc* tile,
                    int ldt) {
  const Epi& epi = *static_cast<const Epi*>(self);
  run_isa<I>([&]() FO_INLINE_LAMBDA { epi(i0, j0, mr, nr, tile, ldt); });
}

// C(M x N) = A(M x K) * B(K x N), handed tile by tile to the epilogue:
//   epi(i0, j0, mr, nr, tile, ldt): rows i0..i0+mr, cols j0..j0+nr, value tile[i * ldt + j].
// partial (leading dimension ldp, M x N, compute type) holds the running sums between k
// blocks; it may alias the epilogue's output when that has the compute type. It is unused
// (may be null) when K <= kc_block<Acc>().
template <class Acc, Isa I, class TA, class TB>
void gemm_isa(int64_t M, int64_t N, int64_t K, MatView<TA> A, MatView<TB> B, Acc* partial,
              int64_t ldp, EpilogueRef<Acc> epi) {
  using Cfg = Config<Acc, I>;
  constexpr int W = Cfg::W, MR = Cfg::MR, NV = Cfg::NV, NR = W * NV;
  if (M <= 0 || N <= 0) return;

  const int64_t nt = std::max<int>(1, at::get_num_threads());
  // k blocks of near-equal size; K == 0 runs one empty block so the epilogue still runs.
  const int64_t kblocks = std::max<int64_t>(1, ceil_div(K, Cfg::KC));
  const int64_t kcb = std::max<int64_t>(1, ceil_div(K, kblocks));
  // column blocks of near-equal size, a multiple of NR
  const int64_t nblocks = ceil_div(N, Cfg::NC);
  const int64_t ncb = round_up(ceil_div(N, nblocks), NR);
  // row blocks: a multiple of the thread count when there are enough rows
  int64_t mb = ceil_div(M, Cfg::MC);
  if (mb >= nt) mb = round_up(mb, nt);
  int64_t mcb = round_up(ceil_div(M, mb), MR);
  mb = ceil_div(M, mcb);
  // little work: run on the calling thread
  const bool serial = static_cast<double>(M) * N * std::max<int64_t>(K, 1) < 262144.0;

  thread_local Scratch b_scratch;
  Acc* bpack = static_cast<Acc*>(b_scratch.get(sizeof(Acc) * kcb * ncb));

  for (int64_t jc = 0; jc < N; jc += ncb) {
    const int64_t nc = std::min(ncb, N - jc);
    const int64_t npanels = ceil_div(nc, NR);
    // split the columns too when there are fewer row blocks than threads
    int64_t nb = 1;
    if (!serial && mb < nt) nb = std::min(npanels, ceil_div(2 * nt, mb));
    const int64_t panels_per_task = ceil_div(npanels, nb);
    nb = ceil_div(npanels, panels_per_task);
    const int64_t ntasks = mb * nb;

    for (int64_t pc = 0; pc < std::max<int64_t>(K, 1); pc += kcb) {
      const int64_t kc = std::max<int64_t>(0, std::min(kcb, K - pc));
      const bool first = pc == 0, last = pc + kcb >= K;

      at::parallel_for(0, npanels, serial ? npanels : std::max<int64_t>(1, npanels / (4 * nt)),
                       [&](int64_t p0, int64_t p1) {
        run_isa<I>([&]() FO_INLINE_LAMBDA {
          for (int64_t p = p0; p < p1; ++p) {
            const int64_t j = p * NR;
            pack_b_panel<NR, W>(B.data + pc * B.rs + (jc + j) * B.cs, B.rs, B.cs,
                                std::min<int64_t>(NR, nc - j), kc, bpack + p * NR * kc);
          }
        });
      });

      at::parallel_for(0, ntasks, serial ? ntasks : 1, [&](int64_t t0, int64_t t1) {
        thread_local Scratch a_scratch;
        Acc* apack = static_cast<Acc*>(a_scratch.get(sizeof(Acc) * round_up(mcb, MR) * kcb));
        int64_t packed_block = -1;
        run_isa<I>([&]() FO_INLINE_LAMBDA {
          alignas(kAlign) Acc tile[MR * NR];
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t im = t / nb, in = t % nb;
            const int64_t m0 = im * mcb;
            const int64_t mc = std::min(mcb, M - m0);
            if (im != packed_block) {
              pack_a<MR, W>(A.data + m0 * A.rs + pc * A.cs, A.rs, A.cs, mc, kc, apack);
              packed_block = im;
            }
            const int64_t p_end = std::min(npanels, (in + 1) * panels_per_task);
            for (int64_t p = in * panels_per_task; p < p_end; ++p) {
              const int64_t j0 = jc + p * NR;
              const int nr = static_cast<int>(std::min<int64_t>(NR, N - j0));
              const Acc* bp = bpack + p * NR * kc;
              for (int64_t ip = 0; ip < mc; ip += MR) {
                const int mr = static_cast<int>(std::min<int64_t>(MR, mc - ip));
                const int64_t i0 = m0 + ip;
                Acc* pr = partial != nullptr ? partial + i0 * ldp + j0 : nullptr;  // K > kc only
                if (mr == MR && nr == NR) {
                  // full tile: the partial sums go straight between memory and registers
                  micro_kernel<Acc, W, MR, NV>(kc, apack + ip * kc, bp, first ? nullptr : pr,
                                               ldp, last ? tile : pr, last ? NR : ldp);
                } else {
                  // edge tile: through the local tile, summing in the same order as above so
                  // that the result does not depend on where the tile edges fall
                  if (!first) {
                    for (int e = 0; e < MR * NR; ++e) tile[e] = Acc(0);
                    for (int i = 0; i < mr; ++i)
                      for (int j = 0; j < nr; ++j) tile[i * NR + j] = pr[i * ldp + j];
                  }
                  micro_kernel<Acc, W, MR, NV>(kc, apack + ip * kc, bp, first ? nullptr : tile,
                                               NR, tile, NR);
                  if (!last)
                    for (int i = 0; i < mr; ++i)
                      for (int j = 0; j < nr; ++j) pr[i * ldp + j] = tile[i * NR + j];
                }
                if (last) epi.fn(epi.self, i0, j0, mr, nr, static_cast<const Acc*>(tile), NR);
              }
            }
          }
        });
      });
    }
  }
}

// The k block size of the ISA this CPU runs: partial sums are needed when K exceeds it.
template <class Acc>
inline int64_t kc_block() {
  switch (cpu_isa()) {
    case Isa::avx512: return Config<Acc, Isa::avx512>::KC;
    case Isa::avx2: return Config<Acc, Isa::avx2>::KC;
    default: return Config<Acc, Isa::baseline>::KC;
  }
}

template <class Acc, class TA, class TB, class Epi>
void gemm(int64_t M, int64_t N, int64_t K, MatView<TA> A, MatView<TB> B, Acc* partial,
          int64_t ldp, const Epi& epi) {
  const void* self = static_cast<const void*>(&epi);
  switch (cpu_isa()) {
    case Isa::avx512:
      gemm_isa<Acc, Isa::avx512>(M, N, K, A, B, partial, ldp,
                                 EpilogueRef<Acc>{self, &epilogue_thunk<Isa::avx512, Acc, Epi>});
      break;
    case Isa::avx2:
      gemm_isa<Acc, Isa::avx2>(M, N, K, A, B, partial, ldp,
                               EpilogueRef<Acc>{self, &epilogue_thunk<Isa::avx2, Acc, Epi>});
      break;
    default:
      gemm_isa<Acc, Isa::baseline>(M, N, K, A, B, partial, ldp,
                                   EpilogueRef<Acc>{self, &epilogue_thunk<Isa::baseline, Acc, Epi>});
      break;
  }
}

}  // namespace gemm
}  // namespace cpu
}  // namespace fastops
