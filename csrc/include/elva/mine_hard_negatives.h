// ELVA's balanced negatives, torch-free interface (the CPU backend of elva::mine_hard_negatives).
//
// Layout (as similarity_topk.h):
//   queries     B rows of d elements of `dtype`; row b starts at element b * query_stride (unit-stride rows).
//   pool        N rows of d elements of `dtype`; row n starts at element n * pool_stride.
//   positives   B x m int64 (row-major, contiguous), -1 = padding: never returned.
//   max_score   nullptr, or B fp32: candidates whose cosine score is above max_score[b] are skipped by both parts.
//   out         B x (n_hard + n_random) int64: the hard part, then the random part, each -1 padded.
// Hard part: similarity_topk_cpu's cosine top n_hard with the positives excluded (its canonical scores).
// Random part: every candidate gets the key reference.mine_hard_negatives.random_keys(seed, b, id); per query the
// n_hard + n_random eligible candidates with the smallest keys (ties by id) are drawn, in key order, and the first
// n_random of them that are not hard are returned. A candidate's score is computed only when its key would enter
// the draw (about (n_hard + n_random) * (1 + ln(N / (n_hard + n_random))) candidates per query), with the same
// canonical cosine as the hard part, so both parts agree on max_score.
//
// Extra memory: the hard part's (similarity_topk.h) and, per query, the draw's n_hard + n_random (key, id) pairs,
// plus one prepared query row and one widened pool row per thread. Never B*N.
#pragma once

#include <cstdint>

#include "elva/common.h"

namespace elva {

struct MineHardNegativesStatus {
  int64_t nonfinite_queries = 0;  // NaN/Inf entries found in the queries (0 = fine)
  bool nonfinite_pool = false;    // a NaN/Inf entry was found in the pool
};

// On a non-finite input the output holds garbage and the caller must raise.
MineHardNegativesStatus mine_hard_negatives_cpu(const void* queries, int64_t query_stride, const void* pool,
                                                int64_t pool_stride, DType dtype, int64_t B, int64_t N, int64_t d,
                                                const int64_t* positives, int64_t positive_cols, int64_t n_hard,
                                                int64_t n_random, const float* max_score, uint32_t seed,
                                                int64_t* out);

}  // namespace elva
