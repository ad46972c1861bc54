// The l2_normalize cases shared by the CPU and CUDA tests: each kernel runs them through a runner that takes
// host buffers, and every output is checked against a float64 computation on the exactly decoded inputs.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#include "elva/common.h"
#include "harness.h"

namespace elva::test {

// Runs the kernel under test on host memory (x is x_bytes long); returns its NaN/Inf count.
using L2NormalizeRunner = std::function<int64_t(const void* x, size_t x_bytes, DType dtype, int64_t rows,
                                                int64_t dim, int64_t row_stride, double eps, float* out)>;

// fp32, fp16 and bf16 elements are handled as codes: the fp32 bits, or the 16-bit pattern.
constexpr uint32_t nan_code(DType dtype) {
  return dtype == DType::F32 ? 0x7fc00000u : dtype == DType::F16 ? 0x7e00u : 0x7fc0u;
}
constexpr uint32_t inf_code(DType dtype) {
  return dtype == DType::F32 ? 0x7f800000u : dtype == DType::F16 ? 0x7c00u : 0x7f80u;
}
constexpr uint32_t sign_code(DType dtype) { return dtype == DType::F32 ? 0x80000000u : 0x8000u; }

inline double decode(DType dtype, uint32_t code) {
  if (dtype == DType::F16) return fp16_value(static_cast<uint16_t>(code));
  if (dtype == DType::BF16) return bf16_value(static_cast<uint16_t>(code));
  float value;
  std::memcpy(&value, &code, sizeof(value));
  return value;
}

inline const char* dtype_name(DType dtype) {
  return dtype == DType::F32 ? "f32" : dtype == DType::F16 ? "f16" : "bf16";
}

// A rows x dim matrix in the kernels' input layout. Padding between rows holds NaN, so a kernel that reads
// past a row's end reports NaN entries or produces NaN (xformers' out-of-bounds canary).
struct Matrix {
  DType dtype;
  int64_t rows, dim, row_stride;
  std::vector<unsigned char> bytes;

  Matrix(DType dtype_, int64_t rows_, int64_t dim_, int64_t row_stride_)
      : dtype(dtype_), rows(rows_), dim(dim_), row_stride(row_stride_) {
    const int64_t elements = rows == 0 ? 0 : (rows - 1) * row_stride + dim;
    bytes.resize(elements * element_size(dtype));
    for (int64_t i = 0; i < elements; ++i) put_element(i, nan_code(dtype));
  }

  void put(int64_t row, int64_t col, uint32_t code) { put_element(row * row_stride + col, code); }
  uint32_t code(int64_t row, int64_t col) const {
    uint32_t code = 0;
    std::memcpy(&code, &bytes[(row * row_stride + col) * element_size(dtype)], element_size(dtype));
    return code;
  }
  double value(int64_t row, int64_t col) const { return decode(dtype, code(row, col)); }

 private:
  void put_element(int64_t index, uint32_t code) {
    std::memcpy(&bytes[index * element_size(dtype)], &code, element_size(dtype));  // little-endian low bytes
  }
};

// A random code of magnitude 2^(exponent + [0, 1)): the exponent is unbiased, the mantissa uniform.
inline uint32_t random_code(DType dtype, int exponent, std::mt19937& rng) {
  const uint32_t sign = rng() % 2 ? sign_code(dtype) : 0;
  switch (dtype) {
    case DType::F32:
      return sign | static_cast<uint32_t>(exponent + 127) << 23 | (rng() & 0x7fffffu);
    case DType::F16:
      return sign | static_cast<uint32_t>(exponent + 15) << 10 | (rng() & 0x3ffu);
    case DType::BF16:
      return sign | static_cast<uint32_t>(exponent + 127) << 7 | (rng() & 0x7fu);
  }
  return 0;
}

// Rows of magnitudes between 1/8 and 8, then row 0 zeros and row 1 tiny: below eps for fp32/bf16 (so it is
// divided by eps), fp16 subnormals (the smallest fp16 is above eps 1e-12).
inline Matrix random_matrix(DType dtype, int64_t rows, int64_t dim, int64_t row_stride, unsigned seed) {
  std::mt19937 rng(seed);
  Matrix x(dtype, rows, dim, row_stride);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < dim; ++c) {
      uint32_t code = random_code(dtype, static_cast<int>(rng() % 7) - 3, rng);
      if (r == 0) code = 0;
      if (r == 1) code = dtype == DType::F16 ? (rng() & 0x83ffu) : random_code(dtype, -80, rng);
      x.put(r, c, code);
    }
  }
  return x;
}

// Relative error allowed per element. The kernels sum squares in fp32: ~1e-7 for these rows; the op's tests
// allow 1e-6 against the reference.
constexpr double kRelTolerance = 1e-6;

