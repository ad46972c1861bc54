// InfoNCE over cosine scores on the CPU, forward and memory-linear backward; see elva/infonce_loss.h.
//
// Scores come from the fp32 micro-kernels of score_tiles.h: a QP-query panel (prepared rows, packed) against a
// block of NB candidate rows (read in place for fp32, widened per thread otherwise), divided by the candidates'
// max(||c||, 1e-12). The tile is laid out tile[j * QP + i] (candidate j, query lane i), so the per-query online
// log-sum-exp runs over 32 query lanes at once.
//
// Forward: OpenMP over query panels; each thread streams every candidate block for its panel. symmetric: each thread
// folds its tiles' columns j < B into its own running (max, sum) per column (O(threads x B)), merged at the end.
//
// Backward: one sweep over the (panel, block) tiles. The panels and the candidate blocks are each split into T
// ranges; in round r thread t scores query range t against candidate range (t + r) % T, so in every round each
// query range and each candidate range belongs to exactly one thread: dQ' and dC' are accumulated (fp32) without
// copies or atomics, and every score tile is computed once for both products. Rows are then mapped back through the
// normalisation.
#include "elva/infonce_loss.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "score_tiles.h"

// GCC 12 warns inside its own AVX-512 headers (_mm512_undefined_*); nothing of ours.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace elva {
namespace {

using namespace tiles;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Tile rows: NB candidates padded to whole CR groups, and to whole 8-row groups of the backward products.
constexpr int64_t kTileRows = NB + 24;
constexpr int64_t kGemmRows = 8;
constexpr int64_t kGemmCols = 32;

// exp(x) in fp32, branch-free so that the lane loops vectorise (Cephes expf: ~1 ulp); 0 below -87.
__attribute__((always_inline)) inline float exp_lane(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  const float k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = xc - k * 0.693359375f;
  r = r + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = static_cast<int32_t>(k) + 127;
  const float scale = float_from_bits(static_cast<uint32_t>(e) << 23);
  return x < -87.0f ? 0.0f : p * scale;
}

// ---------------------------------------------------------------- shared setup

struct Problem {
  const char* q;
  int64_t qs;
  const char* c;
  int64_t cs;
  DType dtype;
  int64_t esize;
  int64_t B, N, d;
  const int64_t* labels;
  float tau;
  bool symmetric;
  const int64_t* fn;
  int64_t fn_cols;
  int64_t panels = 0, blocks = 0;
  Kernel kernel = nullptr;
  Widen widen = nullptr;
  std::vector<float> cdiv{};  // max(||c||, eps) per candidate
  std::vector<float> craw{};  // ||c||
  bool parallel = false;
};

// Per-thread buffers: one query panel (prepared rows, packed, raw norms), one candidate block (widened), its tail
// group and one score tile.
struct Workspace {
  std::vector<float> qrows, qpack, qnorm, crows, tail, tile;
  explicit Workspace(const Problem& p)
      : qrows(static_cast<size_t>(QP * p.d), 0.0f),
        qpack(static_cast<size_t>(QP * p.d), 0.0f),
        qnorm(QP, 1.0f),
        crows(p.dtype == DType::F32 ? 0 : static_cast<size_t>(NB * p.d)),
        tail(static_cast<size_t>(CR * p.d), 0.0f),
        tile(static_cast<size_t>(kTileRows * QP), 0.0f) {}
};

// Checks every row (NaN/Inf) and records the candidates' norms. Returns the status.
InfoNceStatus setup(Problem& p) {
  InfoNceStatus status;
  p.esize = static_cast<int64_t>(element_size(p.dtype));
  p.panels = (p.B + QP - 1) / QP;
  p.blocks = (p.N + NB - 1) / NB;
  p.kernel = pick_kernel();
  p.widen = pick_widen();
  p.parallel = (p.B + p.N) * p.d >= (int64_t{1} << 15);
  p.cdiv.assign(static_cast<size_t>(p.N), 1.0f);
  p.craw.assign(static_cast<size_t>(p.N), 0.0f);
  int64_t bad_q = 0, bad_c = 0;
#pragma omp parallel if (p.parallel) reduction(+ : bad_q, bad_c)
  {
    std::vector<float> row(static_cast<size_t>(p.d));
#pragma omp for schedule(static) nowait
    for (int64_t b = 0; b < p.B; ++b) {
      bad_q += prepare_row(p.q + b * p.qs * p.esize, p.dtype, p.d, Metric::Dot, row.data());
    }
#pragma omp for schedule(static)
    for (int64_t n = 0; n < p.N; ++n) {
      const char* src = p.c + n * p.cs * p.esize;
      const float* values = reinterpret_cast<const float*>(src);
      if (p.dtype != DType::F32) {
        p.widen(reinterpret_cast<const uint16_t*>(src), p.dtype, p.d, row.data());
        values = row.data();
      }
      const float squares = sum_of_squares(values, p.d);
      if (!std::isfinite(squares)) {
        bad_c += std::count_if(values, values + p.d, [](float v) { return !std::isfinite(v); });
      }
      p.craw[n] = std::sqrt(squares);
      p.cdiv[n] = std::max(p.craw[n], kEps);
    }
  }
  status.nonfinite_queries = bad_q;
  status.nonfinite_candidates = bad_c;
  return status;
}

// Prepares query panel `panel`: normalised rows (zero past B), packed [p][QP], raw norms. Returns its real rows.
int64_t load_panel(const Problem& p, int64_t panel, Workspace& ws, float* qpack) {
  const int64_t b0 = panel * QP;
  const int64_t rows = std::min(QP, p.B - b0);
  for (int64_t i = 0; i < QP; ++i) {
    float* row = ws.qrows.data() + i * p.d;
    if (i < rows) {
      prepare_row(p.q + (b0 + i) * p.qs * p.esize, p.dtype, p.d, Metric::Cosine, row);
      // The raw norm, for the normalisation's backward: ||x|| = ||u|| max(||x||, eps) needs the input again.
      const char* src = p.q + (b0 + i) * p.qs * p.esize;
      if (p.dtype == DType::F32) {
        ws.qnorm[i] = std::sqrt(sum_of_squares(reinterpret_cast<const float*>(src), p.d));
      } else {
        // Widen into the packed buffer (overwritten below) to norm the raw row.
        p.widen(reinterpret_cast<const uint16_t*>(src), p.dtype, p.d, qpack);
        ws.qnorm[i] = std::sqrt(sum_of_squares(qpack, p.d));
      }
    } else {
      std::fill(row, row + p.d, 0.0f);
      ws.qnorm[i] = 1.0f;
    }
  }
  for (int64_t i = 0; i < QP; ++i) {
    const float* row = ws.qrows.data() + i * p.d;
    float* out = qpack + i;
    for (int64_t k = 0; k < p.d; ++k) out[k * QP] = row[k];
  }
  return rows;
}

// Candidate block n0..n0+nb as the micro-kernels read it; rows_out/ld_out: the fp32 rows (in place or widened).
Block load_block(const Problem& p, int64_t n0, int64_t nb, Workspace& ws, const float** rows_out, int64_t* ld_out) {
  const float* rows;
  int64_t ld;
  if (p.dtype == DType::F32) {
    rows = reinterpret_cast<const float*>(p.c + n0 * p.cs * p.esize);
    ld = p.cs;
  } else {
    for (int64_t r = 0; r < nb; ++r) {
      p.widen(reinterpret_cast<const uint16_t*>(p.c + (n0 + r) * p.cs * p.esize), p.dtype, p.d,
              ws.crows.data() + r * p.d);
    }
    rows = ws.crows.data();
    ld = p.d;
  }
  const int64_t full_groups = nb / CR;
  const int64_t groups = (nb + CR - 1) / CR;
  if (groups > full_groups) {
    std::fill(ws.tail.begin(), ws.tail.end(), 0.0f);
    for (int64_t r = full_groups * CR; r < nb; ++r) {
      std::copy_n(rows + r * ld, p.d, ws.tail.data() + (r - full_groups * CR) * p.d);
    }
  }
  *rows_out = rows;
  *ld_out = ld;
  return {rows, ld, ws.tail.data(), nullptr, nullptr, full_groups, groups};
}

// Raw dot products of the panel against the block -> tile.
void score(const Problem& p, const Block& block, const float* qpack, Workspace& ws) {
  score_panel(p.kernel, false, qpack, nullptr, block, p.d, ws.tile.data(), kTileRows * QP);
}

// Applies the false negatives of the panel's rows that fall in [n0, n0 + nb): tile entry := value.
void mask_tile(const Problem& p, int64_t panel, int64_t rows, int64_t n0, int64_t nb, float* tile, float value) {
  if (!p.fn) return;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t* ids = p.fn + (panel * QP + i) * p.fn_cols;
    for (int64_t k = 0; k < p.fn_cols; ++k) {
      const int64_t id = ids[k];
      if (id >= n0 && id < n0 + nb) tile[(id - n0) * QP + i] = value;
    }
  }
}

