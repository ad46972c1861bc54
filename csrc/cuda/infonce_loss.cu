// infonce_loss on CUDA: online log-sum-exp forward and a memory-linear backward that recomputes score tiles
// (the design of elva_kernels/triton/infonce_loss.py). No ATen headers, so that plain nvcc compiles it.
//
// Scores: s_ij = (acc_ij * qscale_i) * cscale_j with scale = 1 / max(||row||, 1e-12) (inv_norm_kernel, which
// also counts NaN/Inf entries) and acc the raw dot product of a 64 x 64 score tile computed by all 256 threads
// of a CTA (the tile routine of split_select.cu: fp32 FMAs for fp32, wmma 16x16x16 with fp32 accumulators for
// fp16/bf16). Every kernel places pair (i, j) at tile position (i % 64, j % 64) with the same k sequence, so the
// forward, the column lse, the diagonal and both gradient kernels see bitwise the same s_ij and z_ij = s_ij / tau.
// False negatives: after each score tile, warp w scans the id lists of tile rows 8w..8w+7 and overwrites the
// listed entries with -inf (a sentinel that finite inputs never produce in the raw tile), then a barrier.
//
// Kernels:
//   forward_kernel     a CTA owns 64 queries and streams every candidate tile; warp w folds rows 8w..8w+7
//                      (lanes: columns l, l + 32) into a running (max, sum); writes lse and loss (symmetric: the
//                      label's z, finalised by column_lse_kernel).
//   column_lse_kernel  symmetric: a CTA owns 64 of the first B candidates and streams the query tiles; writes
//                      loss_j = ((lse_j - z_jj) + rlse_j - z_jj) / 2.
//   diagonal_kernel    backward, symmetric: rlse_i = 2 loss_i - lse_i + 2 z_ii (fp64, as the reference).
//   grad_queries_kernel a CTA owns 64 queries; per candidate tile it forms dL/dz in the score buffer, scales it
//                      to G = dL/dz / tau * cscale_j and adds G @ C (raw rows widened to fp32) to its rows of the
//                      fp32 [B, d] accumulator, d in chunks of 64 (the CTA owns those rows: no atomics); it also
//                      sums dL/dz * s in fp64 per CTA for the temperature.
//   grad_candidates_kernel the same per 64 candidates over the query tiles: G = dL/dz / tau * qscale_i, adds
//                      G^T @ Q to the fp32 [N, d] accumulator.
//   normalize_backward_kernel maps the prepared-row gradient back: (g - u (u.g)) / |x| (g / eps below eps).
#include "elva/cuda/infonce_loss.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "elva/cuda/device.cuh"
#include "elva/cuda/score_tile.cuh"

