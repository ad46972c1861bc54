// The select step of the chunked threshold pass (elva/threshold_select.h): cuBLAS has written a chunk of fp32
// products; each warp reads a 128-column run of one row (a 16-byte load per lane), applies the per-score rule
// and, only when some lane holds a survivor (rare: about capacity / N of the scores), reserves slots for the
// whole warp with one atomic and writes the survivors at ballot-prefix offsets. The common path per score is a
// quarter of a vector load, two multiplies, two compares and a ballot.
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>

#include "elva/cuda/device.cuh"
#include "elva/cuda/threshold_select.cuh"

namespace elva {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / device::kWarpSize;
constexpr int kPerLane = 16;
constexpr int kRun = device::kWarpSize * kPerLane;  // columns per warp step

// One warp step: kPerLane columns per lane from `col` of one row. kTail: the run may pass the chunk's end or the
// scales are not 16-byte aligned, so every element is loaded and tested on its own. kLimit: max_score is given.
template <bool kTail, bool kLimit>
__device__ __forceinline__ void select_run(const ThresholdChunk& chunk, int row, int col, int cols,
                                           const float* row_products, const float* chunk_scales, float query_scale,
                                           float threshold, float limit, unsigned lanes_below, int lane) {
  alignas(16) float products[kPerLane];
  alignas(16) float candidate_scales[kPerLane];
  device::load_run<kPerLane, kTail>(row_products, chunk_scales, col, cols, products, candidate_scales);
  float scores[kPerLane];
  unsigned ballots[kPerLane];
  unsigned any = 0u;
  bool odd = false;
  for (int e = 0; e < kPerLane; ++e) {
    scores[e] = threshold_score(products[e], query_scale, candidate_scales[e]);
    odd |= threshold_nonfinite(scores[e]);  // padding scores 0
    const bool survives = kLimit ? threshold_survives(scores[e], threshold, limit) : scores[e] >= threshold;
    ballots[e] = __ballot_sync(0xffffffffu, (!kTail || col + e < cols) && survives);
    any |= ballots[e];
  }
  if (__any_sync(0xffffffffu, odd) && lane == 0) atomicOr(chunk.nonfinite, 1);
  if (any == 0u) return;  // the common case, warp-uniform
  int total = 0;
  for (int e = 0; e < kPerLane; ++e) total += __popc(ballots[e]);
  int base = 0;
  if (lane == 0) base = atomicAdd(chunk.count + row, total);
  base = __shfl_sync(0xffffffffu, base, 0);
  for (int e = 0; e < kPerLane; ++e) {
    const int64_t slot = base + __popc(ballots[e] & lanes_below);
    if ((ballots[e] >> lane & 1u) && slot < chunk.capacity) {
      chunk.scores[row * chunk.capacity + slot] = scores[e];
      chunk.ids[row * chunk.capacity + slot] = static_cast<int32_t>(chunk.first_candidate + col + e);
    }
    base += __popc(ballots[e]);
  }
}

// Per score on the common path: a quarter of two 16-byte loads, the two scale multiplies, one or two compares
// with the threshold (and max_score), the NaN/Inf test and a ballot, plus the loop's share.
// sm90-expect: max_spill_bytes=0 max_epilogue_per_score=10 scores_per_thread=16
template <bool kLimit>
__global__ void __launch_bounds__(kThreads) threshold_select_kernel(ThresholdChunk chunk) {
  const int lane = threadIdx.x % device::kWarpSize;
  const unsigned lanes_below = (1u << lane) - 1u;
  // 32-bit counters (the launcher checks the chunk's size): no 64-bit compare per step.
  const int cols = static_cast<int>(chunk.cols);
  const int rows = static_cast<int>(chunk.rows);
  const int first_col = (blockIdx.x * kWarps + threadIdx.x / device::kWarpSize) * kRun + lane * kPerLane;
  const int col_step = gridDim.x * kWarps * kRun;
  const float* chunk_scales = chunk.candidate_scale + chunk.first_candidate;
  const bool scales_aligned = (reinterpret_cast<uintptr_t>(chunk_scales) & 15u) == 0;
  for (int row = blockIdx.y; row < rows; row += gridDim.y) {  // warp-uniform: a warp stays in its row
    const float query_scale = chunk.query_scale[row];
    const float threshold = chunk.threshold[row];
    const float limit = kLimit ? chunk.max_score[row] : INFINITY;
    const float* row_products = chunk.products + int64_t{row} * chunk.ld;
    for (int col = first_col; col < cols; col += col_step) {
      if (col + kPerLane <= cols && scales_aligned) {
        select_run<false, kLimit>(chunk, row, col, cols, row_products, chunk_scales, query_scale, threshold, limit,
                          lanes_below, lane);
      } else {
        select_run<true, kLimit>(chunk, row, col, cols, row_products, chunk_scales, query_scale, threshold, limit,
                         lanes_below, lane);
      }
    }
  }
}

}  // namespace

cudaError_t threshold_select_cuda(const ThresholdChunk& chunk, cudaStream_t stream) {
  if (chunk.rows == 0 || chunk.cols == 0) return cudaSuccess;
  if (chunk.cols >= (int64_t{1} << 31) - kRun || chunk.rows >= (int64_t{1} << 31) ||
      chunk.capacity >= (int64_t{1} << 31)) {
    return cudaErrorInvalidValue;
  }
  int device_id = 0, multiprocessors = 0;
  cudaGetDevice(&device_id);
  cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device_id);
  // About 8 blocks per SM, rows first: each warp then walks a few runs of one row.
  const int64_t row_blocks = std::min<int64_t>(chunk.rows, 65535);
  const int64_t col_runs = (chunk.cols + kWarps * kRun - 1) / (kWarps * kRun);
  const int64_t col_blocks = std::clamp<int64_t>(8 * multiprocessors / row_blocks, 1, col_runs);
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(row_blocks));
  if (chunk.max_score != nullptr) {
    threshold_select_kernel<true><<<grid, kThreads, 0, stream>>>(chunk);
  } else {
    threshold_select_kernel<false><<<grid, kThreads, 0, stream>>>(chunk);
  }
  return cudaGetLastError();
}

}  // namespace elva
