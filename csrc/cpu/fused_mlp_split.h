// How both CPU paths of the fused MLP (fused_mlp.cpp, fused_mlp_thin.cpp) split a call between
// threads.
#pragma once

#include <cstdint>

namespace fastops {
namespace cpu {

// Weight-gradient accumulators: at most this many chunks of row blocks, then summed in order,
// so the gradients do not depend on the number of threads.
constexpr int64_t kMaxChunks = 16;
// Below this many multiply-adds (rows x weights) a call runs on the calling thread: waking a
// second thread costs microseconds, more than such a call takes.
constexpr double kSerialWork = 262144.0;

}  // namespace cpu
}  // namespace fastops
