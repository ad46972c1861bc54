// A tiny test harness for the torch-free kernels: checks that report and count instead of aborting, and
// half-precision decoders written from the IEEE definitions (std::ldexp), independent of elva/common.h.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>

namespace elva::test {

inline int failures = 0;

// ctest reports a test that exits with this code as skipped (SKIP_RETURN_CODE in CMakeLists.txt).
constexpr int kSkipExitCode = 77;

inline int finish(const char* suite) {
  if (failures == 0) {
    std::printf("%s: all checks passed\n", suite);
    return 0;
  }
  std::printf("%s: %d check(s) failed\n", suite, failures);
  return 1;
}

// binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits.
inline double fp16_value(uint16_t bits) {
  const double sign = (bits & 0x8000u) ? -1.0 : 1.0;
  const int exponent = (bits >> 10) & 0x1f;
  const int mantissa = bits & 0x3ff;
  if (exponent == 0x1f) return mantissa ? std::numeric_limits<double>::quiet_NaN() : sign * INFINITY;
  if (exponent == 0) return sign * std::ldexp(mantissa, -24);
  return sign * std::ldexp(1.0 + mantissa / 1024.0, exponent - 15);
}

// bfloat16: 1 sign, 8 exponent (bias 127), 7 mantissa bits.
inline double bf16_value(uint16_t bits) {
  const double sign = (bits & 0x8000u) ? -1.0 : 1.0;
  const int exponent = (bits >> 7) & 0xff;
  const int mantissa = bits & 0x7f;
  if (exponent == 0xff) return mantissa ? std::numeric_limits<double>::quiet_NaN() : sign * INFINITY;
  if (exponent == 0) return sign * std::ldexp(mantissa, -133);
  return sign * std::ldexp(1.0 + mantissa / 128.0, exponent - 127);
}

}  // namespace elva::test

// Records a failure with a printf-style explanation and carries on, so one run lists every failing case.
#define ELVA_CHECK(cond, ...)                                                     \
  do {                                                                            \
    if (!(cond)) {                                                                \
      std::printf("%s:%d: check failed: %s: ", __FILE__, __LINE__, #cond);        \
      std::printf(__VA_ARGS__);                                                   \
      std::printf("\n");                                                          \
      ++elva::test::failures;                                                     \
    }                                                                             \
  } while (0)