namespace elva {
namespace {

using device::kWarpSize;
using tiles::kChunkF32;
using tiles::kChunkHalf;
using tiles::kF32Ld;
using tiles::kHalfLd;
using tiles::kScoreLd;
using tiles::kThreads;
using tiles::kTile;
using tiles::kWarps;
using tiles::score_tile_f32;
using tiles::score_tile_half;
using device::Pack;
using device::to_float;
using device::warp_max;
using device::warp_sum;

constexpr float kNormEps = 1e-12f;

constexpr int kRowsPerWarp = kTile / kWarps;  // 8


constexpr size_t kTileBytes = sizeof(float) * kTile * kScoreLd;
// The gemm buffer also holds one widened [64 x 64] source chunk (ld kScoreLd) of the gradient products.
constexpr size_t kGemmBytesWithSource =
    std::max({sizeof(float) * 2 * kChunkF32 * kF32Ld, sizeof(uint16_t) * 2 * kTile * kHalfLd, kTileBytes});
static_assert(kGemmBytesWithSource % 16 == 0 && kTileBytes % 16 == 0, "smem alignment");

// Workspace parts are 256-byte aligned.
constexpr size_t kAlign = 256;
size_t aligned(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

struct Args {
  InfoNceProblem p;
  const float* query_scale;
  const float* candidate_scale;
  // forward
  float* loss;
  float* lse;
  // backward
  const float* saved_loss;
  const float* saved_lse;
  const float* grad_loss;
  const float* grad_lse;
  float* column_lse;  // [B], symmetric
  float* grad_prepared;
  double* tau_partials;
  bool want_gemm;
};

__device__ __forceinline__ float scaled_score(float acc, float query_scale, float candidate_scale) {
  return __fmul_rn(__fmul_rn(acc, query_scale), candidate_scale);
}

__device__ __forceinline__ int min_rows(int64_t total, int64_t start) {
  return static_cast<int>(total - start < kTile ? total - start : kTile);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T, bool kVec>
__device__ __forceinline__ void score_tile(const InfoNceProblem& p, int64_t row0, int q_rows, int64_t c0, int c_rows,
                                           unsigned char* gemm, float* scores) {
  if constexpr (std::is_same_v<T, float>) {
    score_tile_f32<kVec>(static_cast<const float*>(p.queries) + row0 * p.query_stride, p.query_stride, q_rows,
                         static_cast<const float*>(p.candidates) + c0 * p.candidate_stride, p.candidate_stride,
                         c_rows, p.d, gemm, scores);
  } else {
    score_tile_half<T, kVec>(static_cast<const uint16_t*>(p.queries) + row0 * p.query_stride, p.query_stride,
                             q_rows, static_cast<const uint16_t*>(p.candidates) + c0 * p.candidate_stride,
                             p.candidate_stride, c_rows, p.d, gemm, scores);
  }
}

// Overwrites the false negatives of tile rows [0, rows) (query row0 + r) among candidates [c0, c0 + c_rows) with
// -inf. Called by all threads (skipped uniformly without false negatives); ends with a barrier.
__device__ __forceinline__ void mask_tile(const InfoNceProblem& p, int64_t row0, int rows, int64_t c0, int c_rows,
                                          float* scores) {
  if (p.false_negatives == nullptr) return;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t m = p.false_negative_cols;
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = warp * kRowsPerWarp + rr;
    if (r >= rows) break;
    const int64_t* ids = p.false_negatives + (row0 + r) * m;
    for (int64_t t = lane; t < m; t += kWarpSize) {
      const int64_t id = ids[t];
      if (id >= c0 && id < c0 + c_rows) scores[r * kScoreLd + (id - c0)] = -INFINITY;
    }
  }
  __syncthreads();
}

// z of a tile entry: -inf for masked entries; s (the score) is set only for unmasked ones.
__device__ __forceinline__ float logit(float acc, float query_scale, float candidate_scale, float tau, float& s) {
  if (acc == -INFINITY) return -INFINITY;
  s = scaled_score(acc, query_scale, candidate_scale);
  return __fdiv_rn(s, tau);
}

// Folds two values per lane into a running (max, sum of exp(x - max)); -inf counts as absent.
__device__ __forceinline__ void fold(float z0, float z1, float& run_max, float& run_sum) {
  const float new_max = fmaxf(run_max, warp_max(fmaxf(z0, z1)));
  const float shift = new_max == -INFINITY ? 0.0f : new_max;
  const float tile_sum = warp_sum(expf(z0 - shift) + expf(z1 - shift));
  run_sum = run_sum * expf(run_max - shift) + tile_sum;
  run_max = new_max;
}

// dL/dz_ij (reference.infonce_loss_backward's formula).
__device__ __forceinline__ float grad_logit(float z, int64_t i, int64_t j, int64_t label, float lse, float weight,
                                            float upstream_lse, bool paired, float column_lse, float column_weight) {
  float g = (weight + upstream_lse) * expf(z - lse);
  if (j == label) g -= weight;
  if (paired) g += column_weight * (expf(z - column_lse) - (i == j ? 1.0f : 0.0f));
  return g;
}

// ---------------------------------------------------------------------------------------------------------
// Inverse norms (and the NaN/Inf count): one warp per row.

constexpr int kRowWarps = 8;
constexpr int64_t kMaxRowBlocks = 1 << 16;

// sm90-expect: max_spill_bytes=0
template <typename T, int kVec>
__global__ void __launch_bounds__(kRowWarps * kWarpSize, 1)
    inv_norm_kernel(const T* __restrict__ x, int64_t rows, int64_t dim, int64_t stride, float* __restrict__ scale,
                    unsigned long long* __restrict__ nonfinite) {
  using InPack = Pack<T, kVec>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t packs = dim / kVec;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kRowWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarpSize; row < rows;
       row += step) {
    const auto* x_row = reinterpret_cast<const InPack*>(x + row * stride);
    float squares = 0.0f;
    for (int64_t k = lane; k < packs; k += kWarpSize) {
      const InPack pack = x_row[k];
#pragma unroll
      for (int e = 0; e < kVec; ++e) squares += to_float(pack.v[e]) * to_float(pack.v[e]);
    }
    squares = warp_sum(squares);
    if (!isfinite(squares) && nonfinite != nullptr) {
      unsigned long long bad = 0;
      for (int64_t k = lane; k < packs; k += kWarpSize) {
        const InPack pack = x_row[k];
#pragma unroll
        for (int e = 0; e < kVec; ++e) bad += !isfinite(to_float(pack.v[e]));
      }
      bad = warp_sum(bad);
      if (lane == 0 && bad > 0) atomicAdd(nonfinite, bad);
    }
    if (lane == 0) scale[row] = 1.0f / fmaxf(sqrtf(squares), kNormEps);
  }
}

// grad_x = (g - u (u.g)) / max(|x|, eps) with u = x / max(|x|, eps), or g / eps when |x| <= eps; one warp per row.
// sm90-expect: max_spill_bytes=0
template <typename T>
__global__ void __launch_bounds__(kRowWarps * kWarpSize)
    normalize_backward_kernel(const T* __restrict__ x, int64_t stride, const float* __restrict__ grad_unit,
                              int64_t rows, int64_t dim, T* __restrict__ out) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kRowWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarpSize; row < rows;
       row += step) {
    const T* x_row = x + row * stride;
    const float* g_row = grad_unit + row * dim;
    T* out_row = out + row * dim;
    float squares = 0.0f, dot = 0.0f;
    for (int64_t k = lane; k < dim; k += kWarpSize) {
      const float v = to_float(x_row[k]);
      squares += v * v;
      dot += v * g_row[k];
    }
    squares = warp_sum(squares);
    dot = warp_sum(dot);
    const float raw_norm = sqrtf(squares);
    const float norm = fmaxf(raw_norm, kNormEps);
    const float radial = dot / norm;  // u . g
    const bool above = raw_norm > kNormEps;
    for (int64_t k = lane; k < dim; k += kWarpSize) {
      const float g = g_row[k];
      const float value = above ? (g - (to_float(x_row[k]) / norm) * radial) / norm : g / kNormEps;
      out_row[k] = from_float<T>(value);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward

// sm90-expect: tensor_cores=HMMA async_copy=yes
// sm90-expect(<float): tensor_cores=none
// sm90-known: async_copy: issue 16 (single-buffered 64x64 tiles staged through shared memory)
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) forward_kernel(const Args a) {
  __shared__ __align__(16) unsigned char gemm[kGemmBytesWithSource];
  __shared__ __align__(16) float scores[kTile * kScoreLd];
  __shared__ float row_scale[kTile];
  __shared__ long long row_label[kTile];
  __shared__ float row_positive[kTile];
  const InfoNceProblem& p = a.p;
  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int rows = min_rows(p.B, row0);
  const float tau = *p.temperature;
  if (tid < kTile) {
    const bool valid = tid < rows;
    row_scale[tid] = valid ? a.query_scale[row0 + tid] : 0.0f;
    row_label[tid] = valid ? p.labels[row0 + tid] : -1;
    row_positive[tid] = 0.0f;
  }
  float run_max[kRowsPerWarp], run_sum[kRowsPerWarp];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    run_max[rr] = -INFINITY;
    run_sum[rr] = 0.0f;
  }
  for (int64_t c0 = 0; c0 < p.N; c0 += kTile) {
    const int c_rows = min_rows(p.N, c0);
    score_tile<T, kVec>(p, row0, rows, c0, c_rows, gemm, scores);  // its first barrier publishes the row state
    mask_tile(p, row0, rows, c0, c_rows, scores);
    float column_scale[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int col = lane + kWarpSize * h;
      column_scale[h] = col < c_rows ? a.candidate_scale[c0 + col] : 0.0f;
    }
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      if (r < rows) {  // warp-uniform
        float z[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int col = lane + kWarpSize * h;
          z[h] = -INFINITY;
          if (col < c_rows) {
            float s = 0.0f;
            z[h] = logit(scores[r * kScoreLd + col], row_scale[r], column_scale[h], tau, s);
            if (c0 + col == row_label[r]) row_positive[r] = z[h];
          }
        }
        fold(z[0], z[1], run_max[rr], run_sum[rr]);
      }
    }
  }
  __syncwarp();
  if (lane == 0) {
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      if (r < rows) {
        const float lse = run_max[rr] + logf(run_sum[rr]);
        a.lse[row0 + r] = lse;
        // Symmetric: the label's z, for column_lse_kernel.
        a.loss[row0 + r] = p.symmetric ? row_positive[r] : lse - row_positive[r];
      }
    }
  }
}

