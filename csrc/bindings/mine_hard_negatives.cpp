// torch binding of elva::mine_hard_negatives_cpu. The schema lives in elva_kernels/_library.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>

#include "elva/mine_hard_negatives.h"
#include "tensor_args.h"

namespace elva {
namespace {

at::Tensor mine_hard_negatives_cpu_op(const at::Tensor& query_emb, const at::Tensor& pool_emb,
                                      const at::Tensor& positives, int64_t n_hard, int64_t n_random,
                                      const std::optional<at::Tensor>& max_score, int64_t seed,
                                      const std::optional<at::Tensor>& /*pool_scale*/) {
  // pool_scale (a Candidates handle's inverse norms) is not read: rows are normed as they are scored.
  TORCH_INTERNAL_ASSERT(query_emb.device().is_cpu());
  const auto [dtype, B, d, N] = bindings::check_queries_and_candidates(query_emb, pool_emb, "query_emb", "pool_emb");
  const at::Tensor positive_ids = bindings::id_matrix(positives, "positives", B, N);
  TORCH_CHECK_VALUE(n_hard >= 0, "n_hard must be an int >= 0; got ", n_hard);
  TORCH_CHECK_VALUE(n_random >= 0, "n_random must be an int >= 0; got ", n_random);
  TORCH_CHECK_VALUE(n_hard + n_random >= 1, "n_hard + n_random must be >= 1; got ", n_hard, " and ", n_random);
  TORCH_CHECK_VALUE(seed >= 0, "seed must be an int >= 0; got ", seed);
  const at::Tensor limits = bindings::per_query_floats(max_score, "max_score", B);

  const at::Tensor q = bindings::with_unit_stride_rows(query_emb);
  const at::Tensor p = bindings::with_unit_stride_rows(pool_emb);
  at::Tensor out = at::empty({B, n_hard + n_random}, query_emb.options().dtype(at::kLong));
  const MineHardNegativesStatus status = mine_hard_negatives_cpu(
      q.const_data_ptr(), q.stride(0), p.const_data_ptr(), p.stride(0), dtype, B, N, d,
      positive_ids.const_data_ptr<int64_t>(), positive_ids.size(1), n_hard, n_random,
      limits.defined() ? limits.const_data_ptr<float>() : nullptr, static_cast<uint32_t>(seed),
      out.mutable_data_ptr<int64_t>());
  TORCH_CHECK_VALUE(status.nonfinite_queries == 0, "query_emb must contain only finite values; found ",
                    status.nonfinite_queries, " NaN/Inf entries");
  TORCH_CHECK_VALUE(!status.nonfinite_pool, "pool_emb must contain only finite values; found NaN/Inf entries");
  return out;
}

}  // namespace
}  // namespace elva

TORCH_LIBRARY_IMPL(elva, CPU, m) { m.impl("mine_hard_negatives_cpu", &elva::mine_hard_negatives_cpu_op); }
