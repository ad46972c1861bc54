// CUDA launcher of ELVA's margin and ranking rewards and their GRPO advantages (SPEC A3); the semantics are
// those of elva_kernels/reference/elva_rewards.py. Torch-free, so that nvcc and ctest build it without libtorch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "elva/common.h"
#include "elva/elva_rewards.h"  // AdvantageMode, shared with the CPU backend

namespace elva {

// The most candidates per rollout the kernel ranks on chip, and the most rollouts per query.
constexpr int64_t kElvaRewardsMaxCandidates = 512;
constexpr int64_t kElvaRewardsMaxRollouts = 1024;

// Slots of the int64 error record the launcher zeroes and the kernel fills; the caller reads it after the stream
// reaches this point. Counts are plain; a "first" slot holds 0 (none) or kFirstBase - index, so that the
// smallest index wins through one atomicMax (decode with elva_rewards_first).
enum ElvaRewardsCudaSlot : int32_t {
  kQueryNonfinite = 0,   // NaN/Inf entries of query_emb
  kCandNonfinite = 1,    // NaN/Inf entries of cand_emb
  kBadPositive = 2,      // first b with positive_index[b] outside [0, C)
  kHiddenPositive = 3,   // first b * G + g whose mask hides the positive
  kNoNegative = 4,       // first b * G + g with fewer than two real candidates
  kErrorSlots = 5
};
constexpr int64_t kFirstBase = int64_t{1} << 62;

// -1 when the slot is empty, else the index it recorded.
inline int64_t elva_rewards_first(int64_t slot) { return slot == 0 ? -1 : kFirstBase - slot; }

struct ElvaRewardsArgs {
  DType dtype;
  int64_t B, G, C, d;
  // query_emb [B, G, d] with unit-stride rows.
  const void* query;
  int64_t query_stride_b, query_stride_g;
  // cand_emb [B, G, C, d] (shared == false) or [B, C, d] (shared == true, cand_stride_g unused), unit-stride rows.
  const void* cand;
  bool shared;
  int64_t cand_stride_b, cand_stride_g, cand_stride_c;
  const int64_t* positive_index;  // [B]
  // bool [B, C] (mask_stride_g == 0) or [B, G, C] with unit stride over C; nullptr: every candidate is real.
  const bool* mask;
  int64_t mask_stride_b, mask_stride_g;
  double delta, gamma, alpha, eps;
  double log_base;
  AdvantageMode advantage;
  double adv_eps;
  // Outputs, contiguous [B, G]; scores is fp32 [B, G, C] (-inf where masked) or nullptr.
  float* total;
  float* margin;
  float* rank_reward;
  int64_t* rank;
  float* advantages;
  float* scores;
  // 2 * B * G doubles of device scratch, needed for AdvantageMode::Batch only (nullptr otherwise).
  double* batch_scratch;
  int64_t* errors;  // kErrorSlots device int64s
};

// Enqueues one kernel on `stream` (two for AdvantageMode::Batch: the batch std needs a grid-wide reduction),
// after zeroing `errors`. Returns cudaErrorInvalidValue for sizes outside the limits above, else the launch error.
cudaError_t elva_rewards_cuda(const ElvaRewardsArgs& args, cudaStream_t stream);

}  // namespace elva
