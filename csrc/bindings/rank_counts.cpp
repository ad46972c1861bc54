// torch bindings of elva::{pair_scores,rank_counts}_{cpu,cuda}, the CUDA backend's rank_statistics
// (elva_kernels/_retrieval.py drives them; the schemas live in elva_kernels/_library.py): the positives' scores,
// then the chunked counting pass. The GEMMs go through torch (product_chunks.h), all of one shape, so a positive
// scores bitwise like its copies in the pool; the count step is elva/rank_count_select.h's rule, by the CUDA
// kernel or its CPU twin. The CPU variants exist so that the CPU tests run these loops and rules step for step.
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/full.h>
#include <ATen/ops/index.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "elva/rank_count_select.h"
#include "product_chunks.h"
#include "tensor_args.h"

#ifdef ELVA_WITH_CUDA
// c10's stream and guard headers, not ATen/cuda/CUDAContext.h (see l2_normalize.cpp).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "elva/cuda/rank_count_select.cuh"
#endif

namespace elva {
namespace {

// ids: int64 [B, m], -1 padded (values not checked: they stay on the device). The score of (i, ids[i, t]), -inf for
// padding: the products come from GEMMs of the counting pass's shape, B x width x d, over the gathered rows.
at::Tensor pair_scores(const at::Tensor& queries, const at::Tensor& candidates, const at::Tensor& query_scale,
                       const at::Tensor& candidate_scale, const at::Tensor& ids, int64_t chunk_columns) {
  const bindings::ScaledPair scales = bindings::check_scaled_pair(queries, candidates, query_scale, candidate_scale);
  bindings::check_chunk_columns(chunk_columns);
  const int64_t B = queries.size(0);
  const at::Tensor ids_c = bindings::matrix_arg(ids, "ids", at::kLong, B, queries.device());
#ifdef ELVA_WITH_CUDA
  const c10::cuda::OptionalCUDAGuard device_guard(
      queries.is_cuda() ? std::optional<at::Device>(queries.device()) : std::nullopt);
#endif
  const int64_t pairs = ids_c.numel();
  const at::Tensor flat = ids_c.reshape({pairs}).clamp_min(0);
  at::Tensor products = at::empty({pairs}, queries.options().dtype(at::kFloat));
  if (pairs > 0 && candidates.size(0) > 0) {
    const int64_t width = bindings::chunk_width(candidates, chunk_columns);
    at::Tensor gathered = bindings::rows_like(candidates, width);
    at::Tensor buffer = bindings::product_buffer(queries, width);
    const at::Tensor left = queries.is_cuda() ? queries : queries.to(at::kFloat);
    const auto index = flat.options();
    const at::Tensor pair_rows = at::arange(pairs, index).floor_divide(ids_c.size(1));
    for (int64_t first = 0; first < pairs; first += width) {
      const int64_t count = std::min(width, pairs - first);
      at::Tensor rows = gathered.narrow(0, 0, count);
      at::index_select_out(rows, candidates, 0, flat.narrow(0, first, count));
      if (count < width) gathered.narrow(0, count, width - count).zero_();  // padding columns, never read
      bindings::chunk_products(left, gathered, buffer);
      products.narrow(0, first, count).copy_(buffer.index({pair_rows.narrow(0, first, count),
                                                           at::arange(count, index)}));
    }
  }
  // The kernels' two roundings, (product * query_scale) * candidate_scale.
  const at::Tensor scores = products.view(ids_c.sizes())
                                .mul(scales.query_scale.unsqueeze(1))
                                .mul(scales.candidate_scale.index_select(0, flat).view(ids_c.sizes()));
  return scores.masked_fill(ids_c.lt(0), -INFINITY);
}

// listed: int32 [B, L], each row's positives and excluded ids ascending, padded with INT32_MAX (not checked: the
// values stay on the device). Returns (ahead int32 [B], the best negative score fp32 [B] (-inf: none), nonfinite).
std::tuple<at::Tensor, at::Tensor, at::Tensor> rank_counts(const at::Tensor& queries, const at::Tensor& candidates,
                                                          const at::Tensor& query_scale,
                                                          const at::Tensor& candidate_scale, const at::Tensor& listed,
                                                          const at::Tensor& pos_score, const at::Tensor& pos_below,
                                                          const at::Tensor& pos_id, int64_t chunk_columns) {
  const bindings::ScaledPair scales = bindings::check_scaled_pair(queries, candidates, query_scale, candidate_scale);
  bindings::check_chunk_columns(chunk_columns);
  const at::Device device = queries.device();
  const int64_t B = queries.size(0), N = candidates.size(0);
  const at::Tensor listed_c = bindings::matrix_arg(listed, "listed", at::kInt, B, device, "L");
  const at::Tensor pos_score_c = bindings::vector_arg(pos_score, "pos_score", at::kFloat, B, device);
  const at::Tensor pos_below_c = bindings::vector_arg(pos_below, "pos_below", at::kFloat, B, device);
  const at::Tensor pos_id_c = bindings::vector_arg(pos_id, "pos_id", at::kInt, B, device);
#ifdef ELVA_WITH_CUDA
  const c10::cuda::OptionalCUDAGuard device_guard(device.is_cuda() ? std::optional<at::Device>(device) : std::nullopt);
#endif
  const auto int32 = queries.options().dtype(at::kInt);
  at::Tensor ahead = at::zeros({B}, int32);
  at::Tensor max_neg_key = at::full({B}, rank_orderable(-INFINITY), int32);
  at::Tensor nonfinite = at::zeros({1}, int32);
  if (B > 0 && N > 0) {
    RankCountChunk chunk{};
    chunk.rows = B;
    chunk.query_scale = scales.query_scale.const_data_ptr<float>();
    chunk.candidate_scale = scales.candidate_scale.const_data_ptr<float>();
    chunk.listed = listed_c.const_data_ptr<int32_t>();
    chunk.listed_width = listed_c.size(1);
    chunk.pos_score = pos_score_c.const_data_ptr<float>();
    chunk.pos_below = pos_below_c.const_data_ptr<float>();
    chunk.pos_id = pos_id_c.const_data_ptr<int32_t>();
    chunk.ahead = ahead.mutable_data_ptr<int32_t>();
    chunk.max_neg_key = max_neg_key.mutable_data_ptr<int32_t>();
    chunk.nonfinite = nonfinite.mutable_data_ptr<int32_t>();
    const auto on_cuda = [](const RankCountChunk& c) {
#ifdef ELVA_WITH_CUDA
      const cudaError_t launched = rank_count_select_cuda(c, c10::cuda::getCurrentCUDAStream());
      TORCH_CHECK(launched == cudaSuccess, "rank_counts_cuda: kernel launch failed: ", cudaGetErrorString(launched));
#else
      (void)c;  // a build without CUDA kernels refused CUDA tensors (check_scaled_pair)
#endif
    };
    bindings::select_chunks(queries, candidates, chunk_columns, chunk, &rank_count_select_cpu, on_cuda);
  }
  // Back from rank_orderable's bits to the float (the map is its own inverse).
  const at::Tensor bits = at::where(max_neg_key.ge(0), max_neg_key, max_neg_key.bitwise_xor(0x7fffffff));
  return {ahead, bits.view(at::kFloat), nonfinite};
}

}  // namespace
}  // namespace elva

TORCH_LIBRARY_IMPL(elva, CPU, m) {
  m.impl("pair_scores_cpu", &elva::pair_scores);
  m.impl("rank_counts_cpu", &elva::rank_counts);
}

#ifdef ELVA_WITH_CUDA
TORCH_LIBRARY_IMPL(elva, CUDA, m) {
  m.impl("pair_scores_cuda", &elva::pair_scores);
  m.impl("rank_counts_cuda", &elva::rank_counts);
}
#endif