// Symmetric: the candidate -> query lse of the first B candidates; finalises loss (which holds z_jj).
// sm90-expect: tensor_cores=HMMA async_copy=yes
// sm90-expect(<float): tensor_cores=none
// sm90-known: async_copy: issue 16 (single-buffered 64x64 tiles staged through shared memory)
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) column_lse_kernel(const Args a) {
  __shared__ __align__(16) unsigned char gemm[kGemmBytesWithSource];
  __shared__ __align__(16) float scores[kTile * kScoreLd];
  __shared__ float column_scale[kTile];
  const InfoNceProblem& p = a.p;
  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int cols = min_rows(p.B, col0);
  const float tau = *p.temperature;
  if (tid < kTile) column_scale[tid] = tid < cols ? a.candidate_scale[col0 + tid] : 0.0f;
  float run_max[kRowsPerWarp], run_sum[kRowsPerWarp];
#pragma unroll
  for (int cc = 0; cc < kRowsPerWarp; ++cc) {
    run_max[cc] = -INFINITY;
    run_sum[cc] = 0.0f;
  }
  for (int64_t row0 = 0; row0 < p.B; row0 += kTile) {
    const int rows = min_rows(p.B, row0);
    score_tile<T, kVec>(p, row0, rows, col0, cols, gemm, scores);
    mask_tile(p, row0, rows, col0, cols, scores);
    float query_scale[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = lane + kWarpSize * h;
      query_scale[h] = r < rows ? a.query_scale[row0 + r] : 0.0f;
    }
#pragma unroll
    for (int cc = 0; cc < kRowsPerWarp; ++cc) {
      const int c = warp * kRowsPerWarp + cc;
      if (c < cols) {  // warp-uniform
        float z[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = lane + kWarpSize * h;
          float s = 0.0f;
          z[h] = r < rows ? logit(scores[r * kScoreLd + c], query_scale[h], column_scale[c], tau, s) : -INFINITY;
        }
        fold(z[0], z[1], run_max[cc], run_sum[cc]);
      }
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int cc = 0; cc < kRowsPerWarp; ++cc) {
      const int c = warp * kRowsPerWarp + cc;
      if (c < cols) {
        const int64_t j = col0 + c;
        const float positive = a.loss[j];
        const float column_lse = run_max[cc] + logf(run_sum[cc]);
        a.loss[j] = ((a.lse[j] - positive) + column_lse - positive) * 0.5f;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward

// Symmetric: rlse_i = 2 loss_i - lse_i + 2 z_ii (fp64, rounded to fp32), z_ii from the diagonal tile.
// sm90-expect: tensor_cores=HMMA
// sm90-expect(<float): tensor_cores=none
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads, 1) diagonal_kernel(const Args a) {
  __shared__ __align__(16) unsigned char gemm[kGemmBytesWithSource];
  __shared__ __align__(16) float scores[kTile * kScoreLd];
  const InfoNceProblem& p = a.p;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int rows = min_rows(p.B, row0);
  score_tile<T, kVec>(p, row0, rows, row0, rows, gemm, scores);
  const int t = threadIdx.x;
  if (t < rows) {
    const int64_t i = row0 + t;
    float s = 0.0f;
    const float z = logit(scores[t * kScoreLd + t], a.query_scale[i], a.candidate_scale[i], *p.temperature, s);
    a.column_lse[i] = static_cast<float>(2.0 * static_cast<double>(a.saved_loss[i]) -
                                         static_cast<double>(a.saved_lse[i]) + 2.0 * static_cast<double>(z));
  }
}

// out[r, k] += sum_t G[r, t] X[t, k] (kTransposed: out[r, k] += sum_t G[t, r] X[t, k]) for r < out_rows, with
// X = src rows [0, src_rows) widened to fp32 (zero past src_rows) and out an fp32 [*, d] block; d in chunks of
// 64 staged in `chunk`. G (kTile x kTile at ld kScoreLd) must be zero where X is padding. Called by all
// threads; ends with a barrier.
template <typename T, bool kVec>
__device__ __forceinline__ void load_chunk_wide(const T* __restrict__ src, int64_t stride, int rows, int64_t d,
                                                int64_t k0, float* __restrict__ dst) {
  if constexpr (kVec) {
    constexpr int kPack = 16 / sizeof(T);
    constexpr int kPerRow = kTile / kPack;
    for (int idx = threadIdx.x; idx < kTile * kPerRow; idx += kThreads) {
      const int row = idx / kPerRow, v = idx % kPerRow;
      const int64_t k = k0 + kPack * v;
      uint4 raw = make_uint4(0u, 0u, 0u, 0u);
      if (row < rows && k < d) raw = *reinterpret_cast<const uint4*>(src + row * stride + k);  // d % kPack == 0
      const T* values = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int e = 0; e < kPack; ++e) dst[row * kScoreLd + kPack * v + e] = to_float(values[e]);
    }
  } else {
    for (int idx = threadIdx.x; idx < kTile * kTile; idx += kThreads) {
      const int row = idx / kTile, kk = idx % kTile;
      const int64_t k = k0 + kk;
      dst[row * kScoreLd + kk] = (row < rows && k < d) ? to_float(src[row * stride + k]) : 0.0f;
    }
  }
}

template <typename T, bool kVec, bool kTransposed>
__device__ void accumulate_rows(const float* __restrict__ G, const T* __restrict__ src, int64_t stride,
                                int src_rows, float* __restrict__ out, int out_rows, int64_t d,
                                float* __restrict__ chunk) {
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  for (int64_t k0 = 0; k0 < d; k0 += kTile) {
    load_chunk_wide<T, kVec>(src, stride, src_rows, d, k0, chunk);
    __syncthreads();
    float acc[4][4];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
#pragma unroll
      for (int b = 0; b < 4; ++b) acc[a][b] = 0.0f;
    }
#pragma unroll 8
    for (int t = 0; t < kTile; ++t) {
      float gv[4], xv[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) gv[a] = kTransposed ? G[t * kScoreLd + ty + 16 * a] : G[(ty + 16 * a) * kScoreLd + t];
#pragma unroll
      for (int b = 0; b < 4; ++b) xv[b] = chunk[t * kScoreLd + tx + 16 * b];
#pragma unroll
      for (int a = 0; a < 4; ++a) {
#pragma unroll
        for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(gv[a], xv[b], acc[a][b]);
      }
    }
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const int r = ty + 16 * a;
      if (r < out_rows) {
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const int64_t k = k0 + tx + 16 * b;
          if (k < d) out[r * d + k] += acc[a][b];
        }
      }
    }
    __syncthreads();
  }
}

