// The CPU infonce_loss kernels (forward and backward) against a brute-force double-precision InfoNCE with a
// materialised score matrix: ragged shapes, extra negatives, symmetric, false negatives, small temperatures,
// fp32/fp16/bf16 inputs (the double oracle sees the same rounded inputs), NaN/Inf detection, and every kernel
// (ELVA_CPU_ISA=scalar|avx2|default).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <vector>

#include "elva/infonce_loss.h"
#include "harness.h"

namespace {

using elva::DType;

struct Oracle {
  std::vector<double> loss, lse, gq, gc;
  double gt = 0.0;
};

// Double-precision InfoNCE and its gradients (dense), on the inputs as doubles.
Oracle oracle(const std::vector<double>& q, const std::vector<double>& c, int64_t B, int64_t N, int64_t d,
              const std::vector<int64_t>& labels, double tau, bool symmetric, const std::vector<int64_t>& fn, int64_t m,
              const std::vector<double>& g, const std::vector<double>& h) {
  auto normalise = [d](const std::vector<double>& x, int64_t rows, std::vector<double>& u, std::vector<double>& n) {
    u.resize(rows * d);
    n.resize(rows);
    for (int64_t r = 0; r < rows; ++r) {
      double s = 0;
      for (int64_t k = 0; k < d; ++k) s += x[r * d + k] * x[r * d + k];
      n[r] = std::sqrt(s);
      for (int64_t k = 0; k < d; ++k) u[r * d + k] = x[r * d + k] / std::max(n[r], 1e-12);
    }
  };
  std::vector<double> uq, nq, uc, nc;
  normalise(q, B, uq, nq);
  normalise(c, N, uc, nc);
  const double inf = INFINITY;
  std::vector<double> s(B * N), z(B * N);
  for (int64_t i = 0; i < B; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      double acc = 0;
      for (int64_t k = 0; k < d; ++k) acc += uq[i * d + k] * uc[j * d + k];
      s[i * N + j] = acc;
      z[i * N + j] = acc / tau;
    }
    for (int64_t k = 0; k < m; ++k) {
      if (fn[i * m + k] >= 0) z[i * N + fn[i * m + k]] = -inf;
    }
  }
  Oracle o;
  o.loss.resize(B);
  o.lse.resize(B);
  std::vector<double> rlse(B);
  for (int64_t i = 0; i < B; ++i) {
    double mx = -inf;
    for (int64_t j = 0; j < N; ++j) mx = std::max(mx, z[i * N + j]);
    double sum = 0;
    for (int64_t j = 0; j < N; ++j) sum += std::exp(z[i * N + j] - mx);
    o.lse[i] = mx + std::log(sum);
    o.loss[i] = o.lse[i] - z[i * N + labels[i]];
  }
  if (symmetric) {
    for (int64_t j = 0; j < B; ++j) {
      double mx = -inf;
      for (int64_t i = 0; i < B; ++i) mx = std::max(mx, z[i * N + j]);
      double sum = 0;
      for (int64_t i = 0; i < B; ++i) sum += std::exp(z[i * N + j] - mx);
      rlse[j] = mx + std::log(sum);
      o.loss[j] = (o.loss[j] + rlse[j] - z[j * N + j]) / 2;
    }
  }
  // dL/dz, then through s = u_q . u_c and the normalisation.
  std::vector<double> dz(B * N, 0.0);
  for (int64_t i = 0; i < B; ++i) {
    const double w = symmetric ? g[i] / 2 : g[i];
    for (int64_t j = 0; j < N; ++j) {
      const double p = std::exp(z[i * N + j] - o.lse[i]);
      dz[i * N + j] += (w + h[i]) * p - (j == labels[i] ? w : 0.0);
      if (symmetric && j < B) dz[i * N + j] += g[j] / 2 * (std::exp(z[i * N + j] - rlse[j]) - (i == j ? 1.0 : 0.0));
    }
  }
  std::vector<double> guq(B * d, 0.0), guc(N * d, 0.0);
  for (int64_t i = 0; i < B; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      const double ds = dz[i * N + j] / tau;
      o.gt -= dz[i * N + j] * s[i * N + j] / (tau * tau);
      for (int64_t k = 0; k < d; ++k) {
        guq[i * d + k] += ds * uc[j * d + k];
        guc[j * d + k] += ds * uq[i * d + k];
      }
    }
  }
  auto back = [d](const std::vector<double>& u, const std::vector<double>& n, std::vector<double>& gu, int64_t rows) {
    for (int64_t r = 0; r < rows; ++r) {
      double radial = 0;
      for (int64_t k = 0; k < d; ++k) radial += u[r * d + k] * gu[r * d + k];
      for (int64_t k = 0; k < d; ++k) {
        gu[r * d + k] = n[r] > 1e-12 ? (gu[r * d + k] - u[r * d + k] * radial) / n[r] : gu[r * d + k] / 1e-12;
      }
    }
  };
  back(uq, nq, guq, B);
  back(uc, nc, guc, N);
  o.gq = guq;
  o.gc = guc;
  return o;
}

