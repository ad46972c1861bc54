// The CUDA elva_rewards kernel against a host brute force of elva_kernels/reference/elva_rewards.py on small
// cases (both candidate layouts, masks, ties, the three advantage modes, fp32/bf16, the data checks), when a GPU
// is present; otherwise reported as skipped.
#include <cuda_runtime.h>  // the typed cudaMalloc overloads

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <vector>

#include "elva/cuda/elva_rewards.cuh"
#include "cuda_harness.h"
#include "harness.h"

namespace {

using elva::test::to_device;
using elva::test::to_host;


struct Case {
  const char* name;
  int64_t B, G, C, d;
  bool shared = false;
  bool bf16 = false;
  int mask_dims = 0;  // 0: none, 2: [B, C], 3: [B, G, C]
  elva::AdvantageMode mode = elva::AdvantageMode::Group;
  double log_base = M_E;
  bool return_scores = true;
  int64_t query_pad = 0;  // extra elements after each query row (a row stride > d)
};

struct Inputs {
  std::vector<float> query, cand;  // values as the device sees them (bf16-rounded when bf16)
  std::vector<int64_t> positive;
  std::vector<uint8_t> mask;
};

struct Outputs {
  std::vector<float> total, margin, rank_reward, advantages, scores;
  std::vector<int64_t> rank;
  int64_t errors[elva::kErrorSlots] = {};
};

constexpr double kDelta = 0.05, kGamma = 0.01, kAlpha = 0.4, kEps = 0.6, kAdvEps = 1e-4;

uint32_t next_random(uint32_t& state) {
  state = state * 1664525u + 1013904223u;
  return state >> 8;
}
float uniform(uint32_t& state) { return static_cast<float>(next_random(state)) / 16777216.0f * 2.0f - 1.0f; }

uint16_t bf16_bits(float value) {  // round to nearest even (finite inputs)
  const uint32_t bits = elva::bits_from_float(value);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

int64_t query_row_stride(const Case& k) { return k.d + k.query_pad; }

Inputs make_inputs(const Case& k, uint32_t seed) {
  Inputs in;
  in.query.assign(k.B * k.G * query_row_stride(k), 0.0f);
  in.cand.resize((k.shared ? k.B * k.C : k.B * k.G * k.C) * k.d);
  for (auto& v : in.query) v = uniform(seed);
  for (auto& v : in.cand) v = uniform(seed);
  if (k.bf16) {
    for (auto& v : in.query) v = static_cast<float>(elva::test::bf16_value(bf16_bits(v)));
    for (auto& v : in.cand) v = static_cast<float>(elva::test::bf16_value(bf16_bits(v)));
  }
  in.positive.resize(k.B);
  for (int64_t b = 0; b < k.B; ++b) in.positive[b] = next_random(seed) % k.C;
  if (k.mask_dims) {
    in.mask.resize(k.mask_dims == 2 ? k.B * k.C : k.B * k.G * k.C);
    for (auto& m : in.mask) m = next_random(seed) % 4 != 0;
    // Keep every positive and candidate (p + 1) % C real.
    const int64_t rows = k.mask_dims == 2 ? 1 : k.G;
    for (int64_t b = 0; b < k.B; ++b)
      for (int64_t g = 0; g < rows; ++g) {
        uint8_t* row = in.mask.data() + (b * rows + g) * k.C;
        row[in.positive[b]] = 1;
        row[(in.positive[b] + 1) % k.C] = 1;
      }
  }
  return in;
}

bool real_at(const Case& k, const Inputs& in, int64_t b, int64_t g, int64_t c) {
  if (!k.mask_dims) return true;
  return in.mask[(k.mask_dims == 2 ? b * k.C : (b * k.G + g) * k.C) + c] != 0;
}

const float* cand_row(const Case& k, const Inputs& in, int64_t b, int64_t g, int64_t c) {
  return in.cand.data() + (k.shared ? b * k.C + c : (b * k.G + g) * k.C + c) * k.d;
}

// fp32 rows / max(||row||, 1e-12), products summed in double and rounded once: the reference's convention.
std::vector<float> normalized(const float* row, int64_t d) {
  double squares = 0;
  for (int64_t i = 0; i < d; ++i) squares += static_cast<double>(row[i]) * row[i];
  const float norm = std::max(static_cast<float>(std::sqrt(squares)), 1e-12f);
  std::vector<float> out(d);
  for (int64_t i = 0; i < d; ++i) out[i] = row[i] / norm;
  return out;
}

Outputs host_reference(const Case& k, const Inputs& in) {
  Outputs out;
  const int64_t n = k.B * k.G;
  out.total.resize(n), out.margin.resize(n), out.rank_reward.resize(n), out.advantages.resize(n), out.rank.resize(n);
  out.scores.assign(n * k.C, -INFINITY);
  std::vector<double> totals(n);
  const double ln_base = std::log(k.log_base);
  for (int64_t b = 0; b < k.B; ++b) {
    for (int64_t g = 0; g < k.G; ++g) {
      const auto q = normalized(in.query.data() + (b * k.G + g) * query_row_stride(k), k.d);
      std::vector<float> s(k.C);
      for (int64_t c = 0; c < k.C; ++c) {
        const auto x = normalized(cand_row(k, in, b, g, c), k.d);
        double dot = 0;
        for (int64_t i = 0; i < k.d; ++i) dot += static_cast<double>(q[i]) * x[i];
        s[c] = real_at(k, in, b, g, c) ? static_cast<float>(dot) : -INFINITY;
        out.scores[(b * k.G + g) * k.C + c] = s[c];
      }
      std::vector<int64_t> order(k.C);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return s[x] > s[y]; });
      std::vector<int64_t> rank(k.C);
      for (int64_t i = 0; i < k.C; ++i) rank[order[i]] = i + 1;
      const int64_t p = in.positive[b];
      double top = -INFINITY, penalty = 0;
      for (int64_t c = 0; c < k.C; ++c) {
        if (c == p || !real_at(k, in, b, g, c)) continue;
        top = std::max(top, static_cast<double>(s[c]));
        penalty += s[c] * (std::log(static_cast<double>(rank[c])) / ln_base - 1);
      }
      const double sp = s[p];
      const double margin = std::max(0.0, sp - top - kDelta);
      const double rank_reward = sp / (1 + std::log(static_cast<double>(rank[p])) / ln_base) - kGamma * penalty;
      const double total = kAlpha * margin + kEps * rank_reward;
      const int64_t row = b * k.G + g;
      totals[row] = total;
      out.total[row] = static_cast<float>(total);
      out.margin[row] = static_cast<float>(margin);
      out.rank_reward[row] = static_cast<float>(rank_reward);
      out.rank[row] = rank[p];
    }
  }
  // Advantages; "batch" takes the std over all n totals.
  double all_sum = 0, all_high = -INFINITY, all_low = INFINITY;
  for (double t : totals) all_sum += t, all_high = std::max(all_high, t), all_low = std::min(all_low, t);
  double batch_var = 0;
  for (double t : totals) batch_var += all_high == all_low ? 0 : (t - all_sum / n) * (t - all_sum / n);
  batch_var /= std::max<int64_t>(n - 1, 1);
  for (int64_t b = 0; b < k.B; ++b) {
    const double* t = totals.data() + b * k.G;
    const double mean = std::accumulate(t, t + k.G, 0.0) / k.G;
    const bool equal = *std::max_element(t, t + k.G) == *std::min_element(t, t + k.G);
    double var = 0;
    for (int64_t g = 0; g < k.G; ++g) var += equal ? 0 : (t[g] - mean) * (t[g] - mean);
    var /= std::max<int64_t>(k.G - 1, 1);
    for (int64_t g = 0; g < k.G; ++g) {
      const double centered = equal ? 0 : t[g] - mean;
      double a = centered;
      if (k.mode == elva::AdvantageMode::Group) a = var > 0 ? centered / (std::sqrt(var) + kAdvEps) : 0;
      if (k.mode == elva::AdvantageMode::Batch) a = batch_var > 0 ? centered / (std::sqrt(batch_var) + kAdvEps) : 0;
      out.advantages[b * k.G + g] = static_cast<float>(a);
    }
  }
  return out;
}


