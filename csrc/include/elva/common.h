// Types and conversions shared by every native kernel. Torch-free: the CPU kernels, the CUDA launchers,
// the ctest cases and the torch bindings all include it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace elva {

// Element type of a kernel input. Outputs and accumulators are always fp32.
enum class DType : int32_t { F32, F16, BF16 };

constexpr size_t element_size(DType dtype) { return dtype == DType::F32 ? 4 : 2; }

inline float float_from_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline uint32_t bits_from_float(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// bf16 is the upper half of an fp32, so widening is a shift.
inline float bf16_bits_to_float(uint16_t bits) { return float_from_bits(static_cast<uint32_t>(bits) << 16); }

// IEEE binary16 -> binary32, exact (every half is a float). Branch-free, so that row loops vectorise:
// the three cases are computed from the magnitude bits moved to fp32 positions, then selected.
inline float fp16_bits_to_float(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t magnitude = static_cast<uint32_t>(bits & 0x7fffu) << 13;
  const uint32_t exponent = magnitude & 0x0f800000u;
  // Normal: rebias the exponent from 15 to 127.
  const uint32_t normal = magnitude + ((127u - 15u) << 23);
  // Inf/NaN (all-ones exponent): rebias to 255, keeping a NaN's payload.
  const uint32_t special = magnitude + ((255u - 31u) << 23);
  // Zero/subnormal, mantissa * 2^-24: read the mantissa as 2^-14 * (1 + mantissa/1024), then take 2^-14 off.
  const uint32_t tiny = bits_from_float(float_from_bits(magnitude + (113u << 23)) - float_from_bits(113u << 23));
  const uint32_t unsigned_bits = exponent == 0x0f800000u ? special : exponent == 0 ? tiny : normal;
  return float_from_bits(sign | unsigned_bits);
}

}  // namespace elva