// Per-CTA sum of a per-thread double into tau_partials[blockIdx.x].
__device__ __forceinline__ void store_block_sum(double value, double* out) {
  __shared__ double warp_sums[kWarps];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  value = warp_sum(value);
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
    out[blockIdx.x] = total;
  }
}

// sm90-expect: tensor_cores=HMMA async_copy=yes
// sm90-expect(<float): tensor_cores=none
// sm90-known: async_copy: issue 16 (single-buffered 64x64 tiles staged through shared memory)
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) grad_queries_kernel(const Args a) {
  __shared__ __align__(16) unsigned char gemm[kGemmBytesWithSource];
  __shared__ __align__(16) float scores[kTile * kScoreLd];
  __shared__ long long row_label[kTile];
  __shared__ float row_lse[kTile], row_weight[kTile], row_upstream[kTile], row_scale[kTile];
  const InfoNceProblem& p = a.p;
  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int rows = min_rows(p.B, row0);
  const float tau = *p.temperature;
  const float half = p.symmetric ? 0.5f : 1.0f;
  if (tid < kTile) {
    const bool valid = tid < rows;
    const int64_t i = row0 + tid;
    row_label[tid] = valid ? p.labels[i] : -1;
    row_lse[tid] = valid ? a.saved_lse[i] : 0.0f;
    row_weight[tid] = valid ? a.grad_loss[i] * half : 0.0f;
    row_upstream[tid] = valid ? a.grad_lse[i] : 0.0f;
    row_scale[tid] = valid ? a.query_scale[i] : 0.0f;
  }
  double tau_sum = 0.0;
  for (int64_t c0 = 0; c0 < p.N; c0 += kTile) {
    const int c_rows = min_rows(p.N, c0);
    score_tile<T, kVec>(p, row0, rows, c0, c_rows, gemm, scores);
    mask_tile(p, row0, rows, c0, c_rows, scores);
    float column_scale[2], column_lse[2], column_weight[2];
    bool column_ok[2], paired[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int col = lane + kWarpSize * h;
      const int64_t j = c0 + col;
      column_ok[h] = col < c_rows;
      paired[h] = p.symmetric && column_ok[h] && j < p.B;
      column_scale[h] = column_ok[h] ? a.candidate_scale[j] : 0.0f;
      column_lse[h] = paired[h] ? a.column_lse[j] : 0.0f;
      column_weight[h] = paired[h] ? a.grad_loss[j] * half : 0.0f;
    }
    float tile_tau = 0.0f;
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int col = lane + kWarpSize * h;
        float G = 0.0f;
        if (r < rows && column_ok[h]) {
          float s = 0.0f;
          const float acc = scores[r * kScoreLd + col];
          const float z = logit(acc, row_scale[r], column_scale[h], tau, s);
          const float g = grad_logit(z, row0 + r, c0 + col, row_label[r], row_lse[r], row_weight[r], row_upstream[r],
                                     paired[h], column_lse[h], column_weight[h]);
          if (acc != -INFINITY) tile_tau = fmaf(g, s, tile_tau);
          G = __fdiv_rn(g, tau) * column_scale[h];
        }
        scores[r * kScoreLd + col] = G;  // each entry is read and written by its own lane only
      }
    }
    tau_sum += static_cast<double>(tile_tau);
    __syncthreads();
    if (a.want_gemm) {
      accumulate_rows<T, kVec, false>(scores, static_cast<const T*>(p.candidates) + c0 * p.candidate_stride,
                                      p.candidate_stride, c_rows, a.grad_prepared + row0 * p.d, rows, p.d,
                                      reinterpret_cast<float*>(gemm));
    }
  }
  store_block_sum(tau_sum, a.tau_partials);
}

