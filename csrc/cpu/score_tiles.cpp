// Shared CPU score tiles: row preparation, the canonical fp32 dot, the screening micro-kernels and their dispatch.
// Used by similarity_topk.cpp and rank_statistics.cpp; see score_tiles.h.
#include "score_tiles.h"

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

// GCC 12 warns inside its own AVX-512 headers (_mm512_undefined_*); nothing of ours.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace elva {
namespace tiles {

// ---------------------------------------------------------------- row preparation

float sum_of_squares(const float* values, int64_t dim) {
  float lanes[kLanes] = {};
  const int64_t body = dim - dim % kLanes;
  for (int64_t i = 0; i < body; i += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) lanes[lane] += values[i + lane] * values[i + lane];
  }
  for (int64_t i = body; i < dim; ++i) lanes[i - body] += values[i] * values[i];
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int lane = 0; lane < width; ++lane) lanes[lane] += lanes[lane + width];
  }
  return lanes[0];
}

// The canonical score of a prepared pair: 64 fp32 FMA lanes (element i in lane i % 64, in index order), then a
// fixed tree. Every reported score comes from here, whichever kernel screened the pair, so results are
// bitwise-identical across code paths and exact duplicates score equal. (64 lanes: four independent FMA chains.)

float canonical_dot_portable(const float* a, const float* b, int64_t dim) {
  float lanes[kDotLanes] = {};
  const int64_t body = dim - dim % kDotLanes;
  for (int64_t i = 0; i < body; i += kDotLanes) {
    for (int lane = 0; lane < kDotLanes; ++lane) lanes[lane] = std::fma(a[i + lane], b[i + lane], lanes[lane]);
  }
  for (int64_t i = body; i < dim; ++i) lanes[i - body] = std::fma(a[i], b[i], lanes[i - body]);
  for (int width = kDotLanes / 2; width > 0; width /= 2) {
    for (int lane = 0; lane < width; ++lane) lanes[lane] += lanes[lane + width];
  }
  return lanes[0];
}

__attribute__((target("avx512f"))) float canonical_dot_avx512(const float* a, const float* b, int64_t dim) {
  alignas(64) float lanes[kDotLanes];
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  const int64_t body = dim - dim % kDotLanes;
  for (int64_t i = 0; i < body; i += kDotLanes) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      acc[v] = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16 * v), _mm512_loadu_ps(b + i + 16 * v), acc[v]);
    }
  }
  for (int v = 0; v < 4; ++v) _mm512_store_ps(lanes + 16 * v, acc[v]);
  for (int64_t i = body; i < dim; ++i) lanes[i - body] = std::fma(a[i], b[i], lanes[i - body]);
  for (int width = kDotLanes / 2; width > 0; width /= 2) {
    for (int lane = 0; lane < width; ++lane) lanes[lane] += lanes[lane + width];
  }
  return lanes[0];
}

// n fp32 -> bf16 (VCVTNEPS2BF16), zero-padded to `padded` elements.
__attribute__((target("avx512f,avx512bf16"))) void to_bf16_avx512(const float* src, int64_t n, int64_t padded,
                                                                   uint16_t* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
    std::memcpy(out + i, &h, sizeof(h));
  }
  for (; i < n; ++i) out[i] = bf16_round(src[i]);
  for (; i < padded; ++i) out[i] = 0;
}

// fp16/bf16 -> fp32 (exact), 16 at a time: VCVTPH2PS for fp16, a shift for bf16.
__attribute__((target("avx512f"))) void widen_avx512(const uint16_t* src, DType dtype, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    const __m512 v = dtype == DType::BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                                          : _mm512_cvtph_ps(h);
    _mm512_storeu_ps(out + i, v);
  }
  for (; i < n; ++i) out[i] = dtype == DType::BF16 ? bf16_bits_to_float(src[i]) : fp16_bits_to_float(src[i]);
}

void widen_portable(const uint16_t* src, DType dtype, int64_t n, float* out) {
  if (dtype == DType::BF16) {
    for (int64_t i = 0; i < n; ++i) out[i] = bf16_bits_to_float(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = fp16_bits_to_float(src[i]);
  }
}

Widen pick_widen() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") ? widen_avx512 : widen_portable;
}

