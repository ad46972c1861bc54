// The per-split CUDA kernels against a brute-force host computation of the same keys (fp32: bitwise, the host
// replays the kernels' fmaf order), and fp16/bf16 lists against exact scores. Reported as skipped without a GPU.
#include <cuda_runtime.h>  // the typed cudaMalloc overloads

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "elva/cuda/split_select.cuh"
#include "cuda_harness.h"
#include "harness.h"

namespace {

using elva::test::to_device;
using elva::test::to_host;

constexpr int64_t kMin = std::numeric_limits<int64_t>::min();



uint32_t bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return b;
}

int64_t score_key(float score, int64_t j) {
  const auto b = static_cast<int32_t>(bits(score + 0.0f));
  const int32_t o = b < 0 ? (b ^ 0x7FFFFFFF) : b;
  return static_cast<int64_t>(o) * (int64_t{1} << 32) + static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(j));
}

float key_score(int64_t key) {
  const auto o = static_cast<int32_t>(key >> 32);
  const int32_t b = o < 0 ? (o ^ 0x7FFFFFFF) : o;
  float v;
  std::memcpy(&v, &b, 4);
  return v;
}

int64_t key_id(int64_t key) { return static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(key)); }

uint32_t mix32(uint32_t x) {
  x = (x ^ (x >> 16)) * 0x45D9F3Bu;
  x = (x ^ (x >> 16)) * 0x45D9F3Bu;
  return x ^ (x >> 16);
}

int64_t hash_key(int64_t seed, int64_t row, int64_t j) {
  uint32_t h = mix32(static_cast<uint32_t>(seed));
  h = mix32(h ^ static_cast<uint32_t>(row));
  h = mix32(h ^ static_cast<uint32_t>(j));
  h = mix32(h ^ static_cast<uint32_t>(j >> 32));
  return (static_cast<int64_t>(0xFFFFFFFFu - h) - (int64_t{1} << 31)) * (int64_t{1} << 32) +
         static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(j));
}

bool listed(const std::vector<int64_t>& ids, int64_t cols, int64_t i, int64_t j) {
  for (int64_t t = 0; t < cols; ++t) {
    if (ids[i * cols + t] == j) return true;
  }
  return false;
}

struct Case {
  int64_t B = 70, N = 300, d = 40, row_stride = 40;  // B > 64: two query blocks
  int64_t split_size = 64, list_size = 16;
};

// fp32 pool with the kernels' score arithmetic replayed on the host.
struct F32Pool {
  Case c;
  std::vector<float> q, x, qs, cs;
  float score(int64_t i, int64_t j) const {
    float acc = 0.0f;
    for (int64_t k = 0; k < c.d; ++k) acc = std::fma(q[i * c.row_stride + k], x[j * c.d + k], acc);
    acc = acc + 0.0f;
    return (acc * qs[i]) * cs[j];
  }
};

