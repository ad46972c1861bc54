// torch bindings of elva::l2_normalize_{cpu,cuda}. The schemas live in elva_kernels/_library.py.
// The tensor and at::empty headers only, not ATen/ATen.h: a third less compile time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "elva/l2_normalize.h"
#include "tensor_args.h"

#ifdef ELVA_WITH_CUDA
// c10's stream and guard headers, not ATen/cuda/CUDAContext.h: the same current stream without the
// cuBLAS/cuSPARSE headers, so that this file also compiles against a toolkit that lacks them.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "elva/cuda/l2_normalize.cuh"
#endif

namespace elva {
namespace {

// Checks x and eps; returns x with unit-stride rows and its element type.
std::pair<at::Tensor, DType> prepare_input(const at::Tensor& x, double eps) {
  bindings::check_matrix(x, "x", "[n, d]");
  const DType dtype = bindings::float_dtype(x, "x");
  bindings::check_positive_finite(eps, "eps");
  return {bindings::with_unit_stride_rows(x), dtype};
}

void check_finite(int64_t nonfinite) {
  TORCH_CHECK_VALUE(nonfinite == 0, "x must contain only finite values; found ", nonfinite, " NaN/Inf entries");
}

at::Tensor l2_normalize_cpu_op(const at::Tensor& x, double eps) {
  TORCH_INTERNAL_ASSERT(x.device().is_cpu());
  const auto [rows_x, dtype] = prepare_input(x, eps);
  at::Tensor out = at::empty(rows_x.sizes(), rows_x.options().dtype(at::kFloat));
  check_finite(l2_normalize_cpu(rows_x.const_data_ptr(), dtype, rows_x.size(0), rows_x.size(1), rows_x.stride(0), eps,
                                out.mutable_data_ptr<float>()));
  return out;
}

#ifdef ELVA_WITH_CUDA
at::Tensor l2_normalize_cuda_op(const at::Tensor& x, double eps) {
  TORCH_INTERNAL_ASSERT(x.device().is_cuda());
  const c10::cuda::CUDAGuard device_guard(x.device());
  const auto [rows_x, dtype] = prepare_input(x, eps);
  at::Tensor out = at::empty(rows_x.sizes(), rows_x.options().dtype(at::kFloat));
  at::Tensor nonfinite = at::empty({1}, rows_x.options().dtype(at::kLong));
  const cudaError_t launched = l2_normalize_cuda(rows_x.const_data_ptr(), dtype, rows_x.size(0), rows_x.size(1),
                                                 rows_x.stride(0), eps, out.mutable_data_ptr<float>(),
                                                 nonfinite.mutable_data_ptr<int64_t>(),
                                                 c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(launched == cudaSuccess, "l2_normalize_cuda: kernel launch failed: ", cudaGetErrorString(launched));
  // The one host sync of the op: SPEC lets a kernel flag NaN/Inf on device and raise after the launch.
  check_finite(nonfinite.item<int64_t>());
  return out;
}
#endif

}  // namespace
}  // namespace elva

TORCH_LIBRARY_IMPL(elva, CPU, m) { m.impl("l2_normalize_cpu", &elva::l2_normalize_cpu_op); }

#ifdef ELVA_WITH_CUDA
TORCH_LIBRARY_IMPL(elva, CUDA, m) { m.impl("l2_normalize_cuda", &elva::l2_normalize_cuda_op); }
#endif
