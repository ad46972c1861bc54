#include "elva/mine_hard_negatives.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "elva/similarity_topk.h"
#include "score_tiles.h"

namespace elva {

using namespace tiles;

namespace {

uint32_t mix32(uint32_t x) {
  x = (x ^ (x >> 16)) * 0x45D9F3Bu;
  x = (x ^ (x >> 16)) * 0x45D9F3Bu;
  return x ^ (x >> 16);
}

// reference.mine_hard_negatives.random_keys with the query's part precomputed.
uint32_t random_key(uint32_t row_hash, int64_t id) {
  const uint32_t h = mix32(row_hash ^ static_cast<uint32_t>(id));
  return mix32(h ^ static_cast<uint32_t>(static_cast<uint64_t>(id) >> 32));
}

// (key, id) in the draw's order: the smallest key first, ties by the smaller id.
using Drawn = std::pair<uint32_t, int64_t>;

}  // namespace

MineHardNegativesStatus mine_hard_negatives_cpu(const void* queries, int64_t query_stride, const void* pool,
                                                int64_t pool_stride, DType dtype, int64_t B, int64_t N, int64_t d,
                                                const int64_t* positives, int64_t positive_cols, int64_t n_hard,
                                                int64_t n_random, const float* max_score, uint32_t seed,
                                                int64_t* out) {
  MineHardNegativesStatus status;
  const int64_t width = n_hard + n_random;
  std::fill(out, out + B * width, int64_t{-1});
  if (B <= 0 || width == 0) return status;
  const int64_t hard = std::min(n_hard, N);
  std::vector<int64_t> hard_ids(static_cast<size_t>(B * hard));
  if (hard > 0) {
    std::vector<float> hard_values(static_cast<size_t>(B * hard));
    const SimilarityTopkStatus topk = similarity_topk_cpu(queries, query_stride, pool, pool_stride, dtype, B, N, d,
                                                          hard, Metric::Cosine, positives, positive_cols, max_score,
                                                          hard_values.data(), hard_ids.data());
    status.nonfinite_queries = topk.nonfinite_queries;
    status.nonfinite_pool = topk.nonfinite_candidates;
    if (status.nonfinite_queries || status.nonfinite_pool) return status;
    for (int64_t b = 0; b < B; ++b) std::copy_n(hard_ids.data() + b * hard, hard, out + b * width);
  }
  if (n_random == 0) return status;

  const Dot dot = pick_dot();
  const int64_t esize = static_cast<int64_t>(element_size(dtype));
  const auto* qbytes = static_cast<const char*>(queries);
  const auto* pbytes = static_cast<const char*>(pool);
  const int64_t keep = std::min(width, N);
  int64_t bad_queries = 0;
  bool bad_pool = false;
  if (hard == 0) {  // no score was computed: check the pool (the queries are checked as they are prepared)
#pragma omp parallel
    {
      std::vector<float> row(static_cast<size_t>(d));
      bool bad = false;
#pragma omp for schedule(static)
      for (int64_t n = 0; n < N; ++n) bad |= prepare_row(pbytes + n * pool_stride * esize, dtype, d, Metric::Dot,
                                                         row.data()) != 0;
#pragma omp critical
      bad_pool |= bad;
    }
    if (bad_pool) {
      status.nonfinite_pool = true;
      return status;
    }
  }
#pragma omp parallel reduction(+ : bad_queries)
  {
    std::vector<float> query(static_cast<size_t>(d)), candidate(static_cast<size_t>(d));
    std::vector<Drawn> drawn;
    drawn.reserve(static_cast<size_t>(keep));
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t bad = prepare_row(qbytes + b * query_stride * esize, dtype, d, Metric::Cosine, query.data());
      bad_queries += bad;
      if (bad) continue;
      const int64_t* listed = positives + b * positive_cols;
      const uint32_t row_hash = mix32(mix32(seed) ^ static_cast<uint32_t>(b));
      drawn.clear();  // a max-heap: its front is the largest (key, id) drawn so far
      for (int64_t n = 0; n < N; ++n) {
        const Drawn entry{random_key(row_hash, n), n};
        if (static_cast<int64_t>(drawn.size()) == keep && !(entry < drawn.front())) continue;
        if (std::find(listed, listed + positive_cols, n) != listed + positive_cols) continue;
        if (max_score != nullptr) {
          // The canonical cosine of similarity_topk_cpu: prepared query . raw row / max(||row||, eps).
          prepare_row(pbytes + n * pool_stride * esize, dtype, d, Metric::Dot, candidate.data());
          const float norm = std::max(std::sqrt(sum_of_squares(candidate.data(), d)), kEps);
          if (dot(query.data(), candidate.data(), d) / norm > max_score[b]) continue;
        }
        if (static_cast<int64_t>(drawn.size()) == keep) {
          std::pop_heap(drawn.begin(), drawn.end());
          drawn.back() = entry;
        } else {
          drawn.push_back(entry);
        }
        std::push_heap(drawn.begin(), drawn.end());
      }
      std::sort_heap(drawn.begin(), drawn.end());
      // The first n_random drawn that are not hard (the draw holds n_hard + n_random, so there are enough).
      const int64_t* row_hard = hard_ids.data() + b * hard;
      int64_t* row_out = out + b * width + n_hard;
      int64_t taken = 0;
      for (const Drawn& entry : drawn) {
        if (taken == n_random) break;
        if (std::find(row_hard, row_hard + hard, entry.second) == row_hard + hard) row_out[taken++] = entry.second;
      }
    }
  }
  status.nonfinite_queries = bad_queries;
  return status;
}

}  // namespace elva
