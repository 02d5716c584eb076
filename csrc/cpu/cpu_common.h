// Shared plumbing for the CPU kernels: run-time ISA dispatch, dtype dispatch and input checks.
//
// Vectorisation: kernels are written as plain loops over scalars (the math lives in the functors
// of activations.h) and GCC's vectoriser turns them into SIMD code. The same loop body is compiled
// three times, for AVX-512, AVX2+FMA and the baseline x86-64, by inlining it into functions that
// carry a `target` attribute; `dispatch_isa` picks one at run time from what the CPU supports.
// The binary therefore runs on any x86-64 CPU and never needs -march=native.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>

#include "../checks.h"
#include "../dispatch.h"

namespace fastops {
namespace cpu {

// Used on the loop bodies handed to dispatch_isa and on every helper they call, so that the
// body is compiled with the ISA of the caller rather than called out-of-line.
#define FO_ALWAYS_INLINE __attribute__((always_inline)) inline
#define FO_INLINE_LAMBDA __attribute__((always_inline))

enum class Isa { baseline = 0, avx2 = 1, avx512 = 2 };

// The best ISA this CPU supports, capped by FASTOPS_CPU_ISA=baseline|avx2|avx512 if set.
Isa cpu_isa();
const char* isa_name(Isa isa);

#if defined(__x86_64__) && defined(__GNUC__)
#define FO_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi,bmi2,popcnt")))
#define FO_TARGET_AVX2 __attribute__((target("avx2,fma,f16c,bmi,bmi2,popcnt")))

template <class Body>
FO_TARGET_AVX512 void run_avx512(const Body& body) { body(); }
template <class Body>
FO_TARGET_AVX2 void run_avx2(const Body& body) { body(); }
template <class Body>
void run_baseline(const Body& body) { body(); }

// body: a lambda marked FO_INLINE_LAMBDA, so it is inlined into (and vectorised for) each clone.
template <class Body>
inline void dispatch_isa(const Body& body) {
  switch (cpu_isa()) {
    case Isa::avx512: run_avx512(body); break;
    case Isa::avx2: run_avx2(body); break;
    default: run_baseline(body); break;
  }
}
#else
template <class Body>
inline void dispatch_isa(const Body& body) { body(); }
#endif

// A contiguous tensor for a kernel's output. A fresh allocation of 32 MB or more is mmapped by
// malloc, and its first touch costs a page fault per 4 KB page, often more than the kernel
// itself; advising transparent huge pages before the first touch cuts the faults 512-fold.
// Only an advice: without THP nothing changes. (With THP defrag on madvise, a fault may stall
// while the kernel compacts memory, the first few times a process asks; see the README.)
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);
inline at::Tensor empty_output(const at::Tensor& like) {
  return empty_output(like.sizes(), like.options());
}

// Elements per parallel task for cheap elementwise loops.
constexpr int64_t kElementwiseGrain = 32768;

// Kernels one op family lends another: maxout over dim 1 (activations.cpp), which the fused
// linear + maxout applies to its pre-activation.
at::Tensor maxout_forward(const at::Tensor& self, int64_t pool_size);

}  // namespace cpu
}  // namespace fastops
