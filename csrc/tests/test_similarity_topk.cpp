// The CPU similarity_topk kernel against a brute-force double-precision top-k: exact ties (small-integer dot
// products are exact in fp32), exclude, max_score, k = N, fewer eligible than k, duplicates, NaN/Inf.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "elva/similarity_topk.h"
#include "harness.h"

namespace {

using elva::DType;
using elva::Metric;

struct Case {
  int64_t B, N, d, k;
  Metric metric;
  std::vector<float> q, c;           // fp32 values (exactly representable in the tested dtype)
  std::vector<int64_t> exclude;      // B x m or empty
  int64_t m = 0;
  std::vector<float> max_score;      // B or empty
};

uint16_t to_bf16(float v) { return static_cast<uint16_t>(elva::bits_from_float(v) >> 16); }  // exact for our data
uint16_t to_fp16(float v) {  // exact for small integers and their halves
  if (v == 0.0f) return std::signbit(v) ? 0x8000 : 0;
  const uint16_t sign = v < 0 ? 0x8000 : 0;
  int exponent;
  const double mantissa = std::frexp(std::fabs(static_cast<double>(v)), &exponent);  // [0.5, 1)
  const int e = exponent - 1 + 15;
  const auto frac = static_cast<uint16_t>(std::lround((mantissa * 2.0 - 1.0) * 1024.0));
  return static_cast<uint16_t>(sign | (e << 10) | frac);
}

// Brute force: double sums of fp32-prepared rows, total order, -inf / -1 tail.
void brute_force(const Case& t, std::vector<float>& values, std::vector<int64_t>& indices) {
  auto prep = [&](const float* row, std::vector<double>& out) {
    out.assign(row, row + t.d);
    if (t.metric == Metric::Cosine) {
      double s = 0;
      for (double v : out) s += v * v;
      const double n = std::max(std::sqrt(s), 1e-12);
      for (double& v : out) v = static_cast<float>(static_cast<float>(v) / static_cast<float>(n));
    }
  };
  values.assign(t.B * t.k, -INFINITY);
  indices.assign(t.B * t.k, -1);
  std::vector<double> q, c;
  for (int64_t b = 0; b < t.B; ++b) {
    prep(&t.q[b * t.d], q);
    std::vector<std::pair<float, int64_t>> all;
    for (int64_t n = 0; n < t.N; ++n) {
      prep(&t.c[n * t.d], c);
      double s = 0;
      for (int64_t p = 0; p < t.d; ++p) s += q[p] * c[p];
      const float score = static_cast<float>(s);
      bool skip = !t.max_score.empty() && score > t.max_score[b];
      for (int64_t j = 0; j < t.m; ++j) skip |= t.exclude[b * t.m + j] == n;
      if (!skip) all.push_back({score, n});
    }
    std::sort(all.begin(), all.end(), [](auto& x, auto& y) { return x.first > y.first || (x.first == y.first && x.second < y.second); });
    for (int64_t j = 0; j < std::min<int64_t>(t.k, all.size()); ++j) {
      values[b * t.k + j] = all[j].first;
      indices[b * t.k + j] = all[j].second;
    }
  }
}

elva::SimilarityTopkStatus run(const Case& t, DType dtype, std::vector<float>& values, std::vector<int64_t>& indices) {
  values.assign(t.B * t.k, 0.0f);
  indices.assign(t.B * t.k, 0);
  std::vector<uint16_t> qh(t.q.size()), ch(t.c.size());
  const void* qp = t.q.data();
  const void* cp = t.c.data();
  if (dtype != DType::F32) {
    auto conv = dtype == DType::BF16 ? to_bf16 : to_fp16;
    std::transform(t.q.begin(), t.q.end(), qh.begin(), conv);
    std::transform(t.c.begin(), t.c.end(), ch.begin(), conv);
    qp = qh.data();
    cp = ch.data();
  }
  return elva::similarity_topk_cpu(qp, t.d, cp, t.d, dtype, t.B, t.N, t.d, t.k, t.metric,
                                   t.exclude.empty() ? nullptr : t.exclude.data(), t.m,
                                   t.max_score.empty() ? nullptr : t.max_score.data(), values.data(), indices.data());
}

Case make_case(std::mt19937& gen, int64_t B, int64_t N, int64_t d, int64_t k, Metric metric, bool integers,
               bool with_exclude, bool with_max) {
  Case t{B, N, d, k, metric, {}, {}, {}, 0, {}};
  std::uniform_int_distribution<int> small(-2, 2);
  std::normal_distribution<float> normal;
  auto draw = [&] { return integers ? static_cast<float>(small(gen)) : normal(gen); };
  for (int64_t i = 0; i < B * d; ++i) t.q.push_back(draw());
  for (int64_t i = 0; i < N * d; ++i) t.c.push_back(draw());
  // Exact copies of some candidate rows, and one zero row.
  std::uniform_int_distribution<int64_t> pick(0, N - 1);
  for (int64_t r = 0; r < N / 4; ++r) {
    const int64_t from = pick(gen), to = pick(gen);
    std::copy_n(&t.c[from * d], d, &t.c[to * d]);
  }
  std::fill_n(&t.c[(N / 2) * d], d, 0.0f);
  if (with_exclude) {
    t.m = 5;
    std::uniform_int_distribution<int64_t> id(-1, N - 1);
    for (int64_t i = 0; i < B * t.m; ++i) t.exclude.push_back(id(gen));
  }
  if (with_max) {
    std::uniform_real_distribution<float> u(-0.3f, 1.0f);
    for (int64_t b = 0; b < B; ++b) t.max_score.push_back(metric == Metric::Dot && integers ? std::round(u(gen) * 4) : u(gen));
  }
  return t;
}

void check_exact(const Case& t, DType dtype, const char* what) {
  std::vector<float> ev, v;
  std::vector<int64_t> ei, i;
  brute_force(t, ev, ei);
  const auto status = run(t, dtype, v, i);
  ELVA_CHECK(status.nonfinite_queries == 0 && !status.nonfinite_candidates, "%s: unexpected non-finite flag", what);
  int64_t bad = 0;
  for (size_t j = 0; j < v.size(); ++j) bad += (v[j] != ev[j]) || (i[j] != ei[j]);
  ELVA_CHECK(bad == 0, "%s (B=%lld N=%lld d=%lld k=%lld dtype=%d): %lld mismatches", what, (long long)t.B,
             (long long)t.N, (long long)t.d, (long long)t.k, (int)dtype, (long long)bad);
}

// Values within tolerance; indices equal wherever the expected scores are separated from their neighbours.
void check_close(const Case& t, const char* what) {
  std::vector<float> ev, v;
  std::vector<int64_t> ei, i;
  brute_force(t, ev, ei);
  run(t, DType::F32, v, i);
  int64_t bad = 0;
  for (int64_t b = 0; b < t.B; ++b) {
    for (int64_t j = 0; j < t.k; ++j) {
      const int64_t at = b * t.k + j;
      if (std::isinf(ev[at])) {
        bad += !(std::isinf(v[at]) && i[at] == -1);
        continue;
      }
      bad += std::fabs(v[at] - ev[at]) > 1e-5f * std::max(1.0f, std::fabs(ev[at]));
      const float prev = j > 0 ? ev[at - 1] : INFINITY, next = j + 1 < t.k ? ev[at + 1] : -INFINITY;
      if (prev - ev[at] > 1e-5f && ev[at] - next > 1e-5f) bad += i[at] != ei[at];
    }
  }
  ELVA_CHECK(bad == 0, "%s: %lld mismatches", what, (long long)bad);
}

}  // namespace

