// torch binding of elva::threshold_topk_{cpu,cuda}, the chunked threshold pass of the CUDA backend's similarity_topk
// (elva_kernels/_retrieval.py drives it; the schema lives in elva_kernels/_library.py). The GEMM of each
// chunk of candidates goes through torch (cuBLAS on CUDA, fp32 products from half inputs); the select step is
// elva/threshold_select.h's rule, by the CUDA kernel or its CPU twin. The CPU variant exists so that the CPU
// tests run this chunk loop and rule step for step.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "elva/threshold_select.h"
#include "tensor_args.h"

#ifdef ELVA_WITH_CUDA
// c10's stream and guard headers, not ATen/cuda/CUDAContext.h (see l2_normalize.cpp).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "elva/cuda/threshold_select.cuh"
#endif

namespace elva {
namespace {

void check_vector(const at::Tensor& t, const char* name, int64_t rows, const at::Device& device) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be a float32 [", rows, "] tensor; got dtype ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == rows, name, " must be a float32 [", rows, "] tensor; got shape ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.device() == device, name, " must be on the queries' device (", device, "); got ", t.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> threshold_topk(
    const at::Tensor& queries, const at::Tensor& candidates, const at::Tensor& query_scale,
    const at::Tensor& candidate_scale, const at::Tensor& threshold, const std::optional<at::Tensor>& max_score,
    int64_t capacity, int64_t chunk_columns) {
  bindings::check_matrix(queries, "queries", "[B, d]");
  bindings::check_matrix(candidates, "candidates", "[N, d] with the queries' d");
  bindings::float_dtype(queries, "queries");
  TORCH_CHECK_TYPE(candidates.scalar_type() == queries.scalar_type(),
                   "candidates must have the queries' dtype; got queries ", queries.scalar_type(), " and candidates ",
                   candidates.scalar_type());
  const at::Device device = queries.device();
  TORCH_CHECK_VALUE(candidates.device() == device, "candidates must be on the queries' device (", device, "); got ",
                    candidates.device());
  const int64_t B = queries.size(0), N = candidates.size(0);
  TORCH_CHECK_VALUE(candidates.size(1) == queries.size(1), "candidates must be [N, d] with the queries' d = ",
                    queries.size(1), "; got shape ", candidates.sizes());
  TORCH_CHECK_VALUE(N < (int64_t{1} << 31), "candidates must have fewer than 2**31 rows; got ", N);
  check_vector(query_scale, "query_scale", B, device);
  check_vector(candidate_scale, "candidate_scale", N, device);
  check_vector(threshold, "threshold", B, device);
  if (max_score.has_value()) check_vector(*max_score, "max_score", B, device);
  TORCH_CHECK_VALUE(capacity >= 1 && capacity < (int64_t{1} << 31), "capacity must be an int in [1, 2**31); got ",
                    capacity);
  TORCH_CHECK_VALUE(chunk_columns >= 4 && chunk_columns % 4 == 0,
                    "chunk_columns must be a positive multiple of 4; got ", chunk_columns);
  const bool on_cuda = device.is_cuda();
#ifdef ELVA_WITH_CUDA
  const c10::cuda::OptionalCUDAGuard device_guard(on_cuda ? std::optional<at::Device>(device) : std::nullopt);
#else
  TORCH_CHECK_VALUE(!on_cuda, "this build of elva has no CUDA kernels; queries are on ", device);
#endif
  const auto fp32 = queries.options().dtype(at::kFloat);
  at::Tensor count = at::zeros({B}, fp32.dtype(at::kInt));
  at::Tensor scores = at::empty({B, capacity}, fp32);
  at::Tensor ids = at::empty({B, capacity}, fp32.dtype(at::kInt));
  at::Tensor nonfinite = at::zeros({1}, fp32.dtype(at::kInt));
  if (B == 0 || N == 0) return {count, scores, ids, nonfinite};

  const at::Tensor query_scale_c = query_scale.contiguous(), candidate_scale_c = candidate_scale.contiguous();
  const at::Tensor threshold_c = threshold.contiguous();
  const at::Tensor limit = max_score.has_value() ? max_score->contiguous() : at::Tensor();
  // cuBLAS gives fp32 products of half inputs directly; CPU matmuls of half types round their output, so the CPU
  // twin multiplies fp32 copies (half products are exact in fp32 either way).
  const bool upcast = !on_cuda && queries.scalar_type() != at::kFloat;
  const at::Tensor left = upcast ? queries.to(at::kFloat) : queries;
  const int64_t width = std::min(chunk_columns, (N + 3) / 4 * 4);
  at::Tensor products = at::empty({B, width}, fp32);  // the only B x chunk buffer, reused by every chunk
  ThresholdChunk chunk{};
  chunk.ld = width;
  chunk.rows = B;
  chunk.query_scale = query_scale_c.const_data_ptr<float>();
  chunk.candidate_scale = candidate_scale_c.const_data_ptr<float>();
  chunk.threshold = threshold_c.const_data_ptr<float>();
  chunk.max_score = limit.defined() ? limit.const_data_ptr<float>() : nullptr;
  chunk.capacity = capacity;
  chunk.count = count.mutable_data_ptr<int32_t>();
  chunk.scores = scores.mutable_data_ptr<float>();
  chunk.ids = ids.mutable_data_ptr<int32_t>();
  chunk.nonfinite = nonfinite.mutable_data_ptr<int32_t>();
  for (int64_t first = 0; first < N; first += width) {
    const int64_t cols = std::min(width, N - first);
    at::Tensor out = products.narrow(1, 0, cols);  // row stride `width`: cuBLAS writes it in place
    const at::Tensor right = candidates.narrow(0, first, cols);
    if (on_cuda && queries.scalar_type() != at::kFloat) {
      at::mm_out(out, left, right.t(), at::kFloat);
    } else {
      at::mm_out(out, left, (upcast ? right.to(at::kFloat) : right).t());
    }
    chunk.products = products.const_data_ptr<float>();
    chunk.first_candidate = first;
    chunk.cols = cols;
#ifdef ELVA_WITH_CUDA
    if (on_cuda) {
      const cudaError_t launched = threshold_select_cuda(chunk, c10::cuda::getCurrentCUDAStream());
      TORCH_CHECK(launched == cudaSuccess, "threshold_topk_cuda: kernel launch failed: ", cudaGetErrorString(launched));
      continue;
    }
#endif
    threshold_select_cpu(chunk);
  }
  return {count, scores, ids, nonfinite};
}

}  // namespace
}  // namespace elva

TORCH_LIBRARY_IMPL(elva, CPU, m) { m.impl("threshold_topk_cpu", &elva::threshold_topk); }

#ifdef ELVA_WITH_CUDA
TORCH_LIBRARY_IMPL(elva, CUDA, m) { m.impl("threshold_topk_cuda", &elva::threshold_topk); }
#endif