inline std::vector<float> run_case(const L2NormalizeRunner& run, const Matrix& x, double eps,
                                   int64_t expected_nonfinite, const char* what) {
  // Unwritten outputs stay NaN and fail the comparison.
  std::vector<float> out(x.rows * x.dim, NAN);
  const int64_t nonfinite = run(x.bytes.data(), x.bytes.size(), x.dtype, x.rows, x.dim, x.row_stride, eps, out.data());
  ELVA_CHECK(nonfinite == expected_nonfinite, "%s %s rows=%lld dim=%lld stride=%lld: %lld NaN/Inf entries reported, "
             "expected %lld", what, dtype_name(x.dtype), (long long)x.rows, (long long)x.dim,
             (long long)x.row_stride, (long long)nonfinite, (long long)expected_nonfinite);
  return out;
}

// y = x / max(||x||, eps) in float64 on the decoded inputs.
inline void expect_normalized(const Matrix& x, double eps, const std::vector<float>& out, const char* what) {
  int64_t mismatches = 0, first_row = 0, first_col = 0;
  double first_got = 0, first_expected = 0;
  for (int64_t r = 0; r < x.rows; ++r) {
    double squares = 0;
    for (int64_t c = 0; c < x.dim; ++c) squares += x.value(r, c) * x.value(r, c);
    const double norm = std::max(std::sqrt(squares), eps);
    for (int64_t c = 0; c < x.dim; ++c) {
      const double expected = x.value(r, c) / norm;
      const double got = out[r * x.dim + c];
      if (std::fabs(got - expected) <= kRelTolerance * std::fabs(expected)) continue;  // false for NaN too
      if (mismatches++ == 0) {
        first_row = r;
        first_col = c;
        first_got = got;
        first_expected = expected;
      }
    }
  }
  ELVA_CHECK(mismatches == 0, "%s %s rows=%lld dim=%lld stride=%lld eps=%g: %lld elements off by more than %g "
             "relative; first at (%lld, %lld): got %.9g, expected %.9g", what, dtype_name(x.dtype), (long long)x.rows,
             (long long)x.dim, (long long)x.row_stride, eps, (long long)mismatches, kRelTolerance,
             (long long)first_row, (long long)first_col, first_got, first_expected);
}

inline void run_l2_normalize_cases(const L2NormalizeRunner& run) {
  const DType dtypes[] = {DType::F32, DType::F16, DType::BF16};
  unsigned seed = 0;
  for (const DType dtype : dtypes) {
    // Ragged dims, and dims whose rows fill whole 16-byte loads (8, 768, 4096); padding 3 breaks the
    // alignment of every row after the first, padding 8 keeps it.
    for (const int64_t dim : {1, 3, 8, 129, 768, 4096}) {
      for (const int64_t padding : {0, 3, 8}) {
        const Matrix x = random_matrix(dtype, 37, dim, dim + padding, ++seed);
        expect_normalized(x, 1e-12, run_case(run, x, 1e-12, 0, "random"), "random");
      }
    }
    // Enough rows for the parallel paths; then with eps above every row's norm (all below 200).
    const Matrix tall = random_matrix(dtype, 3000, 129, 129, ++seed);
    expect_normalized(tall, 1e-12, run_case(run, tall, 1e-12, 0, "tall"), "tall");
    expect_normalized(tall, 1e3, run_case(run, tall, 1e3, 0, "eps above every norm"), "eps above every norm");

    // Row stride 0: every row reads the same memory.
    Matrix broadcast = random_matrix(dtype, 1, 129, 129, ++seed);
    broadcast.rows = 5;
    broadcast.row_stride = 0;
    expect_normalized(broadcast, 1e-12, run_case(run, broadcast, 1e-12, 0, "broadcast"), "broadcast");

    // Three NaN/Inf entries in two rows are all counted.
    Matrix nonfinite = random_matrix(dtype, 6, 129, 129, ++seed);
    nonfinite.put(2, 5, nan_code(dtype));
    nonfinite.put(3, 0, inf_code(dtype));
    nonfinite.put(3, 128, sign_code(dtype) | inf_code(dtype));
    run_case(run, nonfinite, 1e-12, 3, "nan and inf");

    // Empty inputs write nothing and report nothing.
    run_case(run, Matrix(dtype, 0, 129, 129), 1e-12, 0, "no rows");
    run_case(run, Matrix(dtype, 4, 0, 0), 1e-12, 0, "no columns");
  }

  // Finite rows whose fp32 sum of squares overflows are not NaN/Inf input: they normalise to zeros, as the
  // torch reference (fp32 vector_norm) does. fp16 cannot get there (its largest square is 4.3e9).
  for (const DType dtype : {DType::F32, DType::BF16}) {
    std::mt19937 rng(++seed);
    Matrix huge(dtype, 2, 64, 64);
    for (int64_t c = 0; c < 64; ++c) {
      huge.put(0, c, random_code(dtype, 100, rng));
      huge.put(1, c, random_code(dtype, 100, rng));
    }
    const std::vector<float> out = run_case(run, huge, 1e-12, 0, "squares overflow");
    ELVA_CHECK(std::all_of(out.begin(), out.end(), [](float v) { return v == 0.0f; }),
               "%s squares overflow: expected all zeros", dtype_name(dtype));
  }
}

}  // namespace elva::test
