// Argument checks shared by the CPU and CUDA kernels. Each failure raises a Python error that
// names the op, the argument, what was expected and what was given.
#pragma once

#include <ATen/ATen.h>

namespace fastops {

// A float32, float64, float16 or bfloat16 tensor.
void check_floating(const at::Tensor& t, const char* op, const char* arg);
void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* op, const char* arg_a,
                      const char* arg_b);
void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                       const char* arg_a, const char* arg_b);
void check_same_shape(const at::Tensor& a, const at::Tensor& b, const char* op, const char* arg_a,
                      const char* arg_b);
// reduction as in at::Reduction: 0 none, 1 mean, 2 sum.
void check_reduction(int64_t reduction, const char* op);

}  // namespace fastops
