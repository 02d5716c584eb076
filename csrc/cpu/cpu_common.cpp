#include "cpu_common.h"

#include <cstdlib>
#include <cstring>

namespace fastops {
namespace cpu {

static Isa detect_isa() {
  Isa best = Isa::baseline;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::avx2;
  if (best == Isa::avx2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl"))
    best = Isa::avx512;
#endif
  if (const char* cap = std::getenv("FASTOPS_CPU_ISA")) {
    Isa want = best;
    if (!std::strcmp(cap, "baseline")) want = Isa::baseline;
    else if (!std::strcmp(cap, "avx2")) want = Isa::avx2;
    else if (!std::strcmp(cap, "avx512")) want = Isa::avx512;
    if (static_cast<int>(want) < static_cast<int>(best)) best = want;
  }
  return best;
}

Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace cpu
}  // namespace fastops
