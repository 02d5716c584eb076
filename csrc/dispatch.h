// Dtype plumbing shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace fastops {

// The compute (accumulation) type: float for the 16-bit types and float, double for double.
template <class T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <class T> using acc_t = typename Acc<T>::type;

// The four dtypes every fastops op takes (checked beforehand with check_floating, so the name
// in the dispatch's own error message never shows).
#define FO_DISPATCH_FLOATING(TYPE, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, "fastops", __VA_ARGS__)

}  // namespace fastops
