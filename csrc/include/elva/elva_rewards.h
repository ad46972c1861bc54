// ELVA's margin and ranking rewards per rollout and their GRPO advantages, torch-free interface (the CPU backend
// of elva::elva_rewards; semantics in elva_kernels/reference/elva_rewards.py, SPEC A3).
//
// Layout (elements of `dtype`, unit-stride rows; any other stride, 0 included, is allowed):
//   query       B x G rows of d; row (b, g) starts at element b * query_strides[0] + g * query_strides[1].
//   cand        candidate row (b, g, c) starts at b * cand_strides[0] + g * cand_strides[1] + c * cand_strides[2].
//               `shared_candidates` ([B, C, d] shared by the rollouts) means cand_strides[1] is ignored: each
//               candidate row is then normalised once per query and scored against all its rollouts.
//   positive    B int64, the positive's candidate index.
//   mask        nullptr, or bool: candidate (b, g, c) is real when mask[b * mask_strides[0] + g * mask_strides[1] +
//               c * mask_strides[2]] (mask_strides[1] = 0 for a [B, C] mask).
//   outputs     total, margin, rank_reward, advantages: B x G fp32; rank: B x G int64 (the positive's 1-based rank);
//               scores: nullptr, or B x G x C fp32 (-inf at masked candidates). All contiguous.
//
// Scores: rows normalised in fp32 (x / max(||x||, 1e-12), as similarity_topk_cpu prepares them), products summed
// in float64 and rounded once to fp32, so identical candidates tie exactly. Ranks follow the total order (score
// descending, index ascending) among the real candidates. Rewards and advantages are computed in float64 from the
// fp32 scores and rounded to fp32 at the end.
//
// Data checks: the result reports, in the reference's order of precedence, NaN/Inf entries in the query and the
// candidates, a positive index outside [0, C), a mask hiding a positive, and a (query, rollout) without an
// unmasked negative. On any of them the outputs may hold garbage and the caller must raise.
//
// Extra memory: B*G float64 totals, and per OpenMP task G*d + d prepared fp32 values, G*C fp32 scores and C sort
// entries and ranks. Never [B, G, C] beyond the optional scores output.
#pragma once

#include <cstdint>

#include "elva/common.h"

namespace elva {

enum class AdvantageMode : int32_t { Group, Batch, None };

enum class ElvaRewardsError : int32_t {
  None,
  PositiveOutOfRange,  // error_value: the first positive index outside [0, C)
  MaskHidesPositive,   // error_b, error_g: the first (query, rollout) whose positive is masked
  NoNegative,          // error_b, error_g: the first (query, rollout) with fewer than two real candidates
};

struct ElvaRewardsStatus {
  int64_t nonfinite_query = 0;  // NaN/Inf entries of the queries (checked first)
  int64_t nonfinite_cand = 0;   // NaN/Inf entries of the candidates (each distinct row counted once)
  ElvaRewardsError error = ElvaRewardsError::None;
  int64_t error_value = 0;
  int64_t error_b = 0;
  int64_t error_g = 0;
  bool ok() const { return nonfinite_query == 0 && nonfinite_cand == 0 && error == ElvaRewardsError::None; }
};

struct ElvaRewardsOptions {
  double delta = 0.05;
  double gamma = 0.01;
  double alpha = 0.4;
  double eps = 0.6;
  double log_base = 2.718281828459045;
  AdvantageMode advantage = AdvantageMode::Group;
  double adv_eps = 1e-4;
};

// OpenMP over (query, block of rollouts).
ElvaRewardsStatus elva_rewards_cpu(const void* query, const int64_t query_strides[2], const void* cand,
                                   const int64_t cand_strides[3], bool shared_candidates, DType dtype, int64_t B,
                                   int64_t G, int64_t C, int64_t d, const int64_t* positive, const bool* mask,
                                   const int64_t mask_strides[3], const ElvaRewardsOptions& options, float* total,
                                   float* margin, float* rank_reward, int64_t* rank, float* advantages,
                                   float* scores);

}  // namespace elva
