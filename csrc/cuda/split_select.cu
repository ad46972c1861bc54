// The per-split selection kernel (split_topk), the exact path of the CUDA backend's retrieval ops; contract in
// elva_kernels/_retrieval.py. No ATen headers, so that plain nvcc (CMake, CI without a GPU) compiles it.
//
// Layout: a CTA of 256 threads (8 warps) takes one work item = 64 query rows x one split, and walks the split in
// tiles of 64 candidates. Per tile, all 256 threads compute the 64 x 64 score tile into shared memory
// (score_tile: fp32 FMAs for fp32, wmma 16x16x16 with fp32 accumulators for fp16/bf16, k in chunks staged through
// shared memory); then warp w owns query rows 8w..8w+7 of the item and scans the tile row by row, lane l taking
// candidates l and l + 32. Each row keeps its list (list_size keys) in shared memory with its current minimum; a
// key that beats the minimum replaces it and the warp recomputes the minimum.
//
// Every score is (acc * query_scale[i]) * candidate_scale[j] with __fmul_rn (never contracted), and acc comes from
// the same sequence of operations wherever (i, j) sits, so copies of a candidate tie bitwise:
//   fp32: acc = fmaf(q[k], c[k], acc) for k = 0, 1, ..., ceil(d / 32) * 32 - 1 (zeros past d), then acc + 0.0f;
//   fp16/bf16: one accumulator fragment, mma_sync over 16-wide k slices 0, 16, ..., ceil(d / 64) * 64 - 16
//   (zeros past d), fragments m16n16k16 row_major A (queries) / col_major B (candidates), ldm 72.
#include "elva/cuda/split_select.cuh"

#include "elva/cuda/score_tile.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace elva {
namespace {

using tiles::kGemmBytes;
using tiles::kScoreBytes;
using tiles::kScoreLd;
using tiles::kThreads;
using tiles::kTile;
using tiles::kWarps;
using tiles::score_tile_f32;
using tiles::score_tile_half;

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// 64 x 64 tiles, 256 threads (score_tile.cuh has the staged chunks' layout).
constexpr int kRowsPerWarp = kTile / kWarps;  // 8

constexpr int64_t kMinKey = std::numeric_limits<int64_t>::min();
constexpr int64_t kMaxKey = std::numeric_limits<int64_t>::max();
constexpr int64_t kTwo32 = int64_t{1} << 32;
constexpr int64_t kTwo31 = int64_t{1} << 31;

// Per-row state of a work item, in shared memory.
struct RowState {
  int64_t key[kTile];    // the list's minimum
  int64_t bound[kTile];  // upper[i, s]
  float query_scale[kTile];
  float max_score[kTile];
  uint32_t hash[kTile];  // key_mode 1: the hash of (seed, i)
  int32_t slot[kTile];   // where the list's minimum sits
};

constexpr size_t kFixedBytes = kGemmBytes + kScoreBytes + sizeof(RowState);
static_assert(kGemmBytes % 16 == 0 && kScoreBytes % 16 == 0 && sizeof(RowState) % 16 == 0, "smem alignment");

__host__ __device__ __forceinline__ int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

// ---------------------------------------------------------------------------------------------------------
// Keys.

__device__ __forceinline__ int64_t low_word(int64_t j) {
  return static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(j));
}

__device__ __forceinline__ int64_t score_key(float score, int64_t j) {
  const int bits = __float_as_int(__fadd_rn(score, 0.0f));  // -0.0 -> +0.0
  const int orderable = bits < 0 ? (bits ^ 0x7FFFFFFF) : bits;
  return static_cast<int64_t>(orderable) * kTwo32 + low_word(j);
}

__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x = (x ^ (x >> 16)) * 0x45D9F3Bu;
  x = (x ^ (x >> 16)) * 0x45D9F3Bu;
  return x ^ (x >> 16);
}

// reference.mine_hard_negatives.random_keys, up to its last two rounds (which depend on j).
__device__ __forceinline__ uint32_t row_hash(int64_t seed, int64_t row) {
  return mix32(mix32(static_cast<uint32_t>(seed)) ^ static_cast<uint32_t>(row));
}

__device__ __forceinline__ int64_t hash_key(uint32_t row_h, int64_t j) {
  uint32_t h = mix32(row_h ^ static_cast<uint32_t>(j));
  h = mix32(h ^ static_cast<uint32_t>(j >> 32));
  return (static_cast<int64_t>(0xFFFFFFFFu - h) - kTwo31) * kTwo32 + low_word(j);
}

__device__ __forceinline__ float scaled_score(float acc, float query_scale, float candidate_scale) {
  return __fmul_rn(__fmul_rn(acc, query_scale), candidate_scale);
}

__device__ __forceinline__ bool listed(const int64_t* __restrict__ ids, int64_t count, int64_t j) {
  for (int64_t t = 0; t < count; ++t) {
    if (ids[t] == j) return true;
  }
  return false;
}

