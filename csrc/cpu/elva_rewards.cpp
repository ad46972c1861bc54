#include "elva/elva_rewards.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "score_tiles.h"  // prepare_row: the fp32 row preparation shared by the CPU kernels

namespace elva {
namespace {

// Below this many multiply-adds, starting the OpenMP team costs more than the work.
constexpr int64_t kParallelMinWork = 1 << 16;

// The score of two prepared rows: exact fp32 products summed in float64 (8 independent lanes, so that the loop
// vectorises), rounded once to fp32. Any summation order gives the same fp32 score unless the float64 sum lies
// within ~1e-16 of a rounding boundary; identical rows always score equal.
float dot_f64(const float* a, const float* b, int64_t d) {
  constexpr int kLanes = 8;
  double lanes[kLanes] = {};
  const int64_t body = d - d % kLanes;
  for (int64_t i = 0; i < body; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) lanes[k] += static_cast<double>(a[i + k]) * static_cast<double>(b[i + k]);
  }
  for (int64_t i = body; i < d; ++i) lanes[i - body] += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  const double sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  return static_cast<float>(sum);
}

struct Entry {
  float score;
  int32_t index;
};

// The total order: score descending, then index ascending (-0.0 and +0.0 compare equal, as in the reference).
inline bool ahead(const Entry& x, const Entry& y) {
  return x.score > y.score || (x.score == y.score && x.index < y.index);
}

struct Layout {
  const char* query;
  int64_t q_sb, q_sg;  // byte strides
  const char* cand;
  int64_t c_sb, c_sg, c_sc;  // byte strides (c_sg unused when shared)
  bool shared;
  DType dtype;
  int64_t B, G, C, d;
  const int64_t* positive;
  const bool* mask;
  int64_t m_sb, m_sg, m_sc;