// ---------------------------------------------------------------- forward tile (ISA-specific bodies)

struct ForwardLanes {
  float* run_max;     // [QP]
  double* run_sum;    // [QP]
  float* col_max;     // this thread's column maxima (symmetric), indexed by candidate
  double* col_sum;
};

// tile: raw dots -> z = (dot / cdiv_j) / tau in place; padded lanes -inf (before masking).
__attribute__((always_inline)) inline void to_logits_impl(float* tile, const float* cdiv, int64_t nb, int64_t rows,
                                                          float tau) {
  for (int64_t j = 0; j < nb; ++j) {
    float* t = tile + j * QP;
    const float div = cdiv[j];
#pragma omp simd
    for (int64_t i = 0; i < QP; ++i) t[i] = i < rows ? (t[i] / div) / tau : kNegInf;
  }
}

__attribute__((always_inline)) inline void fold_rows_impl(const float* tile, int64_t nb, float* run_max,
                                                          double* run_sum) {
  alignas(64) float tmax[QP], shift[QP], tsum[QP];
  for (int64_t i = 0; i < QP; ++i) tmax[i] = kNegInf, tsum[i] = 0.0f;
  for (int64_t j = 0; j < nb; ++j) {
    const float* t = tile + j * QP;
#pragma omp simd
    for (int64_t i = 0; i < QP; ++i) tmax[i] = std::max(tmax[i], t[i]);
  }
  for (int64_t i = 0; i < QP; ++i) {
    const float m = std::max(run_max[i], tmax[i]);
    shift[i] = m == kNegInf ? 0.0f : m;
  }
  for (int64_t j = 0; j < nb; ++j) {
    const float* t = tile + j * QP;
#pragma omp simd
    for (int64_t i = 0; i < QP; ++i) tsum[i] += exp_lane(t[i] - shift[i]);
  }
  for (int64_t i = 0; i < QP; ++i) {
    run_sum[i] = run_sum[i] * std::exp(static_cast<double>(run_max[i]) - shift[i]) + tsum[i];
    run_max[i] = std::max(run_max[i], tmax[i]);
  }
}

