#include "elva/rank_statistics.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "score_tiles.h"

namespace elva {

using namespace tiles;

RankStatisticsStatus rank_statistics_cpu(const void* queries, int64_t query_stride, const void* candidates,
                                         int64_t candidate_stride, DType dtype, int64_t B, int64_t N, int64_t d,
                                         Metric metric, const int64_t* positives, int64_t positive_cols,
                                         const int64_t* exclude, int64_t exclude_cols, int64_t* rank,
                                         float* pos_score, float* max_neg_score) {
  RankStatisticsStatus status;
  if (B <= 0) return status;
  const Kernel kernel = pick_kernel();
  const Widen widen_row = pick_widen();
  const Dot dot = pick_dot();
  // bf16 screening is twice as fast as fp32 but its error bound is ~40x wider; a positive in the dense middle of
  // the score distribution (untrained embeddings) then sends many pairs to the exact rescoring, so each thread
  // watches the rate of near-ties with the positive on its first block and falls back to the fp32 kernel if it
  // exceeds 1%.
  const bool screen = use_bf16_screen();
  const int64_t esize = static_cast<int64_t>(element_size(dtype));
  const auto* qbytes = static_cast<const char*>(queries);
  const auto* cbytes = static_cast<const char*>(candidates);
  const int64_t panels = (B + QP - 1) / QP;
  const bool parallel = B * N * std::max<int64_t>(d, 1) >= (int64_t{1} << 18);
  const bool cosine = metric == Metric::Cosine;
  const bool widen = dtype != DType::F32;
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();

  // Queries: prepared once (row-major for the canonical dot) and packed panel-major, exactly as similarity_topk.
  const int64_t d2 = (d + 1) / 2;
  std::vector<float> prepared_queries(static_cast<size_t>(B * d));
  std::vector<float> query_norms(static_cast<size_t>(B));
  std::vector<float> packed_queries(static_cast<size_t>(panels * QP * d), 0.0f);
  std::vector<uint16_t> packed_queries_bf16(screen ? static_cast<size_t>(panels * QP * 2 * d2) : 0, 0);
  int64_t bad_queries = 0;
#pragma omp parallel for schedule(static) if (parallel) reduction(+ : bad_queries)
  for (int64_t b = 0; b < B; ++b) {
    float* row = prepared_queries.data() + b * d;
    const int64_t bad = prepare_row(qbytes + b * query_stride * esize, dtype, d, metric, row);
    bad_queries += bad;
    if (bad) continue;
    query_norms[b] = std::sqrt(sum_of_squares(row, d));
    if (screen) {
      uint16_t* panel = packed_queries_bf16.data() + (b / QP) * d2 * 2 * QP + (b % QP) * 2;
      for (int64_t p = 0; p < d; ++p) panel[(p / 2) * 2 * QP + (p % 2)] = bf16_round(row[p]);
    }
    {
      float* panel = packed_queries.data() + (b / QP) * d * QP + b % QP;
      for (int64_t p = 0; p < d; ++p) panel[p * QP] = row[p];
    }
  }
  if (bad_queries) {
    status.nonfinite_queries = bad_queries;
    return status;
  }

  // Per row: the sorted valid positives, and the sorted unique members (positives and exclusions): the candidates
  // that are never negatives.
  const int64_t member_cols = positive_cols + (exclude ? exclude_cols : 0);
  std::vector<int64_t> members(static_cast<size_t>(B * std::max<int64_t>(member_cols, 1)));
  std::vector<int64_t> members_end(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    int64_t* out = members.data() + b * member_cols;
    int64_t count = 0;
    for (int64_t j = 0; j < positive_cols; ++j) {
      const int64_t id = positives[b * positive_cols + j];
      if (id >= 0 && id < N) out[count++] = id;
    }
    for (int64_t j = 0; exclude && j < exclude_cols; ++j) {
      const int64_t id = exclude[b * exclude_cols + j];
      if (id >= 0 && id < N) out[count++] = id;
    }
    std::sort(out, out + count);
    members_end[b] = std::unique(out, out + count) - out;
  }
  const auto is_member = [&](int64_t b, int64_t id) {
    const int64_t* first = members.data() + b * member_cols;
    return std::binary_search(first, first + members_end[b], id);
  };

  // The canonical score of (query b, candidate id), computed as the block pass does: the row widened to fp32, its
  // norm from sum_of_squares, dot / norm. Returns NaN for a non-finite row.
  const auto canonical_score = [&](int64_t b, int64_t id, float* scratch) {
    const char* src = cbytes + id * candidate_stride * esize;
    const float* values = reinterpret_cast<const float*>(src);
    if (widen) {
      widen_row(reinterpret_cast<const uint16_t*>(src), dtype, d, scratch);
      values = scratch;
    }
    const float squares = sum_of_squares(values, d);
    if (!std::isfinite(squares)) return nan;
    const float norm = cosine ? std::max(std::sqrt(squares), kEps) : 1.0f;
    const float raw = dot(prepared_queries.data() + b * d, values, d);
    return cosine ? raw / norm : raw;
  };

  // Best positive per row.
  std::vector<int64_t> best_id(static_cast<size_t>(B), -1);
  std::vector<float> best_score(static_cast<size_t>(B), -inf);
  bool bad_positive = false;
#pragma omp parallel if (parallel) reduction(|| : bad_positive)
  {
    std::vector<float> scratch(static_cast<size_t>(widen ? d : 0));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t j = 0; j < positive_cols; ++j) {
        const int64_t id = positives[b * positive_cols + j];
        if (id < 0 || id >= N) continue;
        const float score = canonical_score(b, id, scratch.data());
        if (std::isnan(score)) {
          bad_positive = true;
          continue;
        }
        if (best_id[b] < 0 || score > best_score[b] || (score == best_score[b] && id < best_id[b])) {
          best_score[b] = score;
          best_id[b] = id;
        }
      }
    }
  }
  if (bad_positive) {
    status.nonfinite_candidates = true;
    return status;
  }

  const ScreenBound bf16_error = screen_bound(d, true);
  const ScreenBound fp32_error = screen_bound(d, false);
  const int64_t max_threads = parallel ? std::max(1, omp_get_max_threads()) : 1;
  const int64_t blocks = (N + NB - 1) / NB;
  const bool split_candidates = panels < max_threads && blocks >= 2 * max_threads;
  const int64_t copies = split_candidates ? max_threads : 1;
  // Per copy: candidates ahead of the best positive (members included, corrected at the end) and the max negative.
  std::vector<int64_t> ahead(static_cast<size_t>(copies * B), 0);
  std::vector<float> top_negative(static_cast<size_t>(copies * B), -inf);

  std::vector<float> widened(widen ? static_cast<size_t>(max_threads * NB * d) : 0);
  std::vector<float> norms(static_cast<size_t>(max_threads * NB), 1.0f);
  std::vector<float> bound_c(static_cast<size_t>(max_threads * NB), 0.0f);
  std::vector<float> tiny_c(static_cast<size_t>(max_threads * NB), 0.0f);
  std::vector<uint16_t> rows_bf16(screen ? static_cast<size_t>(max_threads * NB * 2 * d2) : 0, 0);
  std::atomic<bool> bad_candidates{false};

