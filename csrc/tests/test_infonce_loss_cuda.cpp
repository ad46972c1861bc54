// The CUDA infonce_loss launchers (forward and backward) against a host brute force in double of the reference
// semantics (elva_kernels/reference/infonce_loss.py): cosine scores, false-negative masks, symmetric mode, the
// dL/dz formula and the map back through the normalisation. fp32 within 1e-4 of the largest magnitude, fp16/bf16
// within 2e-2 (inputs exactly representable, so only the kernels' rounding differs). Skipped without a GPU.
#include <cuda_runtime.h>  // the typed cudaMalloc overloads

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "elva/cuda/infonce_loss.cuh"
#include "cuda_harness.h"
#include "harness.h"

namespace {

using elva::test::to_device;
using elva::test::to_host;

using elva::DType;



// Values k / 64 (|k| <= 64) are exact in fp16 and bf16: encode them from their fp32 bits.
uint16_t half_bits(float v, DType dtype) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  if (dtype == DType::BF16) return static_cast<uint16_t>(b >> 16);
  if (v == 0.0f) return static_cast<uint16_t>((b >> 16) & 0x8000u);
  const uint32_t sign = (b >> 16) & 0x8000u;
  const int exponent = static_cast<int>((b >> 23) & 0xff) - 127 + 15;
  return static_cast<uint16_t>(sign | (static_cast<uint32_t>(exponent) << 10) | ((b & 0x7fffffu) >> 13));
}

double decode(uint16_t bits, DType dtype) {
  return dtype == DType::F16 ? elva::test::fp16_value(bits) : elva::test::bf16_value(bits);
}

struct Case {
  const char* name;
  DType dtype;
  int64_t B, N, d;
  int64_t stride_pad;  // extra elements per row (0: contiguous)
  bool symmetric;
  int64_t fn_cols;  // 0: no false negatives
  bool zero_row;    // query 1 is all zeros (norm below eps)
  uint32_t seed;
};

struct Expected {
  std::vector<double> loss, lse, grad_q, grad_c;
  double grad_t;
};

// Host brute force in double.
Expected brute_force(const Case& cs, const std::vector<double>& q, const std::vector<double>& c,
                     const std::vector<int64_t>& labels, const std::vector<int64_t>& fn, double tau,
                     const std::vector<double>& g, const std::vector<double>& h) {
  const int64_t B = cs.B, N = cs.N, d = cs.d;
  auto normalise = [&](const std::vector<double>& x, int64_t rows, std::vector<double>& unit,
                       std::vector<double>& norm, std::vector<double>& raw) {
    unit.assign(rows * d, 0.0);
    norm.assign(rows, 0.0);
    raw.assign(rows, 0.0);
    for (int64_t r = 0; r < rows; ++r) {
      double sq = 0;
      for (int64_t k = 0; k < d; ++k) sq += x[r * d + k] * x[r * d + k];
      raw[r] = std::sqrt(sq);
      norm[r] = std::max(raw[r], 1e-12);
      for (int64_t k = 0; k < d; ++k) unit[r * d + k] = x[r * d + k] / norm[r];
    }
  };
  std::vector<double> qu, qn, qr, cu, cn, cr;
  normalise(q, B, qu, qn, qr);
  normalise(c, N, cu, cn, cr);
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> s(B * N), z(B * N);
  for (int64_t i = 0; i < B; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      double dot = 0;
      for (int64_t k = 0; k < d; ++k) dot += qu[i * d + k] * cu[j * d + k];
      s[i * N + j] = dot;
      bool masked = false;
      for (int64_t t = 0; t < cs.fn_cols; ++t) masked |= fn[i * cs.fn_cols + t] == j;
      z[i * N + j] = masked ? -inf : dot / tau;
    }
  }
  auto lse_of = [&](auto value, int64_t count) {
    double m = -inf;
    for (int64_t t = 0; t < count; ++t) m = std::max(m, value(t));
    double sum = 0;
    for (int64_t t = 0; t < count; ++t) sum += std::exp(value(t) - m);
    return m + std::log(sum);
  };
  Expected e;
  e.lse.resize(B);
  e.loss.resize(B);
  std::vector<double> rlse(B, 0.0);
  for (int64_t i = 0; i < B; ++i) {
    e.lse[i] = lse_of([&](int64_t j) { return z[i * N + j]; }, N);
    e.loss[i] = e.lse[i] - z[i * N + labels[i]];
  }
  if (cs.symmetric) {
    for (int64_t j = 0; j < B; ++j) {
      rlse[j] = lse_of([&](int64_t i) { return z[i * N + j]; }, B);
      e.loss[j] = (e.loss[j] + rlse[j] - z[j * N + j]) / 2;
    }
  }
  std::vector<double> w(g);
  if (cs.symmetric) {
    for (auto& v : w) v /= 2;
  }
  std::vector<double> dq(B * d, 0.0), dc(N * d, 0.0);
  double dtau = 0;
  for (int64_t i = 0; i < B; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      const double zz = z[i * N + j];
      double dz = (w[i] + h[i]) * std::exp(zz - e.lse[i]) - (j == labels[i] ? w[i] : 0.0);
      if (cs.symmetric && j < B) dz += w[j] * (std::exp(zz - rlse[j]) - (i == j ? 1.0 : 0.0));
      dtau += dz * s[i * N + j];
      const double ds = dz / tau;
      for (int64_t k = 0; k < d; ++k) {
        dq[i * d + k] += ds * cu[j * d + k];
        dc[j * d + k] += ds * qu[i * d + k];
      }
    }
  }
  e.grad_t = -dtau / (tau * tau);
  auto back = [&](const std::vector<double>& unit, const std::vector<double>& norm, const std::vector<double>& raw,
                  const std::vector<double>& grad, int64_t rows) {
    std::vector<double> out(rows * d);
    for (int64_t r = 0; r < rows; ++r) {
      double radial = 0;
      for (int64_t k = 0; k < d; ++k) radial += unit[r * d + k] * grad[r * d + k];
      for (int64_t k = 0; k < d; ++k) {
        out[r * d + k] = raw[r] > 1e-12 ? (grad[r * d + k] - unit[r * d + k] * radial) / norm[r]
                                        : grad[r * d + k] / 1e-12;
      }
    }
    return out;
  };
  e.grad_q = back(qu, qn, qr, dq, B);
  e.grad_c = back(cu, cn, cr, dc, N);
  return e;
}