uint16_t to_half_bits(float v, DType dtype) {
  const uint32_t bits = elva::bits_from_float(v);
  if (dtype == DType::BF16) return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  // |v| < 4 here, normal range: round the mantissa to 10 bits.
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs < 0x38800000u) return static_cast<uint16_t>(sign);  // tiny: flush (the oracle reads the bits back)
  uint32_t hb = ((abs >> 23) - 112) << 10 | ((abs & 0x7fffffu) >> 13);
  const uint32_t rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (hb & 1u))) ++hb;
  return static_cast<uint16_t>(sign | hb);
}

double half_value(uint16_t bits, DType dtype) {
  return dtype == DType::BF16 ? elva::test::bf16_value(bits) : elva::test::fp16_value(bits);
}

struct Inputs {
  std::vector<float> q32, c32;
  std::vector<uint16_t> q16, c16;
  std::vector<double> q, c;  // the values the kernel sees
  const void* qp() const { return q16.empty() ? static_cast<const void*>(q32.data()) : q16.data(); }
  const void* cp() const { return c16.empty() ? static_cast<const void*>(c32.data()) : c16.data(); }
};

Inputs make_inputs(std::mt19937_64& rng, int64_t B, int64_t N, int64_t d, DType dtype) {
  std::normal_distribution<float> normal;
  Inputs in;
  auto fill = [&](int64_t rows, std::vector<float>& v32, std::vector<uint16_t>& v16, std::vector<double>& v) {
    v32.resize(rows * d);
    for (auto& x : v32) x = normal(rng);
    v.assign(v32.begin(), v32.end());
    if (dtype != DType::F32) {
      v16.resize(rows * d);
      for (int64_t k = 0; k < rows * d; ++k) {
        v16[k] = to_half_bits(v32[k], dtype);
        v[k] = half_value(v16[k], dtype);
      }
    }
  };
  fill(B, in.q32, in.q16, in.q);
  fill(N, in.c32, in.c16, in.c);
  return in;
}

double grad_value(const std::vector<float>& g32, const std::vector<uint16_t>& g16, DType dtype, int64_t k) {
  return dtype == DType::F32 ? g32[k] : half_value(g16[k], dtype);
}

void run_case(std::mt19937_64& rng, int64_t B, int64_t N, int64_t d, DType dtype, bool symmetric, int64_t m,
              double tau) {
  const Inputs in = make_inputs(rng, B, N, d, dtype);
  std::vector<int64_t> labels(B);
  std::uniform_int_distribution<int64_t> id(0, N - 1);
  for (int64_t b = 0; b < B; ++b) labels[b] = symmetric ? b : id(rng);
  std::vector<int64_t> fn(B * m, -1);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < m; ++k) {
      const int64_t v = rng() % 3 == 0 ? -1 : id(rng);
      fn[b * m + k] = v == labels[b] ? -1 : v;
    }
  }
  std::vector<double> g(B), h(B);
  std::normal_distribution<double> normal;
  for (int64_t b = 0; b < B; ++b) g[b] = normal(rng), h[b] = normal(rng);
  const Oracle o = oracle(in.q, in.c, B, N, d, labels, tau, symmetric, fn, m, g, h);

  std::vector<float> loss(B), lse(B);
  const auto status = elva::infonce_loss_cpu(in.qp(), d, in.cp(), d, dtype, B, N, d, labels.data(),
                                             static_cast<float>(tau), symmetric, m ? fn.data() : nullptr, m,
                                             loss.data(), lse.data());
  ELVA_CHECK(status.nonfinite_queries == 0 && status.nonfinite_candidates == 0, "unexpected non-finite status");
  // Scores are fp32: z carries ~2^-24 d^0.5 / tau of absolute error.
  const double atol = 3e-6 / tau, rtol = 1e-5;
  int bad = 0;
  for (int64_t b = 0; b < B; ++b) {
    if (std::fabs(loss[b] - o.loss[b]) > rtol * std::fabs(o.loss[b]) + atol && bad++ < 3) {
      ELVA_CHECK(false, "B=%ld N=%ld d=%ld sym=%d m=%ld tau=%g: loss[%ld] %.9g vs %.9g", (long)B, (long)N, (long)d,
                 symmetric, (long)m, tau, (long)b, loss[b], o.loss[b]);
    }
    if (std::fabs(lse[b] - o.lse[b]) > rtol * std::fabs(o.lse[b]) + atol && bad++ < 3) {
      ELVA_CHECK(false, "lse[%ld] %.9g vs %.9g", (long)b, lse[b], o.lse[b]);
    }
  }
  std::vector<float> lossf(loss), lsef(lse), gf(g.begin(), g.end()), hf(h.begin(), h.end());
  const bool half = dtype != DType::F32;
  std::vector<float> gq32(half ? 0 : B * d), gc32(half ? 0 : N * d);
  std::vector<uint16_t> gq16(half ? B * d : 0), gc16(half ? N * d : 0);
  double gt = 0.0;
  const auto bstatus = elva::infonce_loss_backward_cpu(
      in.qp(), d, in.cp(), d, dtype, B, N, d, labels.data(), static_cast<float>(tau), symmetric,
      m ? fn.data() : nullptr, m, lossf.data(), lsef.data(), gf.data(), hf.data(),
      half ? static_cast<void*>(gq16.data()) : gq32.data(), half ? static_cast<void*>(gc16.data()) : gc32.data(), &gt);
  ELVA_CHECK(bstatus.nonfinite_queries == 0 && bstatus.nonfinite_candidates == 0, "unexpected non-finite status");
  const double rounding = dtype == DType::F32 ? 0.0 : dtype == DType::F16 ? 2e-3 : 1.6e-2;
  auto check_grad = [&](const std::vector<double>& ref, const std::vector<float>& g32, const std::vector<uint16_t>& g16,
                        const char* name) {
    double scale = 0;
    for (double v : ref) scale = std::max(scale, std::fabs(v));
    const double bound = (2e-6 / tau + rounding) * scale + 1e-6;
    int shown = 0;
    for (size_t k = 0; k < ref.size(); ++k) {
      const double v = grad_value(g32, g16, dtype, static_cast<int64_t>(k));
      if (!(std::fabs(v - ref[k]) <= bound) && shown++ < 3) {
        ELVA_CHECK(false, "B=%ld N=%ld d=%ld sym=%d m=%ld tau=%g: grad %s[%zu] %.9g vs %.9g (bound %.3g)", (long)B,
                   (long)N, (long)d, symmetric, (long)m, tau, name, k, v, ref[k], bound);
      }
    }
  };
  check_grad(o.gq, gq32, gq16, "queries");
  check_grad(o.gc, gc32, gc16, "candidates");
  double weight = 0;
  for (int64_t b = 0; b < B; ++b) weight = std::max({weight, std::fabs(g[b]), std::fabs(h[b])});
  const double tbound = 4e-7 * B * weight / (tau * tau * tau) + 1e-5 * std::fabs(o.gt);
  ELVA_CHECK(std::fabs(gt - o.gt) <= tbound, "B=%ld N=%ld sym=%d tau=%g: grad tau %.9g vs %.9g", (long)B, (long)N,
             symmetric, tau, gt, o.gt);
}

