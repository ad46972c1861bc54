// The count step of the chunked rank pass (the CUDA backend's rank_statistics; elva_kernels/_retrieval.py drives
// it). A GEMM writes one chunk of fp32 products acc[i, j] = <q_i, c_j>; the count scales each into a score and,
// per query, counts the negatives ranked ahead of its best positive p (score s_p, id i_p) under SPEC's total order,
// s > s_p or (s == s_p and id < i_p), and keeps the best negative score. Listed ids (the positives and the
// exclusions) are not negatives.
//
// Both implementations walk a row in runs of kRankRun columns. A run that holds no listed id of its row (nearly
// all of them: a row lists a few ids among N) holds no i_p either, so all its ties rank on one side of i_p: the
// rule is one compare with a per-run bound, s > s_p after i_p and s > (the next float below s_p) before it. A run
// that holds a listed id, or ends the chunk, takes the exact rule: listed ids are skipped, ties compare ids.
// Torch-free, so the CPU twin (csrc/cpu), the CUDA kernel (csrc/cuda) and the tests share the rule below.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "elva/threshold_select.h"  // ELVA_HOST_DEVICE, threshold_score, threshold_nonfinite

namespace elva {

constexpr int kRankRun = 512;  // columns per run: one warp step of the CUDA kernel (32 lanes x 16)

// One chunk of products and the running per-query results. Row i is query i; column t is candidate
// first_candidate + t. ahead and max_neg_key accumulate over the chunks (the binding initialises them once).
struct RankCountChunk {
  const float* products;  // [rows, cols], row stride ld
  int64_t rows, cols, ld;
  int64_t first_candidate;
  const float* query_scale;      // [rows]
  const float* candidate_scale;  // [N], indexed by candidate id
  const int32_t* listed;         // [rows, listed_width] ascending, padded with INT32_MAX
  int64_t listed_width;
  const float* pos_score;  // [rows] s_p
  const float* pos_below;  // [rows] the largest float below s_p
  const int32_t* pos_id;   // [rows] i_p
  int32_t* ahead;          // [rows] negatives ahead of p
  int32_t* max_neg_key;    // [rows] orderable bits of the best negative score (rank_orderable(-inf) when none)
  int32_t* nonfinite;      // one flag, set to 1 on a NaN/Inf score
};

// A float's bits as an int32 that orders like the float (-0.0 just below +0.0), so atomicMax keeps the best score.
ELVA_HOST_DEVICE int32_t rank_orderable(float value) {
  int32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_int(value);
#else
  std::memcpy(&bits, &value, sizeof(bits));
#endif
  return bits >= 0 ? bits : bits ^ 0x7fffffff;
}

// The bound of a run without listed ids that ends before candidate `run_end`: s > bound is "s ranks ahead of p".
ELVA_HOST_DEVICE float rank_run_bound(int64_t run_end, int32_t pos_id, float pos_score, float pos_below) {
  return pos_id >= run_end ? pos_below : pos_score;
}

// The exact rule, for runs that hold listed ids or end the chunk.
ELVA_HOST_DEVICE bool rank_beats(float score, int64_t id, float pos_score, int32_t pos_id) {
  return score > pos_score || (score == pos_score && id < pos_id);
}

// The CPU twin of rank_count_select_cuda: rows in parallel, the same runs and rule.
void rank_count_select_cpu(const RankCountChunk& chunk);

}  // namespace elva