void compare(const char* what, const Case& cs, const std::vector<double>& got, const std::vector<double>& want,
             double tol) {
  double scale = 0, err = 0;
  int64_t worst = 0;
  for (size_t t = 0; t < want.size(); ++t) scale = std::max(scale, std::fabs(want[t]));
  for (size_t t = 0; t < want.size(); ++t) {
    const double e = std::fabs(got[t] - want[t]);
    if (!(e <= err)) {
      err = e;
      worst = static_cast<int64_t>(t);
    }
  }
  const double relative = err / std::max(scale, 1e-30);
  ELVA_CHECK(relative <= tol, "%s %s: max error %.3g relative to max |want| %.3g (at %lld: got %.8g want %.8g)",
             cs.name, what, relative, scale, static_cast<long long>(worst), got[worst], want[worst]);
}

void run(const Case& cs) {
  std::mt19937 rng(cs.seed);
  const int64_t B = cs.B, N = cs.N, d = cs.d, ld = d + cs.stride_pad;
  const bool half = cs.dtype != DType::F32;
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::uniform_int_distribution<int> small(-64, 64);
  auto draw = [&](int64_t rows, std::vector<double>& values, std::vector<float>& f32, std::vector<uint16_t>& f16) {
    values.assign(rows * d, 0.0);
    f32.assign(rows * ld, 0.0f);
    f16.assign(rows * ld, 0);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t k = 0; k < d; ++k) {
        const float v = half ? static_cast<float>(small(rng)) / 64.0f : uniform(rng);
        values[r * d + k] = v;
        f32[r * ld + k] = v;
        if (half) f16[r * ld + k] = half_bits(v, cs.dtype);
      }
    }
  };
  std::vector<double> q, c;
  std::vector<float> qf, cf;
  std::vector<uint16_t> qh, ch;
  draw(B, q, qf, qh);
  draw(N, c, cf, ch);
  if (cs.zero_row && B > 1) {
    for (int64_t k = 0; k < d; ++k) {
      q[1 * d + k] = 0;
      qf[1 * ld + k] = 0;
      qh[1 * ld + k] = 0;
    }
  }
  std::vector<int64_t> labels(B);
  std::uniform_int_distribution<int64_t> pick(0, N - 1);
  for (int64_t i = 0; i < B; ++i) labels[i] = cs.symmetric ? i : pick(rng);
  std::vector<int64_t> fn(B * cs.fn_cols, -1);
  for (int64_t i = 0; i < B; ++i) {
    for (int64_t t = 0; t < cs.fn_cols; ++t) {
      const int64_t id = pick(rng);
      if (id != labels[i] && (t % 3) != 2) fn[i * cs.fn_cols + t] = id;  // some -1 padding
    }
  }
  const float tau = 0.07f;
  std::vector<float> gl(B), gh(B);
  std::vector<double> g(B), h(B);
  for (int64_t i = 0; i < B; ++i) {
    gl[i] = uniform(rng);
    gh[i] = 0.5f * uniform(rng);
    g[i] = gl[i];
    h[i] = gh[i];
  }
  const Expected want = brute_force(cs, q, c, labels, fn, tau, g, h);

  const void* dq = half ? static_cast<const void*>(to_device(qh)) : static_cast<const void*>(to_device(qf));
  const void* dc = half ? static_cast<const void*>(to_device(ch)) : static_cast<const void*>(to_device(cf));
  int64_t* dlabels = to_device(labels);
  int64_t* dfn = cs.fn_cols > 0 ? to_device(fn) : nullptr;
  float* dtau = to_device(std::vector<float>{tau});
  elva::InfoNceProblem problem{dq, ld, dc, ld, cs.dtype, B, N, d, dlabels, dfn, cs.fn_cols, dtau, cs.symmetric};

  float *qs = nullptr, *csc = nullptr, *loss = nullptr, *lse = nullptr;
  unsigned long long* nonfinite = nullptr;
  CUDA_OK(cudaMalloc(&qs, B * sizeof(float)));
  CUDA_OK(cudaMalloc(&csc, N * sizeof(float)));
  CUDA_OK(cudaMalloc(&loss, B * sizeof(float)));
  CUDA_OK(cudaMalloc(&lse, B * sizeof(float)));
  CUDA_OK(cudaMalloc(&nonfinite, 2 * sizeof(unsigned long long)));
  CUDA_OK(elva::infonce_loss_cuda(problem, qs, csc, nonfinite, loss, lse, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  const auto counts = to_host(nonfinite, 2);
  ELVA_CHECK(counts[0] == 0 && counts[1] == 0, "%s: nonfinite counts %llu %llu", cs.name, counts[0], counts[1]);
  const auto loss_h = to_host(loss, B), lse_h = to_host(lse, B);
  const double tol = half ? 2e-2 : 1e-4;
  compare("loss", cs, std::vector<double>(loss_h.begin(), loss_h.end()), want.loss, tol);
  compare("lse", cs, std::vector<double>(lse_h.begin(), lse_h.end()), want.lse, tol);

  float* dgl = to_device(gl);
  float* dgh = to_device(gh);
  const size_t elem = half ? 2 : 4;
  void *gq = nullptr, *gc = nullptr, *workspace = nullptr;
  float* gt = nullptr;
  CUDA_OK(cudaMalloc(&gq, B * d * elem));
  CUDA_OK(cudaMalloc(&gc, N * d * elem));
  CUDA_OK(cudaMalloc(&gt, sizeof(float)));
  CUDA_OK(cudaMalloc(&workspace, elva::infonce_loss_backward_workspace_bytes(B, N, d, true, true)));
  CUDA_OK(elva::infonce_loss_backward_cuda(problem, loss, lse, dgl, dgh, gq, gc, gt, workspace, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  auto fetch = [&](void* p, int64_t count) {
    std::vector<double> out(count);
    if (half) {
      const auto bits = to_host(static_cast<uint16_t*>(p), count);
      for (int64_t t = 0; t < count; ++t) out[t] = decode(bits[t], cs.dtype);
    } else {
      const auto values = to_host(static_cast<float*>(p), count);
      for (int64_t t = 0; t < count; ++t) out[t] = values[t];
    }
    return out;
  };
  compare("grad_queries", cs, fetch(gq, B * d), want.grad_q, tol);
  compare("grad_candidates", cs, fetch(gc, N * d), want.grad_c, tol);
  compare("grad_temperature", cs, {static_cast<double>(to_host(gt, 1)[0])}, {want.grad_t}, tol);

  // Only the temperature gradient: the same value.
  CUDA_OK(cudaMemset(gt, 0, sizeof(float)));
  CUDA_OK(elva::infonce_loss_backward_cuda(problem, loss, lse, dgl, dgh, nullptr, nullptr, gt, workspace, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  compare("grad_temperature (alone)", cs, {static_cast<double>(to_host(gt, 1)[0])}, {want.grad_t}, tol);

  for (void* p : {const_cast<void*>(dq), const_cast<void*>(dc), static_cast<void*>(dlabels), static_cast<void*>(dfn),
                  static_cast<void*>(dtau), static_cast<void*>(qs), static_cast<void*>(csc), static_cast<void*>(loss),
                  static_cast<void*>(lse), static_cast<void*>(nonfinite), static_cast<void*>(dgl),
                  static_cast<void*>(dgh), gq, gc, static_cast<void*>(gt), workspace}) {
    if (p != nullptr) CUDA_OK(cudaFree(p));
  }
}

// A NaN and an Inf in the candidates are counted.
void run_nonfinite() {
  const int64_t B = 3, N = 5, d = 8;
  std::vector<float> qf(B * d, 0.25f), cf(N * d, 0.5f);
  cf[7] = std::numeric_limits<float>::quiet_NaN();
  cf[20] = std::numeric_limits<float>::infinity();
  const float* dq = to_device(qf);
  const float* dc = to_device(cf);
  int64_t* dlabels = to_device(std::vector<int64_t>{0, 1, 2});
  float* dtau = to_device(std::vector<float>{0.05f});
  elva::InfoNceProblem problem{dq, d, dc, d, DType::F32, B, N, d, dlabels, nullptr, 0, dtau, false};
  float *qs = nullptr, *csc = nullptr, *loss = nullptr, *lse = nullptr;
  unsigned long long* nonfinite = nullptr;
  CUDA_OK(cudaMalloc(&qs, B * sizeof(float)));
  CUDA_OK(cudaMalloc(&csc, N * sizeof(float)));
  CUDA_OK(cudaMalloc(&loss, B * sizeof(float)));
  CUDA_OK(cudaMalloc(&lse, B * sizeof(float)));
  CUDA_OK(cudaMalloc(&nonfinite, 2 * sizeof(unsigned long long)));
  CUDA_OK(elva::infonce_loss_cuda(problem, qs, csc, nonfinite, loss, lse, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  const auto counts = to_host(nonfinite, 2);
  ELVA_CHECK(counts[0] == 0 && counts[1] == 2, "nonfinite counts %llu %llu (want 0 2)", counts[0], counts[1]);
  for (const void* p : {static_cast<const void*>(dq), static_cast<const void*>(dc), static_cast<const void*>(dlabels),
                        static_cast<const void*>(dtau), static_cast<const void*>(qs), static_cast<const void*>(csc),
                        static_cast<const void*>(loss), static_cast<const void*>(lse),
                        static_cast<const void*>(nonfinite)}) {
    CUDA_OK(cudaFree(const_cast<void*>(p)));
  }
}

}  // namespace

int main() {
  int devices = 0;
  const cudaError_t status = cudaGetDeviceCount(&devices);
  if (status != cudaSuccess || devices == 0) {
    std::printf("no GPU, skipped (cudaGetDeviceCount: %s, %d devices)\n", cudaGetErrorString(status), devices);
    return elva::test::kSkipExitCode;
  }
  const Case cases[] = {
      {"f32 small", DType::F32, 5, 9, 37, 0, false, 0, true, 1},
      {"f32 vec fn", DType::F32, 70, 133, 64, 4, false, 5, false, 2},
      {"f32 symmetric fn", DType::F32, 67, 130, 40, 0, true, 3, false, 3},
      {"f32 symmetric odd d", DType::F32, 64, 64, 33, 1, true, 0, false, 4},
      {"f16 vec", DType::F16, 70, 100, 72, 0, false, 2, false, 5},
      {"f16 odd d symmetric", DType::F16, 33, 80, 29, 3, true, 2, false, 6},
      {"bf16 vec symmetric", DType::BF16, 66, 140, 128, 8, true, 4, false, 7},
      {"bf16 odd", DType::BF16, 7, 70, 70, 0, false, 0, false, 8},
  };
  for (const Case& cs : cases) run(cs);
  run_nonfinite();
  return elva::test::finish("test_infonce_loss_cuda");
}