  bool real(int64_t b, int64_t g, int64_t c) const {
    return mask == nullptr || mask[b * m_sb + g * m_sg + c * m_sc];
  }
};

// Rewards of one (query, rollout) from its fp32 scores s[0, C). log_rank[j] = log(j + 1) / ln(log_base).
// Writes the float outputs and returns the float64 total.
double rewards_of_row(const Layout& L, int64_t b, int64_t g, const float* s, const double* log_rank,
                      const ElvaRewardsOptions& o, std::vector<Entry>& order, float* margin_out,
                      float* rank_reward_out, int64_t* rank_out) {
  const int64_t p = L.positive[b];
  order.clear();
  for (int64_t c = 0; c < L.C; ++c) {
    if (L.real(b, g, c)) order.push_back({s[c], static_cast<int32_t>(c)});
  }
  std::sort(order.begin(), order.end(), ahead);
  const double s_p = static_cast<double>(s[p]);
  double s_top = 0.0;
  bool top_found = false;
  int64_t r = 0;
  double penalty = 0.0;
  for (size_t j = 0; j < order.size(); ++j) {
    if (order[j].index == p) {
      r = static_cast<int64_t>(j) + 1;
      continue;
    }
    const double sc = static_cast<double>(order[j].score);
    if (!top_found) {
      s_top = sc;
      top_found = true;
    }
    penalty += sc * (log_rank[j] - 1.0);
  }
  const double margin = std::max(s_p - s_top - o.delta, 0.0);
  const double rank_reward = s_p / (1.0 + log_rank[r - 1]) - o.gamma * penalty;
  *margin_out = static_cast<float>(margin);
  *rank_reward_out = static_cast<float>(rank_reward);
  *rank_out = r;
  return o.alpha * margin + o.eps * rank_reward;
}

// The cheap checks on positive_index and mask, in the reference's order. Returns false on the first failure.
bool check_structure(const Layout& L, ElvaRewardsStatus& status) {
  for (int64_t b = 0; b < L.B; ++b) {
    if (L.positive[b] < 0 || L.positive[b] >= L.C) {
      status.error = ElvaRewardsError::PositiveOutOfRange;
      status.error_value = L.positive[b];
      return false;
    }
  }
  if (L.mask != nullptr) {
    for (int64_t b = 0; b < L.B; ++b) {
      for (int64_t g = 0; g < L.G; ++g) {
        if (!L.real(b, g, L.positive[b])) {
          status.error = ElvaRewardsError::MaskHidesPositive;
          status.error_b = b;
          status.error_g = g;
          return false;
        }
      }
    }
  }
  // The positive is real, so a second real candidate is a negative.
  for (int64_t b = 0; b < L.B; ++b) {
    for (int64_t g = 0; g < L.G; ++g) {
      int64_t count = 0;
      for (int64_t c = 0; c < L.C && count < 2; ++c) count += L.real(b, g, c) ? 1 : 0;
      if (count < 2) {
        status.error = ElvaRewardsError::NoNegative;
        status.error_b = b;
        status.error_g = g;
        return false;
      }
    }
  }
  return true;
}

// x - mean(x) over n values, exactly 0 when they are all equal (reference.deviation).
void deviation(const double* x, int64_t n, double* out) {
  double sum = 0.0, lo = x[0], hi = x[0];
  for (int64_t i = 0; i < n; ++i) {
    sum += x[i];
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  const double mean = sum / static_cast<double>(n);
  for (int64_t i = 0; i < n; ++i) out[i] = lo == hi ? 0.0 : x[i] - mean;
}

void advantages_of(const double* totals, int64_t B, int64_t G, const ElvaRewardsOptions& o, float* advantages) {
  // "batch": the std of every reward about the batch mean (the centring itself stays per group).
  double batch_std = 0.0;
  bool batch_positive = false;
  if (o.advantage == AdvantageMode::Batch) {
    std::vector<double> spread(static_cast<size_t>(B * G));
    deviation(totals, B * G, spread.data());
    double squares = 0.0;
    for (double v : spread) squares += v * v;
    const double var = squares / static_cast<double>(std::max<int64_t>(B * G - 1, 1));
    batch_positive = var > 0;
    batch_std = std::sqrt(var);
  }
#pragma omp parallel if (B * G >= kParallelMinWork)
  {
    std::vector<double> centered(static_cast<size_t>(G));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      deviation(totals + b * G, G, centered.data());
      bool positive = true;
      double std = 0.0;
      if (o.advantage == AdvantageMode::Group) {
        double squares = 0.0;
        for (int64_t g = 0; g < G; ++g) squares += centered[g] * centered[g];
        const double var = squares / static_cast<double>(std::max<int64_t>(G - 1, 1));
        positive = var > 0;
        std = std::sqrt(var);
      } else if (o.advantage == AdvantageMode::Batch) {
        positive = batch_positive;
        std = batch_std;
      }
      for (int64_t g = 0; g < G; ++g) {
        double a = centered[g];
        if (o.advantage != AdvantageMode::None) a = positive ? centered[g] / (std + o.adv_eps) : 0.0;
        advantages[b * G + g] = static_cast<float>(a);
      }
    }
  }
}

}  // namespace

