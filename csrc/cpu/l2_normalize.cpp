#include "elva/l2_normalize.h"

#include <algorithm>
#include <cmath>

#include "score_tiles.h"  // sum_of_squares: the one fp32 row reduction of the CPU kernels

namespace elva {
namespace {

// Below this many elements, starting the OpenMP team costs more than the work.
constexpr int64_t kParallelMinElements = 1 << 15;

int64_t count_nonfinite(const float* values, int64_t dim) {
  return std::count_if(values, values + dim, [](float v) { return !std::isfinite(v); });
}

// Widens one fp16/bf16 row into `out` (fp32).
void widen_row(const uint16_t* row, DType dtype, int64_t dim, float* out) {
  if (dtype == DType::BF16) {
    for (int64_t i = 0; i < dim; ++i) out[i] = bf16_bits_to_float(row[i]);
  } else {
    for (int64_t i = 0; i < dim; ++i) out[i] = fp16_bits_to_float(row[i]);
  }
}

// Normalises one row into `out`; returns its number of NaN/Inf entries.
int64_t normalize_row(const void* row, DType dtype, int64_t dim, float eps, float* out) {
  // Half rows are widened straight into the output row, which then serves as the fp32 copy.
  const float* values = static_cast<const float*>(row);
  if (dtype != DType::F32) {
    widen_row(static_cast<const uint16_t*>(row), dtype, dim, out);
    values = out;
  }
  const float squares = tiles::sum_of_squares(values, dim);
  // NaN/Inf entries make the sum non-finite, so finite rows pay nothing for the check.
  if (!std::isfinite(squares)) {
    const int64_t nonfinite = count_nonfinite(values, dim);
    if (nonfinite > 0) return nonfinite;
  }
  const float norm = std::max(std::sqrt(squares), eps);
  // Division, not a reciprocal multiply, so each element rounds once, like the reference.
  for (int64_t i = 0; i < dim; ++i) out[i] = values[i] / norm;
  return 0;
}

}  // namespace

int64_t l2_normalize_cpu(const void* x, DType dtype, int64_t rows, int64_t dim, int64_t row_stride, double eps,
                         float* out) {
  const auto* bytes = static_cast<const char*>(x);
  const int64_t row_bytes = row_stride * static_cast<int64_t>(element_size(dtype));
  const float eps_f = static_cast<float>(eps);
  int64_t nonfinite = 0;
#pragma omp parallel for schedule(static) reduction(+ : nonfinite) if (rows * dim >= kParallelMinElements)
  for (int64_t r = 0; r < rows; ++r) {
    nonfinite += normalize_row(bytes + r * row_bytes, dtype, dim, eps_f, out + r * dim);
  }
  return nonfinite;
}

}  // namespace elva
