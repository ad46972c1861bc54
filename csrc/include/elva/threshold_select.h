// The select step of the chunked threshold pass (the CUDA backend's similarity_topk main path; the threshold,
// its exactness and the fallbacks are in elva_kernels/_retrieval.py). A GEMM writes one chunk of fp32
// products acc[i, j] = <q_i, c_j>; the select scales each, compares it with the query's threshold and appends
// the survivors to the query's buffer. Torch-free: the CPU twin (csrc/cpu), the CUDA kernel (csrc/cuda) and the
// bindings share the per-score rule below, so the CPU tests cover the CUDA kernel's semantics.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define ELVA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ELVA_HOST_DEVICE inline
#endif

namespace elva {

// One chunk of products and where its survivors go. Row i of the chunk is query i; column t is candidate
// first_candidate + t. The buffers are [rows, capacity] contiguous; count[i] (zeroed before the first chunk)
// counts every survivor, those past the capacity too, so count > capacity means the buffer overflowed.
struct ThresholdChunk {
  const float* products;  // [rows, cols], row stride ld
  int64_t rows, cols, ld;
  int64_t first_candidate;
  const float* query_scale;      // [rows]
  const float* candidate_scale;  // [N], indexed by candidate id
  const float* threshold;        // [rows]
  const float* max_score;        // [rows] or nullptr
  int64_t capacity;
  int32_t* count;       // [rows]
  float* scores;        // [rows, capacity]
  int32_t* ids;         // [rows, capacity]
  int32_t* nonfinite;   // one flag, set to 1 on a NaN/Inf score
};

// The kernels' score: the same two roundings as every other elva kernel, (acc * query_scale) * candidate_scale.
ELVA_HOST_DEVICE float threshold_score(float product, float query_scale, float candidate_scale) {
  return (product * query_scale) * candidate_scale;
}

// A score survives when it is >= the threshold and <= max_score (limit = +inf without one). NaN never does.
ELVA_HOST_DEVICE bool threshold_survives(float score, float threshold, float limit) {
  return score >= threshold && score <= limit;
}

ELVA_HOST_DEVICE bool threshold_nonfinite(float score) { return !(fabsf(score) <= FLT_MAX); }

// The CPU twin of threshold_select_cuda: rows in parallel, each row's survivors in candidate order.
void threshold_select_cpu(const ThresholdChunk& chunk);

}  // namespace elva
