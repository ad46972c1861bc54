#include "elva/similarity_topk.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

// GCC 12 warns inside its own AVX-512 headers (_mm512_undefined_*); nothing of ours.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace elva {
namespace {

// Register tile of the score micro-kernels: QP queries (vector lanes) x CR candidates (broadcasts): 24 zmm
// accumulators on AVX-512. Queries are packed once as [panel][d][QP] (or bf16 pairs); candidate rows are read in
// place (fp32) or from a per-thread converted copy of the block, so candidates are never transposed.
//
// Exactness: a kernel only screens. A pair is rescored by canonical_dot (one fixed order) when its screened score
// is within a proven bound of the query's running k-th best (and of max_score); only canonical scores are kept,
// compared and returned, so the result is the exact top-k of the canonical scores whatever kernel screened.
constexpr int64_t QP = 32;
constexpr int64_t CR = 12;
// Candidates per block (validated, normed and converted by the thread that scores them) and the d-chunk (elements,
// or bf16 pairs) kept in L1.
constexpr int64_t NB = 264;  // a multiple of CR
constexpr int64_t KC = 128;
constexpr float kEps = 1e-12f;
constexpr int kLanes = 16;

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
constexpr int kDotLanes = 64;

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

// fp32 -> bf16, round to nearest even (finite inputs).
inline uint16_t bf16_round(float v) {
  const uint32_t bits = bits_from_float(v);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
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

using Widen = void (*)(const uint16_t*, DType, int64_t, float*);

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

using Kernel = void (*)(const float*, const float*, int64_t, int64_t, float*, bool);

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

// Screen in bf16 (VDPBF16PS) unless ELVA_CPU_ISA names another kernel or the CPU lacks AVX512_BF16.
bool use_bf16_screen() {
  __builtin_cpu_init();
  const char* forced = std::getenv("ELVA_CPU_ISA");
  if (forced && *forced) return std::string(forced) == "avx512bf16" && __builtin_cpu_supports("avx512bf16");
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
}

using Dot = float (*)(const float*, const float*, int64_t);

Dot pick_dot() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") ? canonical_dot_avx512 : canonical_dot_portable;
}

// ---------------------------------------------------------------- running top-k per query

struct Entry {
  float score;
  int64_t index;
};

// The total order: score descending, then index ascending.
inline bool better(const Entry& a, const Entry& b) {
  return a.score > b.score || (a.score == b.score && a.index < b.index);
}

// A buffer of candidates that beat `threshold`; when full it is cut back to its k best and the threshold becomes
// the k-th best score. A query's candidates arrive in ascending index order, so a later candidate that only ties
// the threshold loses to it: the filter is one `score > threshold` compare.
struct TopkState {
  Entry* entries;
  int64_t size;
  float threshold;
};

void cut_to_k(TopkState& state, int64_t k) {
  std::nth_element(state.entries, state.entries + (k - 1), state.entries + state.size, better);
  state.size = k;
  state.threshold = state.entries[k - 1].score;
}

}  // namespace

