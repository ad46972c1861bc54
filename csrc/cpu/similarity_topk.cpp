#include "elva/similarity_topk.h"

#include "score_tiles.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

// GCC 12 warns inside its own AVX-512 headers (_mm512_undefined_*); nothing of ours.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace elva {
namespace {

using namespace tiles;

// ---------------------------------------------------------------- running top-k per query

struct Entry {
  float score;
  int64_t index;
};

// The total order: score descending, then index ascending.
inline bool better(const Entry& a, const Entry& b) {
  return a.score > b.score || (a.score == b.score && a.index < b.index);
}

// A buffer of candidates that beat `threshold`; when full it is cut back to its k best and the threshold becomes
// the k-th best score. A query's candidates arrive in ascending index order, so a later candidate that only ties
// the threshold loses to it: the filter is one `score > threshold` compare.
struct TopkState {
  Entry* entries;
  int64_t size;
  float threshold;
};

void cut_to_k(TopkState& state, int64_t k) {
  std::nth_element(state.entries, state.entries + (k - 1), state.entries + state.size, better);
  state.size = k;
  state.threshold = state.entries[k - 1].score;
}

}  // namespace

SimilarityTopkStatus similarity_topk_cpu(const void* queries, int64_t query_stride, const void* candidates,
                                         int64_t candidate_stride, DType dtype, int64_t B, int64_t N, int64_t d,
                                         int64_t k, Metric metric, const int64_t* exclude, int64_t exclude_cols,
                                         const float* max_score, float* values, int64_t* indices) {
  SimilarityTopkStatus status;
  if (B <= 0) return status;
  const Kernel kernel = pick_kernel();
  const Widen widen_row = pick_widen();
  const int64_t esize = static_cast<int64_t>(element_size(dtype));
  const auto* qbytes = static_cast<const char*>(queries);
  const auto* cbytes = static_cast<const char*>(candidates);
  const int64_t panels = (B + QP - 1) / QP;
  const bool parallel = B * N * std::max<int64_t>(d, 1) >= (int64_t{1} << 18);
  const bool cosine = metric == Metric::Cosine;

  // Queries: prepared once (kept row-major for rescoring, with their norms) and packed panel-major [panel][d][QP]
  // in fp32, or [panel][d/2][QP][2] in bf16 when screening, zero rows past B.
  const bool screen = use_bf16_screen();
  const Dot dot = pick_dot();
  const int64_t d2 = (d + 1) / 2;  // bf16 pairs per row; odd d is padded with a zero
  std::vector<float> prepared_queries(static_cast<size_t>(B * d));
  std::vector<float> query_norms(static_cast<size_t>(B));
  std::vector<float> packed_queries(screen ? 0 : static_cast<size_t>(panels * QP * d), 0.0f);
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
    } else {
      float* panel = packed_queries.data() + (b / QP) * d * QP + b % QP;
      for (int64_t p = 0; p < d; ++p) panel[p * QP] = row[p];
    }
  }
  if (bad_queries) {
    status.nonfinite_queries = bad_queries;
    return status;
  }
  // The screening error bound (score_tiles.h).
  const ScreenBound screen_error = screen_bound(d, screen);
  const float bound_scale = screen_error.scale;
  const float tiny_scale = screen_error.tiny;

  // Exclusions: each row's valid ids, sorted, for a binary search on the rare candidates that pass the threshold.
  std::vector<int64_t> excluded;
  std::vector<int64_t> excluded_end;
  if (exclude != nullptr && exclude_cols > 0) {
    excluded.resize(static_cast<size_t>(B * exclude_cols));
    excluded_end.resize(static_cast<size_t>(B));
    for (int64_t b = 0; b < B; ++b) {
      int64_t* out = excluded.data() + b * exclude_cols;
      int64_t count = 0;
      for (int64_t j = 0; j < exclude_cols; ++j) {
        const int64_t id = exclude[b * exclude_cols + j];
        if (id >= 0 && id < N) out[count++] = id;
      }
      std::sort(out, out + count);
      excluded_end[b] = count;
    }
  }
  const auto is_excluded = [&](int64_t b, int64_t id) {
    if (excluded_end.empty()) return false;
    const int64_t* first = excluded.data() + b * exclude_cols;
    return std::binary_search(first, first + excluded_end[b], id);
  };

  const int64_t max_threads = parallel ? std::max(1, omp_get_max_threads()) : 1;
  const int64_t blocks = (N + NB - 1) / NB;
  // Few query panels: the threads split the candidates instead, each with its own top-k buffers, merged at the end.
  const bool split_candidates = panels < max_threads && blocks >= 2 * max_threads;
  const int64_t copies = split_candidates ? max_threads : 1;

  // Running top-k buffers: k + slack entries per query (and per thread when the candidates are split).
  const int64_t capacity = k + std::min<int64_t>(std::max<int64_t>(k, 256), 16384);
  std::vector<Entry> entries(static_cast<size_t>(copies * B * capacity));
  std::vector<TopkState> states(static_cast<size_t>(copies * B));
  for (int64_t b = 0; b < copies * B; ++b) {
    states[b] = {entries.data() + b * capacity, 0, -std::numeric_limits<float>::infinity()};
  }

  // Per thread and block: the candidate norms, the rows widened to fp32 (fp16/bf16) and rounded to bf16 (screening).
  const bool widen = dtype != DType::F32;
  const int64_t buffers = max_threads;
  std::vector<float> widened(widen ? static_cast<size_t>(buffers * NB * d) : 0);
  std::vector<float> norms(static_cast<size_t>(buffers * NB), 1.0f);
  // Per candidate: the screening bound's factors ||c|| / divisor and (||c|| + 1) / divisor (divisor = the cosine norm).
  std::vector<float> bound_c(static_cast<size_t>(buffers * NB), 0.0f);
  std::vector<float> tiny_c(static_cast<size_t>(buffers * NB), 0.0f);
  std::vector<uint16_t> rows_bf16(screen ? static_cast<size_t>(buffers * NB * 2 * d2) : 0, 0);
  std::atomic<int64_t> first_bad_block{blocks};
  const float inf = std::numeric_limits<float>::infinity();
  const auto flag_bad = [&](int64_t block) {
    int64_t seen = first_bad_block.load();
    while (block < seen && !first_bad_block.compare_exchange_weak(seen, block)) {
    }
  };

