// torch binding of elva::threshold_topk_{cpu,cuda}, the chunked threshold pass of the CUDA backend's similarity_topk
// (elva_kernels/_retrieval.py drives it; the schema lives in elva_kernels/_library.py). The GEMM of each
// chunk of candidates goes through torch (product_chunks.h); the select step is elva/threshold_select.h's rule,
// by the CUDA kernel or its CPU twin. The CPU variant exists so that the CPU
// tests run this chunk loop and rule step for step.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "elva/threshold_select.h"
#include "product_chunks.h"
#include "tensor_args.h"

#ifdef ELVA_WITH_CUDA
// c10's stream and guard headers, not ATen/cuda/CUDAContext.h (see l2_normalize.cpp).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "elva/cuda/threshold_select.cuh"
#endif

namespace elva {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> threshold_topk(
    const at::Tensor& queries, const at::Tensor& candidates, const at::Tensor& query_scale,
    const at::Tensor& candidate_scale, const at::Tensor& threshold, const std::optional<at::Tensor>& max_score,
    int64_t capacity, int64_t chunk_columns) {
  const bindings::ScaledPair scales = bindings::check_scaled_pair(queries, candidates, query_scale, candidate_scale);
  bindings::check_chunk_columns(chunk_columns);
  const at::Device device = queries.device();
  const int64_t B = queries.size(0), N = candidates.size(0);
  const at::Tensor threshold_c = bindings::vector_arg(threshold, "threshold", at::kFloat, B, device);
  const at::Tensor limit =
      max_score.has_value() ? bindings::vector_arg(*max_score, "max_score", at::kFloat, B, device) : at::Tensor();
  TORCH_CHECK_VALUE(capacity >= 1 && capacity < (int64_t{1} << 31), "capacity must be an int in [1, 2**31); got ",
                    capacity);
#ifdef ELVA_WITH_CUDA
  const c10::cuda::OptionalCUDAGuard device_guard(device.is_cuda() ? std::optional<at::Device>(device) : std::nullopt);
#endif
  const auto fp32 = queries.options().dtype(at::kFloat);
  at::Tensor count = at::zeros({B}, fp32.dtype(at::kInt));
  at::Tensor scores = at::empty({B, capacity}, fp32);
  at::Tensor ids = at::empty({B, capacity}, fp32.dtype(at::kInt));
  at::Tensor nonfinite = at::zeros({1}, fp32.dtype(at::kInt));
  if (B == 0 || N == 0) return {count, scores, ids, nonfinite};

  ThresholdChunk chunk{};
  chunk.rows = B;
  chunk.query_scale = scales.query_scale.const_data_ptr<float>();
  chunk.candidate_scale = scales.candidate_scale.const_data_ptr<float>();
  chunk.threshold = threshold_c.const_data_ptr<float>();
  chunk.max_score = limit.defined() ? limit.const_data_ptr<float>() : nullptr;
  chunk.capacity = capacity;
  chunk.count = count.mutable_data_ptr<int32_t>();
  chunk.scores = scores.mutable_data_ptr<float>();
  chunk.ids = ids.mutable_data_ptr<int32_t>();
  chunk.nonfinite = nonfinite.mutable_data_ptr<int32_t>();
  const auto on_cuda = [](const ThresholdChunk& c) {
#ifdef ELVA_WITH_CUDA
    const cudaError_t launched = threshold_select_cuda(c, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(launched == cudaSuccess, "threshold_topk_cuda: kernel launch failed: ", cudaGetErrorString(launched));
#else
    (void)c;  // a build without CUDA kernels refused CUDA tensors (check_scaled_pair)
#endif
  };
  bindings::select_chunks(queries, candidates, chunk_columns, chunk, &threshold_select_cpu, on_cuda);
  return {count, scores, ids, nonfinite};
}

}  // namespace
}  // namespace elva

TORCH_LIBRARY_IMPL(elva, CPU, m) { m.impl("threshold_topk_cpu", &elva::threshold_topk); }

#ifdef ELVA_WITH_CUDA
TORCH_LIBRARY_IMPL(elva, CUDA, m) { m.impl("threshold_topk_cuda", &elva::threshold_topk); }
#endif
