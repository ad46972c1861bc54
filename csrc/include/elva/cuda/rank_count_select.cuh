// CUDA launcher of the chunked rank pass's count step (elva/rank_count_select.h has the rule and the layout).
// Torch-free, so that nvcc and ctest build it without libtorch.
#pragma once

#include <cuda_runtime_api.h>

#include "elva/rank_count_select.h"

namespace elva {

// Adds the chunk's counts and best negatives on `stream`; requires ld % 4 == 0 and 16-byte aligned products (the
// bindings pad the chunk's row stride). Does not initialise ahead, max_neg_key or nonfinite. Returns the launch
// error.
cudaError_t rank_count_select_cuda(const RankCountChunk& chunk, cudaStream_t stream);

}  // namespace elva