ElvaRewardsStatus elva_rewards_cpu(const void* query, const int64_t query_strides[2], const void* cand,
                                   const int64_t cand_strides[3], bool shared_candidates, DType dtype, int64_t B,
                                   int64_t G, int64_t C, int64_t d, const int64_t* positive, const bool* mask,
                                   const int64_t mask_strides[3], const ElvaRewardsOptions& options, float* total,
                                   float* margin, float* rank_reward, int64_t* rank, float* advantages,
                                   float* scores) {
  ElvaRewardsStatus status;
  if (B <= 0 || G <= 0) return status;
  const int64_t esize = static_cast<int64_t>(element_size(dtype));
  Layout L{static_cast<const char*>(query),
           query_strides[0] * esize,
           query_strides[1] * esize,
           static_cast<const char*>(cand),
           cand_strides[0] * esize,
           shared_candidates ? 0 : cand_strides[1] * esize,
           cand_strides[2] * esize,
           shared_candidates,
           dtype,
           B,
           G,
           C,
           d,
           positive,
           mask,
           mask ? mask_strides[0] : 0,
           mask ? mask_strides[1] : 0,
           mask ? mask_strides[2] : 0};
  // On a structural error the pass below only counts NaN/Inf entries (they take precedence, as in the reference).
  const bool compute = check_structure(L, status);

  std::vector<double> log_rank(static_cast<size_t>(std::max<int64_t>(C, 1)));
  const double ln_base = std::log(options.log_base);
  for (int64_t j = 0; j < C; ++j) log_rank[j] = std::log(static_cast<double>(j + 1)) / ln_base;
  std::vector<double> totals(static_cast<size_t>(B * G));

  // Tasks: (query, block of rollouts). Per-rollout candidates: one rollout per task. Shared candidates: all the
  // rollouts of a query in one task (each candidate row normalised once and scored against every rollout), split
  // into blocks only when there are fewer queries than threads (each block then normalises the rows again).
  const int64_t threads = omp_get_max_threads();
  const int64_t blocks = shared_candidates ? std::min(G, std::max<int64_t>(1, (threads + B - 1) / B)) : G;
  const int64_t block_size = (G + blocks - 1) / blocks;
  const int64_t tasks = B * blocks;
  int64_t nonfinite_query = 0, nonfinite_cand = 0;
  const bool parallel = B * G * C * std::max<int64_t>(d, 1) >= kParallelMinWork && tasks > 1;

#pragma omp parallel if (parallel) reduction(+ : nonfinite_query, nonfinite_cand)
  {
    std::vector<float> qrows(static_cast<size_t>(block_size * d));
    std::vector<float> crow(static_cast<size_t>(d));
    std::vector<float> s(static_cast<size_t>(block_size * C));
    std::vector<Entry> order;
    order.reserve(static_cast<size_t>(C));
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / blocks;
      const int64_t g0 = (task % blocks) * block_size;
      const int64_t g1 = std::min(G, g0 + block_size);
      if (g0 >= g1) continue;
      int64_t bad = 0;
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t n = tiles::prepare_row(L.query + b * L.q_sb + g * L.q_sg, dtype, d, Metric::Cosine,
                                             qrows.data() + (g - g0) * d);
        nonfinite_query += n;
        bad += n;
      }
      if (shared_candidates) {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t n =
              tiles::prepare_row(L.cand + b * L.c_sb + c * L.c_sc, dtype, d, Metric::Cosine, crow.data());
          if (g0 == 0) nonfinite_cand += n;  // every block reads the same rows: count them once
          bad += n;
          if (bad != 0 || !compute) continue;
          for (int64_t g = g0; g < g1; ++g) s[(g - g0) * C + c] = dot_f64(qrows.data() + (g - g0) * d, crow.data(), d);
        }
      } else {
        for (int64_t g = g0; g < g1; ++g) {
          for (int64_t c = 0; c < C; ++c) {
            const int64_t n = tiles::prepare_row(L.cand + b * L.c_sb + g * L.c_sg + c * L.c_sc, dtype, d,
                                                 Metric::Cosine, crow.data());
            nonfinite_cand += n;
            bad += n;
            if (bad != 0 || !compute) continue;
            s[(g - g0) * C + c] = dot_f64(qrows.data() + (g - g0) * d, crow.data(), d);
          }
        }
      }
      if (bad != 0 || !compute) continue;
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t row = b * G + g;
        const float* srow = s.data() + (g - g0) * C;
        totals[row] = rewards_of_row(L, b, g, srow, log_rank.data(), options, order, margin + row,
                                     rank_reward + row, rank + row);
        total[row] = static_cast<float>(totals[row]);
        if (scores != nullptr) {
          float* out = scores + row * C;
          for (int64_t c = 0; c < C; ++c) out[c] = L.real(b, g, c) ? srow[c] : -std::numeric_limits<float>::infinity();
        }
      }
    }
  }
  status.nonfinite_query = nonfinite_query;
  status.nonfinite_cand = nonfinite_cand;
  if (!status.ok()) return status;
  advantages_of(totals.data(), B, G, options, advantages);
  return status;
}

}  // namespace elva
