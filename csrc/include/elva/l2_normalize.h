// Row L2-normalisation, torch-free interface: y[r, :] = x[r, :] / max(||x[r, :]||_2, eps), in fp32.
//
// Layout, shared with the CUDA launcher (elva/cuda/l2_normalize.cuh):
//   x    rows x dim elements of `dtype`; element (r, c) is at x[r * row_stride + c]. Elements of a row are
//        adjacent, rows need not be: row_stride is dim when contiguous, more for padded or column-sliced
//        rows, 0 for one row broadcast (the torch binding copies only when the last dim is not unit-stride).
//   out  rows x dim fp32, contiguous (row r starts at out[r * dim]).
// The sum of squares is accumulated in fp32, as the torch reference does (torch.linalg.vector_norm on fp32).
//
// Non-finite input is reported, not skipped: the result is the number of NaN/Inf entries of x, found at no
// extra cost on the hot path (a row can only hold one when its sum of squares is not finite). When it is
// non-zero, `out` holds garbage for those rows and the caller must raise. Finite rows whose sum of squares
// overflows fp32 count nothing and normalise to zeros, as the reference does.
#pragma once

#include <cstdint>

#include "elva/common.h"

namespace elva {

// OpenMP over rows. Returns the number of NaN/Inf entries in x.
int64_t l2_normalize_cpu(const void* x, DType dtype, int64_t rows, int64_t dim, int64_t row_stride, double eps,
                         float* out);

}  // namespace elva