void run_f32(const Case& c) {
  std::mt19937_64 rng(1234 + c.d);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  F32Pool pool{c, std::vector<float>(c.B * c.row_stride), std::vector<float>(c.N * c.d), std::vector<float>(c.B),
               std::vector<float>(c.N)};
  for (auto& v : pool.q) v = uniform(rng);
  for (auto& v : pool.x) v = uniform(rng);
  // A few exact duplicates, so that ties are ordered by id.
  for (int64_t k = 0; k < c.d; ++k) pool.x[7 * c.d + k] = pool.x[250 * c.d + k];
  for (auto& v : pool.qs) v = 0.5f + uniform(rng) * 0.25f;
  for (auto& v : pool.cs) v = 1.0f;
  pool.cs[250] = pool.cs[7] = 1.0f;
  for (int64_t j = 0; j < c.N; j += 3) pool.cs[j] = 0.75f + uniform(rng) * 0.1f;

  const int64_t S = (c.N + c.split_size - 1) / c.split_size, L = c.list_size, m = 3;
  std::vector<int64_t> exclude(c.B * m, -1);
  for (int64_t i = 0; i < c.B; ++i) {
    exclude[i * m] = (i * 37) % c.N;
    if (i % 2) exclude[i * m + 1] = (i * 11 + 5) % c.N;
  }
  std::vector<float> max_score(c.B);
  for (int64_t i = 0; i < c.B; ++i) max_score[i] = i % 3 == 0 ? 1e30f : 0.1f * static_cast<float>(i % 5);
  std::vector<int64_t> upper(c.B * S, std::numeric_limits<int64_t>::max());
  for (int64_t i = 0; i < c.B; ++i) {
    for (int64_t s = 0; s < S; ++s) {
      if ((i + s) % 4 == 1) upper[i * S + s] = kMin;  // skipped
      if ((i + s) % 4 == 2) upper[i * S + s] = score_key(0.2f, 100);
    }
  }
  // Rows 64..69 (the second query block) skip every split but one.
  for (int64_t i = 64; i < c.B; ++i) {
    for (int64_t s = 0; s < S; ++s) upper[i * S + s] = s == 2 ? upper[i * S + s] : kMin;
  }

  elva::ScorePool sp{};
  float* q_d = to_device(pool.q);
  float* x_d = to_device(pool.x);
  float* qs_d = to_device(pool.qs);
  float* cs_d = to_device(pool.cs);
  int64_t* ex_d = to_device(exclude);
  float* max_d = to_device(max_score);
  int64_t* up_d = to_device(upper);
  sp.queries = q_d;
  sp.query_stride = c.row_stride;
  sp.candidates = x_d;
  sp.candidate_stride = c.d;
  sp.dtype = elva::DType::F32;
  sp.B = c.B;
  sp.N = c.N;
  sp.d = c.d;
  sp.query_scale = qs_d;
  sp.candidate_scale = cs_d;
  int64_t* keys_d = nullptr;
  int32_t* nonfinite_d = nullptr;
  CUDA_OK(cudaMalloc(&keys_d, c.B * S * L * sizeof(int64_t)));
  CUDA_OK(cudaMalloc(&nonfinite_d, sizeof(int32_t)));

  for (int key_mode = 0; key_mode < 2; ++key_mode) {
    for (int with_options = 0; with_options < 2; ++with_options) {
      CUDA_OK(cudaMemset(keys_d, 0x55, c.B * S * L * sizeof(int64_t)));
      CUDA_OK(elva::split_topk_cuda(sp, with_options ? ex_d : nullptr, with_options ? m : 0,
                                    with_options ? max_d : nullptr, up_d, S, c.split_size, L, key_mode, 42, keys_d,
                                    nonfinite_d, nullptr));
      const auto keys = to_host(keys_d, c.B * S * L);
      const auto nonfinite = to_host(nonfinite_d, 1);
      ELVA_CHECK(nonfinite[0] == 0, "nonfinite %d", nonfinite[0]);
      for (int64_t i = 0; i < c.B; ++i) {
        for (int64_t s = 0; s < S; ++s) {
          std::vector<int64_t> expected;
          for (int64_t j = s * c.split_size; j < std::min(c.N, (s + 1) * c.split_size); ++j) {
            const float score = pool.score(i, j);
            const int64_t key = key_mode == 0 ? score_key(score, j) : hash_key(42, i, j);
            if (key >= upper[i * S + s]) continue;
            if (with_options && (listed(exclude, m, i, j) || !(score <= max_score[i]))) continue;
            expected.push_back(key);
          }
          std::sort(expected.rbegin(), expected.rend());
          if (static_cast<int64_t>(expected.size()) > L) expected.resize(L);
          std::vector<int64_t> got(keys.begin() + (i * S + s) * L, keys.begin() + (i * S + s + 1) * L);
          std::sort(got.rbegin(), got.rend());
          const int64_t real = static_cast<int64_t>(expected.size());
          bool ok = true;
          for (int64_t t = 0; t < L; ++t) {
            if (t < real) {
              ok = ok && got[t] == expected[t];
            } else {
              ok = ok && got[t] < kMin + (int64_t{1} << 31) && (t == 0 || got[t] != got[t - 1]);
            }
          }
          ELVA_CHECK(ok, "split_topk fp32 d=%lld key_mode=%d options=%d row %lld split %lld", (long long)c.d,
                     key_mode, with_options, (long long)i, (long long)s);
        }
      }
    }
  }

  // A NaN score sets nonfinite.
  std::vector<float> nan_scale = pool.cs;
  nan_scale[123] = NAN;
  CUDA_OK(cudaMemcpy(cs_d, nan_scale.data(), c.N * sizeof(float), cudaMemcpyHostToDevice));
  CUDA_OK(elva::split_topk_cuda(sp, nullptr, 0, nullptr, up_d, S, c.split_size, L, 0, 0, keys_d, nonfinite_d,
                                nullptr));
  ELVA_CHECK(to_host(nonfinite_d, 1)[0] == 1, "split_topk did not flag a NaN score");

  for (void* p : {static_cast<void*>(q_d), static_cast<void*>(x_d), static_cast<void*>(qs_d),
                  static_cast<void*>(cs_d), static_cast<void*>(ex_d), static_cast<void*>(max_d),
                  static_cast<void*>(up_d), static_cast<void*>(keys_d), static_cast<void*>(nonfinite_d)}) {
    CUDA_OK(cudaFree(p));
  }
}