Outputs run_on_device(const Case& k, const Inputs& in) {
  const int64_t n = k.B * k.G;
  void* query = nullptr;
  void* cand = nullptr;
  if (k.bf16) {
    std::vector<uint16_t> q(in.query.size()), c(in.cand.size());
    for (size_t i = 0; i < q.size(); ++i) q[i] = bf16_bits(in.query[i]);
    for (size_t i = 0; i < c.size(); ++i) c[i] = bf16_bits(in.cand[i]);
    query = to_device(q), cand = to_device(c);
  } else {
    query = to_device(in.query), cand = to_device(in.cand);
  }
  int64_t* positive = to_device(in.positive);
  bool* mask = k.mask_dims ? reinterpret_cast<bool*>(to_device(in.mask)) : nullptr;
  float *total = nullptr, *margin = nullptr, *rank_reward = nullptr, *advantages = nullptr, *scores = nullptr;
  int64_t *rank = nullptr, *errors = nullptr;
  double* scratch = nullptr;
  for (float** p : {&total, &margin, &rank_reward, &advantages}) {
    CUDA_OK(cudaMalloc(p, n * sizeof(float)));
    CUDA_OK(cudaMemset(*p, 0xff, n * sizeof(float)));  // NaN: unwritten outputs fail the comparison
  }
  CUDA_OK(cudaMalloc(&rank, n * sizeof(int64_t)));
  CUDA_OK(cudaMalloc(&errors, elva::kErrorSlots * sizeof(int64_t)));
  CUDA_OK(cudaMemset(errors, 0x5a, elva::kErrorSlots * sizeof(int64_t)));  // the launcher must zero it
  if (k.return_scores) CUDA_OK(cudaMalloc(&scores, n * k.C * sizeof(float)));
  if (k.mode == elva::AdvantageMode::Batch) CUDA_OK(cudaMalloc(&scratch, 2 * n * sizeof(double)));

  elva::ElvaRewardsArgs a{};
  a.dtype = k.bf16 ? elva::DType::BF16 : elva::DType::F32;
  a.B = k.B, a.G = k.G, a.C = k.C, a.d = k.d;
  a.query = query, a.query_stride_b = k.G * query_row_stride(k), a.query_stride_g = query_row_stride(k);
  a.cand = cand, a.shared = k.shared;
  a.cand_stride_b = (k.shared ? k.C : k.G * k.C) * k.d;
  a.cand_stride_g = k.shared ? 0 : k.C * k.d;
  a.cand_stride_c = k.d;
  a.positive_index = positive;
  a.mask = mask;
  a.mask_stride_b = k.mask_dims == 2 ? k.C : k.G * k.C;
  a.mask_stride_g = k.mask_dims == 3 ? k.C : 0;
  a.delta = kDelta, a.gamma = kGamma, a.alpha = kAlpha, a.eps = kEps, a.log_base = k.log_base;
  a.advantage = k.mode, a.adv_eps = kAdvEps;
  a.total = total, a.margin = margin, a.rank_reward = rank_reward, a.rank = rank, a.advantages = advantages;
  a.scores = scores, a.batch_scratch = scratch, a.errors = errors;
  CUDA_OK(elva::elva_rewards_cuda(a, nullptr));
  CUDA_OK(cudaDeviceSynchronize());

  Outputs out;
  out.total = to_host(total, n), out.margin = to_host(margin, n);
  out.rank_reward = to_host(rank_reward, n), out.advantages = to_host(advantages, n);
  out.rank = to_host(rank, n);
  if (k.return_scores) out.scores = to_host(scores, n * k.C);
  CUDA_OK(cudaMemcpy(out.errors, errors, sizeof(out.errors), cudaMemcpyDeviceToHost));
  for (void* p : {query, cand, static_cast<void*>(positive), static_cast<void*>(mask), static_cast<void*>(total),
                  static_cast<void*>(margin), static_cast<void*>(rank_reward), static_cast<void*>(advantages),
                  static_cast<void*>(scores), static_cast<void*>(rank), static_cast<void*>(errors),
                  static_cast<void*>(scratch)}) {
    if (p) CUDA_OK(cudaFree(p));
  }
  return out;
}