// One input row -> fp32 `out` (normalised for cosine). Returns its number of NaN/Inf entries (0 = fine).
int64_t prepare_row(const char* row, DType dtype, int64_t dim, Metric metric, float* out) {
  if (dtype == DType::F32) {
    std::memcpy(out, row, static_cast<size_t>(dim) * sizeof(float));
  } else {
    const auto* half = reinterpret_cast<const uint16_t*>(row);
    if (dtype == DType::BF16) {
      for (int64_t i = 0; i < dim; ++i) out[i] = bf16_bits_to_float(half[i]);
    } else {
      for (int64_t i = 0; i < dim; ++i) out[i] = fp16_bits_to_float(half[i]);
    }
  }
  // NaN/Inf entries make the sum of squares non-finite, so finite rows pay one fused reduction for the check.
  const float squares = sum_of_squares(out, dim);
  if (!std::isfinite(squares)) {
    const int64_t bad = std::count_if(out, out + dim, [](float v) { return !std::isfinite(v); });
    if (bad > 0) return bad;
  }
  if (metric == Metric::Cosine) {
    const float norm = std::max(std::sqrt(squares), kEps);
    for (int64_t i = 0; i < dim; ++i) out[i] = out[i] / norm;  // division: one rounding, like the reference
  }
  return 0;
}

// ---------------------------------------------------------------- score micro-kernels
// C[j * QP + i] (+)= sum_p q[p * QP + i] * c[j * ldc + p] for p < kc, i < QP, j < CR: one fp32 FMA chain per score in
// p order. Every variant computes exactly that chain, so a score does not depend on the code path or on where its
// candidate sits in a block.

void kernel_scalar(const float* q, const float* c, int64_t ldc, int64_t kc, float* C, bool first) {
  for (int64_t j = 0; j < CR; ++j) {
    for (int64_t i = 0; i < QP; ++i) {
      float acc = first ? 0.0f : C[j * QP + i];
      for (int64_t p = 0; p < kc; ++p) acc = std::fma(q[p * QP + i], c[j * ldc + p], acc);
      C[j * QP + i] = acc;
    }
  }
}

__attribute__((target("avx512f"))) void kernel_avx512(const float* q, const float* c, int64_t ldc, int64_t kc,
                                                       float* C, bool first) {
  __m512 acc[CR][2];
#pragma GCC unroll 12
  for (int j = 0; j < CR; ++j) {
    acc[j][0] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(C + j * QP);
    acc[j][1] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(C + j * QP + 16);
  }
  const float* c0 = c;
  const float* c4 = c + 4 * ldc;
  const float* c8 = c + 8 * ldc;
  for (int64_t p = 0; p < kc; ++p) {
    const __m512 a0 = _mm512_loadu_ps(q + p * QP);
    const __m512 a1 = _mm512_loadu_ps(q + p * QP + 16);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m512 b = _mm512_set1_ps(c0[j * ldc + p]);
      acc[j][0] = _mm512_fmadd_ps(a0, b, acc[j][0]);
      acc[j][1] = _mm512_fmadd_ps(a1, b, acc[j][1]);
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m512 b = _mm512_set1_ps(c4[j * ldc + p]);
      acc[4 + j][0] = _mm512_fmadd_ps(a0, b, acc[4 + j][0]);
      acc[4 + j][1] = _mm512_fmadd_ps(a1, b, acc[4 + j][1]);
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m512 b = _mm512_set1_ps(c8[j * ldc + p]);
      acc[8 + j][0] = _mm512_fmadd_ps(a0, b, acc[8 + j][0]);
      acc[8 + j][1] = _mm512_fmadd_ps(a1, b, acc[8 + j][1]);
    }
  }
#pragma GCC unroll 12
  for (int j = 0; j < CR; ++j) {
    _mm512_storeu_ps(C + j * QP, acc[j][0]);
    _mm512_storeu_ps(C + j * QP + 16, acc[j][1]);
  }
}