template <typename T, bool kVec>
__device__ __forceinline__ void score_tile(const void* queries, int64_t q_stride, int64_t row0, int q_rows,
                                           const void* candidates, int64_t c_stride, int64_t c0, int c_rows,
                                           int64_t d, unsigned char* gemm, float* scores) {
  if constexpr (std::is_same_v<T, float>) {
    score_tile_f32<kVec>(static_cast<const float*>(queries) + row0 * q_stride, q_stride, q_rows,
                         static_cast<const float*>(candidates) + c0 * c_stride, c_stride, c_rows, d, gemm, scores);
  } else {
    score_tile_half<T, kVec>(static_cast<const uint16_t*>(queries) + row0 * q_stride, q_stride, q_rows,
                             static_cast<const uint16_t*>(candidates) + c0 * c_stride, c_stride, c_rows, d, gemm,
                             scores);
  }
}

// ---------------------------------------------------------------------------------------------------------
// split_topk

struct TopkParams {
  ScorePool pool;
  const int64_t* exclude;
  int64_t exclude_cols;
  const float* max_score;
  const int64_t* upper;
  int64_t num_splits, split_size;
  int list_size;
  int key_mode;
  int64_t seed;
  bool compute_scores;
  int64_t* keys;
  int32_t* nonfinite;
};

// sm90-expect: tensor_cores=HMMA async_copy=yes scores_per_thread=16
// sm90-expect(<float): tensor_cores=none
// sm90-known: async_copy: exact path only (single-buffered 64x64 tiles staged through shared memory)
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads, 2) split_topk_kernel(const TopkParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned char* gemm = smem;
  float* scores = reinterpret_cast<float*>(smem + kGemmBytes);
  RowState& rs = *reinterpret_cast<RowState*>(smem + kGemmBytes + kScoreBytes);
  int64_t* lists = reinterpret_cast<int64_t*>(smem + kFixedBytes);

  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int L = p.list_size;
  const int64_t B = p.pool.B, N = p.pool.N, S = p.num_splits;
  const int64_t query_blocks = (B + kTile - 1) / kTile;
  const bool has_max = p.max_score != nullptr;
  bool nonfinite = false;

  for (int64_t item = blockIdx.x; item < query_blocks * S; item += gridDim.x) {
    // Consecutive items share the split, so CTAs running together reuse its candidates from L2.
    const int64_t row0 = (item % query_blocks) * kTile;
    const int64_t s = item / query_blocks;
    const int rows = static_cast<int>(min_i64(kTile, B - row0));
    const int64_t c_begin = s * p.split_size;
    const int64_t c_end = min_i64(N, c_begin + p.split_size);

    __syncthreads();  // the previous item's lists and row state have been written out
    if (tid < kTile) {
      const bool valid = tid < rows;
      const int64_t i = row0 + tid;
      rs.bound[tid] = valid ? p.upper[i * S + s] : kMinKey;
      rs.key[tid] = kMinKey + 1;  // the smallest empty-slot key, in slot 0
      rs.slot[tid] = 0;
      rs.query_scale[tid] = valid ? p.pool.query_scale[i] : 0.0f;
      rs.max_score[tid] = (valid && has_max) ? p.max_score[i] : 0.0f;
      rs.hash[tid] = row_hash(p.seed, i);
    }
    for (int idx = tid; idx < kTile * L; idx += kThreads) lists[idx] = kMinKey + 1 + (idx & (L - 1));
    const bool active = __syncthreads_or(tid < kTile && rs.bound[tid] != kMinKey);

    if (active) {
      for (int64_t c0 = c_begin; c0 < c_end; c0 += kTile) {
        const int c_rows = static_cast<int>(min_i64(kTile, c_end - c0));
        if (p.compute_scores) {
          score_tile<T, kVec>(p.pool.queries, p.pool.query_stride, row0, rows, p.pool.candidates,
                              p.pool.candidate_stride, c0, c_rows, p.pool.d, gemm, scores);
        }
        for (int rr = 0; rr < kRowsPerWarp; ++rr) {
          const int r = warp * kRowsPerWarp + rr;
          if (r >= rows) break;  // warp-uniform
          const int64_t upper = rs.bound[r];
          if (upper == kMinKey) continue;  // warp-uniform: nothing of this row is asked for
          const int64_t i = row0 + r;
          const float query_scale = rs.query_scale[r], max_score = rs.max_score[r];
          const uint32_t h = rs.hash[r];
          const int64_t* exclude_row = p.exclude != nullptr ? p.exclude + i * p.exclude_cols : nullptr;
          int64_t* list = lists + r * L;
          int64_t minimum = rs.key[r];
          int slot = rs.slot[r];
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int col = lane + kWarpSize * half;
            int64_t key = kMinKey;
            bool hit = false;
            if (col < c_rows) {
              const int64_t j = c0 + col;
              float score = 0.0f;
              if (p.compute_scores) {
                score = scaled_score(scores[r * kScoreLd + col], query_scale, p.pool.candidate_scale[j]);
                if (!isfinite(score)) nonfinite = true;
              }
              key = p.key_mode == 0 ? score_key(score, j) : hash_key(h, j);
              hit = key > minimum && (key < upper || upper == INT64_MAX) && (!has_max || score <= max_score) &&
                    !listed(exclude_row, p.exclude_cols, j);
            }
            // Insert the hits one at a time: each replaces the current minimum, which then moves up.
            unsigned pending = __ballot_sync(kFullMask, hit);
            while (pending != 0) {
              const int source = __ffs(pending) - 1;
              pending &= pending - 1;
              const long long candidate = __shfl_sync(kFullMask, static_cast<long long>(key), source);
              if (candidate > minimum) {  // warp-uniform
                if (lane == 0) list[slot] = candidate;
                __syncwarp();
                long long best = kMaxKey;
                int best_slot = L;
                for (int t = lane; t < L; t += kWarpSize) {
                  const long long v = list[t];
                  if (v < best) {
                    best = v;
                    best_slot = t;
                  }
                }
#pragma unroll
                for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
                  const long long other = __shfl_xor_sync(kFullMask, best, offset);
                  const int other_slot = __shfl_xor_sync(kFullMask, best_slot, offset);
                  if (other < best || (other == best && other_slot < best_slot)) {
                    best = other;
                    best_slot = other_slot;
                  }
                }
                minimum = best;
                slot = best_slot;
                __syncwarp();
              }
            }
          }
          if (lane == 0) {
            rs.key[r] = minimum;
            rs.slot[r] = slot;
          }
          __syncwarp();
        }
        __syncthreads();  // the tile's scores are read before the next tile overwrites them
      }
    }

    __syncthreads();
    for (int idx = tid; idx < rows * L; idx += kThreads) {
      const int r = idx / L, t = idx % L;
      p.keys[((row0 + r) * S + s) * L + t] = lists[idx];
    }
  }
  if (nonfinite) atomicExch(p.nonfinite, 1);
}

