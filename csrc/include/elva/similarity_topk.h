// Exact top-k of query-candidate similarity, torch-free interface (the CPU backend of elva::similarity_topk).
//
// Layout:
//   queries     B rows of d elements of `dtype`; row b starts at element b * query_stride (unit-stride rows).
//   candidates  N rows of d elements of `dtype`; row n starts at element n * candidate_stride.
//   exclude     nullptr, or B x m int64 (row-major, contiguous): ids to skip per query, -1 = padding. Ids outside
//               [0, N) never match (the binding rejects them before the call).
//   max_score   nullptr, or B fp32: candidates scoring above max_score[b] are skipped for query b.
//   values      B x k fp32 out, descending; indices B x k int64 out. -inf / -1 fill the tail when fewer than k
//               candidates are eligible.
// Order: score descending, then candidate index ascending. Scores are fp32: rows are prepared in fp32 (cosine:
// queries x / max(||x||, 1e-12); candidates' dot products divided by their max(||c||, 1e-12)); the canonical score
// of a pair is 64 fp32 FMA lanes over d then a fixed tree. A fast kernel (bf16 VDPBF16PS where it beats fp32 FMA,
// else fp32 FMA: AVX-512, AVX2 or scalar) screens the pairs; those within a proven error bound of the running k-th
// best are rescored canonically. Results are thus identical on every code path, and exact duplicates score
// bitwise-equal and come out by index. ELVA_CPU_ISA=avx512bf16|avx512|avx2|scalar forces a kernel (for tests).
//
// Extra memory: B*d fp32 prepared queries plus their packed copy, per thread one candidate block of 264 rows
// (fp32 when widening, bf16 when screening) and a 264 x 32 score tile, the sorted exclude lists (B*m int64), and
// top-k buffers of B * (k + min(max(k, 256), 16384)) (score, index) pairs, once per thread when B <= 32 and the
// threads split the candidates. Never B*N.
#pragma once

#include <cstdint>

#include "elva/common.h"

namespace elva {

enum class Metric : int32_t { Cosine, Dot };

struct SimilarityTopkStatus {
  int64_t nonfinite_queries = 0;  // NaN/Inf entries found in the queries (0 = fine)
  bool nonfinite_candidates = false;  // a NaN/Inf entry was found in the candidates (the search stops early)
};

// OpenMP over query panels of 32 (or, for B <= 32, over candidate blocks, with a merge). On a non-finite input
// the outputs hold garbage and the caller must raise.
SimilarityTopkStatus similarity_topk_cpu(const void* queries, int64_t query_stride, const void* candidates,
                                         int64_t candidate_stride, DType dtype, int64_t B, int64_t N, int64_t d,
                                         int64_t k, Metric metric, const int64_t* exclude, int64_t exclude_cols,
                                         const float* max_score, float* values, int64_t* indices);

}  // namespace elva
