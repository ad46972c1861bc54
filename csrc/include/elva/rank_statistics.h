// Rank statistics of each query's best positive over a candidate pool, torch-free interface (the CPU backend of
// elva::rank_statistics).
//
// Layout (as similarity_topk.h):
//   queries     B rows of d elements of `dtype`; row b starts at element b * query_stride (unit-stride rows).
//   candidates  N rows of d elements of `dtype`; row n starts at element n * candidate_stride.
//   positives   B x m int64 (row-major, contiguous), -1 = padding. Every row must list one id in [0, N) (the binding
//               checks; ids outside [0, N) are ignored here, and a row without one gets rank 0 and NaN scores).
//   exclude     nullptr, or B x m' int64: ids removed from the negatives (a listed positive stays a positive).
//   rank        B int64 out: 1 + the number of candidates that are neither a positive nor excluded for the row and
//               come ahead of the best positive in the total order (score descending, then index ascending).
//   pos_score   B fp32 out: the best positive's score (the highest; ties go to the smaller id).
//   max_neg     B fp32 out: the highest score among non-positive, non-excluded candidates; -inf when none.
// Scores are the canonical fp32 scores of similarity_topk_cpu (same preparation, same reduction), so a candidate
// identical to the best positive ties it bitwise and the ranks agree exactly with similarity_topk_cpu's top-k. A
// fast kernel screens each pair; pairs whose screened score is within the proven error bound of the best positive's
// score (or of the running max negative) are rescored canonically, the others are counted or skipped.
//
// bf16 screening (AVX512_BF16) has a ~40x wider bound than fp32 screening, so each thread falls back to the fp32
// kernel when more than 1% of its first block's pairs are near-ties with the positive (untrained embeddings).
//
// Extra memory: B*d fp32 prepared queries plus their packed fp32 copy (and a bf16 one), the sorted positive and
// exclude ids (B*(m+m') int64), per thread one candidate block of 264 rows and a 264 x 32 score tile, and per
// thread B counters and maxima when the threads split the candidates. Never B*N.
#pragma once

#include <cstdint>

#include "elva/common.h"
#include "elva/similarity_topk.h"  // Metric

namespace elva {

struct RankStatisticsStatus {
  int64_t nonfinite_queries = 0;      // NaN/Inf entries found in the queries (0 = fine)
  bool nonfinite_candidates = false;  // a NaN/Inf entry was found in the candidates (the pass stops early)
};

// On a non-finite input the outputs hold garbage and the caller must raise.
RankStatisticsStatus rank_statistics_cpu(const void* queries, int64_t query_stride, const void* candidates,
                                         int64_t candidate_stride, DType dtype, int64_t B, int64_t N, int64_t d,
                                         Metric metric, const int64_t* positives, int64_t positive_cols,
                                         const int64_t* exclude, int64_t exclude_cols, int64_t* rank,
                                         float* pos_score, float* max_neg_score);

}  // namespace elva