void nonfinite_cases() {
  std::mt19937_64 rng(5);
  const int64_t B = 5, N = 9, d = 7;
  Inputs in = make_inputs(rng, B, N, d, DType::F32);
  std::vector<int64_t> labels = {0, 1, 2, 3, 4};
  std::vector<float> loss(B, -7.0f), lse(B, -7.0f);
  in.q32[2 * d + 3] = NAN;
  in.q32[4 * d + 1] = INFINITY;
  auto status = elva::infonce_loss_cpu(in.q32.data(), d, in.c32.data(), d, DType::F32, B, N, d, labels.data(), 0.05f,
                                       false, nullptr, 0, loss.data(), lse.data());
  ELVA_CHECK(status.nonfinite_queries == 2, "counted %ld bad query entries", (long)status.nonfinite_queries);
  ELVA_CHECK(loss[0] == -7.0f && lse[0] == -7.0f, "outputs written on bad input");
  in.q32[2 * d + 3] = 0.0f;
  in.q32[4 * d + 1] = 0.0f;
  in.c32[8 * d + 6] = -INFINITY;
  std::vector<float> gq(B * d, -7.0f);
  status = elva::infonce_loss_backward_cpu(in.q32.data(), d, in.c32.data(), d, DType::F32, B, N, d, labels.data(),
                                           0.05f, false, nullptr, 0, loss.data(), lse.data(), loss.data(), lse.data(),
                                           gq.data(), nullptr, nullptr);
  ELVA_CHECK(status.nonfinite_candidates == 1, "counted %ld bad candidate entries", (long)status.nonfinite_candidates);
  ELVA_CHECK(gq[0] == -7.0f, "gradient written on bad input");
}

}  // namespace

int main() {
  std::mt19937_64 rng(1234);
  const char* isas[] = {"", "avx2", "scalar"};
  for (const char* isa : isas) {
    setenv("ELVA_CPU_ISA", isa, 1);
    run_case(rng, 1, 1, 1, DType::F32, false, 0, 0.05);
    run_case(rng, 3, 10, 5, DType::F32, true, 2, 0.05);
    run_case(rng, 17, 40, 64, DType::F32, false, 3, 0.01);
    run_case(rng, 40, 300, 33, DType::F32, true, 3, 0.05);
    run_case(rng, 70, 600, 16, DType::F32, false, 2, 1.0);
    run_case(rng, 33, 290, 40, DType::F32, true, 0, 0.01);
  }
  setenv("ELVA_CPU_ISA", "", 1);
  run_case(rng, 37, 280, 24, DType::F16, true, 2, 0.05);
  run_case(rng, 37, 280, 24, DType::BF16, false, 2, 0.05);
  nonfinite_cases();
  return elva::test::finish("test_infonce_loss");
}
