// Row L2-normalisation on CUDA: one warp per row, fp32 accumulation, 16-byte loads when the layout allows.
// No ATen headers, so that plain nvcc (CMake, CI without a GPU) compiles it for sm_90.
#include "elva/cuda/l2_normalize.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "elva/cuda/device.cuh"

#include <algorithm>

namespace elva {
namespace {

using device::kLoadBytes;
using device::kWarpSize;

constexpr int kWarpsPerBlock = 8;
constexpr int kThreadsPerBlock = kWarpSize * kWarpsPerBlock;
// Plenty to fill an H100/H200 (132 SMs x 8 resident blocks); taller inputs loop over rows.
constexpr int64_t kMaxBlocks = 1 << 16;

using device::Pack;
using device::to_float;
using device::warp_sum;

// Requires dim % kVec == 0 and 16-byte-aligned packs (the launcher checks); kVec == 1 serves any layout.
// sm90-expect: max_spill_bytes=0
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreadsPerBlock)
    l2_normalize_kernel(const T* __restrict__ x, int64_t rows, int64_t dim, int64_t row_stride, float eps,
                        float* __restrict__ out, unsigned long long* __restrict__ nonfinite_count) {
  using InPack = Pack<T, kVec>;
  using OutPack = Pack<float, kVec>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t packs = dim / kVec;
  const int64_t warps_in_grid = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize; row < rows;
       row += warps_in_grid) {
    const auto* x_row = reinterpret_cast<const InPack*>(x + row * row_stride);
    auto* out_row = reinterpret_cast<OutPack*>(out + row * dim);

    // 1. Sum of squares in fp32, lanes striding over packs so that a warp's loads are contiguous.
    float squares = 0.0f;
    for (int64_t p = lane; p < packs; p += kWarpSize) {
      const InPack pack = x_row[p];
#pragma unroll
      for (int k = 0; k < kVec; ++k) squares += to_float(pack.v[k]) * to_float(pack.v[k]);
    }
    squares = warp_sum(squares);

    // 2. NaN/Inf entries make the sum non-finite, so finite rows pay nothing for the check.
    if (!isfinite(squares)) {
      unsigned long long nonfinite = 0;
      for (int64_t p = lane; p < packs; p += kWarpSize) {
        const InPack pack = x_row[p];
#pragma unroll
        for (int k = 0; k < kVec; ++k) nonfinite += !isfinite(to_float(pack.v[k]));
      }
      nonfinite = warp_sum(nonfinite);
      if (nonfinite > 0) {
        if (lane == 0) atomicAdd(nonfinite_count, nonfinite);
        continue;
      }
    }

    // 3. Scale. The row was just read, so this second read is served from L1/L2.
    const float norm = fmaxf(sqrtf(squares), eps);
    for (int64_t p = lane; p < packs; p += kWarpSize) {
      const InPack pack = x_row[p];
      OutPack scaled;
#pragma unroll
      for (int k = 0; k < kVec; ++k) scaled.v[k] = to_float(pack.v[k]) / norm;
      out_row[p] = scaled;
    }
  }
}

bool is_aligned(const void* pointer, size_t bytes) { return reinterpret_cast<uintptr_t>(pointer) % bytes == 0; }

template <typename T>
void launch(const void* x, int64_t rows, int64_t dim, int64_t row_stride, float eps, float* out,
            unsigned long long* nonfinite_count, cudaStream_t stream) {
  constexpr int kVec = kLoadBytes / sizeof(T);
  const auto blocks = static_cast<unsigned>(std::min((rows + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxBlocks));
  const auto* typed_x = static_cast<const T*>(x);
  const bool packable = dim % kVec == 0 && row_stride % kVec == 0 && is_aligned(x, kLoadBytes) &&
                        is_aligned(out, sizeof(Pack<float, kVec>));
  if (packable) {
    l2_normalize_kernel<T, kVec>
        <<<blocks, kThreadsPerBlock, 0, stream>>>(typed_x, rows, dim, row_stride, eps, out, nonfinite_count);
  } else {
    l2_normalize_kernel<T, 1>
        <<<blocks, kThreadsPerBlock, 0, stream>>>(typed_x, rows, dim, row_stride, eps, out, nonfinite_count);
  }
}

}  // namespace

cudaError_t l2_normalize_cuda(const void* x, DType dtype, int64_t rows, int64_t dim, int64_t row_stride, double eps,
                              float* out, int64_t* nonfinite_count, cudaStream_t stream) {
  const cudaError_t zeroed = cudaMemsetAsync(nonfinite_count, 0, sizeof(*nonfinite_count), stream);
  if (zeroed != cudaSuccess || rows == 0 || dim == 0) return zeroed;
  // Counts are never negative, so the int64 the caller owns can take the unsigned atomics.
  auto* count = reinterpret_cast<unsigned long long*>(nonfinite_count);
  const auto eps_f = static_cast<float>(eps);
  switch (dtype) {
    case DType::F32:
      launch<float>(x, rows, dim, row_stride, eps_f, out, count, stream);
      break;
    case DType::F16:
      launch<__half>(x, rows, dim, row_stride, eps_f, out, count, stream);
      break;
    case DType::BF16:
      launch<__nv_bfloat16>(x, rows, dim, row_stride, eps_f, out, count, stream);
      break;
  }
  return cudaGetLastError();
}

}  // namespace elva
