// ELVA's rewards and GRPO advantages on CUDA (SPEC A3); semantics of elva_kernels/reference/elva_rewards.py.
//
// One CTA per query b handles its G rollouts, so "group" and "none" advantages need one launch:
//   0. each warp takes rollouts g and stores max(||q_g||, 1e-12) in shared memory;
//   1. for a chunk of rollouts (chunk * C <= kScoreSlots), the warps share the (rollout, candidate) rows: a warp
//      streams a candidate row once (16-byte loads), accumulating in fp32 its sum of squares and its dot with
//      the raw query row(s) (L1/L2-resident), and the score dot / ||q|| / ||c|| goes to shared memory (-inf
//      where masked). A shared [B, C, d] candidate row is read once for up to kQuad rollouts and its norm is
//      computed from that same read: [B, G, C, d] is never materialised;
//   2. a warp per rollout ranks its C <= 512 candidates on chip, rank_c = 1 + #{c' : s_c' > s_c, or
//      s_c' == s_c and c' < c} (masked -inf scores never count), and reduces the rewards in double;
//   3. after the last chunk, warp 0 turns the G totals (double, in shared memory) into advantages; "batch"
//      writes totals and group deviations to scratch for a second, one-CTA kernel that takes the global std.
// Every row goes through the same instructions, so bitwise-identical candidates get bitwise-identical scores
// and the tie goes to the smaller index. The data checks (finite embeddings, positive in range, a mask that
// keeps the positive and a negative) set the error record instead of raising; the binding reads it.
// No ATen headers, so that plain nvcc (CMake, CI without a GPU) compiles it for sm_90.
#include "elva/cuda/elva_rewards.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "elva/cuda/device.cuh"

#include <algorithm>
#include <cmath>

