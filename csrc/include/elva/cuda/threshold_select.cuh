// CUDA launcher of the chunked threshold pass's select step (elva/threshold_select.h has the rule and the
// layout). Torch-free, so that nvcc and ctest build it without libtorch.
#pragma once

#include <cuda_runtime_api.h>

#include "elva/threshold_select.h"

namespace elva {

// Appends the chunk's survivors on `stream`; requires ld % 4 == 0 and 16-byte aligned products (the bindings
// pad the chunk's row stride). Does not zero count or nonfinite. Returns the launch error.
cudaError_t threshold_select_cuda(const ThresholdChunk& chunk, cudaStream_t stream);

}  // namespace elva