int main() {
  std::mt19937 gen(7);
  const DType dtypes[] = {DType::F32, DType::F16, DType::BF16};
  // Small-integer dot products are exact in fp32: indices and values must match bit for bit, ties included.
  for (DType dtype : dtypes) {
    for (int rep = 0; rep < 6; ++rep) {
      const int64_t B = 1 + rep * 5, N = 1 + rep * 97, d = 1 + rep * 13;
      check_exact(make_case(gen, B, N, d, std::max<int64_t>(1, N / 3), Metric::Dot, true, false, false), dtype, "dot");
      check_exact(make_case(gen, B, N, d, N, Metric::Dot, true, true, true), dtype, "dot k=N exclude max_score");
    }
  }
  // Several candidate blocks, d above the d-chunk, both threads busy, a large k.
  check_exact(make_case(gen, 40, 1500, 300, 700, Metric::Dot, true, true, true), DType::F32, "dot large");
  check_exact(make_case(gen, 3, 2000, 5, 2000, Metric::Dot, true, false, false), DType::BF16, "dot k=N many ties");
  // Few queries, many blocks: the threads split the candidates and merge their buffers.
  for (DType dtype : dtypes) {
    check_exact(make_case(gen, 20, 3000, 40, 150, Metric::Dot, true, true, true), dtype, "dot split candidates");
    check_exact(make_case(gen, 1, 5000, 7, 5000, Metric::Dot, true, false, false), dtype, "dot split k=N");
  }
  // Cosine on Gaussian rows: values within 1e-5, separated indices exact.
  for (int rep = 0; rep < 6; ++rep) {
    check_close(make_case(gen, 1 + rep * 7, 50 + rep * 300, 3 + rep * 60, 1 + rep * 40, Metric::Cosine, false,
                          rep % 2 == 0, rep % 3 == 0), "cosine");
  }
  // Exact duplicates: every vector three times, ids i, i + 5, i + 10, come out by index.
  {
    Case t = make_case(gen, 2, 15, 16, 15, Metric::Cosine, false, false, false);
    for (int64_t r = 5; r < 15; ++r) std::copy_n(&t.c[(r % 5) * 16], 16, &t.c[r * 16]);
    std::vector<float> v;
    std::vector<int64_t> i;
    run(t, DType::F32, v, i);
    for (int64_t b = 0; b < 2; ++b) {
      for (int64_t j = 0; j < 15; j += 3) {
        ELVA_CHECK(v[b * 15 + j] == v[b * 15 + j + 1] && v[b * 15 + j] == v[b * 15 + j + 2], "duplicates score equal");
        ELVA_CHECK(i[b * 15 + j] < i[b * 15 + j + 1] && i[b * 15 + j + 1] < i[b * 15 + j + 2], "duplicates by index");
        ELVA_CHECK(i[b * 15 + j] % 5 == i[b * 15 + j + 2] % 5, "duplicates grouped");
      }
    }
  }
  // Non-finite input is reported.
  {
    Case t = make_case(gen, 4, 700, 20, 5, Metric::Cosine, false, false, false);
    std::vector<float> v;
    std::vector<int64_t> i;
    t.c[650 * 20 + 3] = std::numeric_limits<float>::quiet_NaN();
    ELVA_CHECK(run(t, DType::F32, v, i).nonfinite_candidates, "NaN candidate flagged");
    Case split = make_case(gen, 3, 4000, 9, 4, Metric::Dot, false, false, false);
    split.c[3900 * 9] = INFINITY;  // in the last thread's share of the candidates
    ELVA_CHECK(run(split, DType::F32, v, i).nonfinite_candidates, "Inf candidate flagged (split candidates)");
    split.c[3900 * 9] = 0.0f;
    split.c[10 * 9 + 8] = -INFINITY;  // in the first
    ELVA_CHECK(run(split, DType::BF16, v, i).nonfinite_candidates, "-Inf candidate flagged (split candidates)");
    t.c[650 * 20 + 3] = 0.0f;
    t.q[2 * 20 + 1] = INFINITY;
    ELVA_CHECK(run(t, DType::F32, v, i).nonfinite_queries == 1, "Inf query counted");
    t.q[2 * 20 + 1] = 0.0f;
    const auto ok = run(t, DType::F32, v, i);
    ELVA_CHECK(ok.nonfinite_queries == 0 && !ok.nonfinite_candidates, "finite input passes");
  }
  return elva::test::finish("similarity_topk cpu");
}
