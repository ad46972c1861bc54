// torch binding of elva::rank_statistics_cpu. The schema lives in elva_kernels/_library.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "elva/rank_statistics.h"
#include "tensor_args.h"

namespace elva {
namespace {

at::Tensor id_matrix(const at::Tensor& ids, const char* name, int64_t B, int64_t N) {
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> rank_statistics_cpu_op(const at::Tensor& queries,
                                                                      const at::Tensor& candidates,
                                                                      const at::Tensor& positives,
                                                                      c10::string_view metric,
                                                                      const std::optional<at::Tensor>& exclude) {
  TORCH_INTERNAL_ASSERT(queries.device().is_cpu());
  bindings::check_matrix(queries, "queries", "[B, d]");
  bindings::check_matrix(candidates, "candidates", "[N, d] with the queries' d");
  const DType dtype = bindings::float_dtype(queries, "queries");
  bindings::float_dtype(candidates, "candidates");
  TORCH_CHECK_TYPE(candidates.scalar_type() == queries.scalar_type(),
                   "candidates must have the queries' dtype; got queries ", queries.scalar_type(), " and candidates ",
                   candidates.scalar_type());
  TORCH_CHECK_VALUE(candidates.device().is_cpu(), "candidates must be on the queries' device (cpu); got ",
                    candidates.device());
  const int64_t B = queries.size(0), d = queries.size(1), N = candidates.size(0);
  TORCH_CHECK_VALUE(candidates.size(1) == d, "candidates must be [N, d] with the queries' d = ", d, "; got shape ",
                    candidates.sizes());
  TORCH_CHECK_VALUE(B >= 1 && d >= 1, "queries must not be empty [B, d]; got shape ", queries.sizes());
  TORCH_CHECK_VALUE(N >= 1, "candidates must not be empty [N, d]; got shape ", candidates.sizes());
  const std::string metric_name(metric);
  TORCH_CHECK_VALUE(metric_name == "cosine" || metric_name == "dot",
                    "metric must be one of ('cosine', 'dot'); got '", metric_name, "'");

  const at::Tensor positive_ids = id_matrix(positives, "positives", B, N);
  {
    const int64_t* ids = positive_ids.const_data_ptr<int64_t>();
    const int64_t m = positive_ids.size(1);
    for (int64_t b = 0; b < B; ++b) {
      bool any = false;
      for (int64_t j = 0; j < m && !any; ++j) any = ids[b * m + j] >= 0;
      TORCH_CHECK_VALUE(any, "positives must list at least one candidate id per query; row ", b, " has none");
    }
  }
  at::Tensor exclude_ids;
  if (exclude.has_value()) exclude_ids = id_matrix(*exclude, "exclude", B, N);

  const at::Tensor q = bindings::with_unit_stride_rows(queries);
  const at::Tensor c = bindings::with_unit_stride_rows(candidates);
  at::Tensor rank = at::empty({B}, queries.options().dtype(at::kLong));
  at::Tensor pos_score = at::empty({B}, queries.options().dtype(at::kFloat));
  at::Tensor max_neg_score = at::empty({B}, queries.options().dtype(at::kFloat));
  const RankStatisticsStatus status = rank_statistics_cpu(
      q.const_data_ptr(), q.stride(0), c.const_data_ptr(), c.stride(0), dtype, B, N, d,
      metric_name == "cosine" ? Metric::Cosine : Metric::Dot, positive_ids.const_data_ptr<int64_t>(),
      positive_ids.size(1), exclude_ids.defined() ? exclude_ids.const_data_ptr<int64_t>() : nullptr,
      exclude_ids.defined() ? exclude_ids.size(1) : 0, rank.mutable_data_ptr<int64_t>(),
      pos_score.mutable_data_ptr<float>(), max_neg_score.mutable_data_ptr<float>());
  TORCH_CHECK_VALUE(status.nonfinite_queries == 0, "queries must contain only finite values; found ",
                    status.nonfinite_queries, " NaN/Inf entries");
  TORCH_CHECK_VALUE(!status.nonfinite_candidates,
                    "candidates must contain only finite values; found NaN/Inf entries (detected in the kernel)");
  return {rank, pos_score, max_neg_score};
}

}  // namespace
}  // namespace elva

TORCH_LIBRARY_IMPL(elva, CPU, m) { m.impl("rank_statistics_cpu", &elva::rank_statistics_cpu_op); }
