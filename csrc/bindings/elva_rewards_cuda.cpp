// torch binding of elva::elva_rewards_cuda (SPEC A3). The schema lives in elva_kernels/_library.py. CUDA builds
// only: without ELVA_WITH_CUDA this file compiles to nothing.
#ifdef ELVA_WITH_CUDA

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
// c10's stream and guard headers, not ATen/cuda/CUDAContext.h (see l2_normalize.cpp).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#include "elva/cuda/elva_rewards.cuh"
#include "elva_rewards_args.h"
#include "tensor_args.h"

namespace elva {
namespace {

using bindings::advantage_mode;
using bindings::with_unit_stride_last;

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

void check_on_device(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK_VALUE(t.device() == device, "all tensors must be on one device; got query_emb on ", device, ", ", name,
                    " on ", t.device());
}

void check_finite_float(double value, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(value), name, " must be a finite float; got ", value);
}


// The data checks the kernel recorded, raised as the reference's check_data words them, in its order.
void raise_data_errors(const at::Tensor& errors_device, const at::Tensor& positive_index, bool has_mask, int64_t G,
                       int64_t C) {
  const at::Tensor errors = errors_device.cpu();  // the one host sync of the op
  const int64_t* e = errors.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(e[kQueryNonfinite] == 0, "query_emb must contain only finite values; found ", e[kQueryNonfinite],
                    " NaN/Inf entries");
  TORCH_CHECK_VALUE(e[kCandNonfinite] == 0, "cand_emb must contain only finite values; found ", e[kCandNonfinite],
                    " NaN/Inf entries");
  const int64_t bad_b = elva_rewards_first(e[kBadPositive]);
  if (bad_b >= 0) {
    TORCH_CHECK_VALUE(false, "positive_index holds ids outside [0, ", C, "); got ",
                      positive_index[bad_b].item<int64_t>());
  }
  const int64_t hidden = elva_rewards_first(e[kHiddenPositive]);
  if (hidden >= 0) {
    const int64_t b = hidden / G, g = hidden % G;
    TORCH_CHECK_VALUE(false, "mask must keep every positive (positive_index) unmasked; it hides candidate ",
                      positive_index[b].item<int64_t>(), ", the positive of query ", b, ", in rollout ", g);
  }
  const int64_t lonely = elva_rewards_first(e[kNoNegative]);
  if (lonely >= 0) {
    TORCH_CHECK_VALUE(false, has_mask ? "mask" : "cand_emb",
                      " must leave at least one unmasked negative for every query and rollout; query ", lonely / G,
                      ", rollout ", lonely % G, " has only its positive (C = ", C, ")");
  }
}

Outputs elva_rewards_cuda_op(const at::Tensor& query_emb, const at::Tensor& cand_emb, const at::Tensor& positive_index,
                             const std::optional<at::Tensor>& mask, double delta, double gamma, double alpha,
                             double eps, double log_base, c10::string_view advantage, double adv_eps,
                             bool return_scores) {
  // Metadata: rank, dtype, device, shapes, options.
  TORCH_CHECK_VALUE(query_emb.dim() == 3, "query_emb must be a 3-D tensor [B, G, d]; got shape ", query_emb.sizes());
  const char* form_c = "[B, G, C, d] or [B, C, d] with the queries' B, G and d";
  TORCH_CHECK_VALUE(cand_emb.dim() == 3 || cand_emb.dim() == 4, "cand_emb must be a 3-D or 4-D tensor ", form_c,
                    "; got shape ", cand_emb.sizes());
  const DType dtype = bindings::float_dtype(query_emb, "query_emb");
  bindings::float_dtype(cand_emb, "cand_emb");
  TORCH_CHECK_TYPE(cand_emb.scalar_type() == query_emb.scalar_type(), "embeddings must share one dtype; got query_emb ",
                   query_emb.scalar_type(), ", cand_emb ", cand_emb.scalar_type());
  TORCH_CHECK_VALUE(query_emb.device().is_cuda(), "query_emb must be a CUDA tensor; got ", query_emb.device());
  const at::Device device = query_emb.device();
  const c10::cuda::CUDAGuard device_guard(device);
  check_on_device(cand_emb, "cand_emb", device);
  const int64_t B = query_emb.size(0), G = query_emb.size(1), d = query_emb.size(2);
  TORCH_CHECK_VALUE(B >= 1 && G >= 1 && d >= 1, "query_emb must not be empty [B, G, d]; got shape ",
                    query_emb.sizes());
  const bool shared = cand_emb.dim() == 3;
  TORCH_CHECK_VALUE(cand_emb.size(0) == B && (shared || cand_emb.size(1) == G) && cand_emb.size(-1) == d,
                    "cand_emb must be ", form_c, " (B = ", B, ", G = ", G, ", d = ", d, "); got shape ",
                    cand_emb.sizes());
  const int64_t C = cand_emb.size(-2);
  TORCH_CHECK_VALUE(C >= 2, "cand_emb must hold C >= 2 candidates (the positive and a negative); got shape ",
                    cand_emb.sizes());
  TORCH_CHECK_VALUE(C <= kElvaRewardsMaxCandidates, "elva_rewards on CUDA ranks at most ", kElvaRewardsMaxCandidates,
                    " candidates per rollout on chip; got C = ", C, " (use backend='torch')");
  TORCH_CHECK_VALUE(G <= kElvaRewardsMaxRollouts, "elva_rewards on CUDA takes at most ", kElvaRewardsMaxRollouts,
                    " rollouts per query; got G = ", G, " (use backend='torch')");
  TORCH_CHECK_VALUE(B <= 0x7fffffff, "elva_rewards on CUDA takes fewer than 2**31 queries; got B = ", B);
  TORCH_CHECK_TYPE(positive_index.scalar_type() == at::kLong, "positive_index must be int64 [B]; got dtype ",
                   positive_index.scalar_type());
  TORCH_CHECK_VALUE(positive_index.dim() == 1 && positive_index.size(0) == B, "positive_index must be int64 [B] with B = ",
                    B, "; got shape ", positive_index.sizes());
  check_on_device(positive_index, "positive_index", device);
  at::Tensor mask_rows;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, "mask must be bool [B, C] or [B, G, C]; got dtype ",
                     m.scalar_type());
    const bool per_query = m.dim() == 2 && m.size(0) == B && m.size(1) == C;
    const bool per_rollout = m.dim() == 3 && m.size(0) == B && m.size(1) == G && m.size(2) == C;
    TORCH_CHECK_VALUE(per_query || per_rollout, "mask must be bool [B, C] = (", B, ", ", C, ") or [B, G, C] = (", B,
                      ", ", G, ", ", C, "); got shape ", m.sizes());
    check_on_device(m, "mask", device);
    mask_rows = with_unit_stride_last(m);
  }
  check_finite_float(delta, "delta");
  check_finite_float(gamma, "gamma");
  check_finite_float(alpha, "alpha");
  check_finite_float(eps, "eps");
  TORCH_CHECK_VALUE(std::isfinite(log_base) && log_base > 0 && log_base != 1.0,
                    "log_base must be a finite float > 0 other than 1; got ", log_base);
  TORCH_CHECK_VALUE(std::isfinite(adv_eps) && adv_eps >= 0, "adv_eps must be a finite float >= 0.0; got ", adv_eps);
  const AdvantageMode mode = advantage_mode(advantage);

  const at::Tensor queries = with_unit_stride_last(query_emb);
  const at::Tensor candidates = with_unit_stride_last(cand_emb);
  const at::Tensor positives = positive_index.contiguous();
  const auto float_options = queries.options().dtype(at::kFloat);
  at::Tensor total = at::empty({B, G}, float_options);
  at::Tensor margin = at::empty({B, G}, float_options);
  at::Tensor rank_reward = at::empty({B, G}, float_options);
  at::Tensor rank = at::empty({B, G}, queries.options().dtype(at::kLong));
  at::Tensor advantages = at::empty({B, G}, float_options);
  at::Tensor scores = return_scores ? at::empty({B, G, C}, float_options) : at::empty({0}, float_options);
  at::Tensor scratch;
  if (mode == AdvantageMode::Batch) scratch = at::empty({2 * B * G}, queries.options().dtype(at::kDouble));
  at::Tensor errors = at::empty({kErrorSlots}, queries.options().dtype(at::kLong));  // zeroed by the launcher

  ElvaRewardsArgs args{};
  args.dtype = dtype;
  args.B = B;
  args.G = G;
  args.C = C;
  args.d = d;
  args.query = queries.const_data_ptr();
  args.query_stride_b = queries.stride(0);
  args.query_stride_g = queries.stride(1);
  args.cand = candidates.const_data_ptr();
  args.shared = shared;
  args.cand_stride_b = candidates.stride(0);
  args.cand_stride_g = shared ? 0 : candidates.stride(1);
  args.cand_stride_c = candidates.stride(-2);
  args.positive_index = positives.const_data_ptr<int64_t>();
  args.mask = mask_rows.defined() ? mask_rows.const_data_ptr<bool>() : nullptr;
  args.mask_stride_b = mask_rows.defined() ? mask_rows.stride(0) : 0;
  args.mask_stride_g = mask_rows.defined() && mask_rows.dim() == 3 ? mask_rows.stride(1) : 0;
  args.delta = delta;
  args.gamma = gamma;
  args.alpha = alpha;
  args.eps = eps;
  args.log_base = log_base;
  args.advantage = mode;
  args.adv_eps = adv_eps;
  args.total = total.mutable_data_ptr<float>();
  args.margin = margin.mutable_data_ptr<float>();
  args.rank_reward = rank_reward.mutable_data_ptr<float>();
  args.rank = rank.mutable_data_ptr<int64_t>();
  args.advantages = advantages.mutable_data_ptr<float>();
  args.scores = return_scores ? scores.mutable_data_ptr<float>() : nullptr;
  args.batch_scratch = scratch.defined() ? scratch.mutable_data_ptr<double>() : nullptr;
  args.errors = errors.mutable_data_ptr<int64_t>();
  const cudaError_t launched = elva_rewards_cuda(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(launched == cudaSuccess, "elva_rewards_cuda: kernel launch failed: ", cudaGetErrorString(launched));
  // SPEC lets a kernel flag the data checks on device and raise after the launch, returning nothing.
  raise_data_errors(errors, positives, mask.has_value(), G, C);
  return {total, margin, rank_reward, rank, advantages, scores};
}

}  // namespace
}  // namespace elva

TORCH_LIBRARY_IMPL(elva, CUDA, m) { m.impl("elva_rewards_cuda", &elva::elva_rewards_cuda_op); }

#endif  // ELVA_WITH_CUDA
