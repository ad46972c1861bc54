// The CUDA kernel on the shared l2_normalize cases, when a GPU is present; otherwise reported as skipped.
#include <cuda_runtime.h>  // the typed cudaMalloc overloads

#include <cstdlib>

#include "cuda_harness.h"
#include "elva/cuda/l2_normalize.cuh"
#include "l2_normalize_cases.h"

namespace {

// Copies x to the device, runs the launcher on the default stream and copies the results back.
int64_t run_on_device(const void* x, size_t x_bytes, elva::DType dtype, int64_t rows, int64_t dim, int64_t row_stride,
                      double eps, float* out) {
  const size_t out_bytes = rows * dim * sizeof(float);
  void* x_device = nullptr;
  float* out_device = nullptr;
  int64_t* nonfinite_device = nullptr;
  CUDA_OK(cudaMalloc(&x_device, std::max<size_t>(x_bytes, 1)));
  CUDA_OK(cudaMalloc(&out_device, std::max<size_t>(out_bytes, 1)));
  CUDA_OK(cudaMalloc(&nonfinite_device, sizeof(int64_t)));
  CUDA_OK(cudaMemcpy(x_device, x, x_bytes, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(out_device, 0xff, out_bytes));  // NaN: unwritten outputs fail the comparison
  CUDA_OK(elva::l2_normalize_cuda(x_device, dtype, rows, dim, row_stride, eps, out_device, nonfinite_device, nullptr));
  int64_t nonfinite = -1;
  CUDA_OK(cudaMemcpy(out, out_device, out_bytes, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(&nonfinite, nonfinite_device, sizeof(nonfinite), cudaMemcpyDeviceToHost));
  CUDA_OK(cudaFree(x_device));
  CUDA_OK(cudaFree(out_device));
  CUDA_OK(cudaFree(nonfinite_device));
  return nonfinite;
}

}  // namespace

int main() {
  int devices = 0;
  const cudaError_t status = cudaGetDeviceCount(&devices);
  if (status != cudaSuccess || devices == 0) {
    std::printf("no GPU, skipped (cudaGetDeviceCount: %s, %d devices)\n", cudaGetErrorString(status), devices);
    return elva::test::kSkipExitCode;
  }
  elva::test::run_l2_normalize_cases(run_on_device);
  return elva::test::finish("l2_normalize cuda");
}
