// The CPU rank_statistics kernel against a brute-force double-precision count: small-integer data (dot products
// exact in fp32, so ties are exact), duplicates of the positive, several positives per row, exclude (including
// listed positives), every dtype, every kernel (ELVA_CPU_ISA), the split-candidates path, NaN/Inf.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <random>
#include <vector>

#include "elva/rank_statistics.h"
#include "harness.h"

namespace {

using elva::DType;
using elva::Metric;

struct Case {
  int64_t B, N, d;
  std::vector<float> q, c;
  std::vector<int64_t> positives, exclude;
  int64_t m = 1, mx = 0;
};

uint16_t to_bf16(float v) { return static_cast<uint16_t>(elva::bits_from_float(v) >> 16); }  // exact for small ints
uint16_t to_fp16(float v) {
  if (v == 0.0f) return 0;
  const uint16_t sign = v < 0 ? 0x8000 : 0;
  int exponent;
  const double mantissa = std::frexp(std::fabs(static_cast<double>(v)), &exponent);
  const int e = exponent - 1 + 15;
  const auto frac = static_cast<uint16_t>(std::lround((mantissa * 2.0 - 1.0) * 1024.0));
  return static_cast<uint16_t>(sign | (e << 10) | frac);
}

Case make_case(std::mt19937_64& rng, int64_t B, int64_t N, int64_t d, int64_t m, int64_t mx) {
  Case t{B, N, d, {}, {}, {}, {}, m, mx};
  std::uniform_int_distribution<int> value(-3, 3);
  std::uniform_int_distribution<int64_t> id(0, N - 1);
  t.q.resize(B * d);
  t.c.resize(N * d);
  for (auto& v : t.q) v = static_cast<float>(value(rng));
  for (auto& v : t.c) v = static_cast<float>(value(rng));
  for (int64_t n = 0; n < N / 4; ++n) {  // duplicates
    const int64_t a = id(rng), b = id(rng);
    std::copy_n(&t.c[a * d], d, &t.c[b * d]);
  }
  t.positives.assign(B * m, -1);
  for (int64_t b = 0; b < B; ++b) {
    t.positives[b * m] = id(rng);
    for (int64_t j = 1; j < m; ++j) t.positives[b * m + j] = rng() % 2 ? id(rng) : -1;
    std::shuffle(t.positives.begin() + b * m, t.positives.begin() + (b + 1) * m, rng);
  }
  t.exclude.assign(B * mx, -1);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < mx; ++j) {
      const auto r = rng() % 4;
      t.exclude[b * mx + j] = r == 0 ? -1 : r == 1 ? t.positives[b * m] : id(rng);
    }
  }
  return t;
}

void brute_force(const Case& t, std::vector<int64_t>& rank, std::vector<float>& pos, std::vector<float>& neg) {
  rank.assign(t.B, 0);
  pos.assign(t.B, 0);
  neg.assign(t.B, 0);
  for (int64_t b = 0; b < t.B; ++b) {
    std::vector<double> s(t.N);
    for (int64_t n = 0; n < t.N; ++n) {
      double acc = 0;
      for (int64_t p = 0; p < t.d; ++p) acc += static_cast<double>(t.q[b * t.d + p]) * t.c[n * t.d + p];
      s[n] = acc;
    }
    std::vector<char> is_pos(t.N, 0), is_ex(t.N, 0);
    for (int64_t j = 0; j < t.m; ++j) {
      if (t.positives[b * t.m + j] >= 0) is_pos[t.positives[b * t.m + j]] = 1;
    }
    for (int64_t j = 0; j < t.mx; ++j) {
      if (t.exclude[b * t.mx + j] >= 0) is_ex[t.exclude[b * t.mx + j]] = 1;
    }
    int64_t best = -1;
    for (int64_t n = 0; n < t.N; ++n) {
      if (is_pos[n] && (best < 0 || s[n] > s[best])) best = n;
    }
    int64_t ahead = 0;
    double top = -INFINITY;
    for (int64_t n = 0; n < t.N; ++n) {
      if (is_pos[n] || is_ex[n]) continue;
      ahead += s[n] > s[best] || (s[n] == s[best] && n < best);
      top = std::max(top, s[n]);
    }
    rank[b] = ahead + 1;
    pos[b] = static_cast<float>(s[best]);
    neg[b] = static_cast<float>(top);
  }
}

struct Encoded {
  std::vector<float> f32;
  std::vector<uint16_t> half;
  const void* data(DType dtype) const {
    return dtype == DType::F32 ? static_cast<const void*>(f32.data()) : half.data();
  }
};

Encoded encode(const std::vector<float>& values, DType dtype) {
  Encoded e;
  if (dtype == DType::F32) {
    e.f32 = values;
  } else {
    for (float v : values) e.half.push_back(dtype == DType::BF16 ? to_bf16(v) : to_fp16(v));
  }
  return e;
}

