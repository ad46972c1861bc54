// The chunk loop of the CUDA backend's chunked passes (threshold_topk.cpp, rank_counts.cpp) and of their CPU twins:
// torch computes the fp32 products of all queries with one chunk of candidates at a time (cuBLAS on CUDA), into
// one reused B x chunk buffer, and a select kernel consumes each chunk.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cstdint>

#include "tensor_args.h"

namespace elva::bindings {

inline void check_chunk_columns(int64_t chunk_columns) {
  TORCH_CHECK_VALUE(chunk_columns >= 4 && chunk_columns % 4 == 0,
                    "chunk_columns must be a positive multiple of 4; got ", chunk_columns);
}

// The chunk width: chunk_columns, or N when that is less.
inline int64_t chunk_width(const at::Tensor& candidates, int64_t chunk_columns) {
  return std::min(chunk_columns, candidates.size(0));
}

// The fp32 products of all queries with `width` candidate rows (from `first`), into out [B, width] (row stride a
// multiple of 4). Every GEMM of a call has this one shape, B x width x d, so cuBLAS runs one kernel for all of them
// and a candidate's product does not depend on which chunk or gather it came from: exact copies tie bitwise.
inline void chunk_products(const at::Tensor& queries, const at::Tensor& rows, at::Tensor& out) {
  // cuBLAS gives fp32 products of half inputs directly; CPU matmuls of half types round their output, so the CPU
  // twins multiply fp32 copies (half products are exact in fp32 either way).
  if (queries.is_cuda() && queries.scalar_type() != at::kFloat) {
    at::mm_out(out, queries, rows.t(), at::kFloat);
  } else if (queries.is_cuda()) {
    at::mm_out(out, queries, rows.t());
  } else {
    at::mm_out(out, queries.to(at::kFloat), rows.to(at::kFloat).t());
  }
}

// An uninitialised [rows, d] matrix like `candidates` whose data pointer has the same offset from a 16-byte
// boundary: cuBLAS picks its kernel by shape and alignment, so gathered rows multiply like the pool's own.
inline at::Tensor rows_like(const at::Tensor& candidates, int64_t rows) {
  const int64_t d = candidates.size(1), element = candidates.element_size();
  const int64_t offset = static_cast<int64_t>(reinterpret_cast<uintptr_t>(candidates.const_data_ptr()) % 16) / element;
  return at::empty({rows * d + offset}, candidates.options()).narrow(0, offset, rows * d).view({rows, d});
}

// A [B, width] fp32 buffer whose rows start 16-byte aligned (row stride rounded up to 4).
inline at::Tensor product_buffer(const at::Tensor& queries, int64_t width) {
  return at::empty({queries.size(0), (width + 3) / 4 * 4}, queries.options().dtype(at::kFloat)).narrow(1, 0, width);
}

// Runs a select step over every chunk of the pool, in order: chunk's products (fp32 [B, cols], row stride ld, a
// multiple of 4), ld, first_candidate and cols are set, then on_cuda(chunk) runs for CUDA tensors or the CPU twin
// on_cpu(chunk) otherwise. A short last chunk is copied into a full-width buffer first, to keep the GEMMs' shape;
// its padding columns are not selected.
template <class Chunk, class CudaSelect>
void select_chunks(const at::Tensor& queries, const at::Tensor& candidates, int64_t chunk_columns, Chunk& chunk,
                   void (*on_cpu)(const Chunk&), CudaSelect&& on_cuda) {
  const int64_t N = candidates.size(0), width = chunk_width(candidates, chunk_columns);
  at::Tensor products = product_buffer(queries, width);
  const bool cuda = queries.is_cuda();
  const at::Tensor left = cuda ? queries : queries.to(at::kFloat);  // upcast once on the CPU
  for (int64_t first = 0; first < N; first += width) {
    const int64_t cols = std::min(width, N - first);
    at::Tensor rows = candidates.narrow(0, first, cols);
    if (cols < width) {
      at::Tensor padded = rows_like(candidates, width);
      padded.narrow(0, 0, cols).copy_(rows);
      padded.narrow(0, cols, width - cols).zero_();
      rows = padded;
    }
    chunk_products(left, rows, products);
    chunk.products = products.const_data_ptr<float>();
    chunk.ld = products.stride(0);
    chunk.first_candidate = first;
    chunk.cols = cols;
    cuda ? on_cuda(chunk) : on_cpu(chunk);
  }
}

}  // namespace elva::bindings
