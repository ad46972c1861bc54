// The 64 x 64 score tile shared by split_select.cu and infonce_loss.cu: raw dot products of up to 64 query rows
// and 64 candidate rows, staged through shared memory. fp32 inputs use fmaf in k order; fp16/bf16 use wmma
// m16n16k16 with fp32 accumulators. A pair's sum does not depend on where it sits in the tile, so every kernel
// built on it computes bit-identical scores. Device code only: include it from .cu files.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>

#include "elva/cuda/device.cuh"

namespace elva::tiles {

using device::kWarpSize;

constexpr int kTile = 64;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / device::kWarpSize;
constexpr int kScoreLd = kTile + 4;  // floats; a multiple of 4 for wmma::store_matrix_sync

// fp32 chunks: 32 k values, stored k-major [kChunkF32][kF32Ld] (ld 65: conflict-free transposed stores).
constexpr int kChunkF32 = 32;
constexpr int kF32Ld = kTile + 1;
// fp16/bf16 chunks: 64 k values, stored row-major [rows][kHalfLd] (ld 72: a multiple of 8 elements, rows
// 144 bytes apart, so 16-byte stores and 32-byte aligned fragment pointers).
constexpr int kChunkHalf = 64;
constexpr int kHalfLd = kChunkHalf + 8;

// Shared memory of one tile computation: the staged chunks, and the score tile itself.
constexpr size_t kGemmBytes = std::max(sizeof(float) * 2 * kChunkF32 * kF32Ld, sizeof(uint16_t) * 2 * kTile * kHalfLd);
constexpr size_t kScoreBytes = sizeof(float) * kTile * kScoreLd;

// Score tiles: acc[r][c] for query rows q[0, q_rows) and candidate rows c[0, c_rows) (row pointers of the
// first row; rows past the counts read as zero), written to scores[r * kScoreLd + c]. Called by all 256
// threads of the CTA; begins and ends with a barrier.

// fp32: rows x kChunkF32 from src (row-major, unit stride along k) into dst[k][row].
template <bool kVec>
__device__ __forceinline__ void load_chunk_f32(const float* __restrict__ src, int64_t stride, int rows, int64_t d,
                                               int64_t k0, float* __restrict__ dst) {
  if constexpr (kVec) {
    constexpr int kPerRow = kChunkF32 / 4;
    for (int idx = threadIdx.x; idx < kTile * kPerRow; idx += kThreads) {
      const int row = idx / kPerRow, v = idx % kPerRow;
      const int64_t k = k0 + 4 * v;
      float4 value = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (row < rows && k < d) value = *reinterpret_cast<const float4*>(src + row * stride + k);  // d % 4 == 0
      dst[(4 * v + 0) * kF32Ld + row] = value.x;
      dst[(4 * v + 1) * kF32Ld + row] = value.y;
      dst[(4 * v + 2) * kF32Ld + row] = value.z;
      dst[(4 * v + 3) * kF32Ld + row] = value.w;
    }
  } else {
    for (int idx = threadIdx.x; idx < kTile * kChunkF32; idx += kThreads) {
      const int row = idx / kChunkF32, kk = idx % kChunkF32;
      const int64_t k = k0 + kk;
      dst[kk * kF32Ld + row] = (row < rows && k < d) ? src[row * stride + k] : 0.0f;
    }
  }
}

template <bool kVec>
__device__ void score_tile_f32(const float* __restrict__ q, int64_t q_stride, int q_rows,
                               const float* __restrict__ c, int64_t c_stride, int c_rows, int64_t d,
                               unsigned char* gemm, float* __restrict__ scores) {
  float* qs = reinterpret_cast<float*>(gemm);
  float* cs = qs + kChunkF32 * kF32Ld;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;  // rows ty + 16a, columns tx + 16b
  float acc[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a) {
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[a][b] = 0.0f;
  }
  __syncthreads();
  for (int64_t k0 = 0; k0 < d; k0 += kChunkF32) {
    load_chunk_f32<kVec>(q, q_stride, q_rows, d, k0, qs);
    load_chunk_f32<kVec>(c, c_stride, c_rows, d, k0, cs);
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kChunkF32; ++kk) {
      float qv[4], cv[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) qv[a] = qs[kk * kF32Ld + ty + 16 * a];
#pragma unroll
      for (int b = 0; b < 4; ++b) cv[b] = cs[kk * kF32Ld + tx + 16 * b];
#pragma unroll
      for (int a = 0; a < 4; ++a) {
#pragma unroll
        for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(qv[a], cv[b], acc[a][b]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int a = 0; a < 4; ++a) {
#pragma unroll
    for (int b = 0; b < 4; ++b) scores[(ty + 16 * a) * kScoreLd + tx + 16 * b] = __fadd_rn(acc[a][b], 0.0f);
  }
  __syncthreads();
}

// fp16/bf16 (raw 16-bit words): rows x kChunkHalf from src into dst[row][k] (ld kHalfLd).
template <bool kVec>
__device__ __forceinline__ void load_chunk_half(const uint16_t* __restrict__ src, int64_t stride, int rows,
                                                int64_t d, int64_t k0, uint16_t* __restrict__ dst) {
  if constexpr (kVec) {
    constexpr int kPerRow = kChunkHalf / 8;
    for (int idx = threadIdx.x; idx < kTile * kPerRow; idx += kThreads) {
      const int row = idx / kPerRow, v = idx % kPerRow;
      const int64_t k = k0 + 8 * v;
      uint4 value = make_uint4(0u, 0u, 0u, 0u);
      if (row < rows && k < d) value = *reinterpret_cast<const uint4*>(src + row * stride + k);  // d % 8 == 0
      *reinterpret_cast<uint4*>(dst + row * kHalfLd + 8 * v) = value;
    }
  } else {
#pragma unroll 4
    for (int idx = threadIdx.x; idx < kTile * kChunkHalf; idx += kThreads) {
      const int row = idx / kChunkHalf, kk = idx % kChunkHalf;
      const int64_t k = k0 + kk;
      dst[row * kHalfLd + kk] = (row < rows && k < d) ? src[row * stride + k] : uint16_t{0};
    }
  }
}

template <typename T>
using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major>;
template <typename T>
using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::col_major>;
using FragAcc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

// One 16-wide k slice: acc += A[16 x 16] * B[16 x 16]^T, A and B 16 rows of 16-bit values at ld kHalfLd.
template <typename T>
__device__ __forceinline__ void mma_slice(const uint16_t* a_rows, const uint16_t* b_rows, FragAcc& acc) {
  FragA<T> a;
  FragB<T> b;
  nvcuda::wmma::load_matrix_sync(a, reinterpret_cast<const T*>(a_rows), kHalfLd);
  nvcuda::wmma::load_matrix_sync(b, reinterpret_cast<const T*>(b_rows), kHalfLd);
  nvcuda::wmma::mma_sync(acc, a, b, acc);
}

template <typename T, bool kVec>
__device__ void score_tile_half(const uint16_t* __restrict__ q, int64_t q_stride, int q_rows,
                                const uint16_t* __restrict__ c, int64_t c_stride, int c_rows, int64_t d,
                                unsigned char* gemm, float* __restrict__ scores) {
  uint16_t* qs = reinterpret_cast<uint16_t*>(gemm);
  uint16_t* cs = qs + kTile * kHalfLd;
  const int warp = threadIdx.x / kWarpSize;
  const int qf = warp / 2, cf0 = (warp % 2) * 2;  // 4 x 4 fragments: warp w takes (w / 2, 2 (w % 2) + {0, 1})
  FragAcc acc[2];
  nvcuda::wmma::fill_fragment(acc[0], 0.0f);
  nvcuda::wmma::fill_fragment(acc[1], 0.0f);
  __syncthreads();
  for (int64_t k0 = 0; k0 < d; k0 += kChunkHalf) {
    load_chunk_half<kVec>(q, q_stride, q_rows, d, k0, qs);
    load_chunk_half<kVec>(c, c_stride, c_rows, d, k0, cs);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kChunkHalf / 16; ++kk) {
      FragA<T> a;
      nvcuda::wmma::load_matrix_sync(a, reinterpret_cast<const T*>(qs + qf * 16 * kHalfLd + kk * 16), kHalfLd);
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        FragB<T> bf;
        nvcuda::wmma::load_matrix_sync(bf, reinterpret_cast<const T*>(cs + (cf0 + b) * 16 * kHalfLd + kk * 16),
                                       kHalfLd);
        nvcuda::wmma::mma_sync(acc[b], a, bf, acc[b]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int b = 0; b < 2; ++b) {
    nvcuda::wmma::store_matrix_sync(scores + qf * 16 * kScoreLd + (cf0 + b) * 16, acc[b], kScoreLd,
                                    nvcuda::wmma::mem_row_major);
  }
  __syncthreads();
}


}  // namespace elva::tiles
