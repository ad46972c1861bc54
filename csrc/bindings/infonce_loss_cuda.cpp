// torch bindings of elva::infonce_loss_cuda and elva::infonce_loss_backward_cuda (schemas in
// elva_kernels/_library.py; semantics in elva_kernels/reference/infonce_loss.py). The data checks of the
// reference (finite embeddings, then check_ids) run after the forward launch with one host sync: the NaN/Inf
// counts come from the kernels, the id checks from a few ATen reductions on the device. CUDA builds only:
// without ELVA_WITH_CUDA this file compiles to nothing.
#ifdef ELVA_WITH_CUDA

#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <torch/library.h>
// c10's stream and guard headers, not ATen/cuda/CUDAContext.h (see l2_normalize.cpp).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "elva/cuda/infonce_loss.cuh"
#include "tensor_args.h"

namespace elva {
namespace {

void check_on_device(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK_VALUE(t.device() == device, name, " must be on the queries' device (", device, "); got ", t.device());
}

void check_launch(cudaError_t launched, const char* op) {
  TORCH_CHECK(launched == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(launched));
}

// Python's repr of a float (temperature.item()): shortest round trip, "nan", "inf", "-1.0".
std::string python_float(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  char buffer[64];
  const auto result = std::to_chars(buffer, buffer + sizeof(buffer), value);
  std::string text(buffer, result.ptr);
  if (text.find_first_of(".e") == std::string::npos) text += ".0";
  return text;
}

// The checked inputs, with the layouts the kernels need (the tensors own the data `problem` points into).
struct Inputs {
  at::Tensor queries, candidates, labels, temperature, false_negatives;
  InfoNceProblem problem;
};

Inputs check_inputs(const at::Tensor& queries, const at::Tensor& candidates, const at::Tensor& labels,
                    const at::Tensor& temperature, bool symmetric, const std::optional<at::Tensor>& false_negatives) {
  bindings::check_matrix(queries, "queries", "[B, d]");
  bindings::check_matrix(candidates, "candidates", "[N, d] with the queries' d");
  const DType dtype = bindings::float_dtype(queries, "queries");
  bindings::float_dtype(candidates, "candidates");
  TORCH_CHECK_TYPE(candidates.scalar_type() == queries.scalar_type(), "embeddings must share one dtype; got queries ",
                   queries.scalar_type(), ", candidates ", candidates.scalar_type());
  TORCH_CHECK_VALUE(queries.device().is_cuda(), "queries must be a CUDA tensor; got ", queries.device());
  const at::Device device = queries.device();
  check_on_device(candidates, "candidates", device);
  const int64_t B = queries.size(0), d = queries.size(1), N = candidates.size(0);
  TORCH_CHECK_VALUE(B >= 1 && d >= 1, "queries must not be empty [B, d]; got shape ", queries.sizes());
  TORCH_CHECK_VALUE(N >= 1, "candidates must not be empty [N, d]; got shape ", candidates.sizes());
  TORCH_CHECK_VALUE(candidates.size(1) == d, "candidates must be [N, d] with the queries' d = ", d, "; got shape ",
                    candidates.sizes());
  TORCH_CHECK_VALUE(N < (int64_t{1} << 31), "candidates must have fewer than 2**31 rows; got ", N);
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64 [B]; got dtype ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == B, "labels must be int64 [B] with B = ", B,
                    "; got shape ", labels.sizes());
  check_on_device(labels, "labels", device);
  TORCH_CHECK_VALUE(temperature.numel() == 1 && temperature.dim() == 0,
                    "temperature must be a 0-dim float tensor; got shape ", temperature.sizes());
  TORCH_CHECK_TYPE(temperature.is_floating_point(), "temperature must be a 0-dim float tensor; got dtype ",
                   temperature.scalar_type());
  check_on_device(temperature, "temperature", device);
  if (symmetric) {
    TORCH_CHECK_VALUE(N >= B, "candidates must have at least B = ", B,
                      " rows when symmetric=True (the first B are the positives); got shape ", candidates.sizes());
  }
  Inputs in;
  in.queries = bindings::with_unit_stride_rows(queries);
  in.candidates = bindings::with_unit_stride_rows(candidates);
  in.labels = labels.contiguous();
  in.temperature = temperature.to(at::kFloat).contiguous();
  if (false_negatives.has_value()) {
    const at::Tensor& fn = *false_negatives;
    TORCH_CHECK_TYPE(fn.scalar_type() == at::kLong, "false_negatives must be int64 [B, m]; got dtype ",
                     fn.scalar_type());
    TORCH_CHECK_VALUE(fn.dim() == 2 && fn.size(0) == B, "false_negatives must be int64 [B, m] with B = ", B,
                      "; got shape ", fn.sizes());
    check_on_device(fn, "false_negatives", device);
    in.false_negatives = fn.contiguous();
  }
  const bool has_fn = in.false_negatives.defined() && in.false_negatives.size(1) > 0;
  in.problem = InfoNceProblem{in.queries.const_data_ptr(),
                              in.queries.stride(0),
                              in.candidates.const_data_ptr(),
                              in.candidates.stride(0),
                              dtype,
                              B,
                              N,
                              d,
                              in.labels.const_data_ptr<int64_t>(),
                              has_fn ? in.false_negatives.const_data_ptr<int64_t>() : nullptr,
                              has_fn ? in.false_negatives.size(1) : 0,
                              in.temperature.const_data_ptr<float>(),
                              symmetric};
  return in;
}

// The reference's data checks, in its order (finite queries, finite candidates, then check_ids), with one host
// sync; the values quoted in the messages are read only on the error path.
void check_data(const Inputs& in, const at::Tensor& nonfinite) {
  const int64_t B = in.problem.B, N = in.problem.N;
  const at::Tensor& labels = in.labels;
  const at::Tensor& t = in.temperature;
  std::vector<at::Tensor> flags{nonfinite[0], nonfinite[1],
                                t.isfinite().logical_and(t.gt(0)).logical_not().to(at::kLong),
                                labels.lt(0).logical_or(labels.ge(N)).any().to(at::kLong)};
  const at::Tensor arange = at::arange(B, labels.options());
  flags.push_back(in.problem.symmetric ? labels.ne(arange).any().to(at::kLong) : nonfinite[0].mul(0));
  const at::Tensor& fn = in.false_negatives;
  if (fn.defined() && fn.numel() > 0) {
    flags.push_back(fn.lt(-1).logical_or(fn.ge(N)).any().to(at::kLong));
    flags.push_back(fn.eq(labels.unsqueeze(1)).any().to(at::kLong));
  }
  const at::Tensor host = at::stack(flags).cpu();
  const int64_t* f = host.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(f[0] == 0, "queries must contain only finite values; found ", f[0], " NaN/Inf entries");
  TORCH_CHECK_VALUE(f[1] == 0, "candidates must contain only finite values; found ", f[1], " NaN/Inf entries");
  if (f[2] != 0) {
    TORCH_CHECK_VALUE(false, "temperature must be a finite value > 0; got ", python_float(t.item<double>()));
  }
  if (f[3] != 0) {
    const at::Tensor bad = labels.lt(0).logical_or(labels.ge(N));
    TORCH_CHECK_VALUE(false, "labels holds ids outside [0, ", N, "); got ",
                      labels.masked_select(bad)[0].item<int64_t>());
  }
  if (f[4] != 0) {
    const at::Tensor head = labels.slice(0, 0, std::min<int64_t>(B, 8)).cpu();
    std::string listing = "[";
    for (int64_t k = 0; k < head.numel(); ++k) {
      if (k > 0) listing += ", ";
      listing += std::to_string(head.const_data_ptr<int64_t>()[k]);
    }
    listing += "]";
    TORCH_CHECK_VALUE(false, "labels must be arange(B) = arange(", B, ") when symmetric=True (the first B candidates ",
                      "are the positives); got labels starting ", listing);
  }
  if (fn.defined() && fn.numel() > 0) {
    if (f[5] != 0) {
      const at::Tensor bad = fn.lt(-1).logical_or(fn.ge(N));
      TORCH_CHECK_VALUE(false, "false_negatives holds ids outside -1 (padding) or [0, ", N, "); got ",
                        fn.masked_select(bad)[0].item<int64_t>());
    }
    if (f[6] != 0) {
      const at::Tensor clash = fn.eq(labels.unsqueeze(1)).any(1);
      const int64_t row = clash.nonzero()[0][0].item<int64_t>();
      TORCH_CHECK_VALUE(false, "false_negatives must not list a query's own label; row ", row, " lists its label ",
                        labels[row].item<int64_t>());
    }
  }
}

std::tuple<at::Tensor, at::Tensor> infonce_loss_cuda_op(const at::Tensor& queries, const at::Tensor& candidates,
                                                        const at::Tensor& labels, const at::Tensor& temperature,
                                                        bool symmetric,
                                                        const std::optional<at::Tensor>& false_negatives) {
  const c10::cuda::CUDAGuard device_guard(queries.device());
  const Inputs in = check_inputs(queries, candidates, labels, temperature, symmetric, false_negatives);
  const int64_t B = in.problem.B, N = in.problem.N;
  const auto f32 = queries.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({B}, f32);
  at::Tensor lse = at::empty({B}, f32);
  at::Tensor query_scale = at::empty({B}, f32);
  at::Tensor candidate_scale = at::empty({N}, f32);
  // Two uint64 counters (queries, candidates), zeroed by the launcher; counts fit int64.
  at::Tensor nonfinite = at::empty({2}, queries.options().dtype(at::kLong));
  check_launch(infonce_loss_cuda(in.problem, query_scale.mutable_data_ptr<float>(),
                                 candidate_scale.mutable_data_ptr<float>(),
                                 reinterpret_cast<unsigned long long*>(nonfinite.mutable_data_ptr<int64_t>()),
                                 loss.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>(),
                                 c10::cuda::getCurrentCUDAStream()),
               "infonce_loss_cuda");
  check_data(in, nonfinite);
  return {loss, lse};
}

at::Tensor float_vector(const at::Tensor& t, const char* name, int64_t B, const at::Device& device) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == B, name, " must be a float [B] tensor with B = ", B, "; got shape ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.is_floating_point(), name, " must be a float [B] tensor; got dtype ", t.scalar_type());
  check_on_device(t, name, device);
  return t.to(at::kFloat).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_loss_backward_cuda_op(
    const at::Tensor& queries, const at::Tensor& candidates, const at::Tensor& labels, const at::Tensor& temperature,
    bool symmetric, const std::optional<at::Tensor>& false_negatives, const at::Tensor& loss, const at::Tensor& lse,
    const at::Tensor& grad_loss, const at::Tensor& grad_lse, std::array<bool, 3> output_mask) {
  const c10::cuda::CUDAGuard device_guard(queries.device());
  const Inputs in = check_inputs(queries, candidates, labels, temperature, symmetric, false_negatives);
  const int64_t B = in.problem.B, N = in.problem.N, d = in.problem.d;
  const at::Device device = queries.device();
  const at::Tensor loss_f = float_vector(loss, "loss", B, device);
  const at::Tensor lse_f = float_vector(lse, "lse", B, device);
  const at::Tensor grad_loss_f = float_vector(grad_loss, "grad_loss", B, device);
  const at::Tensor grad_lse_f = float_vector(grad_lse, "grad_lse", B, device);
  const auto [want_q, want_c, want_t] = output_mask;

  at::Tensor grad_q = want_q ? at::empty({B, d}, queries.options()) : at::empty({0}, queries.options());
  at::Tensor grad_c = want_c ? at::empty({N, d}, candidates.options()) : at::empty({0}, candidates.options());
  at::Tensor grad_t = want_t ? at::empty({}, queries.options().dtype(at::kFloat)) : at::empty({0}, temperature.options());
  if (!want_q && !want_c && !want_t) return {grad_q, grad_c, grad_t};
  const size_t bytes = infonce_loss_backward_workspace_bytes(B, N, d, want_q, want_c);
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, queries.options().dtype(at::kByte));
  check_launch(infonce_loss_backward_cuda(in.problem, loss_f.const_data_ptr<float>(), lse_f.const_data_ptr<float>(),
                                          grad_loss_f.const_data_ptr<float>(), grad_lse_f.const_data_ptr<float>(),
                                          want_q ? grad_q.mutable_data_ptr() : nullptr,
                                          want_c ? grad_c.mutable_data_ptr() : nullptr,
                                          want_t ? grad_t.mutable_data_ptr<float>() : nullptr,
                                          workspace.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "infonce_loss_backward_cuda");
  if (want_t && temperature.scalar_type() != at::kFloat) grad_t = grad_t.to(temperature.scalar_type());
  return {grad_q, grad_c, grad_t};
}

}  // namespace
}  // namespace elva

TORCH_LIBRARY_IMPL(elva, CUDA, m) {
  m.impl("infonce_loss_cuda", &elva::infonce_loss_cuda_op);
  m.impl("infonce_loss_backward_cuda", &elva::infonce_loss_backward_cuda_op);
}

#endif  // ELVA_WITH_CUDA
