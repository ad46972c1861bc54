// CPU twin of csrc/cuda/rank_count_select.cu (see elva/rank_count_select.h): the same runs, the same two rules.
#include "elva/rank_count_select.h"

#include <algorithm>
#include <limits>

namespace elva {

void rank_count_select_cpu(const RankCountChunk& chunk) {
  bool any_nonfinite = false;
#pragma omp parallel for schedule(static) reduction(|| : any_nonfinite)
  for (int64_t row = 0; row < chunk.rows; ++row) {
    const float* products = chunk.products + row * chunk.ld;
    const float* candidate_scale = chunk.candidate_scale + chunk.first_candidate;
    const int32_t* listed = chunk.listed + row * chunk.listed_width;
    const int32_t* listed_end = listed + chunk.listed_width;
    const float query_scale = chunk.query_scale[row];
    const float pos_score = chunk.pos_score[row], pos_below = chunk.pos_below[row];
    const int32_t pos_id = chunk.pos_id[row];
    int64_t ahead = chunk.ahead[row];
    float best = -std::numeric_limits<float>::infinity();
    for (int64_t run = 0; run < chunk.cols; run += kRankRun) {
      const int64_t run_cols = std::min<int64_t>(kRankRun, chunk.cols - run);
      const int64_t first_id = chunk.first_candidate + run, end_id = first_id + run_cols;
      while (listed < listed_end && *listed < first_id) ++listed;
      if (run_cols == kRankRun && (listed == listed_end || *listed >= end_id)) {
        const float bound = rank_run_bound(end_id, pos_id, pos_score, pos_below);
        for (int64_t t = run; t < run + run_cols; ++t) {
          const float score = threshold_score(products[t], query_scale, candidate_scale[t]);
          any_nonfinite = any_nonfinite || threshold_nonfinite(score);
          ahead += score > bound;
          best = std::max(best, score);
        }
        continue;
      }
      const int32_t* next = listed;
      for (int64_t t = run; t < run + run_cols; ++t) {
        const int64_t id = chunk.first_candidate + t;
        const float score = threshold_score(products[t], query_scale, candidate_scale[t]);
        any_nonfinite = any_nonfinite || threshold_nonfinite(score);
        while (next < listed_end && *next < id) ++next;
        if (next < listed_end && *next == id) continue;  // a positive or an excluded id
        ahead += rank_beats(score, id, pos_score, pos_id);
        best = std::max(best, score);
      }
    }
    chunk.ahead[row] = static_cast<int32_t>(ahead);
    chunk.max_neg_key[row] = std::max(chunk.max_neg_key[row], rank_orderable(best));
  }
  if (any_nonfinite) *chunk.nonfinite = 1;
}

}  // namespace elva
