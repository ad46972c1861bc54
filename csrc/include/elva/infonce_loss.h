// InfoNCE over cosine scores, forward and memory-linear backward: torch-free interface (the CPU backend of
// elva::infonce_loss and elva::infonce_loss_backward).
//
// Layout:
//   queries          B rows of d elements of `dtype`; row b starts at element b * query_stride (unit-stride rows).
//   candidates       N rows of d elements of `dtype`; row n starts at element n * candidate_stride.
//   labels           B int64 in [0, N) (symmetric: labels[b] == b and N >= B).
//   false_negatives  nullptr, or B x m int64 row-major: candidate ids that are not negatives of that query, -1 = padding.
//                    Ids are in [-1, N) and never equal the row's label (the binding checks these before the call).
//   temperature      finite, > 0.
// Semantics (elva_kernels/reference/infonce_loss.py): rows are normalised in fp32 (x / max(||x||, 1e-12)),
// s_ij = cos(q_i, c_j) in fp32, z_ij = s_ij / tau, lse_i = log sum_j exp(z_ij) over the counted candidates,
// loss_i = lse_i - z_{i, l_i}; symmetric: loss_i = (lse_i - z_ii + rlse_i - z_ii) / 2 with rlse_j the log-sum-exp over
// queries i that do not list j.
//
// Scores: the query row is prepared (normalised), the candidate row is read as is (or widened to fp32), the fp32
// score micro-kernel of score_tiles.h sums the products in one FMA chain in index order, and the result is divided
// by max(||c||, 1e-12).
//
// Extra memory: O(threads x (tile + query panel + candidate block)) plus O(B + N) norms and running sums (and, for
// symmetric, O(threads x B) partial column sums); never B x N. The backward also keeps one fp32 query panel gradient
// and one fp32 candidate block gradient per thread.
#pragma once

#include <cstdint>

#include "elva/common.h"

namespace elva {

struct InfoNceStatus {
  int64_t nonfinite_queries = 0;     // NaN/Inf entries found in the queries (0 = fine)
  int64_t nonfinite_candidates = 0;  // NaN/Inf entries found in the candidates (0 = fine)
};

// loss, lse: B fp32 out. On a non-finite input nothing is written and the status says which.
// OpenMP over query panels of 32 (symmetric: per-thread partial column sums, merged).
InfoNceStatus infonce_loss_cpu(const void* queries, int64_t query_stride, const void* candidates,
                               int64_t candidate_stride, DType dtype, int64_t B, int64_t N, int64_t d,
                               const int64_t* labels, float temperature, bool symmetric,
                               const int64_t* false_negatives, int64_t false_negative_cols, float* loss, float* lse);

// Gradients of sum(grad_loss * loss + grad_lse * lse), given the forward's loss and lse (B fp32 each).
//   grad_queries     nullptr, or B x d of `dtype`, contiguous (written fully).
//   grad_candidates  nullptr, or N x d of `dtype`, contiguous (written fully).
//   grad_temperature nullptr, or one double out: dL/dtau.
// Pass 1 (grad_queries, and grad_temperature) runs over query panels, pass 2 (grad_candidates) over candidate blocks,
// each recomputing its score tiles. On a non-finite input nothing is written.
InfoNceStatus infonce_loss_backward_cpu(const void* queries, int64_t query_stride, const void* candidates,
                                        int64_t candidate_stride, DType dtype, int64_t B, int64_t N, int64_t d,
                                        const int64_t* labels, float temperature, bool symmetric,
                                        const int64_t* false_negatives, int64_t false_negative_cols,
                                        const float* loss, const float* lse, const float* grad_loss,
                                        const float* grad_lse, void* grad_queries, void* grad_candidates,
                                        double* grad_temperature);

}  // namespace elva
