// The CPU kernel of elva_rewards on hand-computed cases: rewards, ties in index order, masks, both candidate
// layouts, fp16/bf16 input, the advantage modes (zero std included) and the data checks.
#include <cmath>
#include <cstdio>
#include <limits>
#include <vector>

#include "elva/elva_rewards.h"
#include "harness.h"

namespace {

using elva::AdvantageMode;
using elva::DType;
using elva::ElvaRewardsError;
using elva::ElvaRewardsOptions;
using elva::ElvaRewardsStatus;

const double LN2 = std::log(2.0), LN3 = std::log(3.0), LN4 = std::log(4.0);

struct Result {
  ElvaRewardsStatus status;
  std::vector<float> total, margin, rank_reward, advantages, scores;
  std::vector<int64_t> rank;
};

// Contiguous inputs: query [B, G, d], candidates [B, C, d] (shared) or [B, G, C, d], mask nullptr, [B, C] (mask_g
// false) or [B, G, C].
Result run(const void* query, const void* cand, bool shared, DType dtype, int64_t B, int64_t G, int64_t C, int64_t d,
           const std::vector<int64_t>& positive, const bool* mask = nullptr, bool mask_g = false,
           ElvaRewardsOptions options = {}) {
  Result r;
  const size_t rows = static_cast<size_t>(B * G);
  r.total.assign(rows, NAN);
  r.margin.assign(rows, NAN);
  r.rank_reward.assign(rows, NAN);
  r.advantages.assign(rows, NAN);
  r.rank.assign(rows, -7);
  r.scores.assign(rows * static_cast<size_t>(C), NAN);
  const int64_t query_strides[2] = {G * d, d};
  const int64_t cand_strides[3] = {shared ? C * d : G * C * d, shared ? 0 : C * d, d};
  const int64_t mask_strides[3] = {mask_g ? G * C : C, mask_g ? C : 0, 1};
  r.status = elva::elva_rewards_cpu(query, query_strides, cand, cand_strides, shared, dtype, B, G, C, d,
                                    positive.data(), mask, mask_strides, options, r.total.data(), r.margin.data(),
                                    r.rank_reward.data(), r.rank.data(), r.advantages.data(), r.scores.data());
  return r;
}

bool near(double a, double b, double tol = 1e-6) { return std::fabs(a - b) <= tol; }

// The query is (1, 0); (4, 3) scores 0.8, (3, 4) 0.6, (0, 1) 0, (-1, 0) -1 and (1, 0) 1.
const std::vector<float> kQuery = {1, 0};
const std::vector<float> kCandidates = {4, 3, 3, 4, 0, 1, -1, 0};

void test_positive_first(bool shared) {
  const Result r = run(kQuery.data(), kCandidates.data(), shared, DType::F32, 1, 1, 4, 2, {0});
  ELVA_CHECK(r.status.ok(), "status");
  const double penalty = 0.6 * (LN2 - 1) + 0.0 * (LN3 - 1) + (-1.0) * (LN4 - 1);
  const double margin = 0.8 - 0.6 - 0.05, rank_reward = 0.8 - 0.01 * penalty;
  ELVA_CHECK(r.rank[0] == 1, "rank %lld", static_cast<long long>(r.rank[0]));
  ELVA_CHECK(near(r.margin[0], margin), "margin %.9g vs %.9g", r.margin[0], margin);
  ELVA_CHECK(near(r.rank_reward[0], rank_reward), "rank_reward %.9g vs %.9g", r.rank_reward[0], rank_reward);
  ELVA_CHECK(near(r.total[0], 0.4 * margin + 0.6 * rank_reward), "total %.9g", r.total[0]);
  ELVA_CHECK(r.advantages[0] == 0.0f, "G = 1 advantage %.9g", r.advantages[0]);
  const float expected[4] = {0.8f, 0.6f, 0.0f, -1.0f};
  for (int c = 0; c < 4; ++c) ELVA_CHECK(near(r.scores[c], expected[c], 1e-7), "score %d: %.9g", c, r.scores[c]);
}

void test_positive_last_base_two() {
  const std::vector<float> cand = {1, 0, 4, 3, 3, 4, 0, 1};
  ElvaRewardsOptions options;
  options.log_base = 2.0;
  const Result r = run(kQuery.data(), cand.data(), true, DType::F32, 1, 1, 4, 2, {3}, nullptr, false, options);
  const double penalty = 1.0 * (0 - 1) + 0.8 * (1 - 1) + 0.6 * (std::log2(3.0) - 1);
  ELVA_CHECK(r.rank[0] == 4, "rank %lld", static_cast<long long>(r.rank[0]));
  ELVA_CHECK(r.margin[0] == 0.0f, "margin %.9g", r.margin[0]);
  ELVA_CHECK(near(r.rank_reward[0], -0.01 * penalty), "rank_reward %.9g", r.rank_reward[0]);
}

// Candidates 1 and 2 are the same vector (0.8), and so are 0 and 3 (0.6): ranks 3, 1, 2, 4.
void test_ties_rank_by_index() {
  const std::vector<float> cand = {3, 4, 4, 3, 4, 3, 3, 4};
  const int64_t ranks[4] = {3, 1, 2, 4};
  const double s[4] = {0.6, 0.8, 0.8, 0.6};
  for (int64_t p : {1, 2}) {
    const Result r = run(kQuery.data(), cand.data(), true, DType::F32, 1, 1, 4, 2, {p});
    ELVA_CHECK(r.scores[1] == r.scores[2] && r.scores[0] == r.scores[3], "duplicates must score equal");
    double penalty = 0;
    for (int c = 0; c < 4; ++c) {
      if (c != p) penalty += s[c] * (std::log(static_cast<double>(ranks[c])) - 1);
    }
    ELVA_CHECK(r.rank[0] == ranks[p], "p %lld rank %lld", static_cast<long long>(p), static_cast<long long>(r.rank[0]));
    ELVA_CHECK(r.margin[0] == 0.0f, "the twin is the top negative: margin %.9g", r.margin[0]);
    const double expected = 0.8 / (1 + std::log(static_cast<double>(ranks[p]))) - 0.01 * penalty;
    ELVA_CHECK(near(r.rank_reward[0], expected), "p %lld rank_reward %.9g vs %.9g", static_cast<long long>(p),
               r.rank_reward[0], expected);
  }
}

void test_mask() {
  const std::vector<float> cand = {1, 0, 4, 3, 3, 4, 0, 1};
  const bool mask[4] = {false, true, true, true};
  const Result r = run(kQuery.data(), cand.data(), true, DType::F32, 1, 1, 4, 2, {3}, mask);
  const double penalty = 0.8 * (0 - 1) + 0.6 * (LN2 - 1);
  ELVA_CHECK(r.rank[0] == 3, "rank %lld", static_cast<long long>(r.rank[0]));
  ELVA_CHECK(near(r.rank_reward[0], -0.01 * penalty), "rank_reward %.9g", r.rank_reward[0]);
  ELVA_CHECK(std::isinf(r.scores[0]) && r.scores[0] < 0, "masked score %.9g", r.scores[0]);
}

// Two rollouts of one query against per-rollout candidates: rollout 0 ranks its positive first (as above),
// rollout 1 last; advantages from the two totals in every mode.
void test_per_rollout_and_advantages() {
  const std::vector<float> query = {1, 0, 1, 0};
  std::vector<float> cand = kCandidates;  // rollout 0
  const std::vector<float> rollout1 = {-1, 0, 4, 3, 3, 4, 0, 1};
  cand.insert(cand.end(), rollout1.begin(), rollout1.end());
  const double pen0 = 0.6 * (LN2 - 1) + 0.0 * (LN3 - 1) + (-1.0) * (LN4 - 1);
  const double t0 = 0.4 * (0.8 - 0.6 - 0.05) + 0.6 * (0.8 - 0.01 * pen0);
  const double pen1 = 0.8 * (0 - 1) + 0.6 * (LN2 - 1) + 0.0 * (LN3 - 1);
  const double t1 = 0.6 * (-1.0 / (1 + LN4) - 0.01 * pen1);
  const double mean = (t0 + t1) / 2, std = std::fabs(t0 - t1) / std::sqrt(2.0);
  for (AdvantageMode mode : {AdvantageMode::Group, AdvantageMode::Batch, AdvantageMode::None}) {
    ElvaRewardsOptions options;
    options.advantage = mode;
    const Result r = run(query.data(), cand.data(), false, DType::F32, 1, 2, 4, 2, {0}, nullptr, false, options);
    ELVA_CHECK(r.status.ok(), "status");
    ELVA_CHECK(r.rank[0] == 1 && r.rank[1] == 4, "ranks %lld %lld", static_cast<long long>(r.rank[0]),
               static_cast<long long>(r.rank[1]));
    ELVA_CHECK(near(r.total[0], t0) && near(r.total[1], t1), "totals %.9g %.9g vs %.9g %.9g", r.total[0],
               r.total[1], t0, t1);
    // One query: the batch std is the group std.
    const double scale = mode == AdvantageMode::None ? 1.0 : 1.0 / (std + 1e-4);
    ELVA_CHECK(near(r.advantages[0], (t0 - mean) * scale, 1e-5) && near(r.advantages[1], (t1 - mean) * scale, 1e-5),
               "mode %d advantages %.9g %.9g", static_cast<int>(mode), r.advantages[0], r.advantages[1]);
  }
}

// Identical rollouts: equal totals give advantages of exactly 0 (no NaN), even with adv_eps 0; in batch mode two
// queries with equal rollouts each but different totals still give 0 (centring is per group).
void test_zero_std() {
  const std::vector<float> query = {1, 0, 1, 0, 1, 0, 0, 1, 0, 1, 0, 1};  // [2, 3, 2]
  std::vector<float> cand = kCandidates;
  cand.insert(cand.end(), kCandidates.begin(), kCandidates.end());  // [2, 4, 2]
  for (AdvantageMode mode : {AdvantageMode::Group, AdvantageMode::Batch, AdvantageMode::None}) {
    ElvaRewardsOptions options;
    options.advantage = mode;
    options.adv_eps = 0.0;
    const Result r = run(query.data(), cand.data(), true, DType::F32, 2, 3, 4, 2, {0, 1}, nullptr, false, options);
    ELVA_CHECK(r.total[0] != r.total[3], "the two queries differ");
    for (int i = 0; i < 6; ++i) {
      ELVA_CHECK(r.advantages[i] == 0.0f, "mode %d advantage %d: %.9g", static_cast<int>(mode), i, r.advantages[i]);
    }
  }
}

// fp16 and bf16 inputs (exact small integers) give the fp32 results.
void test_half_inputs() {
  // 1 = 0x3c00 (fp16) / 0x3f80 (bf16); 3, 4, -1 likewise.
  const std::vector<uint16_t> q16 = {0x3c00, 0x0000}, qb = {0x3f80, 0x0000};
  const std::vector<uint16_t> c16 = {0x4400, 0x4200, 0x4200, 0x4400, 0x0000, 0x3c00, 0xbc00, 0x0000};
  const std::vector<uint16_t> cb = {0x4080, 0x4040, 0x4040, 0x4080, 0x0000, 0x3f80, 0xbf80, 0x0000};
  for (int h = 0; h < 4; ++h) ELVA_CHECK(elva::test::fp16_value(c16[h]) == elva::test::bf16_value(cb[h]), "fixture");
  const Result f = run(kQuery.data(), kCandidates.data(), true, DType::F32, 1, 1, 4, 2, {1});
  const Result a = run(q16.data(), c16.data(), true, DType::F16, 1, 1, 4, 2, {1});
  const Result b = run(qb.data(), cb.data(), true, DType::BF16, 1, 1, 4, 2, {1});
  for (const Result* r : {&a, &b}) {
    ELVA_CHECK(r->status.ok() && r->rank[0] == f.rank[0] && r->total[0] == f.total[0] &&
                   r->rank_reward[0] == f.rank_reward[0],
               "half total %.9g vs %.9g", r->total[0], f.total[0]);
  }
}

void test_data_checks() {
  // A NaN query entry and a NaN candidate entry are counted; they take precedence over a bad positive.
  std::vector<float> q = {NAN, 0};
  std::vector<float> cand = kCandidates;
  cand[3] = INFINITY;
  Result r = run(q.data(), cand.data(), true, DType::F32, 1, 1, 4, 2, {9});
  ELVA_CHECK(r.status.nonfinite_query == 1 && r.status.nonfinite_cand == 1, "nonfinite %lld %lld",
             static_cast<long long>(r.status.nonfinite_query), static_cast<long long>(r.status.nonfinite_cand));
  ELVA_CHECK(r.status.error == ElvaRewardsError::PositiveOutOfRange && r.status.error_value == 9, "positive");
  ELVA_CHECK(!r.status.ok(), "not ok");

  r = run(kQuery.data(), kCandidates.data(), true, DType::F32, 1, 1, 4, 2, {-1});
  ELVA_CHECK(r.status.error == ElvaRewardsError::PositiveOutOfRange && r.status.error_value == -1, "negative id");
  ELVA_CHECK(std::isnan(r.total[0]) && r.rank[0] == -7, "nothing written on a bad positive");

  // [B=1, G=2, C=4] mask hiding the positive (2) in rollout 1.
  const std::vector<float> q2 = {1, 0, 0, 1};
  const bool hides[8] = {true, true, true, true, true, true, false, true};
  r = run(q2.data(), kCandidates.data(), true, DType::F32, 1, 2, 4, 2, {2}, hides, true);
  ELVA_CHECK(r.status.error == ElvaRewardsError::MaskHidesPositive && r.status.error_b == 0 && r.status.error_g == 1,
             "mask hides positive: error %d b %lld g %lld", static_cast<int>(r.status.error),
             static_cast<long long>(r.status.error_b), static_cast<long long>(r.status.error_g));

  // Rollout 1 keeps only its positive.
  const bool lonely[8] = {true, true, false, false, false, false, true, false};
  r = run(q2.data(), kCandidates.data(), true, DType::F32, 1, 2, 4, 2, {2}, lonely, true);
  ELVA_CHECK(r.status.error == ElvaRewardsError::MaskHidesPositive && r.status.error_g == 0, "rollout 0 hides p");
  const bool lonely2[8] = {true, false, true, false, false, false, true, false};
  r = run(q2.data(), kCandidates.data(), true, DType::F32, 1, 2, 4, 2, {2}, lonely2, true);
  ELVA_CHECK(r.status.error == ElvaRewardsError::NoNegative && r.status.error_b == 0 && r.status.error_g == 1,
             "no negative: error %d g %lld", static_cast<int>(r.status.error),
             static_cast<long long>(r.status.error_g));
  ELVA_CHECK(std::isnan(r.total[0]), "nothing written on a lonely rollout");

  // One candidate, no mask.
  r = run(kQuery.data(), kCandidates.data(), true, DType::F32, 1, 1, 1, 2, {0});
  ELVA_CHECK(r.status.error == ElvaRewardsError::NoNegative, "C = 1");
}

}  // namespace

int main() {
  test_positive_first(true);
  test_positive_first(false);
  test_positive_last_base_two();
  test_ties_rank_by_index();
  test_mask();
  test_per_rollout_and_advantages();
  test_zero_std();
  test_half_inputs();
  test_data_checks();
  return elva::test::finish("elva_rewards cpu");
}
