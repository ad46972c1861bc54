// Tensor -> raw-pointer argument checks shared by the op bindings. Messages name the argument, the expected
// form and what came, as the Python validators do.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "elva/common.h"

namespace elva::bindings {

inline DType float_dtype(const at::Tensor& t, const char* name) {
  const auto type = t.scalar_type();
  TORCH_CHECK_TYPE(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, name,
                   " must have dtype in (float32, float16, bfloat16); got ", type);
  return type == at::kFloat ? DType::F32 : type == at::kHalf ? DType::F16 : DType::BF16;
}

inline void check_matrix(const at::Tensor& t, const char* name, const char* form) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be a 2-D tensor ", form, "; got shape ", t.sizes());
}

inline void check_positive_finite(double value, const char* name) {
  TORCH_CHECK_VALUE(value > 0 && std::isfinite(value), name, " must be a finite float > 0; got ", value);
}

// The kernels take a row stride but need unit-stride rows: only other layouts are copied.
inline at::Tensor with_unit_stride_rows(const at::Tensor& matrix) {
  return matrix.size(1) <= 1 || matrix.stride(1) == 1 ? matrix : matrix.contiguous();
}

}  // namespace elva::bindings