// Columns j < ncols of the tile folded into col_max/col_sum[j] (over the 32 lanes; padded lanes are -inf).
__attribute__((always_inline)) inline void fold_columns_impl(const float* tile, int64_t ncols, float* col_max,
                                                             double* col_sum) {
  for (int64_t j = 0; j < ncols; ++j) {
    const float* t = tile + j * QP;
    float m = kNegInf;
#pragma omp simd reduction(max : m)
    for (int64_t i = 0; i < QP; ++i) m = std::max(m, t[i]);
    const float new_max = std::max(col_max[j], m);
    const float shift = new_max == kNegInf ? 0.0f : new_max;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < QP; ++i) s += exp_lane(t[i] - shift);
    col_sum[j] = col_sum[j] * std::exp(static_cast<double>(col_max[j]) - shift) + s;
    col_max[j] = new_max;
  }
}

// Backward: tile of raw dots -> dZ (before the one-hot terms and masks), accumulating nothing else.
//   lanes: lse[i], a[i] = w_i + h_i, valid[i] (1 real / 0 padded); columns j < ncols_sym also get
//   wc[j] exp(z - rlse[j]). s (the cosine) is kept in `scores` for dL/dtau when it is wanted.
struct BackwardLanes {
  const float* lse;
  const float* a;
  const float* valid;
  const float* rlse;  // per column (symmetric), indexed by tile column
  const float* wc;
};

__attribute__((always_inline)) inline void dz_tile_impl(float* tile, float* scores, const float* cdiv, int64_t nb,
                                                        int64_t ncols_sym, float tau, const BackwardLanes& L) {
  for (int64_t j = 0; j < nb; ++j) {
    float* t = tile + j * QP;
    float* sc = scores + j * QP;
    const float div = cdiv[j];
    if (j < ncols_sym) {
      const float rl = L.rlse[j], w = L.wc[j];
#pragma omp simd
      for (int64_t i = 0; i < QP; ++i) {
        const float s = t[i] / div;
        const float z = s / tau;
        sc[i] = s;
        t[i] = (L.a[i] * exp_lane(z - L.lse[i]) + w * exp_lane(z - rl)) * L.valid[i];
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < QP; ++i) {
        const float s = t[i] / div;
        const float z = s / tau;
        sc[i] = s;
        t[i] = L.a[i] * exp_lane(z - L.lse[i]) * L.valid[i];
      }
    }
  }
}

// sum dz * s over the tile (fp32 lanes, then double), and dz -> dS = dz / tau in place.
__attribute__((always_inline)) inline double finish_tile_impl(float* tile, const float* scores, int64_t nb,
                                                              float tau, bool want_t) {
  alignas(64) float acc[QP] = {};
  for (int64_t j = 0; j < nb; ++j) {
    float* t = tile + j * QP;
    const float* sc = scores + j * QP;
    if (want_t) {
#pragma omp simd
      for (int64_t i = 0; i < QP; ++i) acc[i] += t[i] * sc[i];
    }
#pragma omp simd
    for (int64_t i = 0; i < QP; ++i) t[i] = t[i] / tau;
  }
  double total = 0.0;
  for (int64_t i = 0; i < QP; ++i) total += acc[i];
  return total;
}

