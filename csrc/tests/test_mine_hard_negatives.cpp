// The CPU mine_hard_negatives kernel against brute force: the hard part is similarity_topk_cpu with the positives
// excluded; the random part is the smallest keys of reference.mine_hard_negatives.random_keys (recomputed here from
// its definition) among eligible candidates, skipping the hard ones; with max_score, every drawn id scores at most
// max_score and every skipped smaller key above it (double cosine, within rounding); short pools pad with -1;
// NaN/Inf is reported whether or not the hard part scores anything.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <set>
#include <vector>

#include "elva/mine_hard_negatives.h"
#include "elva/similarity_topk.h"
#include "harness.h"

namespace {

using elva::DType;

uint32_t mix32(uint64_t x) {  // the reference's int64 arithmetic, masked to 32 bits
  x = ((x ^ (x >> 16)) * 0x45D9F3Bull) & 0xFFFFFFFFull;
  x = ((x ^ (x >> 16)) * 0x45D9F3Bull) & 0xFFFFFFFFull;
  return static_cast<uint32_t>(x ^ (x >> 16));
}

uint32_t reference_key(uint32_t seed, int64_t row, int64_t id) {
  uint64_t h = mix32(seed);
  h = mix32(h ^ (static_cast<uint64_t>(row) & 0xFFFFFFFFull));
  h = mix32(h ^ (static_cast<uint64_t>(id) & 0xFFFFFFFFull));
  return mix32(h ^ (static_cast<uint64_t>(id) >> 32));
}

double cosine(const std::vector<float>& q, int64_t b, const std::vector<float>& c, int64_t n, int64_t d) {
  double dot = 0, qq = 0, cc = 0;
  for (int64_t p = 0; p < d; ++p) {
    dot += double(q[b * d + p]) * c[n * d + p];
    qq += double(q[b * d + p]) * q[b * d + p];
    cc += double(c[n * d + p]) * c[n * d + p];
  }
  return dot / std::max(std::sqrt(qq), 1e-12) / std::max(std::sqrt(cc), 1e-12);
}

void check_case(std::mt19937_64& rng, int64_t B, int64_t N, int64_t d, int64_t n_hard, int64_t n_random,
                bool with_max_score) {
  std::normal_distribution<float> normal;
  std::vector<float> q(B * d), c(N * d);
  for (auto& v : q) v = normal(rng);
  for (auto& v : c) v = normal(rng);
  const int64_t m = 2;
  std::vector<int64_t> positives(B * m);
  for (auto& p : positives) p = rng() % 3 ? static_cast<int64_t>(rng() % N) : -1;
  std::vector<float> max_score(B, 0.1f);
  const uint32_t seed = static_cast<uint32_t>(rng() % 1000);
  const int64_t width = n_hard + n_random;
  std::vector<int64_t> out(B * width);
  const auto status = elva::mine_hard_negatives_cpu(q.data(), d, c.data(), d, DType::F32, B, N, d, positives.data(), m,
                                                    n_hard, n_random, with_max_score ? max_score.data() : nullptr,
                                                    seed, out.data());
  ELVA_CHECK(!status.nonfinite_pool && status.nonfinite_queries == 0, "finite inputs reported as non-finite");
  const int64_t hard = std::min(n_hard, N);
  std::vector<int64_t> hard_ids(B * std::max<int64_t>(hard, 1), -1);
  if (hard > 0) {
    std::vector<float> values(B * hard);
    elva::similarity_topk_cpu(q.data(), d, c.data(), d, DType::F32, B, N, d, hard, elva::Metric::Cosine,
                              positives.data(), m, with_max_score ? max_score.data() : nullptr, values.data(),
                              hard_ids.data());
  }
  const double slack = 1e-5;  // fp32 canonical scores against double
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* row = out.data() + b * width;
    for (int64_t j = 0; j < n_hard; ++j) {
      const int64_t want = j < hard ? hard_ids[b * hard + j] : -1;
      ELVA_CHECK(row[j] == want, "hard part row %ld slot %ld: %ld, want %ld", long(b), long(j), long(row[j]),
                 long(want));
    }
    const std::set<int64_t> listed(positives.begin() + b * m, positives.begin() + (b + 1) * m);
    const std::set<int64_t> hard_set(row, row + n_hard);
    // Candidates in key order; the random part takes the eligible ones that are not hard, in that order.
    std::vector<std::pair<uint32_t, int64_t>> order;
    for (int64_t n = 0; n < N; ++n) order.emplace_back(reference_key(seed, b, n), n);
    std::sort(order.begin(), order.end());
    int64_t taken = 0;
    for (const auto& [key, n] : order) {
      if (taken == n_random) break;
      if (listed.count(n) || hard_set.count(n)) continue;
      if (with_max_score) {
        const double s = cosine(q, b, c, n, d);
        if (std::fabs(s - max_score[b]) < slack) {  // rounding decides: accept either, and follow the kernel
          if (row[n_hard + taken] == n) ++taken;
          continue;
        }
        if (s > max_score[b]) continue;
      }
      ELVA_CHECK(row[n_hard + taken] == n, "random part row %ld slot %ld: %ld, want %ld", long(b), long(taken),
                 long(row[n_hard + taken]), long(n));
      ++taken;
    }
    for (int64_t j = taken; j < n_random; ++j) {
      ELVA_CHECK(row[n_hard + j] == -1, "row %ld: slot %ld past the eligible candidates holds %ld", long(b),
                 long(j), long(row[n_hard + j]));
    }
  }
}

void check_nonfinite() {
  std::vector<float> q(3 * 8, 1.0f), c(500 * 8, 1.0f);
  std::vector<int64_t> positives(3, 0), out(3 * 4);
  c[321 * 8 + 2] = NAN;
  for (int64_t n_hard : {0, 2}) {
    const auto status = elva::mine_hard_negatives_cpu(q.data(), 8, c.data(), 8, DType::F32, 3, 500, 8,
                                                      positives.data(), 1, n_hard, 4 - n_hard, nullptr, 0, out.data());
    ELVA_CHECK(status.nonfinite_pool, "NaN in the pool not reported (n_hard %ld)", long(n_hard));
  }
  c[321 * 8 + 2] = 1.0f;
  q[1 * 8 + 5] = -INFINITY;
  const auto status = elva::mine_hard_negatives_cpu(q.data(), 8, c.data(), 8, DType::F32, 3, 500, 8, positives.data(),
                                                    1, 0, 4, nullptr, 0, out.data());
  ELVA_CHECK(status.nonfinite_queries == 1, "-Inf in a query not reported");
}

}  // namespace

int main() {
  std::mt19937_64 rng(99);
  for (int rep = 0; rep < 12; ++rep) {
    const int64_t B = 1 + rng() % 40, N = 1 + rng() % 2500, d = 1 + rng() % 40;
    check_case(rng, B, N, d, rng() % 30, 1 + rng() % 30, rep % 2 == 1);
  }
  check_case(rng, 3, 40, 8, 30, 30, false);  // a short pool: both parts pad with -1
  check_nonfinite();
  return elva::test::finish("test_mine_hard_negatives");
}
