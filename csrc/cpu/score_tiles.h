// Internal to the CPU backends (not installed, torch-free): the pieces that similarity_topk.cpp and
// rank_statistics.cpp share, so that both score every pair with the same canonical fp32 reduction.
//
// Register tile of the score micro-kernels: QP queries (vector lanes) x CR candidates (broadcasts): 24 zmm
// accumulators on AVX-512. Queries are packed once as [panel][d][QP] (or bf16 pairs); candidate rows are read in
// place (fp32) or from a per-thread converted copy of the block, so candidates are never transposed.
//
// Exactness: a kernel only screens. A pair is rescored by canonical_dot (one fixed order) when its screened score
// is within a proven bound (ScreenBound) of a decision threshold; only canonical scores are kept, compared and
// returned, so results are those of the canonical scores whatever kernel screened.
#pragma once

#include <cmath>
#include <cstdint>

#include "elva/common.h"
#include "elva/similarity_topk.h"  // Metric

namespace elva {
namespace tiles {

constexpr int64_t QP = 32;
constexpr int64_t CR = 12;
// Candidates per block (validated, normed and converted by the thread that scores them) and the d-chunk (elements,
// or bf16 pairs) kept in L1.
constexpr int64_t NB = 264;  // a multiple of CR
constexpr int64_t KC = 128;
constexpr float kEps = 1e-12f;
constexpr int kLanes = 16;
// The canonical score of a prepared pair: 64 fp32 FMA lanes (element i in lane i % 64, in index order), then a
// fixed tree. Every reported score comes from here, whichever kernel screened the pair, so results are
// bitwise-identical across code paths and exact duplicates score equal. (64 lanes: four independent FMA chains.)
constexpr int kDotLanes = 64;

// 16-lane fp32 sum of squares in a fixed order.
float sum_of_squares(const float* values, int64_t dim);

float canonical_dot_portable(const float* a, const float* b, int64_t dim);
float canonical_dot_avx512(const float* a, const float* b, int64_t dim);
using Dot = float (*)(const float*, const float*, int64_t);
Dot pick_dot();

// fp32 -> bf16, round to nearest even (finite inputs).
inline uint16_t bf16_round(float v) {
  const uint32_t bits = bits_from_float(v);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// n fp32 -> bf16 (VCVTNEPS2BF16), zero-padded to `padded` elements. Needs AVX512_BF16 (use_bf16_screen()).
void to_bf16_avx512(const float* src, int64_t n, int64_t padded, uint16_t* out);

// fp16/bf16 -> fp32 (exact).
void widen_avx512(const uint16_t* src, DType dtype, int64_t n, float* out);
void widen_portable(const uint16_t* src, DType dtype, int64_t n, float* out);
using Widen = void (*)(const uint16_t*, DType, int64_t, float*);
Widen pick_widen();

// One input row -> fp32 `out` (normalised for cosine). Returns its number of NaN/Inf entries (0 = fine).
int64_t prepare_row(const char* row, DType dtype, int64_t dim, Metric metric, float* out);

// Score micro-kernels: C[j * QP + i] (+)= sum_p q[p * QP + i] * c[j * ldc + p] for p < kc, i < QP, j < CR.
void kernel_scalar(const float* q, const float* c, int64_t ldc, int64_t kc, float* C, bool first);
void kernel_avx512(const float* q, const float* c, int64_t ldc, int64_t kc, float* C, bool first);
void kernel_avx2(const float* q, const float* c, int64_t ldc, int64_t kc, float* C, bool first);
// bf16 screening: q packed [p2][QP][2] bf16, candidate row j at c + j * ldc (bf16 pairs, even ldc).
void kernel_bf16(const uint16_t* q, const uint16_t* c, int64_t ldc, int64_t kc2, float* C, bool first);
using Kernel = void (*)(const float*, const float*, int64_t, int64_t, float*, bool);
// ELVA_CPU_ISA=scalar|avx2 forces a slower variant (tests compare them; results are bitwise-identical).
Kernel pick_kernel();
// Screen in bf16 (VDPBF16PS) where the CPU has AVX512_BF16 and a one-time timing finds it faster than fp32 FMA
// (not on Sapphire Rapids, whose VDPBF16PS issues at half the FMA rate), unless ELVA_CPU_ISA names a kernel.
bool use_bf16_screen();

// One block of prepared candidate rows as the micro-kernels read it: `full_groups` whole CR-row groups in place
// (fp32 rows with stride ld, or bf16 pairs with stride 2 * d2) and, when groups > full_groups, the zero-padded
// partial last group copied to tail / tail16.
struct Block {
  const float* rows;
  int64_t ld;
  const float* tail;
  const uint16_t* rows16;
  const uint16_t* tail16;
  int64_t full_groups;
  int64_t groups;
};

// The Block of nb prepared rows (fp32 at rows with stride ld, or bf16 pairs at rows16 with stride 2 * d2 when
// `bf16`): copies the partial last group, zero-padded, into tail or tail16 (each sized for CR rows).
Block make_block(const float* rows, int64_t ld, const uint16_t* rows16, int64_t nb, int64_t d, bool bf16, float* tail,
                 uint16_t* tail16);

// Screened scores of one QP-query panel against a block -> tile[j * QP + i] for the block's CR-padded rows.
// With `bf16` the panel is qpanel16 (packed bf16 pairs, d2 = (d + 1) / 2 of them), else qpanel (packed fp32).
void score_panel(Kernel kernel, bool bf16, const float* qpanel, const uint16_t* qpanel16, const Block& block,
                 int64_t d, float* tile, int64_t tile_size);

// |screened - canonical| <= scale ||q|| ||c|| / divisor + tiny (||q|| + 1) (||c|| + 1) / divisor: each side's
// rounding to bf16 when screening, and the fp32 sums of both scores (gamma_(d+2) with unit 2^-23 whatever the
// summation order), with a 1% margin, plus the float rounding of `screened +- bound` and of the cosine divisions;
// the tiny term covers flushed subnormals: 2^-100 (d + 1).
struct ScreenBound {
  float scale;
  float tiny;
};

inline ScreenBound screen_bound(int64_t d, bool screen) {
  const double accumulation = 2.0 * static_cast<double>(d + 2) * std::ldexp(1.0, -23);
  const float scale = static_cast<float>(
      1.01 * ((screen ? std::ldexp(1.0, -7) + std::ldexp(1.0, -16) : 0.0) + accumulation * (1 + std::ldexp(1.0, -6))) +
      std::ldexp(1.0, -20));
  const float tiny = static_cast<float>(std::ldexp(1.0, -100) * static_cast<double>(d + 1));
  return {scale, tiny};
}

}  // namespace tiles
}  // namespace elva