// AVX2: the 32 x 12 tile as two 32 x 6 halves (24 ymm accumulators each).
__attribute__((target("avx2,fma"))) void kernel_avx2_half(const float* q, const float* c, int64_t ldc, int64_t kc,
                                                           float* C, bool first) {
  __m256 acc[6][4];
#pragma GCC unroll 6
  for (int j = 0; j < 6; ++j) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) acc[j][v] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(C + j * QP + 8 * v);
  }
  for (int64_t p = 0; p < kc; ++p) {
    __m256 a[4];
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) a[v] = _mm256_loadu_ps(q + p * QP + 8 * v);
#pragma GCC unroll 6
    for (int j = 0; j < 6; ++j) {
      const __m256 b = _mm256_set1_ps(c[j * ldc + p]);
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) acc[j][v] = _mm256_fmadd_ps(a[v], b, acc[j][v]);
    }
  }
#pragma GCC unroll 6
  for (int j = 0; j < 6; ++j) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) _mm256_storeu_ps(C + j * QP + 8 * v, acc[j][v]);
  }
}

void kernel_avx2(const float* q, const float* c, int64_t ldc, int64_t kc, float* C, bool first) {
  kernel_avx2_half(q, c, ldc, kc, C, first);
  kernel_avx2_half(q, c + 6 * ldc, ldc, kc, C + 6 * QP, first);
}

// bf16 screening kernel: C[j * QP + i] (+)= sum over pairs p2 < kc2 of q pair (i, p2) . c pair (j, p2), with
// VDPBF16PS (twice the FMA rate). q is packed [p2][QP][2] bf16, candidate row j at c + j * ldc (bf16, even ldc).
__attribute__((target("avx512f,avx512bf16"))) void kernel_bf16(const uint16_t* q, const uint16_t* c, int64_t ldc,
                                                                int64_t kc2, float* C, bool first) {
  __m512 acc[CR][2];
#pragma GCC unroll 12
  for (int j = 0; j < CR; ++j) {
    acc[j][0] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(C + j * QP);
    acc[j][1] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(C + j * QP + 16);
  }
  for (int64_t p = 0; p < kc2; ++p) {
    const __m512bh a0 = (__m512bh)_mm512_loadu_si512(q + p * 2 * QP);
    const __m512bh a1 = (__m512bh)_mm512_loadu_si512(q + p * 2 * QP + QP);
#pragma GCC unroll 12
    for (int j = 0; j < CR; ++j) {
      int32_t pair;
      std::memcpy(&pair, c + j * ldc + 2 * p, sizeof(pair));
      const __m512bh b = (__m512bh)_mm512_set1_epi32(pair);
      acc[j][0] = _mm512_dpbf16_ps(acc[j][0], a0, b);
      acc[j][1] = _mm512_dpbf16_ps(acc[j][1], a1, b);
    }
  }
#pragma GCC unroll 12
  for (int j = 0; j < CR; ++j) {
    _mm512_storeu_ps(C + j * QP, acc[j][0]);
    _mm512_storeu_ps(C + j * QP + 16, acc[j][1]);
  }
}

// ELVA_CPU_ISA=scalar|avx2 forces a slower variant (tests compare them; results are bitwise-identical).
Kernel pick_kernel() {
  __builtin_cpu_init();
  const char* forced = std::getenv("ELVA_CPU_ISA");
  const std::string isa = forced ? forced : "";
  if (isa == "scalar") return kernel_scalar;
  if (isa != "avx2" && __builtin_cpu_supports("avx512f")) return kernel_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kernel_avx2;
  return kernel_scalar;
}