#define ELVA_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,fma")))

ELVA_AVX512 void to_logits_avx512(float* tile, const float* cdiv, int64_t nb, int64_t rows, float tau) {
  to_logits_impl(tile, cdiv, nb, rows, tau);
}
void to_logits_portable(float* tile, const float* cdiv, int64_t nb, int64_t rows, float tau) {
  to_logits_impl(tile, cdiv, nb, rows, tau);
}
ELVA_AVX512 void fold_rows_avx512(const float* tile, int64_t nb, float* run_max, double* run_sum) {
  fold_rows_impl(tile, nb, run_max, run_sum);
}
void fold_rows_portable(const float* tile, int64_t nb, float* run_max, double* run_sum) {
  fold_rows_impl(tile, nb, run_max, run_sum);
}
ELVA_AVX512 void fold_columns_avx512(const float* tile, int64_t ncols, float* col_max, double* col_sum) {
  fold_columns_impl(tile, ncols, col_max, col_sum);
}
void fold_columns_portable(const float* tile, int64_t ncols, float* col_max, double* col_sum) {
  fold_columns_impl(tile, ncols, col_max, col_sum);
}
ELVA_AVX512 void dz_tile_avx512(float* tile, float* scores, const float* cdiv, int64_t nb, int64_t ncols_sym,
                                float tau, const BackwardLanes& L) {
  dz_tile_impl(tile, scores, cdiv, nb, ncols_sym, tau, L);
}
void dz_tile_portable(float* tile, float* scores, const float* cdiv, int64_t nb, int64_t ncols_sym, float tau,
                      const BackwardLanes& L) {
  dz_tile_impl(tile, scores, cdiv, nb, ncols_sym, tau, L);
}
ELVA_AVX512 double finish_tile_avx512(float* tile, const float* scores, int64_t nb, float tau, bool want_t) {
  return finish_tile_impl(tile, scores, nb, tau, want_t);
}
double finish_tile_portable(float* tile, const float* scores, int64_t nb, float tau, bool want_t) {
  return finish_tile_impl(tile, scores, nb, tau, want_t);
}

// ---------------------------------------------------------------- backward products
// out[r * ldo + c] += sum_k A[r * ars + k * aks] * Bm[k * ldb + c] for r < 8, k < K, c < width (<= 32).

