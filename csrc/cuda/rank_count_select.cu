// The count step of the chunked rank pass (elva/rank_count_select.h): cuBLAS has written a chunk of fp32 products;
// each warp reads a kRankRun-column run of one row (a 16-byte load per lane), keeps its lanes' counts and best
// negative in registers across the runs of that row, and adds them to the row's results with one atomic each
// when it leaves the row. A run with no listed id of its row (warp-uniform: one pointer walk per run) costs per
// score a quarter of two vector loads, two multiplies, one compare and add, one maximum and the NaN/Inf test.
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cstdint>

#include "elva/cuda/device.cuh"
#include "elva/cuda/rank_count_select.cuh"

namespace elva {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / device::kWarpSize;
constexpr int kPerLane = kRankRun / device::kWarpSize;

// One lane's kPerLane columns from `col`. kTail: the run may pass the chunk's end or the scales are not 16-byte
// aligned, so every element is loaded on its own. kExact: the run holds listed ids or is short (exact rule).
template <bool kTail, bool kExact>
__device__ __forceinline__ void count_run(const RankCountChunk& chunk, int col, int cols, const float* row_products,
                                          const float* chunk_scales, float query_scale, float bound, float pos_score,
                                          int32_t pos_id, const int32_t* listed, const int32_t* listed_end,
                                          int& ahead, float& best, bool& odd) {
  alignas(16) float products[kPerLane];
  alignas(16) float candidate_scales[kPerLane];
  device::load_run<kPerLane, kTail>(row_products, chunk_scales, col, cols, products, candidate_scales);
  const int64_t first_id = chunk.first_candidate + col;
  float run_ahead = 0.0f;  // FSET + FADD per score (an int count takes a compare, an add and a select); exact to 16
  for (int e = 0; e < kPerLane; ++e) {
    const float score = threshold_score(products[e], query_scale, candidate_scales[e]);
    if (!kExact) {
      odd |= threshold_nonfinite(score);
      run_ahead += score > bound ? 1.0f : 0.0f;
      best = fmaxf(best, score);
      continue;
    }
    const int64_t id = first_id + e;
    if (col + e >= cols) continue;
    odd |= threshold_nonfinite(score);
    while (listed < listed_end && *listed < id) ++listed;
    if (listed < listed_end && *listed == id) continue;  // a positive or an excluded id
    ahead += rank_beats(score, id, pos_score, pos_id);
    best = fmaxf(best, score);
  }
  ahead += static_cast<int>(run_ahead);
}

// sm90-expect: max_spill_bytes=0 max_epilogue_per_score=10 scores_per_thread=16
__global__ void __launch_bounds__(kThreads) rank_count_select_kernel(RankCountChunk chunk) {
  const int lane = threadIdx.x % device::kWarpSize;
  // 32-bit counters (the launcher checks the chunk's size): no 64-bit compare per step.
  const int cols = static_cast<int>(chunk.cols);
  const int rows = static_cast<int>(chunk.rows);
  const int first_run = (blockIdx.x * kWarps + threadIdx.x / device::kWarpSize) * kRankRun;
  const int run_step = gridDim.x * kWarps * kRankRun;
  const float* chunk_scales = chunk.candidate_scale + chunk.first_candidate;
  const bool scales_aligned = (reinterpret_cast<uintptr_t>(chunk_scales) & 15u) == 0;
  for (int row = blockIdx.y; row < rows; row += gridDim.y) {  // warp-uniform: a warp stays in its row
    if (first_run >= cols) break;
    const float query_scale = chunk.query_scale[row];
    const float pos_score = chunk.pos_score[row], pos_below = chunk.pos_below[row];
    const int32_t pos_id = chunk.pos_id[row];
    const float* row_products = chunk.products + int64_t{row} * chunk.ld;
    const int32_t* listed = chunk.listed + int64_t{row} * chunk.listed_width;
    const int32_t* listed_end = listed + chunk.listed_width;
    while (listed < listed_end && *listed < chunk.first_candidate + first_run) ++listed;
    int ahead = 0;
    float best = -INFINITY;
    bool odd = false;
    for (int run = first_run; run < cols; run += run_step) {
      const int64_t first_id = chunk.first_candidate + run, end_id = first_id + kRankRun;
      const int col = run + lane * kPerLane;
      const float bound = rank_run_bound(end_id, pos_id, pos_score, pos_below);
      // `listed` points at the row's first listed id past this warp's previous run: one in the runs of the other
      // warps since then (rare) sends this run down the exact path, which moves the pointer on.
      if (run + kRankRun <= cols && (listed == listed_end || *listed >= end_id)) {
        if (scales_aligned) {
          count_run<false, false>(chunk, col, cols, row_products, chunk_scales, query_scale, bound, pos_score,
                                  pos_id, listed, listed_end, ahead, best, odd);
        } else {
          count_run<true, false>(chunk, col, cols, row_products, chunk_scales, query_scale, bound, pos_score,
                                 pos_id, listed, listed_end, ahead, best, odd);
        }
      } else {
        while (listed < listed_end && *listed < first_id) ++listed;  // the same walk in every lane
        count_run<true, true>(chunk, col, cols, row_products, chunk_scales, query_scale, bound, pos_score, pos_id,
                              listed, listed_end, ahead, best, odd);
        while (listed < listed_end && *listed < end_id) ++listed;
      }
    }
    ahead = device::warp_sum(ahead);
    best = device::warp_max(best);
    if (lane == 0) {
      if (ahead != 0) atomicAdd(chunk.ahead + row, ahead);
      atomicMax(chunk.max_neg_key + row, rank_orderable(best));
    }
    if (__any_sync(0xffffffffu, odd) && lane == 0) atomicOr(chunk.nonfinite, 1);
  }
}

}  // namespace

cudaError_t rank_count_select_cuda(const RankCountChunk& chunk, cudaStream_t stream) {
  if (chunk.rows == 0 || chunk.cols == 0) return cudaSuccess;
  if (chunk.cols >= (int64_t{1} << 31) - kRankRun || chunk.rows >= (int64_t{1} << 31)) return cudaErrorInvalidValue;
  int device_id = 0, multiprocessors = 0;
  cudaGetDevice(&device_id);
  cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device_id);
  // About 8 blocks per SM, rows first: each warp then walks a few runs of one row.
  const int64_t row_blocks = std::min<int64_t>(chunk.rows, 65535);
  const int64_t col_runs = (chunk.cols + kWarps * kRankRun - 1) / (kWarps * kRankRun);
  const int64_t col_blocks = std::clamp<int64_t>(8 * multiprocessors / row_blocks, 1, col_runs);
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(row_blocks));
  rank_count_select_kernel<<<grid, kThreads, 0, stream>>>(chunk);
  return cudaGetLastError();
}

}  // namespace elva