// sm90-expect: tensor_cores=HMMA async_copy=yes
// sm90-expect(<float): tensor_cores=none
// sm90-known: async_copy: issue 16 (single-buffered 64x64 tiles staged through shared memory)
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) grad_candidates_kernel(const Args a) {
  __shared__ __align__(16) unsigned char gemm[kGemmBytesWithSource];
  __shared__ __align__(16) float scores[kTile * kScoreLd];
  const InfoNceProblem& p = a.p;
  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int cols = min_rows(p.N, col0);
  const float tau = *p.temperature;
  const float half = p.symmetric ? 0.5f : 1.0f;
  float column_scale[2], column_lse[2], column_weight[2];
  bool column_ok[2], paired[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int col = lane + kWarpSize * h;
    const int64_t j = col0 + col;
    column_ok[h] = col < cols;
    paired[h] = p.symmetric && column_ok[h] && j < p.B;
    column_scale[h] = column_ok[h] ? a.candidate_scale[j] : 0.0f;
    column_lse[h] = paired[h] ? a.column_lse[j] : 0.0f;
    column_weight[h] = paired[h] ? a.grad_loss[j] * half : 0.0f;
  }
  for (int64_t row0 = 0; row0 < p.B; row0 += kTile) {
    const int rows = min_rows(p.B, row0);
    score_tile<T, kVec>(p, row0, rows, col0, cols, gemm, scores);
    mask_tile(p, row0, rows, col0, cols, scores);
#pragma unroll 2
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      const bool row_ok = r < rows;  // warp-uniform
      const int64_t i = row0 + r;
      const int64_t label = row_ok ? p.labels[i] : -1;
      const float lse = row_ok ? a.saved_lse[i] : 0.0f;
      const float weight = row_ok ? a.grad_loss[i] * half : 0.0f;
      const float upstream = row_ok ? a.grad_lse[i] : 0.0f;
      const float query_scale = row_ok ? a.query_scale[i] : 0.0f;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int col = lane + kWarpSize * h;
        float G = 0.0f;
        if (row_ok && column_ok[h]) {
          float s = 0.0f;
          const float z = logit(scores[r * kScoreLd + col], query_scale, column_scale[h], tau, s);
          const float g = grad_logit(z, i, col0 + col, label, lse, weight, upstream, paired[h], column_lse[h],
                                     column_weight[h]);
          G = __fdiv_rn(g, tau) * query_scale;
        }
        scores[r * kScoreLd + col] = G;
      }
    }
    __syncthreads();
    accumulate_rows<T, kVec, true>(scores, static_cast<const T*>(p.queries) + row0 * p.query_stride, p.query_stride,
                                   rows, a.grad_prepared + col0 * p.d, cols, p.d, reinterpret_cast<float*>(gemm));
  }
}

