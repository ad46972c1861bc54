// torch binding of elva::split_topk_cuda, the per-split kernel of the exact path in
// elva_kernels/_retrieval.py. The schemas live in elva_kernels/_library.py. CUDA builds only: without
// ELVA_WITH_CUDA this file compiles to nothing.
#ifdef ELVA_WITH_CUDA

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
// c10's stream and guard headers, not ATen/cuda/CUDAContext.h (see l2_normalize.cpp).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <tuple>

#include "elva/cuda/split_select.cuh"
#include "tensor_args.h"

namespace elva {
namespace {

// The scored pair, checked: CUDA, one float dtype, same d, N < 2**31; the returned tensors own the (possibly
// copied) unit-stride data that pool points into.
struct Pool {
  at::Tensor queries, candidates, query_scale, candidate_scale;
  ScorePool pool;
};

Pool check_pool(const at::Tensor& queries, const at::Tensor& candidates, const at::Tensor& query_scale,
                const at::Tensor& candidate_scale) {
  TORCH_CHECK_VALUE(queries.device().is_cuda(), "queries must be a CUDA tensor; got ", queries.device());
  const bindings::ScaledPair scales = bindings::check_scaled_pair(queries, candidates, query_scale, candidate_scale);
  const int64_t B = queries.size(0), d = queries.size(1), N = candidates.size(0);
  Pool out;
  out.query_scale = scales.query_scale;
  out.candidate_scale = scales.candidate_scale;
  out.queries = bindings::with_unit_stride_rows(queries);
  out.candidates = bindings::with_unit_stride_rows(candidates);
  out.pool = ScorePool{out.queries.const_data_ptr(),
                       out.queries.stride(0),
                       out.candidates.const_data_ptr(),
                       out.candidates.stride(0),
                       bindings::float_dtype(queries, "queries"),
                       B,
                       N,
                       d,
                       out.query_scale.const_data_ptr<float>(),
                       out.candidate_scale.const_data_ptr<float>()};
  return out;
}

void check_launch(cudaError_t launched, const char* op) {
  TORCH_CHECK(launched == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(launched));
}

std::tuple<at::Tensor, at::Tensor> split_topk_cuda_op(const at::Tensor& queries, const at::Tensor& candidates,
                                                      const at::Tensor& query_scale,
                                                      const at::Tensor& candidate_scale,
                                                      const std::optional<at::Tensor>& exclude,
                                                      const std::optional<at::Tensor>& max_score,
                                                      const at::Tensor& upper, int64_t split_size, int64_t list_size,
                                                      int64_t key_mode, int64_t seed) {
  const c10::cuda::CUDAGuard device_guard(queries.device());
  const Pool pool = check_pool(queries, candidates, query_scale, candidate_scale);
  const int64_t B = pool.pool.B, N = pool.pool.N;
  const at::Device device = queries.device();
  TORCH_CHECK_VALUE(split_size >= 1, "split_size must be an int >= 1; got ", split_size);
  TORCH_CHECK_VALUE(list_size >= 16 && list_size <= 128 && (list_size & (list_size - 1)) == 0,
                    "list_size must be a power of two in [16, 128]; got ", list_size);
  TORCH_CHECK_VALUE(key_mode == 0 || key_mode == 1, "key_mode must be 0 (by score) or 1 (random); got ", key_mode);
  const at::Tensor upper_c = bindings::matrix_arg(upper, "upper", at::kLong, B, device, "S");
  const int64_t S = upper_c.size(1);
  const int64_t expected_splits = (N + split_size - 1) / split_size;
  TORCH_CHECK_VALUE(S == expected_splits, "upper must be int64 [B, S] with S = ceil(N / split_size) = ",
                    expected_splits, "; got shape ", upper.sizes());
  at::Tensor exclude_ids;
  if (exclude.has_value()) exclude_ids = bindings::matrix_arg(*exclude, "exclude", at::kLong, B, device);
  at::Tensor limits;
  if (max_score.has_value()) limits = bindings::vector_arg(*max_score, "max_score", at::kFloat, B, device);

  at::Tensor keys = at::empty({B, S, list_size}, queries.options().dtype(at::kLong));
  at::Tensor nonfinite = at::empty({1}, queries.options().dtype(at::kInt));  // zeroed by the launcher
  check_launch(split_topk_cuda(pool.pool, exclude_ids.defined() ? exclude_ids.const_data_ptr<int64_t>() : nullptr,
                               exclude_ids.defined() ? exclude_ids.size(1) : 0,
                               limits.defined() ? limits.const_data_ptr<float>() : nullptr,
                               upper_c.const_data_ptr<int64_t>(), S, split_size, list_size, key_mode, seed,
                               keys.mutable_data_ptr<int64_t>(), nonfinite.mutable_data_ptr<int32_t>(),
                               c10::cuda::getCurrentCUDAStream()),
               "split_topk_cuda");
  return {keys, nonfinite};
}

}  // namespace
}  // namespace elva

TORCH_LIBRARY_IMPL(elva, CUDA, m) {
  m.impl("split_topk_cuda", &elva::split_topk_cuda_op);
}

#endif  // ELVA_WITH_CUDA
