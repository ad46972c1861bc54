// Host-side helpers of the CUDA ctest cases: abort on a failed CUDA call, and copies to and from the device.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace elva::test {

inline void check_cuda(cudaError_t status, const char* call) {
  if (status == cudaSuccess) return;
  std::printf("%s failed: %s\n", call, cudaGetErrorString(status));
  std::exit(1);
}
#define CUDA_OK(call) ::elva::test::check_cuda((call), #call)

template <typename T>
T* to_device(const std::vector<T>& host) {
  T* device = nullptr;
  CUDA_OK(cudaMalloc(&device, std::max<size_t>(host.size() * sizeof(T), 1)));
  if (!host.empty()) CUDA_OK(cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return device;
}

template <typename T>
std::vector<T> to_host(const T* device, size_t count) {
  std::vector<T> host(count);
  if (count) CUDA_OK(cudaMemcpy(host.data(), device, count * sizeof(T), cudaMemcpyDeviceToHost));
  return host;
}

}  // namespace elva::test
