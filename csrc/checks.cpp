#include "checks.h"

namespace fastops {

void check_floating(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.defined(), op, ": ", arg, " is an undefined tensor");
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                   op, ": expected ", arg,
                   " to be a floating-point tensor (float32, float64, float16 or bfloat16), got ",
                   st);
}

void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* op, const char* arg_a,
                      const char* arg_b) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": expected ", arg_b,
                   " to have the dtype of ", arg_a, " (", a.scalar_type(), "), got ",
                   b.scalar_type());
}

void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                       const char* arg_a, const char* arg_b) {
  TORCH_CHECK(a.device() == b.device(), op, ": expected ", arg_b, " to be on the device of ",
              arg_a, " (", a.device(), "), got ", b.device());
}

void check_same_shape(const at::Tensor& a, const at::Tensor& b, const char* op, const char* arg_a,
                      const char* arg_b) {
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": expected ", arg_b, " to have the shape of ", arg_a,
              " ", a.sizes(), ", got ", b.sizes());
}

void check_reduction(int64_t reduction, const char* op) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2, op,
              ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

}  // namespace fastops