SimilarityTopkStatus similarity_topk_cpu(const void* queries, int64_t query_stride, const void* candidates,
                                         int64_t candidate_stride, DType dtype, int64_t B, int64_t N, int64_t d,
                                         int64_t k, Metric metric, const int64_t* exclude, int64_t exclude_cols,
                                         const float* max_score, float* values, int64_t* indices) {
  SimilarityTopkStatus status;
  if (B <= 0) return status;
  const Kernel kernel = pick_kernel();
  const Widen widen_row = pick_widen();
  const int64_t esize = static_cast<int64_t>(element_size(dtype));
  const auto* qbytes = static_cast<const char*>(queries);
  const auto* cbytes = static_cast<const char*>(candidates);
  const int64_t panels = (B + QP - 1) / QP;
  const bool parallel = B * N * std::max<int64_t>(d, 1) >= (int64_t{1} << 18);
  const bool cosine = metric == Metric::Cosine;

  // Queries: prepared once (kept row-major for rescoring, with their norms) and packed panel-major [panel][d][QP]
  // in fp32, or [panel][d/2][QP][2] in bf16 when screening, zero rows past B.
  const bool screen = use_bf16_screen();
  const Dot dot = pick_dot();
  const int64_t d2 = (d + 1) / 2;  // bf16 pairs per row; odd d is padded with a zero
  std::vector<float> prepared_queries(static_cast<size_t>(B * d));
  std::vector<float> query_norms(static_cast<size_t>(B));
  std::vector<float> packed_queries(screen ? 0 : static_cast<size_t>(panels * QP * d), 0.0f);
  std::vector<uint16_t> packed_queries_bf16(screen ? static_cast<size_t>(panels * QP * 2 * d2) : 0, 0);
  int64_t bad_queries = 0;
#pragma omp parallel for schedule(static) if (parallel) reduction(+ : bad_queries)
  for (int64_t b = 0; b < B; ++b) {
    float* row = prepared_queries.data() + b * d;
    const int64_t bad = prepare_row(qbytes + b * query_stride * esize, dtype, d, metric, row);
    bad_queries += bad;
    if (bad) continue;
    query_norms[b] = std::sqrt(sum_of_squares(row, d));
    if (screen) {
      uint16_t* panel = packed_queries_bf16.data() + (b / QP) * d2 * 2 * QP + (b % QP) * 2;
      for (int64_t p = 0; p < d; ++p) panel[(p / 2) * 2 * QP + (p % 2)] = bf16_round(row[p]);
    } else {
      float* panel = packed_queries.data() + (b / QP) * d * QP + b % QP;
      for (int64_t p = 0; p < d; ++p) panel[p * QP] = row[p];
    }
  }
  if (bad_queries) {
    status.nonfinite_queries = bad_queries;
    return status;
  }
  // |screened - canonical| <= E ||q|| ||c|| + tiny (each side's rounding to bf16 when screening, and the fp32 sums
  // of both scores: gamma_(d+2) with unit 2^-23 whatever the summation order), with a 1% margin. The tiny term
  // covers flushed subnormals: 2^-100 (d + 1) (||q|| + 1) (||c|| + 1) / divisor.
  const double accumulation = 2.0 * static_cast<double>(d + 2) * std::ldexp(1.0, -23);
  const float bound_scale = static_cast<float>(
      1.01 * ((screen ? std::ldexp(1.0, -7) + std::ldexp(1.0, -16) : 0.0) + accumulation * (1 + std::ldexp(1.0, -6))) +
      std::ldexp(1.0, -20));  // + the float rounding of `screened +- bound` and of the cosine divisions
  const float tiny_scale = static_cast<float>(std::ldexp(1.0, -100) * static_cast<double>(d + 1));

  // Exclusions: each row's valid ids, sorted, for a binary search on the rare candidates that pass the threshold.
  std::vector<int64_t> excluded;
  std::vector<int64_t> excluded_end;
  if (exclude != nullptr && exclude_cols > 0) {
    excluded.resize(static_cast<size_t>(B * exclude_cols));
    excluded_end.resize(static_cast<size_t>(B));
    for (int64_t b = 0; b < B; ++b) {
      int64_t* out = excluded.data() + b * exclude_cols;
      int64_t count = 0;
      for (int64_t j = 0; j < exclude_cols; ++j) {
        const int64_t id = exclude[b * exclude_cols + j];
        if (id >= 0 && id < N) out[count++] = id;
      }
      std::sort(out, out + count);
      excluded_end[b] = count;
    }
  }
  const auto is_excluded = [&](int64_t b, int64_t id) {
    if (excluded_end.empty()) return false;
    const int64_t* first = excluded.data() + b * exclude_cols;
    return std::binary_search(first, first + excluded_end[b], id);
  };

  const int64_t max_threads = parallel ? std::max(1, omp_get_max_threads()) : 1;
  const int64_t blocks = (N + NB - 1) / NB;
  // Few query panels: the threads split the candidates instead, each with its own top-k buffers, merged at the end.
  const bool split_candidates = panels < max_threads && blocks >= 2 * max_threads;
  const int64_t copies = split_candidates ? max_threads : 1;

  // Running top-k buffers: k + slack entries per query (and per thread when the candidates are split).
  const int64_t capacity = k + std::min<int64_t>(std::max<int64_t>(k, 256), 16384);
  std::vector<Entry> entries(static_cast<size_t>(copies * B * capacity));
  std::vector<TopkState> states(static_cast<size_t>(copies * B));
  for (int64_t b = 0; b < copies * B; ++b) {
    states[b] = {entries.data() + b * capacity, 0, -std::numeric_limits<float>::infinity()};
  }

  // Per thread and block: the candidate norms, the rows widened to fp32 (fp16/bf16) and rounded to bf16 (screening).
  const bool widen = dtype != DType::F32;
  const int64_t buffers = max_threads;
  std::vector<float> widened(widen ? static_cast<size_t>(buffers * NB * d) : 0);
  std::vector<float> norms(static_cast<size_t>(buffers * NB), 1.0f);
  // Per candidate: the screening bound's factors ||c|| / divisor and (||c|| + 1) / divisor (divisor = the cosine norm).
  std::vector<float> bound_c(static_cast<size_t>(buffers * NB), 0.0f);
  std::vector<float> tiny_c(static_cast<size_t>(buffers * NB), 0.0f);
  std::vector<uint16_t> rows_bf16(screen ? static_cast<size_t>(buffers * NB * 2 * d2) : 0, 0);
  std::atomic<int64_t> first_bad_block{blocks};
  const float inf = std::numeric_limits<float>::infinity();
  const auto flag_bad = [&](int64_t block) {
    int64_t seen = first_bad_block.load();
    while (block < seen && !first_bad_block.compare_exchange_weak(seen, block)) {
    }
  };

#pragma omp parallel num_threads(max_threads) if (parallel)
  {
    const int64_t threads = omp_get_num_threads();
    const int64_t thread = omp_get_thread_num();
    std::vector<float> tile(static_cast<size_t>(NB * QP));
    std::vector<float> tail(static_cast<size_t>(CR * d), 0.0f);  // the block's last, partial group, zero-padded
    std::vector<uint16_t> tail_bf16(static_cast<size_t>(CR * 2 * d2), 0);
    float bound_q[QP], tiny_q[QP];
    float threshold[QP], limit[QP], scaled[QP];

    // Rows [r0, r1) of the block at n0: widened (fp16/bf16) into block_rows, normed; returns whether one holds a
    // NaN/Inf (the sum of squares is then not finite, so finite rows pay one fused reduction for the check).
    const auto prepare_block = [&](int64_t n0, int64_t r0, int64_t r1, float* block_rows, float* block_norms) {
      bool bad = false;
      for (int64_t r = r0; r < r1; ++r) {
        const char* src = cbytes + (n0 + r) * candidate_stride * esize;
        const float* values_r = reinterpret_cast<const float*>(src);
        if (widen) {
          widen_row(reinterpret_cast<const uint16_t*>(src), dtype, d, block_rows + r * d);
          values_r = block_rows + r * d;
        }
        const float squares = sum_of_squares(values_r, d);
        if (!std::isfinite(squares)) {
          bad |= std::any_of(values_r, values_r + d, [](float v) { return !std::isfinite(v); });
        }
        const float length = std::sqrt(squares);
        block_norms[r] = cosine ? std::max(length, kEps) : 1.0f;
        const int64_t slot = block_norms - norms.data() + r;
        bound_c[slot] = length / block_norms[r];
        tiny_c[slot] = (length + 1.0f) / block_norms[r];
        if (screen && !bad) to_bf16_avx512(values_r, d, 2 * d2, rows_bf16.data() + slot * 2 * d2);
      }
      return bad;
    };

    // Scores query panels [panel0, panel1) against the block and folds the tiles into `my_states` (B entries).
    const auto score_block = [&](int64_t n0, int64_t nb, const float* rows, int64_t ld, const float* block_norms,
                                 int64_t panel0, int64_t panel1, TopkState* my_states) {
      const int64_t full_groups = nb / CR;
      const int64_t groups = (nb + CR - 1) / CR;
      const int64_t slot0 = block_norms - norms.data();
      const uint16_t* rows16 = rows_bf16.data() + slot0 * 2 * d2;
      if (groups > full_groups) {
        if (screen) {
          std::fill(tail_bf16.begin(), tail_bf16.end(), uint16_t{0});
          std::copy_n(rows16 + full_groups * CR * 2 * d2, (nb - full_groups * CR) * 2 * d2, tail_bf16.data());
        } else {
          std::fill(tail.begin(), tail.end(), 0.0f);
          for (int64_t r = full_groups * CR; r < nb; ++r) {
            std::copy_n(rows + r * ld, d, tail.data() + (r - full_groups * CR) * d);
          }
        }
      }
      for (int64_t panel = panel0; panel < panel1; ++panel) {
        if (screen) {
          for (int64_t k0 = 0; k0 < d2; k0 += KC) {
            const int64_t kc = std::min(KC, d2 - k0);
            const uint16_t* qpanel = packed_queries_bf16.data() + (panel * d2 + k0) * 2 * QP;
            for (int64_t g = 0; g < full_groups; ++g) {
              kernel_bf16(qpanel, rows16 + g * CR * 2 * d2 + 2 * k0, 2 * d2, kc, tile.data() + g * CR * QP, k0 == 0);
            }
            if (groups > full_groups) {
              kernel_bf16(qpanel, tail_bf16.data() + 2 * k0, 2 * d2, kc, tile.data() + full_groups * CR * QP, k0 == 0);
            }
          }
        } else {
          for (int64_t k0 = 0; k0 < d; k0 += KC) {
            const int64_t kc = std::min(KC, d - k0);
            const float* qpanel = packed_queries.data() + (panel * d + k0) * QP;
            for (int64_t g = 0; g < full_groups; ++g) {
              kernel(qpanel, rows + g * CR * ld + k0, ld, kc, tile.data() + g * CR * QP, k0 == 0);
            }
            if (groups > full_groups) {
              kernel(qpanel, tail.data() + k0, d, kc, tile.data() + full_groups * CR * QP, k0 == 0);
            }
          }
        }
        if (d == 0) std::fill(tile.begin(), tile.end(), 0.0f);
        // Fold the tile into the running top-k of the panel's queries; padded query lanes never pass.
        for (int64_t i = 0; i < QP; ++i) {
          const int64_t b = panel * QP + i;
          threshold[i] = b < B ? my_states[b].threshold : inf;
          limit[i] = b < B && max_score ? max_score[b] : inf;
          bound_q[i] = b < B ? bound_scale * query_norms[b] : 0.0f;
          tiny_q[i] = b < B ? tiny_scale * (query_norms[b] + 1.0f) : 0.0f;
        }
        for (int64_t j = 0; j < nb; ++j) {
          const float* t = tile.data() + j * QP;
          const float norm = block_norms[j];
          const float bc = bound_c[slot0 + j], tc = tiny_c[slot0 + j];
          int pass = 0;
          for (int64_t i = 0; i < QP; ++i) {
            scaled[i] = cosine ? t[i] / norm : t[i];
            const float bound = bound_q[i] * bc + tiny_q[i] * tc;
            // Written so that a NaN/Inf screened score (an overflow) passes to the exact rescoring.
            pass |= !(scaled[i] + bound <= threshold[i]) & !(scaled[i] - bound > limit[i]);
          }
          if (!pass) continue;
          const int64_t id = n0 + j;
          for (int64_t i = 0; i < QP; ++i) {
            const float bound = bound_q[i] * bc + tiny_q[i] * tc;
            if (scaled[i] + bound <= threshold[i] || scaled[i] - bound > limit[i]) continue;
            const int64_t b = panel * QP + i;
            if (b >= B) continue;
            // The candidate may belong: its canonical score decides.
            const float raw = dot(prepared_queries.data() + b * d, rows + j * ld, d);
            const float score = cosine ? raw / norm : raw;
            if (!(score > threshold[i] && score <= limit[i])) continue;
            if (is_excluded(b, id)) continue;
            TopkState& state = my_states[b];
            state.entries[state.size++] = {score, id};
            if (state.size == capacity) {
              cut_to_k(state, k);
              threshold[i] = state.threshold;
            }
          }
        }
      }
    };

    // Each thread validates and converts every block it scores itself (no modified cache lines cross cores, no
    // barrier): split candidates = my blocks x all panels; split queries = all blocks x my panels.
    float* my_rows = widen ? widened.data() + thread * NB * d : nullptr;
    float* my_norms = norms.data() + thread * NB;
    const int64_t block0 = split_candidates ? blocks * thread / threads : 0;
    const int64_t block1 = split_candidates ? blocks * (thread + 1) / threads : blocks;
    const int64_t panel0 = split_candidates ? 0 : panels * thread / threads;
    const int64_t panel1 = split_candidates ? panels : panels * (thread + 1) / threads;
    TopkState* my_states = states.data() + (split_candidates ? thread * B : 0);
    for (int64_t block = block0; block < block1 && panel0 < panel1; ++block) {
      if (first_bad_block.load() < blocks) break;
      const int64_t n0 = block * NB;
      const int64_t nb = std::min(NB, N - n0);
      if (prepare_block(n0, 0, nb, my_rows, my_norms)) {
        flag_bad(block);
        break;
      }
      const float* rows = widen ? my_rows : reinterpret_cast<const float*>(cbytes + n0 * candidate_stride * esize);
      score_block(n0, nb, rows, widen ? d : candidate_stride, my_norms, panel0, panel1, my_states);
    }
  }
  if (first_bad_block.load() < blocks) {
    status.nonfinite_candidates = true;
    return status;
  }

  // Merge the per-thread buffers (split candidates), sort each query's survivors; -inf / -1 fill the tail.
  std::vector<Entry> merged(split_candidates ? static_cast<size_t>(copies * k) : 0);
#pragma omp parallel for schedule(static) if (parallel && !split_candidates)
  for (int64_t b = 0; b < B; ++b) {
    Entry* best = nullptr;
    int64_t count = 0;
    if (split_candidates) {
      for (int64_t t = 0; t < copies; ++t) {
        TopkState& state = states[t * B + b];
        if (state.size > k) cut_to_k(state, k);
        std::copy_n(state.entries, state.size, merged.data() + count);
        count += state.size;
      }
      best = merged.data();
    } else {
      best = states[b].entries;
      count = states[b].size;
    }
    if (count > k) {
      std::nth_element(best, best + (k - 1), best + count, better);
      count = k;
    }
    std::sort(best, best + count, better);
    for (int64_t j = 0; j < k; ++j) {
      const bool real = j < count;
      values[b * k + j] = real ? best[j].score : -std::numeric_limits<float>::infinity();
      indices[b * k + j] = real ? best[j].index : -1;
    }
  }
  return status;
}

}  // namespace elva
