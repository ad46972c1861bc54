// CUDA launcher of the row L2-normalisation; layout and semantics as in elva/l2_normalize.h.
// Torch-free, so that nvcc and ctest build it without libtorch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "elva/common.h"

namespace elva {

// Enqueues the kernel on `stream`; x and out are device pointers. `nonfinite_count` is one device int64 that
// the launcher zeroes and the kernel sets to the number of NaN/Inf entries of x: read it after the stream
// reaches this point and raise when it is non-zero. Returns the launch error (cudaSuccess when enqueued).
cudaError_t l2_normalize_cuda(const void* x, DType dtype, int64_t rows, int64_t dim, int64_t row_stride, double eps,
                              float* out, int64_t* nonfinite_count, cudaStream_t stream);

}  // namespace elva
