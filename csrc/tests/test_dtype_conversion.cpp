// Every fp16 and bf16 bit pattern widened by elva/common.h against the IEEE definition.
#include <cstring>

#include "elva/common.h"
#include "harness.h"

namespace {

// The same value; for NaN, the same sign and payload bits (the half's payload moved up, not quietened).
void check_same(float got, double expected, uint32_t expected_nan_bits, const char* what, uint32_t bits) {
  if (std::isnan(expected)) {
    ELVA_CHECK(elva::bits_from_float(got) == expected_nan_bits, "%s 0x%04x: got bits 0x%08x, expected 0x%08x", what,
               bits, elva::bits_from_float(got), expected_nan_bits);
  } else {
    // Exact: every half is a float; signbit tells -0 from +0.
    ELVA_CHECK(static_cast<double>(got) == expected && std::signbit(got) == std::signbit(expected),
               "%s 0x%04x: got %.9g, expected %.9g", what, bits, got, expected);
  }
}

}  // namespace

int main() {
  for (uint32_t bits = 0; bits <= 0xffffu; ++bits) {
    const auto half = static_cast<uint16_t>(bits);
    const uint32_t sign = (bits & 0x8000u) << 16;
    check_same(elva::fp16_bits_to_float(half), elva::test::fp16_value(half),
               sign | 0x7f800000u | ((bits & 0x3ffu) << 13), "fp16", bits);
    check_same(elva::bf16_bits_to_float(half), elva::test::bf16_value(half), bits << 16, "bf16", bits);
  }
  return elva::test::finish("dtype conversion");
}