ELVA_AVX512 void gemm8_avx512(const float* A, int64_t ars, int64_t aks, const float* Bm, int64_t ldb, int64_t K,
                              float* out, int64_t ldo, int64_t width) {
  const __mmask16 m0 = width >= 16 ? __mmask16(0xffff) : __mmask16((1u << width) - 1);
  const __mmask16 m1 = width >= 32 ? __mmask16(0xffff) : width > 16 ? __mmask16((1u << (width - 16)) - 1) : 0;
  __m512 acc[kGemmRows][2];
#pragma GCC unroll 8
  for (int r = 0; r < kGemmRows; ++r) {
    acc[r][0] = _mm512_maskz_loadu_ps(m0, out + r * ldo);
    acc[r][1] = _mm512_maskz_loadu_ps(m1, out + r * ldo + 16);
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, Bm + k * ldb);
    const __m512 b1 = _mm512_maskz_loadu_ps(m1, Bm + k * ldb + 16);
    const float* a = A + k * aks;
#pragma GCC unroll 8
    for (int r = 0; r < kGemmRows; ++r) {
      const __m512 v = _mm512_set1_ps(a[r * ars]);
      acc[r][0] = _mm512_fmadd_ps(v, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(v, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kGemmRows; ++r) {
    _mm512_mask_storeu_ps(out + r * ldo, m0, acc[r][0]);
    _mm512_mask_storeu_ps(out + r * ldo + 16, m1, acc[r][1]);
  }
}

void gemm8_portable(const float* A, int64_t ars, int64_t aks, const float* Bm, int64_t ldb, int64_t K, float* out,
                    int64_t ldo, int64_t width) {
  for (int64_t r = 0; r < kGemmRows; ++r) {
    float acc[kGemmCols];
    for (int64_t c = 0; c < width; ++c) acc[c] = out[r * ldo + c];
    for (int64_t k = 0; k < K; ++k) {
      const float a = A[r * ars + k * aks];
      const float* b = Bm + k * ldb;
      for (int64_t c = 0; c < width; ++c) acc[c] = std::fma(a, b[c], acc[c]);
    }
    for (int64_t c = 0; c < width; ++c) out[r * ldo + c] = acc[c];
  }
}

using Gemm8 = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*, int64_t, int64_t);

// out[R x d] += A[R x K] Bm[K x d], R a multiple of 8; column chunks outermost so a K x 32 slab of Bm stays in L1.
void gemm(Gemm8 kernel, const float* A, int64_t ars, int64_t aks, const float* Bm, int64_t ldb, int64_t R, int64_t K,
          float* out, int64_t ldo, int64_t d) {
  for (int64_t c0 = 0; c0 < d; c0 += kGemmCols) {
    const int64_t width = std::min(kGemmCols, d - c0);
    for (int64_t r0 = 0; r0 < R; r0 += kGemmRows) {
      kernel(A + r0 * ars, ars, aks, Bm + c0, ldb, K, out + r0 * ldo + c0, ldo, width);
    }
  }
}

struct Isa {
  bool avx512;
  Gemm8 gemm8;
};

Isa pick_isa() {
  __builtin_cpu_init();
  // The score kernel's choice (ELVA_CPU_ISA) decides: the AVX-512 lane loops only with the AVX-512 score kernel.
  const bool avx512 = pick_kernel() == kernel_avx512 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512bw");
  return {avx512, avx512 ? gemm8_avx512 : gemm8_portable};
}

// Gradient of x / max(||x||, eps) given the gradient g of that output, u the output and raw = ||x||; in place on g.
void normalize_backward_row(float* g, const float* u, float raw, int64_t d) {
  if (raw > kEps) {
    float radial = 0.0f;
    for (int64_t k = 0; k < d; ++k) radial += u[k] * g[k];
    for (int64_t k = 0; k < d; ++k) g[k] = (g[k] - u[k] * radial) / raw;
  } else {
    for (int64_t k = 0; k < d; ++k) g[k] = g[k] / kEps;
  }
}

uint16_t round_half(float v, DType dtype) {
  if (dtype == DType::BF16) {
    if (std::isnan(v)) return 0x7fc0;
    return bf16_round(v);
  }
  // fp32 -> fp16, round to nearest even.
  const uint32_t bits = bits_from_float(v);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {                                                 // below 2^-14: subnormal half
    const float scaled = float_from_bits(abs) * 16777216.0f;               // in units of 2^-24
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(scaled)));
  }
  const uint32_t mant = abs & 0x007fffffu;
  uint32_t h = ((abs >> 23) - 112) << 10 | (mant >> 13);
  const uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

void store_row(const float* g, DType dtype, int64_t d, void* out_row) {
  if (dtype == DType::F32) {
    if (static_cast<const void*>(g) != out_row) std::memcpy(out_row, g, static_cast<size_t>(d) * sizeof(float));
    return;
  }
  auto* out = static_cast<uint16_t*>(out_row);
  for (int64_t k = 0; k < d; ++k) out[k] = round_half(g[k], dtype);
}

}  // namespace

// ---------------------------------------------------------------- forward