// grad_temperature = -sum(partials) / tau^2 (fp64), one CTA.
// sm90-expect: max_spill_bytes=0
__global__ void __launch_bounds__(kThreads)
    finish_temperature_kernel(const double* __restrict__ partials, int64_t count, const float* __restrict__ tau,
                              float* __restrict__ out) {
  double sum = 0.0;
  for (int64_t t = threadIdx.x; t < count; t += kThreads) sum += partials[t];
  __shared__ double warp_sums[kWarps];
  sum = warp_sum(sum);
  if (threadIdx.x % kWarpSize == 0) warp_sums[threadIdx.x / kWarpSize] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
    const double t = static_cast<double>(*tau);
    *out = static_cast<float>(-total / (t * t));
  }
}

// ---------------------------------------------------------------------------------------------------------
// Launchers

bool is_aligned(const void* pointer, size_t bytes) { return reinterpret_cast<uintptr_t>(pointer) % bytes == 0; }

// 16-byte loads need d, both row strides and both base pointers to fit them.
bool vector_loads(const InfoNceProblem& p) {
  const int64_t vec = p.dtype == DType::F32 ? 4 : 8;
  return p.d % vec == 0 && p.query_stride % vec == 0 && p.candidate_stride % vec == 0 &&
         is_aligned(p.queries, 16) && is_aligned(p.candidates, 16);
}

unsigned blocks_of(int64_t rows) { return static_cast<unsigned>((rows + kTile - 1) / kTile); }

template <typename T>
void launch_inv_norm(const void* x, int64_t rows, int64_t d, int64_t stride, float* scale,
                     unsigned long long* nonfinite, cudaStream_t stream) {
  if (rows == 0) return;
  constexpr int kVec = 16 / sizeof(T);
  const auto blocks = static_cast<unsigned>(std::min((rows + kRowWarps - 1) / kRowWarps, kMaxRowBlocks));
  const auto* typed = static_cast<const T*>(x);
  if (d % kVec == 0 && stride % kVec == 0 && is_aligned(x, 16)) {
    inv_norm_kernel<T, kVec><<<blocks, kRowWarps * kWarpSize, 0, stream>>>(typed, rows, d, stride, scale, nonfinite);
  } else {
    inv_norm_kernel<T, 1><<<blocks, kRowWarps * kWarpSize, 0, stream>>>(typed, rows, d, stride, scale, nonfinite);
  }
}

