// torch binding of elva::similarity_topk_cpu. The schema lives in elva_kernels/_library.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "elva/similarity_topk.h"
#include "tensor_args.h"

namespace elva {
namespace {

std::tuple<at::Tensor, at::Tensor> similarity_topk_cpu_op(const at::Tensor& queries, const at::Tensor& candidates,
                                                          int64_t k, c10::string_view metric,
                                                          const std::optional<at::Tensor>& exclude,
                                                          const std::optional<at::Tensor>& max_score,
                                                          const std::optional<at::Tensor>& /*candidate_scale*/) {
  // candidate_scale (a Candidates handle's inverse norms) is not read: each block is normed while it is in cache.
  TORCH_INTERNAL_ASSERT(queries.device().is_cpu());
  const auto [dtype, B, d, N] = bindings::check_queries_and_candidates(queries, candidates);
  TORCH_CHECK_VALUE(k >= 1 && k <= N, "k must be an int in [1, ", N, "]; got ", k);
  const Metric metric_kind = bindings::is_cosine(metric) ? Metric::Cosine : Metric::Dot;

  at::Tensor exclude_ids;
  if (exclude.has_value()) exclude_ids = bindings::id_matrix(*exclude, "exclude", B, N);
  const at::Tensor limits = bindings::per_query_floats(max_score, "max_score", B);

  const at::Tensor q = bindings::with_unit_stride_rows(queries);
  const at::Tensor c = bindings::with_unit_stride_rows(candidates);
  at::Tensor values = at::empty({B, k}, queries.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({B, k}, queries.options().dtype(at::kLong));
  const SimilarityTopkStatus status = similarity_topk_cpu(
      q.const_data_ptr(), q.stride(0), c.const_data_ptr(), c.stride(0), dtype, B, N, d, k,
      metric_kind,
      exclude_ids.defined() ? exclude_ids.const_data_ptr<int64_t>() : nullptr,
      exclude_ids.defined() ? exclude_ids.size(1) : 0, limits.defined() ? limits.const_data_ptr<float>() : nullptr,
      values.mutable_data_ptr<float>(), indices.mutable_data_ptr<int64_t>());
  TORCH_CHECK_VALUE(status.nonfinite_queries == 0, "queries must contain only finite values; found ",
                    status.nonfinite_queries, " NaN/Inf entries");
  TORCH_CHECK_VALUE(!status.nonfinite_candidates,
                    "candidates must contain only finite values; found NaN/Inf entries (detected in the kernel)");
  return {values, indices};
}

}  // namespace
}  // namespace elva

TORCH_LIBRARY_IMPL(elva, CPU, m) { m.impl("similarity_topk_cpu", &elva::similarity_topk_cpu_op); }