void compare(const char* name, const char* what, const std::vector<float>& got, const std::vector<float>& want,
             double tolerance) {
  ELVA_CHECK(got.size() == want.size(), "%s %s: %zu values, want %zu", name, what, got.size(), want.size());
  for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
    const bool both_ninf = std::isinf(want[i]) && want[i] < 0 && std::isinf(got[i]) && got[i] < 0;
    ELVA_CHECK(both_ninf || std::fabs(got[i] - want[i]) <= tolerance * (1 + std::fabs(want[i])),
               "%s %s[%zu] = %.9g, want %.9g", name, what, i, got[i], want[i]);
  }
}

void check_no_errors(const char* name, const Outputs& out) {
  for (int s = 0; s < elva::kErrorSlots; ++s) ELVA_CHECK(out.errors[s] == 0, "%s: error slot %d = %lld", name, s,
                                                          static_cast<long long>(out.errors[s]));
}

void check_case(const Case& k, const Inputs& in) {
  const Outputs want = host_reference(k, in);
  const Outputs got = run_on_device(k, in);
  check_no_errors(k.name, got);
  for (size_t i = 0; i < want.rank.size(); ++i)
    ELVA_CHECK(got.rank[i] == want.rank[i], "%s rank[%zu] = %lld, want %lld", k.name, i,
               static_cast<long long>(got.rank[i]), static_cast<long long>(want.rank[i]));
  compare(k.name, "total", got.total, want.total, 1e-5);
  compare(k.name, "margin", got.margin, want.margin, 1e-5);
  compare(k.name, "rank_reward", got.rank_reward, want.rank_reward, 1e-5);
  compare(k.name, "advantages", got.advantages, want.advantages, 1e-3);  // (r - mean) / std amplifies
  if (k.return_scores) compare(k.name, "scores", got.scores, want.scores, 1e-5);
}