// fp16/bf16: split_topk's lists against the exact scores of the pairs (the MMA's sums are not replayed here).
void run_half(elva::DType dtype, int64_t d) {
  const int64_t B = 37, N = 300, split_size = 64, L = 32;
  const int64_t S = (N + split_size - 1) / split_size;
  std::mt19937_64 rng(99 + d);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  auto encode = [&](float v) -> uint16_t {
    if (dtype == elva::DType::BF16) return static_cast<uint16_t>(bits(v) >> 16);  // truncation is fine here
    // fp16 of a value in [-1, 1] with 10 mantissa bits: through a multiple of 2^-14 grid.
    const double r = std::round(static_cast<double>(v) * 16384.0) / 16384.0;
    if (r == 0.0) return 0;
    const uint16_t sign = r < 0 ? 0x8000 : 0;
    int e;
    const double f = std::frexp(std::fabs(r), &e);  // |r| = f * 2^e, f in [0.5, 1)
    const int exponent = e - 1 + 15;
    if (exponent <= 0) return sign;
    const auto mantissa = static_cast<uint16_t>(std::lround((f * 2.0 - 1.0) * 1024.0)) & 0x3ff;
    return static_cast<uint16_t>(sign | (exponent << 10) | mantissa);
  };
  std::vector<uint16_t> q(B * d), x(N * d);
  for (auto& v : q) v = encode(uniform(rng));
  for (auto& v : x) v = encode(uniform(rng));
  std::vector<float> qs(B, 1.0f), cs(N, 1.0f);
  std::vector<int64_t> upper(B * S, std::numeric_limits<int64_t>::max());
  uint16_t* q_d = to_device(q);
  uint16_t* x_d = to_device(x);
  float* qs_d = to_device(qs);
  float* cs_d = to_device(cs);
  int64_t* up_d = to_device(upper);
  elva::ScorePool sp{q_d, d, x_d, d, dtype, B, N, d, qs_d, cs_d};
  int64_t* keys_d = nullptr;
  int32_t* nonfinite_d = nullptr;
  CUDA_OK(cudaMalloc(&keys_d, B * S * L * sizeof(int64_t)));
  CUDA_OK(cudaMalloc(&nonfinite_d, sizeof(int32_t)));
  CUDA_OK(elva::split_topk_cuda(sp, nullptr, 0, nullptr, up_d, S, split_size, L, 0, 0, keys_d, nonfinite_d, nullptr));
  const auto keys = to_host(keys_d, B * S * L);
  // Each list holds its own split's ids, each with a close fp32 dot product, and they are the split's best L by
  // the exact scores up to rounding (a listed score is at least every unlisted one, less a tolerance).
  auto exact_score = [&](int64_t i, int64_t j) {
    double exact = 0.0;
    for (int64_t k = 0; k < d; ++k) {
      const double a = dtype == elva::DType::BF16 ? elva::test::bf16_value(q[i * d + k])
                                                  : elva::test::fp16_value(q[i * d + k]);
      const double b = dtype == elva::DType::BF16 ? elva::test::bf16_value(x[j * d + k])
                                                  : elva::test::fp16_value(x[j * d + k]);
      exact += a * b;
    }
    return exact;
  };
  int misplaced = 0;
  for (int64_t i = 0; i < B; ++i) {
    for (int64_t s = 0; s < S; ++s) {
      const int64_t first = s * split_size, end = std::min(N, (s + 1) * split_size);
      std::vector<bool> listed(N, false);
      double lowest = INFINITY;
      for (int64_t t = (i * S + s) * L; t < (i * S + s + 1) * L; ++t) {
        const int64_t j = key_id(keys[t]);
        if (j < first || j >= end || listed[j]) {
          ++misplaced;
          continue;
        }
        listed[j] = true;
        const double exact = exact_score(i, j);
        const float got = key_score(keys[t]);
        ELVA_CHECK(std::fabs(exact - got) < 1e-4 * (1.0 + std::fabs(exact)), "half score %g vs %g", got, exact);
        lowest = std::min(lowest, exact);
      }
      for (int64_t j = first; j < end; ++j) {
        if (listed[j]) continue;
        ELVA_CHECK(exact_score(i, j) <= lowest + 2e-4 * (1.0 + std::fabs(lowest)), "row %lld split %lld misses %lld",
                   (long long)i, (long long)s, (long long)j);
      }
    }
  }
  ELVA_CHECK(misplaced == 0, "%s d=%lld: %d keys outside their split or repeated",
             dtype == elva::DType::BF16 ? "bf16" : "fp16", (long long)d, misplaced);
  for (void* p : {static_cast<void*>(q_d), static_cast<void*>(x_d), static_cast<void*>(qs_d),
                  static_cast<void*>(cs_d), static_cast<void*>(up_d), static_cast<void*>(keys_d),
                  static_cast<void*>(nonfinite_d)}) {
    CUDA_OK(cudaFree(p));
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
  Case vectorised;  // d % 4 == 0: 16-byte loads
  run_f32(vectorised);
  Case scalar;
  scalar.d = 37;
  scalar.row_stride = 39;
  scalar.list_size = 32;
  scalar.split_size = 100;
  run_f32(scalar);
  run_half(elva::DType::F16, 72);
  run_half(elva::DType::F16, 37);
  run_half(elva::DType::BF16, 136);
  return elva::test::finish("split_select cuda");
}
