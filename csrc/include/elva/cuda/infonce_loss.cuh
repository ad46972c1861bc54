// CUDA launchers of infonce_loss (forward and memory-linear backward); semantics in
// elva_kernels/reference/infonce_loss.py, design in csrc/cuda/infonce_loss.cu. Torch-free, so that nvcc and
// ctest build them without libtorch; the torch binding is csrc/bindings/infonce_loss_cuda.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "elva/common.h"

namespace elva {

// The scored pair and its ids, all device pointers.
//   queries [B, d], candidates [N, d]: one element type, unit stride along d, row strides in elements.
//   labels [B] int64 in [0, N) (symmetric: labels[i] == i and N >= B).
//   false_negatives: [B, false_negative_cols] int64 row-major (-1 padded, ids in [-1, N), never the row's label)
//     or nullptr. The binding checks the ids; invalid ids are never dereferenced, they only give wrong values.
//   temperature: one fp32 on the device (finite, > 0).
// Requires N < 2**31 and B < 2**31.
struct InfoNceProblem {
  const void* queries;
  int64_t query_stride;
  const void* candidates;
  int64_t candidate_stride;
  DType dtype;
  int64_t B, N, d;
  const int64_t* labels;
  const int64_t* false_negatives;
  int64_t false_negative_cols;
  const float* temperature;
  bool symmetric;
};

// Forward: loss [B] and lse [B] fp32 (the per-query losses, both directions averaged when symmetric).
// query_scale [B] / candidate_scale [N] (fp32 workspace, written here) receive 1 / max(||row||, 1e-12).
// nonfinite [2] (uint64, zeroed here) receives the number of NaN/Inf entries of the queries and the candidates;
// when either is non-zero, loss and lse are garbage. Read it after the stream reaches this point.
// Returns the launch error (cudaSuccess when enqueued).
cudaError_t infonce_loss_cuda(const InfoNceProblem& problem, float* query_scale, float* candidate_scale,
                              unsigned long long* nonfinite, float* loss, float* lse, cudaStream_t stream);

// Bytes of device workspace infonce_loss_backward_cuda needs (256-byte aligned base): inverse norms, weights,
// the reverse lse, per-CTA temperature partial sums, and the fp32 prepared-row gradient accumulators
// ([B, d] when grad_queries is wanted, [N, d] when grad_candidates is wanted).
size_t infonce_loss_backward_workspace_bytes(int64_t B, int64_t N, int64_t d, bool want_queries,
                                             bool want_candidates);

// Backward of sum(grad_loss * loss + grad_lse * lse), given the forward's loss and lse (fp32 [B] each) and the
// upstream gradients (fp32 [B] each).
//   grad_queries: nullptr, or [B, d] of the input dtype, contiguous (written fully).
//   grad_candidates: nullptr, or [N, d] of the input dtype, contiguous (written fully).
//   grad_temperature: nullptr, or one fp32 on the device: dL/dtau.
// workspace: infonce_loss_backward_workspace_bytes(...) bytes, 256-byte aligned. Returns the launch error.
cudaError_t infonce_loss_backward_cuda(const InfoNceProblem& problem, const float* loss, const float* lse,
                                       const float* grad_loss, const float* grad_lse, void* grad_queries,
                                       void* grad_candidates, float* grad_temperature, void* workspace,
                                       cudaStream_t stream);

}  // namespace elva