void run_random_cases() {
  using M = elva::AdvantageMode;
  const Case cases[] = {
      {"per-rollout fp32 packed", 3, 4, 7, 64},
      {"per-rollout fp32 odd d", 2, 3, 9, 37, false, false, 0, M::Group},
      {"shared fp32, G = 5 (partial quad)", 3, 5, 11, 32, true},
      {"shared fp32 odd d, [B, C] mask", 2, 6, 13, 45, true, false, 2},
      {"per-rollout bf16, [B, G, C] mask", 2, 4, 17, 48, false, true, 3},
      {"shared bf16, [B, G, C] mask, none", 3, 3, 10, 40, true, true, 3, M::None},
      {"per-rollout batch, log base 2", 4, 4, 6, 16, false, false, 0, M::Batch, 2.0},
      {"shared batch, padded query rows", 3, 2, 5, 24, true, false, 2, M::Batch, M_E, true, 8},
      {"G = 1 (advantage 0)", 3, 1, 5, 16},
      {"C = 512, several chunks", 2, 20, 512, 8, false, false, 3},
      {"shared C = 512", 2, 17, 512, 12, true},
      {"no scores", 2, 2, 4, 8, false, false, 0, M::Group, M_E, false},
  };
  uint32_t seed = 1;
  for (const Case& k : cases) check_case(k, make_inputs(k, seed++));
}

