// Device helpers shared by the CUDA kernels: element widening, aligned vector packs, warp reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace elva::device {

constexpr int kWarpSize = 32;
// One vector load moves 16 bytes: 4 fp32 or 8 fp16/bf16 elements.
constexpr int kLoadBytes = 16;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// kVec consecutive elements moved by one aligned access.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// Butterfly reductions: every lane ends with the same bits, so branches on the result stay warp-uniform.
template <typename V>
__device__ __forceinline__ V warp_sum(V value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

template <typename V>
__device__ __forceinline__ V warp_max(V value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value = max(value, __shfl_xor_sync(0xffffffffu, value, offset));
  }
  return value;
}

}  // namespace elva::device