InfoNceStatus infonce_loss_cpu(const void* queries, int64_t query_stride, const void* candidates,
                               int64_t candidate_stride, DType dtype, int64_t B, int64_t N, int64_t d,
                               const int64_t* labels, float temperature, bool symmetric,
                               const int64_t* false_negatives, int64_t false_negative_cols, float* loss, float* lse) {
  Problem p{static_cast<const char*>(queries), query_stride, static_cast<const char*>(candidates), candidate_stride,
            dtype, 0, B, N, d, labels, temperature, symmetric, false_negatives, false_negative_cols};
  if (B <= 0) return {};
  const InfoNceStatus status = setup(p);
  if (status.nonfinite_queries || status.nonfinite_candidates) return status;
  const Isa isa = pick_isa();
  const auto to_logits = isa.avx512 ? to_logits_avx512 : to_logits_portable;
  const auto fold_rows = isa.avx512 ? fold_rows_avx512 : fold_rows_portable;
  const auto fold_columns = isa.avx512 ? fold_columns_avx512 : fold_columns_portable;

  const int64_t threads = p.parallel ? std::max(1, omp_get_max_threads()) : 1;
  const int64_t ncol = symmetric ? B : 0;
  std::vector<float> col_max(static_cast<size_t>(threads * ncol), kNegInf);
  std::vector<double> col_sum(static_cast<size_t>(threads * ncol), 0.0);
  std::vector<double> row_lse(static_cast<size_t>(B));
  std::vector<float> positive(static_cast<size_t>(B), 0.0f);

  // Panels go in groups: each candidate block is loaded once per group and scored against every panel of it while
  // it sits in L2 (streaming all candidates once per panel would be bound by memory bandwidth).
  const int64_t group = std::clamp<int64_t>(p.panels / (2 * threads), 1, 8);
  const int64_t groups = (p.panels + group - 1) / group;
#pragma omp parallel num_threads(threads) if (p.parallel)
  {
    Workspace ws(p);
    const int64_t thread = omp_get_thread_num();
    float* my_col_max = col_max.data() + thread * ncol;
    double* my_col_sum = col_sum.data() + thread * ncol;
    std::vector<float> packs(static_cast<size_t>(group * QP * d));
    std::vector<float> run_max(static_cast<size_t>(group * QP));
    std::vector<double> run_sum(static_cast<size_t>(group * QP));
    std::vector<int64_t> panel_rows(static_cast<size_t>(group));
#pragma omp for schedule(dynamic, 1)
    for (int64_t gi = 0; gi < groups; ++gi) {
      const int64_t first = gi * group, count = std::min(group, p.panels - first);
      for (int64_t k = 0; k < count; ++k) panel_rows[k] = load_panel(p, first + k, ws, packs.data() + k * QP * d);
      std::fill(run_max.begin(), run_max.end(), kNegInf);
      std::fill(run_sum.begin(), run_sum.end(), 0.0);
      for (int64_t n0 = 0; n0 < N; n0 += NB) {
        const int64_t nb = std::min(NB, N - n0);
        const float* rows_ptr;
        int64_t ld;
        const Block block = load_block(p, n0, nb, ws, &rows_ptr, &ld);
        for (int64_t k = 0; k < count; ++k) {
          const int64_t panel = first + k, rows = panel_rows[k];
          score(p, block, packs.data() + k * QP * d, ws);
          float* tile = ws.tile.data();
          to_logits(tile, p.cdiv.data() + n0, nb, rows, temperature);
          mask_tile(p, panel, rows, n0, nb, tile, kNegInf);
          for (int64_t i = 0; i < rows; ++i) {
            const int64_t label = labels[panel * QP + i];
            if (label >= n0 && label < n0 + nb) positive[panel * QP + i] = tile[(label - n0) * QP + i];
          }
          fold_rows(tile, nb, run_max.data() + k * QP, run_sum.data() + k * QP);
          if (symmetric && n0 < B) {
            fold_columns(tile, std::min(nb, B - n0), my_col_max + n0, my_col_sum + n0);
          }
        }
      }
      for (int64_t k = 0; k < count; ++k) {
        for (int64_t i = 0; i < panel_rows[k]; ++i) {
          row_lse[(first + k) * QP + i] = run_max[k * QP + i] + std::log(run_sum[k * QP + i]);
        }
      }
    }
  }

#pragma omp parallel for schedule(static) if (p.parallel)
  for (int64_t b = 0; b < B; ++b) {
    const double forward = row_lse[b] - positive[b];
    lse[b] = static_cast<float>(row_lse[b]);
    if (!symmetric) {
      loss[b] = static_cast<float>(forward);
      continue;
    }
    float m = kNegInf;
    for (int64_t t = 0; t < threads; ++t) m = std::max(m, col_max[t * ncol + b]);
    double s = 0.0;
    for (int64_t t = 0; t < threads; ++t) {
      if (col_max[t * ncol + b] != kNegInf) s += col_sum[t * ncol + b] * std::exp(double(col_max[t * ncol + b]) - m);
    }
    const double reverse = m + std::log(s) - positive[b];
    loss[b] = static_cast<float>((forward + reverse) / 2);
  }
  return status;
}

// ---------------------------------------------------------------- backward

