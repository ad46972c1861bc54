// Tensor -> raw-pointer argument checks shared by the op bindings. Messages name the argument, the expected
// form and what came, as the Python validators do.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string>

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

// The same for any rank: unit stride along the last dim (other strides, 0 for broadcast views included, are kept).
inline at::Tensor with_unit_stride_last(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

// Sizes of a (queries [B, d], candidates [N, d]) pair, checked: one float dtype, one CPU device, same d,
// nothing empty. The names are the op's (mining calls them query_emb and pool_emb).
struct PoolShape {
  DType dtype;
  int64_t B, d, N;
};

inline PoolShape check_queries_and_candidates(const at::Tensor& queries, const at::Tensor& candidates,
                                              const char* queries_name = "queries",
                                              const char* candidates_name = "candidates") {
  const std::string q_name(queries_name), c_name(candidates_name);
  const std::string q_of = q_name + (q_name.back() == 's' ? "'" : "'s");  // "queries'", "query_emb's"
  check_matrix(queries, queries_name, "[B, d]");
  const std::string form = "[N, d] with " + q_of + " d";
  check_matrix(candidates, candidates_name, form.c_str());
  const DType dtype = float_dtype(queries, queries_name);
  float_dtype(candidates, candidates_name);
  TORCH_CHECK_TYPE(candidates.scalar_type() == queries.scalar_type(), c_name, " must have ", q_of,
                   " dtype; got ", q_name, " ", queries.scalar_type(), " and ", c_name, " ",
                   candidates.scalar_type());
  TORCH_CHECK_VALUE(candidates.device().is_cpu(), c_name, " must be on ", q_of, " device (cpu); got ",
                    candidates.device());
  const int64_t B = queries.size(0), d = queries.size(1), N = candidates.size(0);
  TORCH_CHECK_VALUE(candidates.size(1) == d, c_name, " must be [N, d] with ", q_of, " d = ", d, "; got shape ",
                    candidates.sizes());
  TORCH_CHECK_VALUE(B >= 1 && d >= 1, q_name, " must not be empty [B, d]; got shape ", queries.sizes());
  TORCH_CHECK_VALUE(N >= 1, c_name, " must not be empty [N, d]; got shape ", candidates.sizes());
  return {dtype, B, d, N};
}

// An optional float32 [B] per-query bound (max_score): checked and contiguous, or undefined when absent.
inline at::Tensor per_query_floats(const std::optional<at::Tensor>& values, const char* name, int64_t B) {
  if (!values.has_value()) return {};
  const at::Tensor& t = *values;
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be a float32 [B] tensor; got dtype ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == B, name, " must be a float32 [B] tensor with B = ", B,
                    "; got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the queries' device (cpu); got ", t.device());
  return t.contiguous();
}

// "cosine" -> true, "dot" -> false.
inline bool is_cosine(c10::string_view metric) {
  const std::string name(metric);
  TORCH_CHECK_VALUE(name == "cosine" || name == "dot", "metric must be one of ('cosine', 'dot'); got '", name, "'");
  return name == "cosine";
}

// int64 [B, m] candidate ids, -1 = padding, every other id in [0, N); returned contiguous.
inline at::Tensor id_matrix(const at::Tensor& ids, const char* name, int64_t B, int64_t N) {
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong, name, " must be int64 [B, m]; got dtype ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == 2 && ids.size(0) == B, name, " must be int64 [B, m] with B = ", B, "; got shape ",
                    ids.sizes());
  TORCH_CHECK_VALUE(ids.device().is_cpu(), name, " must be on the queries' device (cpu); got ", ids.device());
  at::Tensor out = ids.contiguous();
  const int64_t* data = out.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < out.numel(); ++i) {
    TORCH_CHECK_VALUE(data[i] >= -1 && data[i] < N, name, " holds ids outside -1 (padding) or [0, ", N, "); got ",
                      data[i]);
  }
  return out;
}

}  // namespace elva::bindings