template <typename T>
void launch_normalize_backward(const void* x, int64_t stride, const float* grad_unit, int64_t rows, int64_t d,
                               void* out, cudaStream_t stream) {
  if (rows == 0) return;
  const auto blocks = static_cast<unsigned>(std::min((rows + kRowWarps - 1) / kRowWarps, kMaxRowBlocks));
  normalize_backward_kernel<T><<<blocks, kRowWarps * kWarpSize, 0, stream>>>(static_cast<const T*>(x), stride,
                                                                             grad_unit, rows, d, static_cast<T*>(out));
}

template <typename T, bool kVec>
void forward_typed(const Args& a, cudaStream_t stream) {
  forward_kernel<T, kVec><<<blocks_of(a.p.B), kThreads, 0, stream>>>(a);
  if (a.p.symmetric) column_lse_kernel<T, kVec><<<blocks_of(a.p.B), kThreads, 0, stream>>>(a);
}

struct BackwardPlan {
  bool want_q, want_c, want_t;
};

template <typename T, bool kVec>
void backward_typed(Args a, const BackwardPlan& plan, float* grad_q_prepared, float* grad_c_prepared,
                    void* grad_queries, void* grad_candidates, float* grad_temperature, cudaStream_t stream) {
  const InfoNceProblem& p = a.p;
  if (p.symmetric) diagonal_kernel<T, kVec><<<blocks_of(p.B), kThreads, 0, stream>>>(a);
  if (plan.want_q || plan.want_t) {
    a.grad_prepared = grad_q_prepared;
    a.want_gemm = plan.want_q;
    grad_queries_kernel<T, kVec><<<blocks_of(p.B), kThreads, 0, stream>>>(a);
    if (plan.want_t) {
      finish_temperature_kernel<<<1, kThreads, 0, stream>>>(a.tau_partials, blocks_of(p.B), p.temperature,
                                                            grad_temperature);
    }
    if (plan.want_q) {
      launch_normalize_backward<T>(p.queries, p.query_stride, grad_q_prepared, p.B, p.d, grad_queries, stream);
    }
  }
  if (plan.want_c) {
    a.grad_prepared = grad_c_prepared;
    a.want_gemm = true;
    grad_candidates_kernel<T, kVec><<<blocks_of(p.N), kThreads, 0, stream>>>(a);
    launch_normalize_backward<T>(p.candidates, p.candidate_stride, grad_c_prepared, p.N, p.d, grad_candidates,
                                 stream);
  }
}

struct WorkspaceLayout {
  size_t query_scale, candidate_scale, column_lse, tau_partials, grad_q, grad_c, total;
};

WorkspaceLayout layout(int64_t B, int64_t N, int64_t d, bool want_q, bool want_c) {
  WorkspaceLayout w{};
  size_t at = 0;
  w.query_scale = at;
  at += aligned(sizeof(float) * B);
  w.candidate_scale = at;
  at += aligned(sizeof(float) * N);
  w.column_lse = at;
  at += aligned(sizeof(float) * B);
  w.tau_partials = at;
  at += aligned(sizeof(double) * blocks_of(B));
  w.grad_q = at;
  if (want_q) at += aligned(sizeof(float) * B * d);
  w.grad_c = at;
  if (want_c) at += aligned(sizeof(float) * N * d);
  w.total = std::max<size_t>(at, kAlign);
  return w;
}

