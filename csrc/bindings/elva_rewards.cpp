// torch binding of elva::elva_rewards_cpu. The schema lives in elva_kernels/_library.py; the semantics and the
// data-check messages are those of elva_kernels/reference/elva_rewards.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#include "elva/elva_rewards.h"
#include "elva_rewards_args.h"
#include "tensor_args.h"

namespace elva {
namespace {

using bindings::advantage_mode;
using bindings::with_unit_stride_last;

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

constexpr const char* kCandForm = "[B, G, C, d] or [B, C, d] with the queries' B, G and d";


Outputs elva_rewards_cpu_op(const at::Tensor& query_emb, const at::Tensor& cand_emb, const at::Tensor& positive_index,
                            const std::optional<at::Tensor>& mask, double delta, double gamma, double alpha,
                            double eps, double log_base, c10::string_view advantage, double adv_eps,
                            bool return_scores) {
  // ---- metadata
  TORCH_CHECK_VALUE(query_emb.dim() == 3, "query_emb must be a 3-D tensor [B, G, d]; got shape ", query_emb.sizes());
  TORCH_CHECK_VALUE(cand_emb.dim() == 3 || cand_emb.dim() == 4, "cand_emb must be a 3-D or 4-D tensor ", kCandForm,
                    "; got shape ", cand_emb.sizes());
  const DType dtype = bindings::float_dtype(query_emb, "query_emb");
  bindings::float_dtype(cand_emb, "cand_emb");
  TORCH_CHECK_TYPE(cand_emb.scalar_type() == query_emb.scalar_type(), "embeddings must share one dtype; got query_emb ",
                   query_emb.scalar_type(), ", cand_emb ", cand_emb.scalar_type());
  TORCH_CHECK_VALUE(query_emb.device().is_cpu(), "query_emb must be on the cpu for elva_rewards_cpu; got ",
                    query_emb.device());
  TORCH_CHECK_VALUE(cand_emb.device().is_cpu(), "cand_emb must be on the queries' device (cpu); got ",
                    cand_emb.device());
  const int64_t B = query_emb.size(0), G = query_emb.size(1), d = query_emb.size(2);
  const bool shared = cand_emb.dim() == 3;
  TORCH_CHECK_VALUE(cand_emb.size(0) == B && (shared || cand_emb.size(1) == G) && cand_emb.size(-1) == d,
                    "cand_emb must be ", kCandForm, " (B = ", B, ", G = ", G, ", d = ", d, "); got shape ",
                    cand_emb.sizes());
  const int64_t C = cand_emb.size(-2);

  TORCH_CHECK_TYPE(positive_index.scalar_type() == at::kLong, "positive_index must be int64 [B]; got dtype ",
                   positive_index.scalar_type());
  TORCH_CHECK_VALUE(positive_index.dim() == 1 && positive_index.size(0) == B,
                    "positive_index must be int64 [B] with B = ", B, "; got shape ", positive_index.sizes());
  TORCH_CHECK_VALUE(positive_index.device().is_cpu(), "positive_index must be on the queries' device (cpu); got ",
                    positive_index.device());

  at::Tensor mask_t;
  int64_t mask_strides[3] = {0, 0, 0};
  if (mask.has_value()) {
    mask_t = *mask;
    TORCH_CHECK_TYPE(mask_t.scalar_type() == at::kBool, "mask must be bool [B, C] or [B, G, C]; got dtype ",
                     mask_t.scalar_type());
    const bool two_d = mask_t.dim() == 2 && mask_t.size(0) == B && mask_t.size(1) == C;
    const bool three_d = mask_t.dim() == 3 && mask_t.size(0) == B && mask_t.size(1) == G && mask_t.size(2) == C;
    TORCH_CHECK_VALUE(two_d || three_d, "mask must be bool [B, C] = (", B, ", ", C, ") or [B, G, C] = (", B, ", ", G,
                      ", ", C, "); got shape ", mask_t.sizes());
    TORCH_CHECK_VALUE(mask_t.device().is_cpu(), "mask must be on the queries' device (cpu); got ", mask_t.device());
    mask_strides[0] = mask_t.stride(0);
    mask_strides[1] = two_d ? 0 : mask_t.stride(1);
    mask_strides[2] = mask_t.stride(-1);
  }
  const AdvantageMode mode = advantage_mode(advantage);
  TORCH_CHECK_VALUE(std::isfinite(log_base) && log_base > 0 && log_base != 1,
                    "log_base must be a finite float > 0 and != 1; got ", log_base);

  // ---- the kernel
  const at::Tensor q = with_unit_stride_last(query_emb);
  const at::Tensor c = with_unit_stride_last(cand_emb);
  const at::Tensor positives = positive_index.contiguous();
  const int64_t query_strides[2] = {q.stride(0), q.stride(1)};
  const int64_t cand_strides[3] = {c.stride(0), shared ? 0 : c.stride(1), c.stride(-2)};

  const auto f32 = query_emb.options().dtype(at::kFloat);
  at::Tensor total = at::empty({B, G}, f32);
  at::Tensor margin = at::empty({B, G}, f32);
  at::Tensor rank_reward = at::empty({B, G}, f32);
  at::Tensor rank = at::empty({B, G}, query_emb.options().dtype(at::kLong));
  at::Tensor advantages = at::empty({B, G}, f32);
  at::Tensor scores = return_scores ? at::empty({B, G, C}, f32) : at::empty({0}, f32);

  ElvaRewardsOptions options;
  options.delta = delta;
  options.gamma = gamma;
  options.alpha = alpha;
  options.eps = eps;
  options.log_base = log_base;
  options.advantage = mode;
  options.adv_eps = adv_eps;
  const ElvaRewardsStatus status = elva_rewards_cpu(
      q.const_data_ptr(), query_strides, c.const_data_ptr(), cand_strides, shared, dtype, B, G, C, d,
      positives.const_data_ptr<int64_t>(), mask_t.defined() ? mask_t.const_data_ptr<bool>() : nullptr, mask_strides,
      options, total.mutable_data_ptr<float>(), margin.mutable_data_ptr<float>(),
      rank_reward.mutable_data_ptr<float>(), rank.mutable_data_ptr<int64_t>(), advantages.mutable_data_ptr<float>(),
      return_scores ? scores.mutable_data_ptr<float>() : nullptr);

  // ---- data checks, in the reference's order (check_data)
  TORCH_CHECK_VALUE(status.nonfinite_query == 0, "query_emb must contain only finite values; found ",
                    status.nonfinite_query, " NaN/Inf entries");
  TORCH_CHECK_VALUE(status.nonfinite_cand == 0, "cand_emb must contain only finite values; found ",
                    status.nonfinite_cand, " NaN/Inf entries");
  switch (status.error) {
    case ElvaRewardsError::None:
      break;
    case ElvaRewardsError::PositiveOutOfRange:
      TORCH_CHECK_VALUE(false, "positive_index holds ids outside [0, ", C, "); got ", status.error_value);
      break;
    case ElvaRewardsError::MaskHidesPositive:
      TORCH_CHECK_VALUE(false, "mask must keep every positive (positive_index) unmasked; it hides candidate ",
                        positives.const_data_ptr<int64_t>()[status.error_b], ", the positive of query ",
                        status.error_b, ", in rollout ", status.error_g);
      break;
    case ElvaRewardsError::NoNegative:
      TORCH_CHECK_VALUE(false, mask_t.defined() ? "mask" : "cand_emb",
                        " must leave at least one unmasked negative for every query and rollout; query ",
                        status.error_b, ", rollout ", status.error_g, " has only its positive (C = ", C, ")");
      break;
  }
  return {total, margin, rank_reward, rank, advantages, scores};
}

}  // namespace
}  // namespace elva

TORCH_LIBRARY_IMPL(elva, CPU, m) { m.impl("elva_rewards_cpu", &elva::elva_rewards_cpu_op); }
