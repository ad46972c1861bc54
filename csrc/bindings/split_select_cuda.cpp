// torch bindings of elva::{split_topk,pair_scores,split_rank_counts}_cuda, the per-split kernels behind
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

void check_on_device(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK_VALUE(t.device() == device, name, " must be on the queries' device (", device, "); got ", t.device());
}

// The scored pair, checked: CUDA, one float dtype, same d, N < 2**31; the returned tensors own the (possibly
// copied) unit-stride data that pool points into.
struct Pool {
  at::Tensor queries, candidates, query_scale, candidate_scale;
  ScorePool pool;
};

Pool check_pool(const at::Tensor& queries, const at::Tensor& candidates, const at::Tensor& query_scale,
                const at::Tensor& candidate_scale) {
  bindings::check_matrix(queries, "queries", "[B, d]");
  bindings::check_matrix(candidates, "candidates", "[N, d] with the queries' d");
  const DType dtype = bindings::float_dtype(queries, "queries");
  bindings::float_dtype(candidates, "candidates");
  TORCH_CHECK_TYPE(candidates.scalar_type() == queries.scalar_type(),
                   "candidates must have the queries' dtype; got queries ", queries.scalar_type(), " and candidates ",
                   candidates.scalar_type());
  TORCH_CHECK_VALUE(queries.device().is_cuda(), "queries must be a CUDA tensor; got ", queries.device());
  const at::Device device = queries.device();
  check_on_device(candidates, "candidates", device);
  const int64_t B = queries.size(0), d = queries.size(1), N = candidates.size(0);
  TORCH_CHECK_VALUE(candidates.size(1) == d, "candidates must be [N, d] with the queries' d = ", d, "; got shape ",
                    candidates.sizes());
  TORCH_CHECK_VALUE(N < (int64_t{1} << 31), "candidates must have fewer than 2**31 rows; got ", N);
  const auto check_scale = [&](const at::Tensor& scale, const char* name, int64_t rows) {
    TORCH_CHECK_TYPE(scale.scalar_type() == at::kFloat, name, " must be a float32 tensor; got dtype ",
                     scale.scalar_type());
    TORCH_CHECK_VALUE(scale.dim() == 1 && scale.size(0) == rows, name, " must be a float32 [", rows,
                      "] tensor; got shape ", scale.sizes());
    check_on_device(scale, name, device);
  };
  check_scale(query_scale, "query_scale", B);
  check_scale(candidate_scale, "candidate_scale", N);
  Pool out;
  out.queries = bindings::with_unit_stride_rows(queries);
  out.candidates = bindings::with_unit_stride_rows(candidates);
  out.query_scale = query_scale.contiguous();
  out.candidate_scale = candidate_scale.contiguous();
  out.pool = ScorePool{out.queries.const_data_ptr(),
                       out.queries.stride(0),
                       out.candidates.const_data_ptr(),
                       out.candidates.stride(0),
                       dtype,
                       B,
                       N,
                       d,
                       out.query_scale.const_data_ptr<float>(),
                       out.candidate_scale.const_data_ptr<float>()};
  return out;
}

// int64 [B, m] ids on the device, returned contiguous (values are not read on the host).
at::Tensor id_matrix(const at::Tensor& ids, const char* name, int64_t B, const at::Device& device) {
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong, name, " must be int64 [B, m]; got dtype ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == 2 && ids.size(0) == B, name, " must be int64 [B, m] with B = ", B, "; got shape ",
                    ids.sizes());
  check_on_device(ids, name, device);
  return ids.contiguous();
}

