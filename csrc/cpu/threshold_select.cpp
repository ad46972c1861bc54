// CPU twin of csrc/cuda/threshold_select.cu (see elva/threshold_select.h): the same rule per score, survivors
// appended in candidate order, so a row's buffer is deterministic here and an arrival-order permutation of it
// on the GPU.
#include "elva/threshold_select.h"

#include <limits>

namespace elva {

void threshold_select_cpu(const ThresholdChunk& chunk) {
  bool any_nonfinite = false;
#pragma omp parallel for schedule(static) reduction(|| : any_nonfinite)
  for (int64_t row = 0; row < chunk.rows; ++row) {
    const float* products = chunk.products + row * chunk.ld;
    const float query_scale = chunk.query_scale[row];
    const float threshold = chunk.threshold[row];
    const float limit = chunk.max_score ? chunk.max_score[row] : std::numeric_limits<float>::infinity();
    const float* candidate_scale = chunk.candidate_scale + chunk.first_candidate;
    int64_t count = chunk.count[row];
    for (int64_t t = 0; t < chunk.cols; ++t) {
      const float score = threshold_score(products[t], query_scale, candidate_scale[t]);
      any_nonfinite = any_nonfinite || threshold_nonfinite(score);
      if (!threshold_survives(score, threshold, limit)) continue;
      if (count < chunk.capacity) {
        chunk.scores[row * chunk.capacity + count] = score;
        chunk.ids[row * chunk.capacity + count] = static_cast<int32_t>(chunk.first_candidate + t);
      }
      ++count;
    }
    chunk.count[row] = static_cast<int32_t>(count);
  }
  if (any_nonfinite) *chunk.nonfinite = 1;
}

}  // namespace elva