namespace {

// Seconds of `reps` calls of a micro-kernel over one KC-deep register tile, the best of three tries.
template <typename Run>
double best_seconds(Run run, int reps) {
  double best = 1e30;
  for (int trial = 0; trial < 3; ++trial) {
    const auto start = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) run();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return best;
}

// Whether VDPBF16PS does a K-deep tile in under 0.7 of the fp32 FMA kernel's time here. It does twice the products
// per instruction, so it is about 0.5 where it issues at the FMA rate (Zen 4) and about 1 where it issues at half of
// it (Sapphire Rapids); its wider error bound sends more pairs to rescoring, hence the margin. Measured once, about a
// millisecond; results do not depend on it (every kept score is canonical).
bool bf16_screen_pays() {
  std::vector<float> q(KC * QP, 0.5f), c(CR * KC, 0.25f), out(CR * QP);
  std::vector<uint16_t> q16(KC * QP, bf16_round(0.5f)), c16(CR * KC, bf16_round(0.25f));
  const int reps = 400;
  // Accumulating (first = false) chains the calls, so none can be hoisted or dropped.
  const double fp32 = best_seconds([&] { kernel_avx512(q.data(), c.data(), KC, KC, out.data(), false); }, reps);
  const double bf16 = best_seconds([&] { kernel_bf16(q16.data(), c16.data(), KC, KC / 2, out.data(), false); }, reps);
  volatile float sink = out[0];
  static_cast<void>(sink);
  return bf16 < 0.7 * fp32;
}

}  // namespace

// Screen in bf16 (VDPBF16PS) where the CPU has AVX512_BF16 and it is measurably faster than fp32 FMA
// (bf16_screen_pays), unless ELVA_CPU_ISA names a kernel.
bool use_bf16_screen() {
  __builtin_cpu_init();
  const char* forced = std::getenv("ELVA_CPU_ISA");
  if (forced && *forced) return std::string(forced) == "avx512bf16" && __builtin_cpu_supports("avx512bf16");
  static const bool pays = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16") &&
                           bf16_screen_pays();
  return pays;
}

Dot pick_dot() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") ? canonical_dot_avx512 : canonical_dot_portable;
}

Block make_block(const float* rows, int64_t ld, const uint16_t* rows16, int64_t nb, int64_t d, bool bf16, float* tail,
                 uint16_t* tail16) {
  const int64_t full_groups = nb / CR;
  const int64_t groups = (nb + CR - 1) / CR;
  const int64_t partial = nb - full_groups * CR;
  if (groups > full_groups) {
    if (bf16) {
      const int64_t pairs = 2 * ((d + 1) / 2);
      std::fill(tail16, tail16 + CR * pairs, uint16_t{0});
      std::copy_n(rows16 + full_groups * CR * pairs, partial * pairs, tail16);
    } else {
      std::fill(tail, tail + CR * d, 0.0f);
      for (int64_t r = 0; r < partial; ++r) std::copy_n(rows + (full_groups * CR + r) * ld, d, tail + r * d);
    }
  }
  return {rows, ld, tail, rows16, tail16, full_groups, groups};
}

void score_panel(Kernel kernel, bool bf16, const float* qpanel, const uint16_t* qpanel16, const Block& block,
                 int64_t d, float* tile, int64_t tile_size) {
  const int64_t d2 = (d + 1) / 2;
  const bool partial = block.groups > block.full_groups;
  if (bf16) {
    for (int64_t k0 = 0; k0 < d2; k0 += KC) {
      const int64_t kc = std::min(KC, d2 - k0);
      const uint16_t* q = qpanel16 + k0 * 2 * QP;
      for (int64_t g = 0; g < block.full_groups; ++g) {
        kernel_bf16(q, block.rows16 + g * CR * 2 * d2 + 2 * k0, 2 * d2, kc, tile + g * CR * QP, k0 == 0);
      }
      if (partial) kernel_bf16(q, block.tail16 + 2 * k0, 2 * d2, kc, tile + block.full_groups * CR * QP, k0 == 0);
    }
  } else {
    for (int64_t k0 = 0; k0 < d; k0 += KC) {
      const int64_t kc = std::min(KC, d - k0);
      const float* q = qpanel + k0 * QP;
      for (int64_t g = 0; g < block.full_groups; ++g) {
        kernel(q, block.rows + g * CR * block.ld + k0, block.ld, kc, tile + g * CR * QP, k0 == 0);
      }
      if (partial) kernel(q, block.tail + k0, d, kc, tile + block.full_groups * CR * QP, k0 == 0);
    }
  }
  if (d == 0) std::fill(tile, tile + tile_size, 0.0f);
}

}  // namespace tiles
}  // namespace elva