InfoNceStatus infonce_loss_backward_cpu(const void* queries, int64_t query_stride, const void* candidates,
                                        int64_t candidate_stride, DType dtype, int64_t B, int64_t N, int64_t d,
                                        const int64_t* labels, float temperature, bool symmetric,
                                        const int64_t* false_negatives, int64_t false_negative_cols,
                                        const float* loss, const float* lse, const float* grad_loss,
                                        const float* grad_lse, void* grad_queries, void* grad_candidates,
                                        double* grad_temperature) {
  Problem p{static_cast<const char*>(queries), query_stride, static_cast<const char*>(candidates), candidate_stride,
            dtype, 0, B, N, d, labels, temperature, symmetric, false_negatives, false_negative_cols};
  if (B <= 0) return {};
  const InfoNceStatus status = setup(p);
  if (status.nonfinite_queries || status.nonfinite_candidates) return status;
  const Isa isa = pick_isa();
  const auto dz_tile = isa.avx512 ? dz_tile_avx512 : dz_tile_portable;
  const auto finish_tile = isa.avx512 ? finish_tile_avx512 : finish_tile_portable;
  const bool want_q = grad_queries != nullptr, want_c = grad_candidates != nullptr;
  const bool want_t = grad_temperature != nullptr;
  if (!want_q && !want_c && !want_t) return status;
  const float tau = temperature;

  // Per-query weights: w (g, or g / 2 per direction when symmetric), a = w + h.
  std::vector<float> w(static_cast<size_t>(B)), a(static_cast<size_t>(B)), rlse(symmetric ? B : 0);
  for (int64_t b = 0; b < B; ++b) {
    w[b] = symmetric ? grad_loss[b] / 2 : grad_loss[b];
    a[b] = w[b] + grad_lse[b];
  }
  if (symmetric) {
    // rlse_i = 2 loss_i - lse_i + 2 z_ii (the reference's _reverse_lse), with z_ii computed exactly as the forward
    // tile did: the prepared query, one FMA chain over the raw candidate in index order, / max(||c||, eps), / tau.
#pragma omp parallel if (p.parallel)
    {
      std::vector<float> qrow(static_cast<size_t>(d)), crow(static_cast<size_t>(d));
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) {
        prepare_row(p.q + b * p.qs * p.esize, dtype, d, Metric::Cosine, qrow.data());
        const float* c = reinterpret_cast<const float*>(p.c + b * p.cs * p.esize);
        if (dtype != DType::F32) {
          p.widen(reinterpret_cast<const uint16_t*>(p.c + b * p.cs * p.esize), dtype, d, crow.data());
          c = crow.data();
        }
        float acc = 0.0f;
        for (int64_t k = 0; k < d; ++k) acc = std::fma(qrow[k], c[k], acc);
        const float z = (acc / p.cdiv[b]) / tau;
        rlse[b] = static_cast<float>(2.0 * loss[b] - double(lse[b]) + 2.0 * double(z));
      }
    }
  }

  // fp32 accumulators of the prepared-row gradients: the outputs themselves for fp32.
  std::vector<float> dq_buffer, dc_buffer;
  float* dq = nullptr;
  float* dc = nullptr;
  if (want_q) {
    if (dtype == DType::F32) {
      dq = static_cast<float*>(grad_queries);
    } else {
      dq_buffer.resize(static_cast<size_t>(B * d));
      dq = dq_buffer.data();
    }
  }
  if (want_c) {
    if (dtype == DType::F32) {
      dc = static_cast<float*>(grad_candidates);
    } else {
      dc_buffer.resize(static_cast<size_t>(N * d));
      dc = dc_buffer.data();
    }
  }

  const int64_t threads = p.parallel ? std::max(1, omp_get_max_threads()) : 1;
  std::vector<double> tau_parts(static_cast<size_t>(threads), 0.0);
  const bool gemms = want_q || want_c;

