// Device helpers shared by the CUDA kernels: element widening, aligned vector packs, warp reductions, chunk runs.
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

// One lane's kCount consecutive products and candidate scales of a chunk row, from column `col`. kTail: the run may
// pass the chunk's `cols` or the scales are not 16-byte aligned, so each element is loaded on its own (0 past cols);
// otherwise 16-byte loads (kCount a multiple of 4, products 16-byte aligned).
template <int kCount, bool kTail>
__device__ __forceinline__ void load_run(const float* row_products, const float* chunk_scales, int col, int cols,
                                         float (&products)[kCount], float (&scales)[kCount]) {
  if (kTail) {
    for (int e = 0; e < kCount; ++e) {
      const bool inside = col + e < cols;
      products[e] = inside ? row_products[col + e] : 0.0f;
      scales[e] = inside ? chunk_scales[col + e] : 0.0f;
    }
  } else {
    for (int v = 0; v < kCount; v += 4) {
      *reinterpret_cast<float4*>(products + v) = *reinterpret_cast<const float4*>(row_products + col + v);
      *reinterpret_cast<float4*>(scales + v) = *reinterpret_cast<const float4*>(chunk_scales + col + v);
    }
  }
}

}  // namespace elva::device