// ---------------------------------------------------------------------------------------------------------
// Launchers

bool is_aligned(const void* pointer, size_t bytes) { return reinterpret_cast<uintptr_t>(pointer) % bytes == 0; }

// 16-byte loads need d, both row strides and both base pointers to fit them.
bool vector_loads(const ScorePool& pool) {
  const int64_t vec = pool.dtype == DType::F32 ? 4 : 8;
  return pool.d % vec == 0 && pool.query_stride % vec == 0 && pool.candidate_stride % vec == 0 &&
         is_aligned(pool.queries, 16) && is_aligned(pool.candidates, 16);
}

unsigned split_grid(const ScorePool& pool, int64_t num_splits) {
  const int64_t items = (pool.B + kTile - 1) / kTile * num_splits;
  return static_cast<unsigned>(std::min<int64_t>(items, int64_t{1} << 30));
}

template <typename Kernel, typename Params>
cudaError_t launch_split(Kernel kernel, const Params& params, unsigned grid, size_t smem_bytes, cudaStream_t stream) {
  const cudaError_t attribute =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
  if (attribute != cudaSuccess) return attribute;
  kernel<<<grid, kThreads, smem_bytes, stream>>>(params);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_topk(const TopkParams& params, unsigned grid, size_t smem, bool vec, cudaStream_t stream) {
  return vec ? launch_split(split_topk_kernel<T, true>, params, grid, smem, stream)
             : launch_split(split_topk_kernel<T, false>, params, grid, smem, stream);
}

}  // namespace

cudaError_t split_topk_cuda(const ScorePool& pool, const int64_t* exclude, int64_t exclude_cols,
                            const float* max_score, const int64_t* upper, int64_t num_splits, int64_t split_size,
                            int64_t list_size, int64_t key_mode, int64_t seed, int64_t* keys, int32_t* nonfinite,
                            cudaStream_t stream) {
  const cudaError_t zeroed = cudaMemsetAsync(nonfinite, 0, sizeof(*nonfinite), stream);
  if (zeroed != cudaSuccess || pool.B == 0 || num_splits == 0) return zeroed;
  if (list_size < 16 || list_size > 128 || (list_size & (list_size - 1)) != 0 || split_size < 1 ||
      (key_mode != 0 && key_mode != 1)) {
    return cudaErrorInvalidValue;
  }
  TopkParams params{};
  params.pool = pool;
  params.exclude = exclude_cols > 0 ? exclude : nullptr;
  params.exclude_cols = exclude_cols > 0 ? exclude_cols : 0;
  params.max_score = max_score;
  params.upper = upper;
  params.num_splits = num_splits;
  params.split_size = split_size;
  params.list_size = static_cast<int>(list_size);
  params.key_mode = static_cast<int>(key_mode);
  params.seed = seed;
  params.compute_scores = key_mode == 0 || max_score != nullptr;
  params.keys = keys;
  params.nonfinite = nonfinite;
  const size_t smem = kFixedBytes + sizeof(int64_t) * kTile * list_size;
  const unsigned grid = split_grid(pool, num_splits);
  const bool vec = vector_loads(pool);
  switch (pool.dtype) {
    case DType::F32:
      return launch_topk<float>(params, grid, smem, vec, stream);
    case DType::F16:
      return launch_topk<__half>(params, grid, smem, vec, stream);
    case DType::BF16:
      return launch_topk<__nv_bfloat16>(params, grid, smem, vec, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace elva
