// torch bindings of elva::infonce_loss_cpu and elva::infonce_loss_backward_cpu. The schemas live in
// elva_kernels/_library.py; the data checks and their messages follow elva_kernels/reference/infonce_loss.py
// (_check_data). NaN/Inf are counted by the kernels while they prepare the rows.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <sstream>
#include <tuple>

#include "elva/infonce_loss.h"
#include "tensor_args.h"

namespace elva {
namespace {

struct Args {
  bindings::PoolShape shape;
  at::Tensor q, c, labels, false_negatives;
  float tau;
};

void check_status(const InfoNceStatus& status) {
  TORCH_CHECK_VALUE(status.nonfinite_queries == 0, "queries must contain only finite values; found ",
                    status.nonfinite_queries, " NaN/Inf entries");
  TORCH_CHECK_VALUE(status.nonfinite_candidates == 0, "candidates must contain only finite values; found ",
                    status.nonfinite_candidates, " NaN/Inf entries");
}

at::Tensor per_query(const at::Tensor& t, const char* name, int64_t B) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be a float32 [B] tensor; got dtype ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == B, name, " must be a float32 [B] tensor with B = ", B,
                    "; got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the queries' device (cpu); got ", t.device());
  return t.contiguous();
}

Args check_args(const at::Tensor& queries, const at::Tensor& candidates, const at::Tensor& labels,
                const at::Tensor& temperature, bool symmetric, const std::optional<at::Tensor>& false_negatives) {
  TORCH_INTERNAL_ASSERT(queries.device().is_cpu());
  Args args;
  args.shape = bindings::check_queries_and_candidates(queries, candidates);
  const int64_t B = args.shape.B, N = args.shape.N;
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64 [B]; got dtype ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == B, "labels must be int64 [B] with B = ", B,
                    "; got shape ", labels.sizes());
  TORCH_CHECK_VALUE(labels.device().is_cpu(), "labels must be on the queries' device (cpu); got ", labels.device());
  TORCH_CHECK_TYPE(temperature.is_floating_point(), "temperature must be a 0-dim float tensor; got dtype ",
                   temperature.scalar_type());
  TORCH_CHECK_VALUE(temperature.dim() == 0, "temperature must be a 0-dim float tensor; got shape ",
                    temperature.sizes());
  TORCH_CHECK_VALUE(temperature.device().is_cpu(), "temperature must be on the queries' device (cpu); got ",
                    temperature.device());
  const double tau = temperature.item<double>();
  const float tau32 = static_cast<float>(tau);
  TORCH_CHECK_VALUE(std::isfinite(tau32) && tau32 > 0, "temperature must be a finite value > 0; got ", tau);
  args.tau = tau32;

  args.labels = labels.contiguous();
  const int64_t* ids = args.labels.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(ids[b] >= 0 && ids[b] < N, "labels holds ids outside [0, ", N, "); got ", ids[b]);
  }
  if (symmetric) {
    bool arange = true;
    for (int64_t b = 0; b < B; ++b) arange &= ids[b] == b;
    if (!arange) {
      std::ostringstream head;
      head << "[";
      for (int64_t b = 0; b < std::min<int64_t>(B, 8); ++b) head << (b ? ", " : "") << ids[b];
      head << "]";
      TORCH_CHECK_VALUE(false, "labels must be arange(B) = arange(", B,
                        ") when symmetric=True (the first B candidates are the positives); got labels starting ",
                        head.str());
    }
  }
  if (false_negatives.has_value()) {
    args.false_negatives = bindings::id_matrix(*false_negatives, "false_negatives", B, N);
    const int64_t m = args.false_negatives.size(1);
    const int64_t* fn = args.false_negatives.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t k = 0; k < m; ++k) {
        TORCH_CHECK_VALUE(fn[b * m + k] != ids[b], "false_negatives must not list a query's own label; row ", b,
                          " lists its label ", ids[b]);
      }
    }
  }
  args.q = bindings::with_unit_stride_rows(queries);
  args.c = bindings::with_unit_stride_rows(candidates);
  return args;
}

std::tuple<at::Tensor, at::Tensor> infonce_loss_cpu_op(const at::Tensor& queries, const at::Tensor& candidates,
                                                       const at::Tensor& labels, const at::Tensor& temperature,
                                                       bool symmetric,
                                                       const std::optional<at::Tensor>& false_negatives) {
  const Args args = check_args(queries, candidates, labels, temperature, symmetric, false_negatives);
  const auto& s = args.shape;
  at::Tensor loss = at::empty({s.B}, queries.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({s.B}, queries.options().dtype(at::kFloat));
  const bool fn = args.false_negatives.defined();
  const InfoNceStatus status = infonce_loss_cpu(
      args.q.const_data_ptr(), args.q.stride(0), args.c.const_data_ptr(), args.c.stride(0), s.dtype, s.B, s.N, s.d,
      args.labels.const_data_ptr<int64_t>(), args.tau, symmetric,
      fn ? args.false_negatives.const_data_ptr<int64_t>() : nullptr, fn ? args.false_negatives.size(1) : 0,
      loss.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>());
  check_status(status);
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_loss_backward_cpu_op(
    const at::Tensor& queries, const at::Tensor& candidates, const at::Tensor& labels, const at::Tensor& temperature,
    bool symmetric, const std::optional<at::Tensor>& false_negatives, const at::Tensor& loss, const at::Tensor& lse,
    const at::Tensor& grad_loss, const at::Tensor& grad_lse, std::array<bool, 3> output_mask) {
  const Args args = check_args(queries, candidates, labels, temperature, symmetric, false_negatives);
  const auto& s = args.shape;
  const at::Tensor loss_c = per_query(loss, "loss", s.B), lse_c = per_query(lse, "lse", s.B);
  const at::Tensor g = per_query(grad_loss, "grad_loss", s.B), h = per_query(grad_lse, "grad_lse", s.B);
  const auto [want_q, want_c, want_t] = output_mask;
  at::Tensor grad_q = want_q ? at::empty({s.B, s.d}, queries.options()) : at::empty({0}, queries.options());
  at::Tensor grad_c = want_c ? at::empty({s.N, s.d}, candidates.options()) : at::empty({0}, candidates.options());
  double grad_t = 0.0;
  const bool fn = args.false_negatives.defined();
  const InfoNceStatus status = infonce_loss_backward_cpu(
      args.q.const_data_ptr(), args.q.stride(0), args.c.const_data_ptr(), args.c.stride(0), s.dtype, s.B, s.N, s.d,
      args.labels.const_data_ptr<int64_t>(), args.tau, symmetric,
      fn ? args.false_negatives.const_data_ptr<int64_t>() : nullptr, fn ? args.false_negatives.size(1) : 0,
      loss_c.const_data_ptr<float>(), lse_c.const_data_ptr<float>(), g.const_data_ptr<float>(),
      h.const_data_ptr<float>(), want_q ? grad_q.mutable_data_ptr() : nullptr,
      want_c ? grad_c.mutable_data_ptr() : nullptr, want_t ? &grad_t : nullptr);
  check_status(status);
  at::Tensor grad_temperature = at::empty({0}, temperature.options());
  if (want_t) {
    grad_temperature = at::empty({}, temperature.options());
    grad_temperature.fill_(grad_t);
  }
  return {grad_q, grad_c, grad_temperature};
}

}  // namespace
}  // namespace elva

TORCH_LIBRARY_IMPL(elva, CPU, m) {
  m.impl("infonce_loss_cpu", &elva::infonce_loss_cpu_op);
  m.impl("infonce_loss_backward_cpu", &elva::infonce_loss_backward_cpu_op);
}