#pragma omp parallel num_threads(max_threads) if (parallel)
  {
    const int64_t threads = omp_get_num_threads();
    const int64_t thread = omp_get_thread_num();
    std::vector<float> tile(static_cast<size_t>(NB * QP));
    std::vector<float> tail(static_cast<size_t>(CR * d), 0.0f);  // the block's last, partial group, zero-padded
    std::vector<uint16_t> tail_bf16(static_cast<size_t>(CR * 2 * d2), 0);
    float bound_q[QP], tiny_q[QP];
    float threshold[QP], limit[QP], scaled[QP];

    // Rows [r0, r1) of the block at n0: widened (fp16/bf16) into block_rows, normed; returns whether one holds a
    // NaN/Inf (the sum of squares is then not finite, so finite rows pay one fused reduction for the check).
    const auto prepare_block = [&](int64_t n0, int64_t r0, int64_t r1, float* block_rows, float* block_norms) {
      bool bad = false;
      for (int64_t r = r0; r < r1; ++r) {
        const char* src = cbytes + (n0 + r) * candidate_stride * esize;
        const float* values_r = reinterpret_cast<const float*>(src);
        if (widen) {
          widen_row(reinterpret_cast<const uint16_t*>(src), dtype, d, block_rows + r * d);
          values_r = block_rows + r * d;
        }
        const float squares = sum_of_squares(values_r, d);
        if (!std::isfinite(squares)) {
          bad |= std::any_of(values_r, values_r + d, [](float v) { return !std::isfinite(v); });
        }
        const float length = std::sqrt(squares);
        block_norms[r] = cosine ? std::max(length, kEps) : 1.0f;
        const int64_t slot = block_norms - norms.data() + r;
        bound_c[slot] = length / block_norms[r];
        tiny_c[slot] = (length + 1.0f) / block_norms[r];
        if (screen && !bad) to_bf16_avx512(values_r, d, 2 * d2, rows_bf16.data() + slot * 2 * d2);
      }
      return bad;
    };

    // Scores query panels [panel0, panel1) against the block and folds the tiles into `my_states` (B entries).
    const auto score_block = [&](int64_t n0, int64_t nb, const float* rows, int64_t ld, const float* block_norms,
                                 int64_t panel0, int64_t panel1, TopkState* my_states) {
      const int64_t slot0 = block_norms - norms.data();
      const Block block = make_block(rows, ld, rows_bf16.data() + slot0 * 2 * d2, nb, d, screen, tail.data(),
                                     tail_bf16.data());
      for (int64_t panel = panel0; panel < panel1; ++panel) {
        score_panel(kernel, screen, packed_queries.data() + panel * d * QP, packed_queries_bf16.data() + panel * d2 * 2 * QP,
                    block, d, tile.data(), static_cast<int64_t>(tile.size()));
        // Fold the tile into the running top-k of the panel's queries; padded query lanes never pass.
        for (int64_t i = 0; i < QP; ++i) {
          const int64_t b = panel * QP + i;
          threshold[i] = b < B ? my_states[b].threshold : inf;
          limit[i] = b < B && max_score ? max_score[b] : inf;
          bound_q[i] = b < B ? bound_scale * query_norms[b] : 0.0f;
          tiny_q[i] = b < B ? tiny_scale * (query_norms[b] + 1.0f) : 0.0f;
        }
        for (int64_t j = 0; j < nb; ++j) {
          const float* t = tile.data() + j * QP;
          const float norm = block_norms[j];
          const float bc = bound_c[slot0 + j], tc = tiny_c[slot0 + j];
          int pass = 0;
          for (int64_t i = 0; i < QP; ++i) {
            scaled[i] = cosine ? t[i] / norm : t[i];
            const float bound = bound_q[i] * bc + tiny_q[i] * tc;
            // Written so that a NaN/Inf screened score (an overflow) passes to the exact rescoring.
            pass |= !(scaled[i] + bound <= threshold[i]) & !(scaled[i] - bound > limit[i]);
          }
          if (!pass) continue;
          const int64_t id = n0 + j;
          for (int64_t i = 0; i < QP; ++i) {
            const float bound = bound_q[i] * bc + tiny_q[i] * tc;
            if (scaled[i] + bound <= threshold[i] || scaled[i] - bound > limit[i]) continue;
            const int64_t b = panel * QP + i;
            if (b >= B) continue;
            // The candidate may belong: its canonical score decides.
            const float raw = dot(prepared_queries.data() + b * d, rows + j * ld, d);
            const float score = cosine ? raw / norm : raw;
            if (!(score > threshold[i] && score <= limit[i])) continue;
            if (is_excluded(b, id)) continue;
            TopkState& state = my_states[b];
            state.entries[state.size++] = {score, id};
            if (state.size == capacity) {
              cut_to_k(state, k);
              threshold[i] = state.threshold;
            }
          }
        }
      }
    };

    // Each thread validates and converts every block it scores itself (no modified cache lines cross cores, no
    // barrier): split candidates = my blocks x all panels; split queries = all blocks x my panels.
    float* my_rows = widen ? widened.data() + thread * NB * d : nullptr;
    float* my_norms = norms.data() + thread * NB;
    const int64_t block0 = split_candidates ? blocks * thread / threads : 0;
    const int64_t block1 = split_candidates ? blocks * (thread + 1) / threads : blocks;
    const int64_t panel0 = split_candidates ? 0 : panels * thread / threads;
    const int64_t panel1 = split_candidates ? panels : panels * (thread + 1) / threads;
    TopkState* my_states = states.data() + (split_candidates ? thread * B : 0);
    for (int64_t block = block0; block < block1 && panel0 < panel1; ++block) {
      if (first_bad_block.load() < blocks) break;
      const int64_t n0 = block * NB;
      const int64_t nb = std::min(NB, N - n0);
      if (prepare_block(n0, 0, nb, my_rows, my_norms)) {
        flag_bad(block);
        break;
      }
      const float* rows = widen ? my_rows : reinterpret_cast<const float*>(cbytes + n0 * candidate_stride * esize);
      score_block(n0, nb, rows, widen ? d : candidate_stride, my_norms, panel0, panel1, my_states);
    }
  }
  if (first_bad_block.load() < blocks) {
    status.nonfinite_candidates = true;
    return status;
  }

  // Merge the per-thread buffers (split candidates), sort each query's survivors; -inf / -1 fill the tail.
  std::vector<Entry> merged(split_candidates ? static_cast<size_t>(copies * k) : 0);
#pragma omp parallel for schedule(static) if (parallel && !split_candidates)
  for (int64_t b = 0; b < B; ++b) {
    Entry* best = nullptr;
    int64_t count = 0;
    if (split_candidates) {
      for (int64_t t = 0; t < copies; ++t) {
        TopkState& state = states[t * B + b];
        if (state.size > k) cut_to_k(state, k);
        std::copy_n(state.entries, state.size, merged.data() + count);
        count += state.size;
      }
      best = merged.data();
    } else {
      best = states[b].entries;
      count = states[b].size;
    }
    if (count > k) {
      std::nth_element(best, best + (k - 1), best + count, better);
      count = k;
    }
    std::sort(best, best + count, better);
    for (int64_t j = 0; j < k; ++j) {
      const bool real = j < count;
      values[b * k + j] = real ? best[j].score : -std::numeric_limits<float>::infinity();
      indices[b * k + j] = real ? best[j].index : -1;
    }
  }
  return status;
}

}  // namespace elva