void check_case(const Case& t, DType dtype, const char* isa) {
  std::vector<int64_t> want_rank;
  std::vector<float> want_pos, want_neg;
  brute_force(t, want_rank, want_pos, want_neg);
  const Encoded q = encode(t.q, dtype), c = encode(t.c, dtype);
  std::vector<int64_t> rank(t.B, -7);
  std::vector<float> pos(t.B), neg(t.B);
  const auto status = elva::rank_statistics_cpu(q.data(dtype), t.d, c.data(dtype), t.d, dtype, t.B, t.N, t.d,
                                                Metric::Dot, t.positives.data(), t.m,
                                                t.mx ? t.exclude.data() : nullptr, t.mx, rank.data(), pos.data(),
                                                neg.data());
  ELVA_CHECK(status.nonfinite_queries == 0 && !status.nonfinite_candidates, "unexpected non-finite status");
  int bad = 0;
  for (int64_t b = 0; b < t.B; ++b) {
    if (rank[b] != want_rank[b] || pos[b] != want_pos[b] || neg[b] != want_neg[b]) {
      if (bad++ < 3) {
        ELVA_CHECK(false, "isa %s dtype %d B %ld N %ld d %ld row %ld: rank %ld/%ld pos %g/%g neg %g/%g", isa,
                   static_cast<int>(dtype), static_cast<long>(t.B), static_cast<long>(t.N), static_cast<long>(t.d),
                   static_cast<long>(b), static_cast<long>(rank[b]), static_cast<long>(want_rank[b]), pos[b],
                   want_pos[b], neg[b], want_neg[b]);
      }
    }
  }
}

// Cosine: a duplicate of the best positive with a smaller id ranks ahead of it (bitwise-equal scores).
void check_duplicate_cosine() {
  const int64_t B = 1, N = 900, d = 37;
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal;
  std::vector<float> q(B * d), c(N * d);
  for (auto& v : q) v = normal(rng);
  for (auto& v : c) v = normal(rng);
  std::copy_n(&c[700 * d], d, &c[5 * d]);  // candidate 5 == positive 700
  std::copy_n(&c[700 * d], d, &c[800 * d]);  // candidate 800 == positive 700, larger id: not ahead
  for (int64_t p = 0; p < d; ++p) c[3 * d + p] = 2.0f * q[p];  // candidate 3 is the query: cosine 1, ahead
  int64_t positive = 700, rank = 0;
  float pos = 0, neg = 0;
  elva::rank_statistics_cpu(q.data(), d, c.data(), d, DType::F32, B, N, d, Metric::Cosine, &positive, 1, nullptr, 0,
                            &rank, &pos, &neg);
  // Count by the kernel's own pos score: every other candidate strictly above it in double, plus 3 and 5.
  int64_t above = 0;
  double qn = 0;
  for (float v : q) qn += double(v) * v;
  for (int64_t n = 0; n < N; ++n) {
    if (n == 700 || n == 5 || n == 800 || n == 3) continue;
    double s = 0, cn = 0;
    for (int64_t p = 0; p < d; ++p) s += double(q[p]) * c[n * d + p], cn += double(c[n * d + p]) * c[n * d + p];
    above += s / std::sqrt(qn * cn) > pos;
  }
  ELVA_CHECK(rank == above + 3, "duplicate: rank %ld, want %ld", static_cast<long>(rank), static_cast<long>(above + 3));
  ELVA_CHECK(neg >= 0.9999f, "duplicate: max_neg_score %g should be ~1 (candidate 3)", neg);
  positive = 5;
  int64_t rank5 = 0;
  elva::rank_statistics_cpu(q.data(), d, c.data(), d, DType::F32, B, N, d, Metric::Cosine, &positive, 1, nullptr, 0,
                            &rank5, &pos, &neg);
  ELVA_CHECK(rank5 == rank - 1, "duplicate with the smaller id: rank %ld, want %ld", static_cast<long>(rank5),
             static_cast<long>(rank - 1));
}

void check_nonfinite() {
  std::vector<float> q(4 * 8, 1.0f), c(600 * 8, 1.0f);
  std::vector<int64_t> positives(4, 0), rank(4);
  std::vector<float> pos(4), neg(4);
  c[555 * 8 + 3] = NAN;
  auto status = elva::rank_statistics_cpu(q.data(), 8, c.data(), 8, DType::F32, 4, 600, 8, Metric::Dot,
                                          positives.data(), 1, nullptr, 0, rank.data(), pos.data(), neg.data());
  ELVA_CHECK(status.nonfinite_candidates, "NaN candidate not reported");
  c[555 * 8 + 3] = 1.0f;
  q[2 * 8 + 1] = INFINITY;
  status = elva::rank_statistics_cpu(q.data(), 8, c.data(), 8, DType::F32, 4, 600, 8, Metric::Dot, positives.data(),
                                     1, nullptr, 0, rank.data(), pos.data(), neg.data());
  ELVA_CHECK(status.nonfinite_queries == 1, "Inf query not reported");
}

}  // namespace

int main() {
  std::mt19937_64 rng(1234);
  const char* isas[] = {"", "avx512bf16", "avx512", "avx2", "scalar"};
  for (const char* isa : isas) {
    setenv("ELVA_CPU_ISA", isa, 1);
    for (int rep = 0; rep < 6; ++rep) {
      const int64_t B = 1 + rng() % 70, N = 1 + rng() % 3000, d = 1 + rng() % 70;
      const Case t = make_case(rng, B, N, d, 1 + rng() % 4, rng() % 2 ? 0 : 1 + rng() % 5);
      for (DType dtype : {DType::F32, DType::F16, DType::BF16}) check_case(t, dtype, isa);
    }
    // Few queries, many blocks: the threads split the candidates.
    const Case t = make_case(rng, 3, 20000, 24, 2, 3);
    check_case(t, DType::F32, isa);
  }
  unsetenv("ELVA_CPU_ISA");
  check_duplicate_cosine();
  check_nonfinite();
  return elva::test::finish("test_rank_statistics");
}