template <typename T>
cudaError_t backward_dtype(const Args& a, const BackwardPlan& plan, float* grad_q_prepared, float* grad_c_prepared,
                           void* grad_queries, void* grad_candidates, float* grad_temperature, cudaStream_t stream) {
  const InfoNceProblem& p = a.p;
  launch_inv_norm<T>(p.queries, p.B, p.d, p.query_stride, const_cast<float*>(a.query_scale), nullptr, stream);
  launch_inv_norm<T>(p.candidates, p.N, p.d, p.candidate_stride, const_cast<float*>(a.candidate_scale), nullptr,
                     stream);
  if (vector_loads(p)) {
    backward_typed<T, true>(a, plan, grad_q_prepared, grad_c_prepared, grad_queries, grad_candidates,
                            grad_temperature, stream);
  } else {
    backward_typed<T, false>(a, plan, grad_q_prepared, grad_c_prepared, grad_queries, grad_candidates,
                             grad_temperature, stream);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t infonce_loss_cuda(const InfoNceProblem& problem, float* query_scale, float* candidate_scale,
                              unsigned long long* nonfinite, float* loss, float* lse, cudaStream_t stream) {
  const cudaError_t zeroed = cudaMemsetAsync(nonfinite, 0, 2 * sizeof(*nonfinite), stream);
  if (zeroed != cudaSuccess || problem.B == 0) return zeroed;
  if (problem.N < 1 || problem.d < 1 || (problem.symmetric && problem.N < problem.B)) return cudaErrorInvalidValue;
  Args a{};
  a.p = problem;
  a.query_scale = query_scale;
  a.candidate_scale = candidate_scale;
  a.loss = loss;
  a.lse = lse;
  switch (problem.dtype) {
    case DType::F32:
      launch_inv_norm<float>(problem.queries, problem.B, problem.d, problem.query_stride, query_scale, nonfinite,
                             stream);
      launch_inv_norm<float>(problem.candidates, problem.N, problem.d, problem.candidate_stride, candidate_scale,
                             nonfinite + 1, stream);
      break;
    case DType::F16:
      launch_inv_norm<__half>(problem.queries, problem.B, problem.d, problem.query_stride, query_scale, nonfinite,
                              stream);
      launch_inv_norm<__half>(problem.candidates, problem.N, problem.d, problem.candidate_stride, candidate_scale,
                              nonfinite + 1, stream);
      break;
    case DType::BF16:
      launch_inv_norm<__nv_bfloat16>(problem.queries, problem.B, problem.d, problem.query_stride, query_scale,
                                     nonfinite, stream);
      launch_inv_norm<__nv_bfloat16>(problem.candidates, problem.N, problem.d, problem.candidate_stride,
                                     candidate_scale, nonfinite + 1, stream);
      break;
  }
  const bool vec = vector_loads(problem);
  switch (problem.dtype) {
    case DType::F32:
      vec ? forward_typed<float, true>(a, stream) : forward_typed<float, false>(a, stream);
      break;
    case DType::F16:
      vec ? forward_typed<__half, true>(a, stream) : forward_typed<__half, false>(a, stream);
      break;
    case DType::BF16:
      vec ? forward_typed<__nv_bfloat16, true>(a, stream) : forward_typed<__nv_bfloat16, false>(a, stream);
      break;
  }
  return cudaGetLastError();
}

size_t infonce_loss_backward_workspace_bytes(int64_t B, int64_t N, int64_t d, bool want_queries,
                                             bool want_candidates) {
  return layout(B, N, d, want_queries, want_candidates).total;
}

cudaError_t infonce_loss_backward_cuda(const InfoNceProblem& problem, const float* loss, const float* lse,
                                       const float* grad_loss, const float* grad_lse, void* grad_queries,
                                       void* grad_candidates, float* grad_temperature, void* workspace,
                                       cudaStream_t stream) {
  const BackwardPlan plan{grad_queries != nullptr, grad_candidates != nullptr, grad_temperature != nullptr};
  if (problem.B == 0 || (!plan.want_q && !plan.want_c && !plan.want_t)) return cudaSuccess;
  if (problem.N < 1 || problem.d < 1 || (problem.symmetric && problem.N < problem.B)) return cudaErrorInvalidValue;
  const WorkspaceLayout w = layout(problem.B, problem.N, problem.d, plan.want_q, plan.want_c);
  auto* base = static_cast<unsigned char*>(workspace);
  Args a{};
  a.p = problem;
  a.query_scale = reinterpret_cast<float*>(base + w.query_scale);
  a.candidate_scale = reinterpret_cast<float*>(base + w.candidate_scale);
  a.saved_loss = loss;
  a.saved_lse = lse;
  a.grad_loss = grad_loss;
  a.grad_lse = grad_lse;
  a.column_lse = reinterpret_cast<float*>(base + w.column_lse);
  a.tau_partials = reinterpret_cast<double*>(base + w.tau_partials);
  float* grad_q_prepared = plan.want_q ? reinterpret_cast<float*>(base + w.grad_q) : nullptr;
  float* grad_c_prepared = plan.want_c ? reinterpret_cast<float*>(base + w.grad_c) : nullptr;
  if (plan.want_q) {
    const cudaError_t zeroed = cudaMemsetAsync(grad_q_prepared, 0, sizeof(float) * problem.B * problem.d, stream);
    if (zeroed != cudaSuccess) return zeroed;
  }
  if (plan.want_c) {
    const cudaError_t zeroed = cudaMemsetAsync(grad_c_prepared, 0, sizeof(float) * problem.N * problem.d, stream);
    if (zeroed != cudaSuccess) return zeroed;
  }
  switch (problem.dtype) {
    case DType::F32:
      return backward_dtype<float>(a, plan, grad_q_prepared, grad_c_prepared, grad_queries, grad_candidates,
                                   grad_temperature, stream);
    case DType::F16:
      return backward_dtype<__half>(a, plan, grad_q_prepared, grad_c_prepared, grad_queries, grad_candidates,
                                    grad_temperature, stream);
    case DType::BF16:
      return backward_dtype<__nv_bfloat16>(a, plan, grad_q_prepared, grad_c_prepared, grad_queries,
                                           grad_candidates, grad_temperature, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace elva
