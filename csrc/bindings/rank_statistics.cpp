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

std::tuple<at::Tensor, at::Tensor, at::Tensor> rank_statistics_cpu_op(const at::Tensor& queries,
                                                                      const at::Tensor& candidates,
                                                                      const at::Tensor& positives,
                                                                      c10::string_view metric,
                                                                      const std::optional<at::Tensor>& exclude,
                                                                      const std::optional<at::Tensor>&
                                                                      /*candidate_scale*/) {
  // candidate_scale (a Candidates handle's inverse norms) is not read: each block is normed while it is in cache.
  TORCH_INTERNAL_ASSERT(queries.device().is_cpu());
  const auto [dtype, B, d, N] = bindings::check_queries_and_candidates(queries, candidates);
  const Metric metric_kind = bindings::is_cosine(metric) ? Metric::Cosine : Metric::Dot;

  const at::Tensor positive_ids = bindings::id_matrix(positives, "positives", B, N);
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
  if (exclude.has_value()) exclude_ids = bindings::id_matrix(*exclude, "exclude", B, N);

  const at::Tensor q = bindings::with_unit_stride_rows(queries);
  const at::Tensor c = bindings::with_unit_stride_rows(candidates);
  at::Tensor rank = at::empty({B}, queries.options().dtype(at::kLong));
  at::Tensor pos_score = at::empty({B}, queries.options().dtype(at::kFloat));
  at::Tensor max_neg_score = at::empty({B}, queries.options().dtype(at::kFloat));
  const RankStatisticsStatus status = rank_statistics_cpu(
      q.const_data_ptr(), q.stride(0), c.const_data_ptr(), c.stride(0), dtype, B, N, d,
      metric_kind, positive_ids.const_data_ptr<int64_t>(),
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