at::Tensor vector_arg(const at::Tensor& t, const char* name, at::ScalarType type, int64_t B,
                      const at::Device& device) {
  TORCH_CHECK_TYPE(t.scalar_type() == type, name, " must be a ", type, " [B] tensor; got dtype ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == B, name, " must be a ", type, " [B] tensor with B = ", B,
                    "; got shape ", t.sizes());
  check_on_device(t, name, device);
  return t.contiguous();
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
  TORCH_CHECK_TYPE(upper.scalar_type() == at::kLong, "upper must be int64 [B, S]; got dtype ", upper.scalar_type());
  TORCH_CHECK_VALUE(upper.dim() == 2 && upper.size(0) == B, "upper must be int64 [B, S] with B = ", B,
                    "; got shape ", upper.sizes());
  check_on_device(upper, "upper", device);
  const int64_t S = upper.size(1);
  const int64_t expected_splits = (N + split_size - 1) / split_size;
  TORCH_CHECK_VALUE(S == expected_splits, "upper must be int64 [B, S] with S = ceil(N / split_size) = ",
                    expected_splits, "; got shape ", upper.sizes());
  const at::Tensor upper_c = upper.contiguous();
  at::Tensor exclude_ids;
  if (exclude.has_value()) exclude_ids = id_matrix(*exclude, "exclude", B, device);
  at::Tensor limits;
  if (max_score.has_value()) limits = vector_arg(*max_score, "max_score", at::kFloat, B, device);

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

at::Tensor pair_scores_cuda_op(const at::Tensor& queries, const at::Tensor& candidates, const at::Tensor& query_scale,
                               const at::Tensor& candidate_scale, const at::Tensor& ids) {
  const c10::cuda::CUDAGuard device_guard(queries.device());
  const Pool pool = check_pool(queries, candidates, query_scale, candidate_scale);
  const at::Tensor ids_c = id_matrix(ids, "ids", pool.pool.B, queries.device());
  at::Tensor out = at::empty(ids_c.sizes(), queries.options().dtype(at::kFloat));
  check_launch(pair_scores_cuda(pool.pool, ids_c.const_data_ptr<int64_t>(), ids_c.size(1),
                                out.mutable_data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
               "pair_scores_cuda");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> split_rank_counts_cuda_op(
    const at::Tensor& queries, const at::Tensor& candidates, const at::Tensor& query_scale,
    const at::Tensor& candidate_scale, const at::Tensor& positives, const std::optional<at::Tensor>& exclude,
    const at::Tensor& pos_keys, int64_t split_size) {
  const c10::cuda::CUDAGuard device_guard(queries.device());
  const Pool pool = check_pool(queries, candidates, query_scale, candidate_scale);
  const int64_t B = pool.pool.B, N = pool.pool.N;
  const at::Device device = queries.device();
  TORCH_CHECK_VALUE(split_size >= 1, "split_size must be an int >= 1; got ", split_size);
  const int64_t S = (N + split_size - 1) / split_size;
  const at::Tensor positive_ids = id_matrix(positives, "positives", B, device);
  at::Tensor exclude_ids;
  if (exclude.has_value()) exclude_ids = id_matrix(*exclude, "exclude", B, device);
  const at::Tensor pos_keys_c = vector_arg(pos_keys, "pos_keys", at::kLong, B, device);

  at::Tensor ahead = at::empty({B, S}, queries.options().dtype(at::kLong));
  at::Tensor max_neg_keys = at::empty({B, S}, queries.options().dtype(at::kLong));
  at::Tensor nonfinite = at::empty({1}, queries.options().dtype(at::kInt));  // zeroed by the launcher
  check_launch(split_rank_counts_cuda(pool.pool, positive_ids.const_data_ptr<int64_t>(), positive_ids.size(1),
                                      exclude_ids.defined() ? exclude_ids.const_data_ptr<int64_t>() : nullptr,
                                      exclude_ids.defined() ? exclude_ids.size(1) : 0,
                                      pos_keys_c.const_data_ptr<int64_t>(), S, split_size,
                                      ahead.mutable_data_ptr<int64_t>(), max_neg_keys.mutable_data_ptr<int64_t>(),
                                      nonfinite.mutable_data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream()),
               "split_rank_counts_cuda");
  return {ahead, max_neg_keys, nonfinite};
}

}  // namespace
}  // namespace elva

TORCH_LIBRARY_IMPL(elva, CUDA, m) {
  m.impl("split_topk_cuda", &elva::split_topk_cuda_op);
  m.impl("pair_scores_cuda", &elva::pair_scores_cuda_op);
  m.impl("split_rank_counts_cuda", &elva::split_rank_counts_cuda_op);
}

#endif  // ELVA_WITH_CUDA
