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

// torch's Python name of the index and score dtypes the bindings take ("float32", not c10's "Float").
inline const char* dtype_name(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return "float32";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    default: return c10::toString(type);
  }
}

// A [rows] vector of `type` on the queries' device, checked and returned contiguous; `label` names its length in
// messages ("B" per query, "N" per candidate).
inline at::Tensor vector_arg(const at::Tensor& t, const char* name, at::ScalarType type, int64_t rows,
                             const at::Device& device, const char* label = "B") {
  TORCH_CHECK_TYPE(t.scalar_type() == type, name, " must be a ", dtype_name(type), " [", label, "] tensor; got dtype ",
                   dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == rows, name, " must be a ", dtype_name(type), " [", label,
                    "] tensor with ", label, " = ", rows, "; got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == device, name, " must be on the queries' device (", device, "); got ", t.device());
  return t.contiguous();
}

// A [B, width] matrix of `type` on the queries' device, returned contiguous; its values are not read here (they may
// sit on the GPU). `width` names the second dimension in messages.
inline at::Tensor matrix_arg(const at::Tensor& t, const char* name, at::ScalarType type, int64_t B,
                             const at::Device& device, const char* width = "m") {
  TORCH_CHECK_TYPE(t.scalar_type() == type, name, " must be ", dtype_name(type), " [B, ", width, "]; got dtype ",
                   dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == B, name, " must be ", dtype_name(type), " [B, ", width,
                    "] with B = ", B, "; got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == device, name, " must be on the queries' device (", device, "); got ", t.device());
  return t.contiguous();
}

// The scored pair and its fp32 scales, checked: a [B, d] and an [N, d] matrix of one float dtype on one device,
// N < 2**31, scales [B] and [N] (returned contiguous). Refuses CUDA tensors in a build without CUDA
// kernels.
struct ScaledPair {
  at::Tensor query_scale, candidate_scale;
};

inline ScaledPair check_scaled_pair(const at::Tensor& queries, const at::Tensor& candidates,
                                    const at::Tensor& query_scale, const at::Tensor& candidate_scale) {
  check_matrix(queries, "queries", "[B, d]");
  check_matrix(candidates, "candidates", "[N, d] with the queries' d");
  float_dtype(queries, "queries");
  const at::Device device = queries.device();
  TORCH_CHECK_TYPE(candidates.scalar_type() == queries.scalar_type(),
                   "candidates must have the queries' dtype; got queries ", queries.scalar_type(), " and candidates ",
                   candidates.scalar_type());
  TORCH_CHECK_VALUE(candidates.device() == device, "candidates must be on the queries' device (", device, "); got ",
                    candidates.device());
  TORCH_CHECK_VALUE(candidates.size(1) == queries.size(1), "candidates must be [N, d] with the queries' d = ",
                    queries.size(1), "; got shape ", candidates.sizes());
  TORCH_CHECK_VALUE(candidates.size(0) < (int64_t{1} << 31), "candidates must have fewer than 2**31 rows; got ",
                    candidates.size(0));
#ifndef ELVA_WITH_CUDA
  TORCH_CHECK_VALUE(!device.is_cuda(), "this build of elva has no CUDA kernels; queries are on ", device);
#endif
  return {vector_arg(query_scale, "query_scale", at::kFloat, queries.size(0), device),
          vector_arg(candidate_scale, "candidate_scale", at::kFloat, candidates.size(0), device, "N")};
}

// An optional float32 [B] per-query bound (max_score) on the CPU: checked and contiguous, or undefined when absent.
inline at::Tensor per_query_floats(const std::optional<at::Tensor>& values, const char* name, int64_t B) {
  return values.has_value() ? vector_arg(*values, name, at::kFloat, B, at::Device(at::kCPU)) : at::Tensor();
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