// Exact duplicates tie bitwise: a duplicate of the positive at a smaller index ranks first (r = 2, margin 0), one
// at a larger index ranks after it. Every rollout of a query is the same here, so the advantages are exactly 0.
void run_tie_cases() {
  for (bool shared : {false, true}) {
    Case k{shared ? "ties, shared" : "ties, per-rollout", 2, 3, 6, 32, shared};
    Inputs in = make_inputs(k, 99);
    in.positive = {3, 1};
    for (int64_t b = 0; b < k.B; ++b) {
      float* q0 = in.query.data() + b * k.G * k.d;
      for (int64_t g = 1; g < k.G; ++g) std::copy(q0, q0 + k.d, q0 + g * k.d);
      for (int64_t g = 0; g < (shared ? 1 : k.G); ++g) {
        float* rows = const_cast<float*>(cand_row(k, in, b, g, 0));
        if (g > 0) std::copy(cand_row(k, in, b, 0, 0), cand_row(k, in, b, 0, 0) + k.C * k.d, rows);
        // The positive is the query itself (the top score); query 0 duplicates it at candidate 0 (ahead of it),
        // query 1 at candidate 4 (after it).
        std::copy(q0, q0 + k.d, rows + in.positive[b] * k.d);
        std::copy(q0, q0 + k.d, rows + (b == 0 ? 0 : 4) * k.d);
      }
    }
    check_case(k, in);
    const Outputs got = run_on_device(k, in);
    for (int64_t g = 0; g < k.G; ++g) {
      ELVA_CHECK(got.rank[g] == 2, "%s: query 0 rollout %lld rank %lld, want 2", k.name, static_cast<long long>(g),
                 static_cast<long long>(got.rank[g]));
      ELVA_CHECK(got.margin[g] == 0.0f, "%s: tied margin %g, want 0", k.name, got.margin[g]);
      ELVA_CHECK(got.rank[k.G + g] == 1, "%s: query 1 rank %lld, want 1", k.name,
                 static_cast<long long>(got.rank[k.G + g]));
      for (int64_t b = 0; b < k.B; ++b) {
        ELVA_CHECK(got.advantages[b * k.G + g] == 0.0f, "%s: equal rollouts advantage %g, want exactly 0", k.name,
                   got.advantages[b * k.G + g]);
      }
    }
  }
}

// The data checks: recorded, never a crash, in the slots the binding reads.
void run_error_cases() {
  Case k{"errors", 3, 2, 5, 16, false, false, 3};
  const Inputs clean = make_inputs(k, 7);
  {
    Inputs in = clean;
    in.query[(1 * k.G + 1) * k.d + 3] = NAN;
    in.query[5] = INFINITY;
    in.cand[(2 * k.G * k.C + 4) * k.d] = NAN;
    const Outputs out = run_on_device(k, in);
    ELVA_CHECK(out.errors[elva::kQueryNonfinite] == 2, "query NaN/Inf count %lld, want 2",
               static_cast<long long>(out.errors[elva::kQueryNonfinite]));
    ELVA_CHECK(out.errors[elva::kCandNonfinite] == 1, "cand NaN/Inf count %lld, want 1",
               static_cast<long long>(out.errors[elva::kCandNonfinite]));
  }
  {
    Inputs in = clean;
    in.positive[2] = k.C;
    in.positive[1] = -1;
    const Outputs out = run_on_device(k, in);
    ELVA_CHECK(elva::elva_rewards_first(out.errors[elva::kBadPositive]) == 1, "bad positive at %lld, want query 1",
               static_cast<long long>(elva::elva_rewards_first(out.errors[elva::kBadPositive])));
  }
  {
    Inputs in = clean;
    in.mask[(2 * k.G + 1) * k.C + in.positive[2]] = 0;  // hides the positive of (2, 1)
    in.mask[(2 * k.G + 0) * k.C + in.positive[2]] = 0;  // and of (2, 0): the first
    for (int64_t c = 0; c < k.C; ++c) in.mask[(1 * k.G + 1) * k.C + c] = c == in.positive[1];  // (1, 1) lonely
    const Outputs out = run_on_device(k, in);
    ELVA_CHECK(elva::elva_rewards_first(out.errors[elva::kHiddenPositive]) == 2 * k.G,
               "hidden positive at %lld, want %lld",
               static_cast<long long>(elva::elva_rewards_first(out.errors[elva::kHiddenPositive])),
               static_cast<long long>(2 * k.G));
    ELVA_CHECK(elva::elva_rewards_first(out.errors[elva::kNoNegative]) == 1 * k.G + 1, "lonely at %lld, want %lld",
               static_cast<long long>(elva::elva_rewards_first(out.errors[elva::kNoNegative])),
               static_cast<long long>(k.G + 1));
  }
}

}  // namespace

int main() {
  int devices = 0;
  const cudaError_t status = cudaGetDeviceCount(&devices);
  if (status != cudaSuccess || devices == 0) {
    std::printf("no GPU, skipped (cudaGetDeviceCount: %s, %d devices)\n", cudaGetErrorString(status), devices);
    return elva::test::kSkipExitCode;
  }
  run_random_cases();
  run_tie_cases();
  run_error_cases();
  return elva::test::finish("elva_rewards cuda");
}