namespace elva {
namespace {

using device::kLoadBytes;
using device::kWarpSize;

constexpr int kWarps = 8;
constexpr int kThreads = kWarpSize * kWarps;
// 512 CTAs (the A3 benchmark's B) fit in one wave of 132 SMs at 4 CTAs each; this caps registers at 64.
constexpr int kMinBlocksPerSm = 4;
// fp32 scores of one chunk of rollouts in shared memory (32 KiB): C <= 512 leaves room for >= 16 rollouts.
constexpr int64_t kScoreSlots = 8192;
// Rollouts scored from one read of a shared candidate row.
constexpr int kQuad = 4;
constexpr float kNormEps = 1e-12f;

using device::Pack;
using device::to_float;
using device::warp_sum;
using device::warp_max;
template <typename V>
__device__ __forceinline__ V warp_min(V value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value = min(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

__device__ __forceinline__ float negative_infinity() { return __int_as_float(0xff800000); }

__device__ __forceinline__ void record_first(int64_t* errors, int slot, int64_t index) {
  atomicMax(reinterpret_cast<unsigned long long*>(errors + slot), static_cast<unsigned long long>(kFirstBase - index));
}

__device__ __forceinline__ void add_count(int64_t* errors, int slot, unsigned long long count) {
  atomicAdd(reinterpret_cast<unsigned long long*>(errors + slot), count);
}

// NaN/Inf entries of a row (the slow path, taken only when the row's sum of squares is not finite).
template <typename T>
__device__ unsigned long long count_nonfinite(const T* __restrict__ row, int64_t d, int lane) {
  unsigned long long count = 0;
  for (int64_t k = lane; k < d; k += kWarpSize) count += !isfinite(to_float(row[k]));
  return warp_sum(count);
}

// One warp: the sum of squares of cand_row and its dots with the first nq of q_rows, in fp32 with one fmaf per
// product and a fixed lane order, then summed over the warp (every lane gets the totals).
template <typename T, int kVec, int kQ>
__device__ __forceinline__ void row_dots(const T* __restrict__ cand_row, const T* const (&q_rows)[kQ], int nq,
                                         int64_t packs, int lane, float (&dots)[kQ], float& squares) {
  using P = Pack<T, kVec>;
  // kQ > 1 already has kQ + 1 independent loads per step; unrolling it further spills (2-byte types).
  constexpr int kUnroll = kQ == 1 ? 4 : 1;
  const auto* cand = reinterpret_cast<const P*>(cand_row);
  squares = 0.0f;
#pragma unroll
  for (int j = 0; j < kQ; ++j) dots[j] = 0.0f;
#pragma unroll kUnroll
  for (int64_t p = lane; p < packs; p += kWarpSize) {
    const P c = cand[p];
    float cf[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      cf[k] = to_float(c.v[k]);
      squares = fmaf(cf[k], cf[k], squares);
    }
#pragma unroll
    for (int j = 0; j < kQ; ++j) {
      if (j < nq) {
        const P q = reinterpret_cast<const P*>(q_rows[j])[p];
#pragma unroll
        for (int k = 0; k < kVec; ++k) dots[j] = fmaf(to_float(q.v[k]), cf[k], dots[j]);
      }
    }
  }
  squares = warp_sum(squares);
#pragma unroll
  for (int j = 0; j < kQ; ++j) dots[j] = warp_sum(dots[j]);
}

// The mask of one query, by value (a reference to the kernel parameter would copy it to local memory).
struct QueryMask {
  const bool* row;  // nullptr: every candidate is real
  int64_t stride_g;
  __device__ bool real(int64_t g, int64_t c) const { return row == nullptr || row[g * stride_g + c]; }
};

// sm90-expect: max_spill_bytes=0
template <typename T, int kVec, bool kShared>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    elva_rewards_kernel(const ElvaRewardsArgs a, int64_t chunk, double ln_base) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t G = a.G, C = a.C;
  double* totals = reinterpret_cast<double*>(smem);                   // [G]
  float* q_norms = reinterpret_cast<float*>(totals + G);          // [G]
  float* scores = q_norms + G;                                    // [chunk, C]

  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const QueryMask query{a.mask == nullptr ? nullptr : a.mask + b * a.mask_stride_b, a.mask_stride_g};
  const int64_t packs = a.d / kVec;
  const T* q_base = static_cast<const T*>(a.query) + b * a.query_stride_b;
  const T* c_base = static_cast<const T*>(a.cand) + b * a.cand_stride_b;

  // An out-of-range positive is reported; the CTA still runs (on candidate 0) so that the NaN/Inf counts,
  // which the reference checks first, stay exact.
  const int64_t positive_raw = a.positive_index[b];
  const bool positive_valid = positive_raw >= 0 && positive_raw < C;
  const int64_t p = positive_valid ? positive_raw : 0;
  if (!positive_valid && threadIdx.x == 0) record_first(a.errors, kBadPositive, b);

  // 0. Query norms.
  for (int64_t g = warp; g < G; g += kWarps) {
    const T* q_row = q_base + g * a.query_stride_g;
    const T* const q_rows[1] = {q_row};
    float dots[1], squares;
    row_dots<T, kVec, 1>(q_row, q_rows, 0, packs, lane, dots, squares);
    if (!isfinite(squares)) {
      const unsigned long long bad = count_nonfinite(q_row, a.d, lane);
      if (lane == 0 && bad > 0) add_count(a.errors, kQueryNonfinite, bad);
    }
    if (lane == 0) q_norms[g] = fmaxf(sqrtf(squares), kNormEps);
  }
  __syncthreads();

  for (int64_t g0 = 0; g0 < G; g0 += chunk) {
    const int64_t rollouts = min(chunk, G - g0);

    // 1. Scores of the chunk.
    if constexpr (!kShared) {
      for (int64_t r = warp; r < rollouts * C; r += kWarps) {
        const int64_t g = g0 + r / C, c = r % C;
        const T* c_row = c_base + g * a.cand_stride_g + c * a.cand_stride_c;
        const T* const q_rows[1] = {q_base + g * a.query_stride_g};
        float dots[1], squares;
        row_dots<T, kVec, 1>(c_row, q_rows, 1, packs, lane, dots, squares);
        if (!isfinite(squares)) {
          const unsigned long long bad = count_nonfinite(c_row, a.d, lane);
          if (lane == 0 && bad > 0) add_count(a.errors, kCandNonfinite, bad);
        }
        if (lane == 0) {
          const float s = query.real(g, c) ? dots[0] / q_norms[g] / fmaxf(sqrtf(squares), kNormEps)
                                           : negative_infinity();
          scores[r] = s;
          if (a.scores != nullptr) a.scores[(b * G + g) * C + c] = s;
        }
      }
    } else {
      const int64_t quads = (rollouts + kQuad - 1) / kQuad;
      for (int64_t t = warp; t < quads * C; t += kWarps) {
        const int64_t quad = t / C, c = t % C;
        const int64_t gq = g0 + quad * kQuad;
        const int nq = static_cast<int>(min(static_cast<int64_t>(kQuad), g0 + rollouts - gq));
        const T* c_row = c_base + c * a.cand_stride_c;
        const T* q_rows[kQuad];
#pragma unroll
        for (int j = 0; j < kQuad; ++j) q_rows[j] = q_base + (gq + min(j, nq - 1)) * a.query_stride_g;
        float dots[kQuad], squares;
        row_dots<T, kVec, kQuad>(c_row, q_rows, nq, packs, lane, dots, squares);
        // Each shared row is counted once: in the first quad of the first chunk.
        if (gq == 0 && !isfinite(squares)) {
          const unsigned long long bad = count_nonfinite(c_row, a.d, lane);
          if (lane == 0 && bad > 0) add_count(a.errors, kCandNonfinite, bad);
        }
        const float c_norm = fmaxf(sqrtf(squares), kNormEps);
#pragma unroll
        for (int j = 0; j < kQuad; ++j) {
          if (j < nq && lane == j) {
            const int64_t g = gq + j;
            const float s = query.real(g, c) ? dots[j] / q_norms[g] / c_norm : negative_infinity();
            scores[(g - g0) * C + c] = s;
            if (a.scores != nullptr) a.scores[(b * G + g) * C + c] = s;
          }
        }
      }
    }
    __syncthreads();

    // 2. Ranks and rewards, a warp per rollout.
    for (int64_t local = warp; local < rollouts; local += kWarps) {
      const int64_t g = g0 + local;
      const float* s_row = scores + local * C;
      double penalty = 0.0;
      float top_negative = negative_infinity();
      float s_positive = 0.0f;
      int real_count = 0, positive_rank = 0;
      for (int64_t c = lane; c < C; c += kWarpSize) {
        if (!query.real(g, c)) continue;
        const float s = s_row[c];
        ++real_count;
        int rank = 1;
        for (int64_t other = 0; other < C; ++other) {
          const float s_other = s_row[other];
          rank += (s_other > s) | ((s_other == s) & (other < c));
        }
        if (c == p) {
          positive_rank = rank;
          s_positive = s;
        } else {
          top_negative = fmaxf(top_negative, s);
          penalty += static_cast<double>(s) * (log(static_cast<double>(rank)) / ln_base - 1.0);
        }
      }
      real_count = warp_sum(real_count);
      positive_rank = warp_sum(positive_rank);
      penalty = warp_sum(penalty);
      top_negative = warp_max(top_negative);
      s_positive = __shfl_sync(0xffffffffu, s_positive, static_cast<int>(p % kWarpSize));
      if (lane == 0) {
        const int64_t row = b * G + g;
        const bool positive_real = query.real(g, p);
        if (positive_valid && !positive_real) record_first(a.errors, kHiddenPositive, row);
        if (real_count < 2) record_first(a.errors, kNoNegative, row);
        const int rank = max(positive_rank, 1);
        const double sp = s_positive;
        const double margin = fmax(0.0, sp - static_cast<double>(top_negative) - a.delta);
        const double rank_reward = sp / (1.0 + log(static_cast<double>(rank)) / ln_base) - a.gamma * penalty;
        const double total = a.alpha * margin + a.eps * rank_reward;
        totals[g] = total;
        a.total[row] = static_cast<float>(total);
        a.margin[row] = static_cast<float>(margin);
        a.rank_reward[row] = static_cast<float>(rank_reward);
        a.rank[row] = rank;
      }
    }
    __syncthreads();
  }

  // 3. Advantages from the G totals: mean, and exactly 0 deviation when all are equal.
  if (warp != 0) return;
  double sum = 0.0, high = -HUGE_VAL, low = HUGE_VAL;
  for (int64_t g = lane; g < G; g += kWarpSize) {
    sum += totals[g];
    high = fmax(high, totals[g]);
    low = fmin(low, totals[g]);
  }
  const double mean = warp_sum(sum) / static_cast<double>(G);
  const bool equal = warp_max(high) == warp_min(low);
  double squares = 0.0;
  for (int64_t g = lane; g < G; g += kWarpSize) {
    const double centered = equal ? 0.0 : totals[g] - mean;
    squares += centered * centered;
  }
  const double var = warp_sum(squares) / static_cast<double>(max(G - 1, int64_t{1}));
  for (int64_t g = lane; g < G; g += kWarpSize) {
    const int64_t row = b * G + g;
    const double centered = equal ? 0.0 : totals[g] - mean;
    switch (a.advantage) {
      case AdvantageMode::None:
        a.advantages[row] = static_cast<float>(centered);
        break;
      case AdvantageMode::Group:
        a.advantages[row] = var > 0 ? static_cast<float>(centered / (sqrt(var) + a.adv_eps)) : 0.0f;
        break;
      case AdvantageMode::Batch:
        a.batch_scratch[row] = totals[g];
        a.batch_scratch[a.B * G + row] = centered;
        break;
    }
  }
}

// Block-wide reductions for the one-CTA batch kernel (every thread gets the result).
constexpr int kBatchThreads = 1024;

template <typename V, typename Op>
__device__ V block_reduce(V value, Op op, V* slots) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  __syncthreads();  // slots may still be read by a previous reduction
  if (lane == 0) slots[warp] = value;
  __syncthreads();
  value = slots[lane];  // kBatchThreads / kWarpSize == kWarpSize slots
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

struct Add {
  __device__ double operator()(double x, double y) const { return x + y; }
};
struct Max {
  __device__ double operator()(double x, double y) const { return fmax(x, y); }
};
struct Min {
  __device__ double operator()(double x, double y) const { return fmin(x, y); }
};

// "batch": the group deviations over the unbiased std of all n = B * G totals (TRL's scale_rewards="batch").
// sm90-expect: max_spill_bytes=0
__global__ void __launch_bounds__(kBatchThreads)
    batch_advantages_kernel(const double* __restrict__ scratch, int64_t n, double adv_eps, float* __restrict__ out) {
  __shared__ double slots[kWarpSize];
  const double* totals = scratch;
  const double* centered = scratch + n;
  double sum = 0.0, high = -HUGE_VAL, low = HUGE_VAL;
  for (int64_t i = threadIdx.x; i < n; i += kBatchThreads) {
    sum += totals[i];
    high = fmax(high, totals[i]);
    low = fmin(low, totals[i]);
  }
  const double mean = block_reduce(sum, Add{}, slots) / static_cast<double>(n);
  const bool equal = block_reduce(high, Max{}, slots) == block_reduce(low, Min{}, slots);
  double squares = 0.0;
  if (!equal) {
    for (int64_t i = threadIdx.x; i < n; i += kBatchThreads) {
      const double spread = totals[i] - mean;
      squares += spread * spread;
    }
  }
  const double var = block_reduce(squares, Add{}, slots) / static_cast<double>(max(n - 1, int64_t{1}));
  const double denominator = sqrt(var) + adv_eps;
  for (int64_t i = threadIdx.x; i < n; i += kBatchThreads) {
    out[i] = var > 0 ? static_cast<float>(centered[i] / denominator) : 0.0f;
  }
}

bool is_aligned(const void* pointer, size_t bytes) { return reinterpret_cast<uintptr_t>(pointer) % bytes == 0; }

template <typename T, int kVec, bool kShared>
cudaError_t launch_kernel(const ElvaRewardsArgs& a, int64_t chunk, double ln_base, size_t smem, cudaStream_t stream) {
  elva_rewards_kernel<T, kVec, kShared>
      <<<static_cast<unsigned>(a.B), kThreads, smem, stream>>>(a, chunk, ln_base);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(const ElvaRewardsArgs& a, double ln_base, cudaStream_t stream) {
  constexpr int kVec = kLoadBytes / sizeof(T);
  const int64_t chunk = std::min(a.G, std::max<int64_t>(1, kScoreSlots / a.C));
  const size_t smem = static_cast<size_t>(a.G) * (sizeof(double) + sizeof(float)) +
                      static_cast<size_t>(chunk * a.C) * sizeof(float);
  const bool packable = a.d % kVec == 0 && a.query_stride_b % kVec == 0 && a.query_stride_g % kVec == 0 &&
                        a.cand_stride_b % kVec == 0 && (a.shared || a.cand_stride_g % kVec == 0) &&
                        a.cand_stride_c % kVec == 0 && is_aligned(a.query, kLoadBytes) &&
                        is_aligned(a.cand, kLoadBytes);
  if (packable) {
    return a.shared ? launch_kernel<T, kVec, true>(a, chunk, ln_base, smem, stream)
                    : launch_kernel<T, kVec, false>(a, chunk, ln_base, smem, stream);
  }
  return a.shared ? launch_kernel<T, 1, true>(a, chunk, ln_base, smem, stream)
                  : launch_kernel<T, 1, false>(a, chunk, ln_base, smem, stream);
}

}  // namespace

cudaError_t elva_rewards_cuda(const ElvaRewardsArgs& a, cudaStream_t stream) {
  if (a.B < 1 || a.B > 0x7fffffff || a.G < 1 || a.G > kElvaRewardsMaxRollouts || a.C < 2 ||
      a.C > kElvaRewardsMaxCandidates || a.d < 0 || !(a.log_base > 0) || a.log_base == 1.0 ||
      (a.advantage == AdvantageMode::Batch && a.batch_scratch == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const cudaError_t zeroed = cudaMemsetAsync(a.errors, 0, kErrorSlots * sizeof(int64_t), stream);
  if (zeroed != cudaSuccess) return zeroed;
  const double ln_base = std::log(a.log_base);
  cudaError_t launched = cudaSuccess;
  switch (a.dtype) {
    case DType::F32:
      launched = launch<float>(a, ln_base, stream);
      break;
    case DType::F16:
      launched = launch<__half>(a, ln_base, stream);
      break;
    case DType::BF16:
      launched = launch<__nv_bfloat16>(a, ln_base, stream);
      break;
  }
  if (launched != cudaSuccess || a.advantage != AdvantageMode::Batch) return launched;
  batch_advantages_kernel<<<1, kBatchThreads, 0, stream>>>(a.batch_scratch, a.B * a.G, a.adv_eps, a.advantages);
  return cudaGetLastError();
}

}  // namespace elva