#pragma omp parallel num_threads(threads) if (p.parallel)
  {
    const int64_t T = omp_get_num_threads();
    const int64_t t = omp_get_thread_num();
    Workspace ws(p);
    std::vector<float> scores(static_cast<size_t>(kTileRows * QP), 0.0f);
    std::vector<float> block_grad(want_c ? static_cast<size_t>(kTileRows * d) : 0);
    std::vector<float> panel_grad(want_q ? static_cast<size_t>(QP * d) : 0);
    alignas(64) float lane_lse[QP], lane_a[QP], lane_valid[QP];
    double tau_sum = 0.0;

    if (want_q) {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < B * d; ++i) dq[i] = 0.0f;
    }
    if (want_c) {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < N * d; ++i) dc[i] = 0.0f;
    }

    const int64_t panel0 = p.panels * t / T, panel1 = p.panels * (t + 1) / T;
    for (int64_t round = 0; round < T; ++round) {
      const int64_t range = (t + round) % T;
      const int64_t block0 = p.blocks * range / T, block1 = p.blocks * (range + 1) / T;
      for (int64_t blk = block0; blk < block1 && panel0 < panel1; ++blk) {
        const int64_t n0 = blk * NB;
        const int64_t nb = std::min(NB, N - n0);
        const int64_t nb8 = (nb + kGemmRows - 1) / kGemmRows * kGemmRows;
        const float* crows;
        int64_t ld;
        const Block block = load_block(p, n0, nb, ws, &crows, &ld);
        // Whole 8-row groups accumulate straight into dC' (this thread owns the block in this round).
        const bool direct_c = nb8 == nb;
        float* c_target = direct_c ? dc + n0 * d : block_grad.data();
        if (want_c && !direct_c) std::fill(block_grad.begin(), block_grad.begin() + nb8 * d, 0.0f);
        const int64_t ncols_sym = symmetric && n0 < B ? std::min(nb, B - n0) : 0;
        for (int64_t panel = panel0; panel < panel1; ++panel) {
          const int64_t rows = load_panel(p, panel, ws, ws.qpack.data());
          const int64_t b0 = panel * QP;
          for (int64_t i = 0; i < QP; ++i) {
            lane_lse[i] = i < rows ? lse[b0 + i] : 0.0f;
            lane_a[i] = i < rows ? a[b0 + i] : 0.0f;
            lane_valid[i] = i < rows ? 1.0f : 0.0f;
          }
          score(p, block, ws.qpack.data(), ws);
          float* tile = ws.tile.data();
          const BackwardLanes lanes{lane_lse, lane_a, lane_valid, symmetric ? rlse.data() + n0 : nullptr,
                                    symmetric ? w.data() + n0 : nullptr};
          dz_tile(tile, scores.data(), p.cdiv.data() + n0, nb, ncols_sym, tau, lanes);
          mask_tile(p, panel, rows, n0, nb, tile, 0.0f);
          for (int64_t i = 0; i < rows; ++i) {
            const int64_t b = b0 + i;
            const int64_t label = labels[b];
            if (label >= n0 && label < n0 + nb) tile[(label - n0) * QP + i] -= w[b];
            // Reverse direction's one-hot (labels are arange(B)): the same entry, weighted by w_j = w_b.
            if (symmetric && b >= n0 && b < n0 + ncols_sym) tile[(b - n0) * QP + i] -= w[b];
          }
          tau_sum += finish_tile(tile, scores.data(), nb, tau, want_t);
          if (!gemms) continue;
          std::fill(tile + nb * QP, tile + nb8 * QP, 0.0f);
          // dC'[j] += sum_i dS_ij q'_i (prepared query rows).
          if (want_c) gemm(isa.gemm8, tile, QP, 1, ws.qrows.data(), d, nb8, QP, c_target, d, d);
          if (want_q) {
            // dQ'[i] += sum_j dS_ij c'_j with c'_j = c_j / cdiv_j: fold 1/cdiv into the tile.
            for (int64_t j = 0; j < nb; ++j) {
              const float div = p.cdiv[n0 + j];
              for (int64_t i = 0; i < QP; ++i) tile[j * QP + i] /= div;
            }
            float* out = dq + b0 * d;
            if (rows == QP) {
              gemm(isa.gemm8, tile, 1, QP, crows, ld, QP, nb, out, d, d);
            } else {
              std::fill(panel_grad.begin(), panel_grad.end(), 0.0f);
              gemm(isa.gemm8, tile, 1, QP, crows, ld, QP, nb, panel_grad.data(), d, d);
              for (int64_t k = 0; k < rows * d; ++k) out[k] += panel_grad[k];
            }
          }
        }
        if (want_c && !direct_c && panel0 < panel1) {
          float* out = dc + n0 * d;
          for (int64_t k = 0; k < nb * d; ++k) out[k] += block_grad[k];
        }
      }
#pragma omp barrier
    }
    tau_parts[t] = tau_sum;

    // Map the prepared-row gradients back through the normalisation and store them in the input dtype.
    if (want_q) {
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) {
        float* u = ws.qrows.data();
        prepare_row(p.q + b * p.qs * p.esize, dtype, d, Metric::Cosine, u);
        const char* src = p.q + b * p.qs * p.esize;
        float raw;
        if (dtype == DType::F32) {
          raw = std::sqrt(sum_of_squares(reinterpret_cast<const float*>(src), d));
        } else {
          p.widen(reinterpret_cast<const uint16_t*>(src), dtype, d, ws.qpack.data());
          raw = std::sqrt(sum_of_squares(ws.qpack.data(), d));
        }
        normalize_backward_row(dq + b * d, u, raw, d);
        store_row(dq + b * d, dtype, d, static_cast<char*>(grad_queries) + b * d * p.esize);
      }
    }
    if (want_c) {
#pragma omp for schedule(static)
      for (int64_t n = 0; n < N; ++n) {
        float* u = ws.qrows.data();
        prepare_row(p.c + n * p.cs * p.esize, dtype, d, Metric::Cosine, u);
        normalize_backward_row(dc + n * d, u, p.craw[n], d);
        store_row(dc + n * d, dtype, d, static_cast<char*>(grad_candidates) + n * d * p.esize);
      }
    }
  }
  if (want_t) {
    double total = 0.0;
    for (double part : tau_parts) total += part;
    *grad_temperature = -total / (double(tau) * double(tau));
  }
  return status;
}

}  // namespace elva
