// CUDA launcher of the per-split selection kernel behind elva_kernels/_retrieval.py (keys, eligibility,
// list layout and sentinels are defined in that module's docstring). Torch-free, so that nvcc and ctest build
// it without libtorch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "elva/common.h"

namespace elva {

// The scored pair (queries [B, d], candidates [N, d]): device pointers, one element type, unit stride along d,
// row strides in elements. score(i, j) = (acc * query_scale[i]) * candidate_scale[j], acc the fp32 sum of
// q[i, k] * c[j, k]: fp32 FMAs in k order for F32, tensor-core 16x16x16 MMAs with fp32 accumulators for
// F16/BF16, the same arithmetic wherever the pair sits.
// Requires N < 2**31.
struct ScorePool {
  const void* queries;
  int64_t query_stride;
  const void* candidates;
  int64_t candidate_stride;
  DType dtype;
  int64_t B, N, d;
  const float* query_scale;      // [B]
  const float* candidate_scale;  // [N]
};

// keys [B, num_splits, list_size] (contiguous): per (query i, split s) the list_size largest eligible keys of
// candidates [s * split_size, min(N, (s + 1) * split_size)), any order, empty slots INT64_MIN + 1 + slot.
// exclude: [B, exclude_cols] contiguous, -1 padded, or nullptr; max_score: [B] or nullptr; upper [B, num_splits]
// contiguous (a row whose upper is INT64_MIN gets an empty list). list_size: a power of two in [16, 128].
// key_mode 0: by score; 1: by the random hash of (seed, i, j), i the row index in `queries`.
// nonfinite (one int32) is zeroed here and set to 1 by a kernel that computed a NaN/Inf score; read it after
// the stream reaches this point. Returns the launch error (cudaSuccess when enqueued).
cudaError_t split_topk_cuda(const ScorePool& pool, const int64_t* exclude, int64_t exclude_cols,
                            const float* max_score, const int64_t* upper, int64_t num_splits, int64_t split_size,
                            int64_t list_size, int64_t key_mode, int64_t seed, int64_t* keys, int32_t* nonfinite,
                            cudaStream_t stream);

}  // namespace elva