#pragma omp parallel num_threads(max_threads) if (parallel)
  {
    const int64_t threads = omp_get_num_threads();
    const int64_t thread = omp_get_thread_num();
    std::vector<float> tile(static_cast<size_t>(NB * QP));
    std::vector<float> tail(static_cast<size_t>(CR * d), 0.0f);
    std::vector<uint16_t> tail_bf16(static_cast<size_t>(CR * 2 * d2), 0);
    float bound_q[QP], tiny_q[QP], target[QP], best_neg[QP], scaled[QP], slack[QP];
    int64_t target_id[QP], count[QP];
    bool use16 = screen;  // this thread's screening kernel (see above)
    int64_t blocks_seen = 0, pairs_seen = 0, pairs_rescored = 0;

    float* my_rows = widen ? widened.data() + thread * NB * d : nullptr;
    const int64_t slot0 = thread * NB;
    float* my_norms = norms.data() + slot0;
    uint16_t* my_rows16 = screen ? rows_bf16.data() + slot0 * 2 * d2 : nullptr;
    const int64_t block0 = split_candidates ? blocks * thread / threads : 0;
    const int64_t block1 = split_candidates ? blocks * (thread + 1) / threads : blocks;
    const int64_t panel0 = split_candidates ? 0 : panels * thread / threads;
    const int64_t panel1 = split_candidates ? panels : panels * (thread + 1) / threads;
    int64_t* my_ahead = ahead.data() + (split_candidates ? thread * B : 0);
    float* my_top = top_negative.data() + (split_candidates ? thread * B : 0);

    for (int64_t block = block0; block < block1 && panel0 < panel1; ++block) {
      if (bad_candidates.load(std::memory_order_relaxed)) break;
      const int64_t n0 = block * NB;
      const int64_t nb = std::min(NB, N - n0);
      // Widen, validate and norm the block's rows (as similarity_topk's prepare_block).
      bool bad = false;
      for (int64_t r = 0; r < nb; ++r) {
        const char* src = cbytes + (n0 + r) * candidate_stride * esize;
        const float* values_r = reinterpret_cast<const float*>(src);
        if (widen) {
          widen_row(reinterpret_cast<const uint16_t*>(src), dtype, d, my_rows + r * d);
          values_r = my_rows + r * d;
        }
        const float squares = sum_of_squares(values_r, d);
        if (!std::isfinite(squares)) {
          bad |= std::any_of(values_r, values_r + d, [](float v) { return !std::isfinite(v); });
        }
        const float length = std::sqrt(squares);
        my_norms[r] = cosine ? std::max(length, kEps) : 1.0f;
        bound_c[slot0 + r] = length / my_norms[r];
        tiny_c[slot0 + r] = (length + 1.0f) / my_norms[r];
        if (use16 && !bad) to_bf16_avx512(values_r, d, 2 * d2, my_rows16 + r * 2 * d2);
      }
      if (bad) {
        bad_candidates.store(true);
        break;
      }
      const float* rows = widen ? my_rows : reinterpret_cast<const float*>(cbytes + n0 * candidate_stride * esize);
      const int64_t ld = widen ? d : candidate_stride;
      const Block tiles_of_block = make_block(rows, ld, my_rows16, nb, d, use16, tail.data(), tail_bf16.data());
      for (int64_t panel = panel0; panel < panel1; ++panel) {
        score_panel(kernel, use16, packed_queries.data() + panel * d * QP, packed_queries_bf16.data() + panel * d2 * 2 * QP,
                    tiles_of_block, d, tile.data(), static_cast<int64_t>(tile.size()));
        // Padded query lanes get +inf targets, so they never count nor pass.
        for (int64_t i = 0; i < QP; ++i) {
          const int64_t b = panel * QP + i;
          const bool real = b < B;
          target[i] = real ? best_score[b] : inf;
          target_id[i] = real ? best_id[b] : 0;
          best_neg[i] = real ? my_top[b] : inf;
          const ScreenBound& error = use16 ? bf16_error : fp32_error;
          bound_q[i] = real ? error.scale * query_norms[b] : 0.0f;
          tiny_q[i] = real ? error.tiny * (query_norms[b] + 1.0f) : 0.0f;
          count[i] = 0;
        }
        for (int64_t j = 0; j < nb; ++j) {
          const float* t = tile.data() + j * QP;
          const float norm = my_norms[j];
          const float bc = bound_c[slot0 + j], tc = tiny_c[slot0 + j];
          int pass = 0;
          for (int64_t i = 0; i < QP; ++i) {
            scaled[i] = cosine ? t[i] / norm : t[i];
            slack[i] = bound_q[i] * bc + tiny_q[i] * tc;
            const bool above = scaled[i] - slack[i] > target[i];  // certainly ahead of the best positive
            count[i] += above;
            // Written so that a NaN/Inf screened score (an overflow) goes to the exact rescoring.
            pass |= (!(scaled[i] + slack[i] < target[i]) & !above) | !(scaled[i] + slack[i] <= best_neg[i]);
          }
          if (!pass) continue;
          const int64_t id = n0 + j;
          for (int64_t i = 0; i < QP; ++i) {
            const int64_t b = panel * QP + i;
            if (b >= B) break;
            const bool near = !(scaled[i] + slack[i] < target[i]) && !(scaled[i] - slack[i] > target[i]);
            const bool could_top = !(scaled[i] + slack[i] <= best_neg[i]);
            if (!near && !could_top) continue;
            pairs_rescored += near;  // the max-negative rescoring fades after the first blocks
            const float raw = dot(prepared_queries.data() + b * d, rows + j * ld, d);
            const float score = cosine ? raw / norm : raw;
            if (near && (score > target[i] || (score == target[i] && id < target_id[i]))) ++count[i];
            if (could_top && score > best_neg[i] && !is_member(b, id)) best_neg[i] = score;
          }
        }
        for (int64_t i = 0; i < QP; ++i) {
          const int64_t b = panel * QP + i;
          if (b >= B) break;
          my_ahead[b] += count[i];
          my_top[b] = best_neg[i];
        }
        pairs_seen += nb * std::min(QP, B - panel * QP);
      }
      if (use16 && ++blocks_seen == 1 && pairs_rescored * 100 > pairs_seen) use16 = false;
    }
  }
  if (bad_candidates.load()) {
    status.nonfinite_candidates = true;
    return status;
  }

  // Merge the copies, then take back the members (positives, exclusions) that were counted as ahead.
#pragma omp parallel if (parallel)
  {
    std::vector<float> scratch(static_cast<size_t>(widen ? d : 0));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      if (best_id[b] < 0) {
        rank[b] = 0;
        pos_score[b] = nan;
        max_neg_score[b] = nan;
        continue;
      }
      int64_t total = 0;
      float top = -inf;
      for (int64_t t = 0; t < copies; ++t) {
        total += ahead[t * B + b];
        top = std::max(top, top_negative[t * B + b]);
      }
      const int64_t* first = members.data() + b * member_cols;
      for (int64_t j = 0; j < members_end[b]; ++j) {
        const float score = canonical_score(b, first[j], scratch.data());
        if (score > best_score[b] || (score == best_score[b] && first[j] < best_id[b])) --total;
      }
      rank[b] = total + 1;
      pos_score[b] = best_score[b];
      max_neg_score[b] = top;
    }
  }
  return status;
}

}  // namespace elva
