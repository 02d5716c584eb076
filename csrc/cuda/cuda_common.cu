#include "cuda_common.cuh"

#include <array>
#include <mutex>

namespace fastops {
namespace gpu {

namespace {
constexpr int kMaxDevices = 64;

int cached_attribute(std::array<int, kMaxDevices>& cache, std::once_flag* once,
                     int (*query)(int device)) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "fastops: CUDA device index ", device,
              " beyond the ", kMaxDevices, " supported");
  std::call_once(once[device], [&] { cache[device] = query(device); });
  return cache[device];
}
}  // namespace

int num_sms() {
  static std::array<int, kMaxDevices> cache{};
  static std::once_flag once[kMaxDevices];
  return cached_attribute(cache, once, [](int device) {
    int value = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, device));
    return value;
  });
}

int compute_capability() {
  static std::array<int, kMaxDevices> cache{};
  static std::once_flag once[kMaxDevices];
  return cached_attribute(cache, once, [](int device) {
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    return major * 10 + minor;
  });
}

}  // namespace gpu
}  // namespace fastops
