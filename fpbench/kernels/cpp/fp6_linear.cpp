// Weight-only FP6 (E3M2, "4+2" layout) and INT4 (group 128) linear kernels for CPU.
//
// y[m, n] = scale[n] * sum_k x[m, k] * fp6(code[n, k])          (FP6, per-channel scale)
// y[m, n] = sum_g scale[n, g] * sum_{k in g} x[m, k] * int4[n, k] (INT4, 128-wide groups)
//
// Packed layout (written by fpbench/packing.py, which documents it in full): each row
// of K weights (K padded to a multiple of 128 with code 0 = +0.0) is cut into blocks
// of 256, the last one possibly a half block of 128 (its high nibbles take 64 bytes,
// its 2-bit fields the usual 64 bytes with fields 0..3 used). A block holds 128 bytes of high nibbles (code >> 2 = sign and exponent) and
// 64 bytes of low 2-bit fields (code & 3 = mantissa), both read as 32 little-endian
// uint16 lanes per 64 bytes. Lane j carries the weights at offset 32*i + kmap(j) of its
// 32-weight slices (nibble i in bits 4i..4i+3, 2-bit field i in bits 2i..2i+1), where
// kmap(2t) = t and kmap(2t+1) = 16 + t. With that lane order, a 64-entry table lookup
// on uint16 lanes gives bf16 patterns whose even lanes (shifted up 16 bits) are the
// fp32 weights k..k+15 and whose odd lanes (masked) are k+16..k+31: no shuffles.
//
// Exactness: every E3M2 value (subnormals 0.0625..0.1875 included, max 28) has at most
// 3 significant bits and an exponent in [-4, 4], so it is exact in bf16 and in fp16; the
// decode is therefore exact, and the only roundings are fp32 FMAs and the final scale
// multiply. No flush-to-zero / denormals-are-zero mode is ever set.
//
// ISA: AVX-512 (F+BW, plus BF16 for bf16 activations), AVX2 (+FMA+F16C) and portable
// scalar code live in one binary; the best one the CPU supports is picked at run time
// (or a narrower one forced by the caller). Packed arrays should start on a 64-byte
// boundary (fpbench/packing.py allocates them so): the loads are unaligned-tolerant, but
// a vector that spans two cache lines costs about twice as much to stream.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kBlock = 256;       // weights per packed FP6 block
constexpr int64_t kGranule = 128;     // K is padded to a multiple of this (a final half block)

// packed_lo2 bytes per row: 64 per started block; a final half block (128 weights) keeps
// all 64 bytes and uses 2-bit fields 0..3. packed_hi4 is always Kp / 2 bytes per row.
inline int64_t lo2_row(int64_t Kp) { return 64 * ((Kp + kBlock - 1) / kBlock); }
inline int64_t blocks_in(int64_t Kp) { return (Kp + kBlock - 1) / kBlock; }
constexpr int64_t kInt4Group = 128;   // INT4 group size = weights per 64 packed bytes
constexpr int kRowsPerPass = 4;       // activation rows sharing one decode of a weight row

inline int kmap(int j) { return (j & 1) ? 16 + (j >> 1) : (j >> 1); }

// Exact value of each FP6 E3M2 code: sign<<5 | exp<<2 | mantissa, bias 3, no specials.
float fp6_value(int code) {
  int sign = (code >> 5) & 1, exp = (code >> 2) & 7, mant = code & 3;
  float mag = exp == 0 ? std::ldexp(static_cast<float>(mant), -4)
                       : std::ldexp(1.0f + mant / 4.0f, exp - 3);
  return sign ? -mag : mag;
}

uint16_t bf16_bits(float value) {  // exact for the values used here (<= 8 significant bits)
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  return static_cast<uint16_t>(bits >> 16);
}

// ---------------------------------------------------------------- scalar (reference)

inline int fp6_code_at(const uint8_t* hi4, const uint8_t* lo2, int64_t k) {
  // Position of weight k inside its block: slice i (32 weights), lane j.
  int64_t block = k / kBlock, r = k % kBlock;
  int i = static_cast<int>(r / 32), pos = static_cast<int>(r % 32);
  int j = pos < 16 ? 2 * pos : 2 * (pos - 16) + 1;
  const uint8_t* h = hi4 + block * 128 + (i / 4) * 64;
  const uint8_t* l = lo2 + block * 64;
  uint16_t hlane = static_cast<uint16_t>(h[2 * j] | (h[2 * j + 1] << 8));
  uint16_t llane = static_cast<uint16_t>(l[2 * j] | (l[2 * j + 1] << 8));
  int hi = (hlane >> (4 * (i % 4))) & 15, lo = (llane >> (2 * i)) & 3;
  return hi << 2 | lo;
}

inline int int4_nibble_at(const uint8_t* packed, int64_t k) {
  int64_t block = k / kInt4Group, r = k % kInt4Group;
  int i = static_cast<int>(r / 32), pos = static_cast<int>(r % 32);
  int j = pos < 16 ? 2 * pos : 2 * (pos - 16) + 1;
  const uint8_t* h = packed + block * 64;
  uint16_t lane = static_cast<uint16_t>(h[2 * j] | (h[2 * j + 1] << 8));
  return (lane >> (4 * i)) & 15;
}

void fp6_dequant_row_scalar(const uint8_t* hi4, const uint8_t* lo2, float scale, int64_t K,
                            const float* table, float* out) {
  for (int64_t k = 0; k < K; ++k) out[k] = table[fp6_code_at(hi4, lo2, k)] * scale;
}

void int4_dequant_row_scalar(const uint8_t* packed, const float* scales, int64_t K, float* out) {
  for (int64_t k = 0; k < K; ++k)
    out[k] = static_cast<float>(int4_nibble_at(packed, k) - 8) * scales[k / kInt4Group];
}

void fp6_rows_scalar(const float* x, int64_t ldx, int64_t M, const uint8_t* hi4,
                     const uint8_t* lo2, const float* scales, int64_t Kp, int64_t n0, int64_t n1,
                     float* y, int64_t ldy, const float* table) {
  std::vector<float> w(Kp);
  for (int64_t n = n0; n < n1; ++n) {
    fp6_dequant_row_scalar(hi4 + n * Kp / 2, lo2 + n * lo2_row(Kp), 1.0f, Kp, table, w.data());
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t k = 0; k < Kp; ++k) acc += x[m * ldx + k] * w[k];
      y[m * ldy + n] = acc * scales[n];
    }
  }
}

void int4_rows_scalar(const float* x, int64_t ldx, int64_t M, const uint8_t* packed,
                      const float* scales, int64_t K, int64_t n0, int64_t n1, float* y,
                      int64_t ldy) {
  int64_t groups = K / kInt4Group;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = packed + n * K / 2;
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        float part = 0.f;
        for (int64_t k = g * kInt4Group; k < (g + 1) * kInt4Group; ++k)
          part += x[m * ldx + k] * static_cast<float>(int4_nibble_at(row, k) - 8);
        acc += part * scales[n * groups + g];
      }
      y[m * ldy + n] = acc;
    }
  }
}

// ---------------------------------------------------------------- AVX-512 (F + BW [+ BF16])
//
// Small M: register tiles of NR weight rows x MR activation rows. Each 32-weight slice
// of each weight row is decoded once per MR activation rows, and each activation vector
// loaded once serves NR weight rows, so the packed weights stream from DRAM once and x
// is re-read from cache only N/NR times (an [MR, K] slab of x does not fit in L1).

// Compile-time unrolled loops. Each SIMD region defines its own copy, since GCC inlines
// a callee only into a caller compiled for the same (or a wider) target.
#define FPBENCH_STATIC_FOR(name)                                                         \
  template <int... Is, class F>                                                          \
  __attribute__((always_inline)) inline void name(std::integer_sequence<int, Is...>, F&& f) { \
    (f(std::integral_constant<int, Is>{}), ...);                                         \
  }

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")

FPBENCH_STATIC_FOR(static_for)

struct Avx512Tables {
  __m512i fp6_pos, fp6_neg, int4;  // bf16 patterns: codes 0..31, 32..63, nibble (x2)
};

Avx512Tables make_avx512_tables(const float* fp6_table) {
  alignas(64) uint16_t pos[32], neg[32], i4[32];
  for (int c = 0; c < 32; ++c) {
    pos[c] = bf16_bits(fp6_table[c]);
    neg[c] = bf16_bits(fp6_table[32 + c]);
    i4[c] = bf16_bits(static_cast<float>((c & 15) - 8));  // bit 4 of the index is ignored
  }
  return {_mm512_load_si512(pos), _mm512_load_si512(neg), _mm512_load_si512(i4)};
}

// bf16 patterns of slice I (0..7) of the 256-weight block at (h4, l2), in lane order.
template <int I>
inline __m512i fp6_slice_bf16(const uint8_t* h4, const uint8_t* l2, const Avx512Tables& t) {
  constexpr int ip = I & 3;
  const __m512i h = _mm512_loadu_si512(h4 + (I / 4) * 64);
  const __m512i l = _mm512_loadu_si512(l2);
  // Nibble ip to bits 5..2 and 2-bit field I to bits 1..0; bits above 5 are junk that
  // the 64-entry lookup ignores.
  const __m512i hpart = ip == 0 ? _mm512_slli_epi16(h, 2) : _mm512_srli_epi16(h, 4 * ip - 2);
  const __m512i lpart = I == 0 ? l : _mm512_srli_epi16(l, 2 * I);
  // Bit select: bits 1..0 from lpart, the rest from hpart (imm 0xD8 = C ? B : A).
  const __m512i code = _mm512_ternarylogic_epi32(hpart, lpart, _mm512_set1_epi16(3), 0xD8);
  return _mm512_permutex2var_epi16(t.fp6_pos, code, t.fp6_neg);
}

template <int I>
inline __m512i int4_slice_bf16(const uint8_t* group, const Avx512Tables& t) {
  const __m512i h = _mm512_loadu_si512(group);
  return _mm512_permutexvar_epi16(I == 0 ? h : _mm512_srli_epi16(h, 4 * I), t.int4);  // index bits 4..0
}

// Lane-order bf16 -> fp32: even lanes are weights k..k+15, odd lanes k+16..k+31.
inline void bf16_lanes_to_ps(__m512i bf16, __m512& lo, __m512& hi) {
  lo = _mm512_castsi512_ps(_mm512_slli_epi32(bf16, 16));
  hi = _mm512_castsi512_ps(_mm512_maskz_mov_epi16(0xAAAAAAAAu, bf16));
}

// Software prefetch of the rows kPrefetchRows ahead, block by block: a row is only a
// few KiB, too short for the hardware prefetchers to ramp up on before it ends, and one
// core's DRAM bandwidth depends on having many misses in flight.
constexpr int64_t kPrefetchRows = 8;

inline void prefetch_line(const uint8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }

// Block b of the nr FP6 rows that start kPrefetchRows rows after h4 / l2.
inline void prefetch_fp6_block(const uint8_t* h4, const uint8_t* l2, int64_t Kp, int64_t b, int nr) {
  for (int r = 0; r < nr; ++r) {
    const uint8_t* ahead = h4 + (r + kPrefetchRows) * (Kp / 2) + b * 128;
    prefetch_line(ahead);
    prefetch_line(ahead + 64);
    prefetch_line(l2 + (r + kPrefetchRows) * lo2_row(Kp) + b * 64);
  }
}

// Calls tile(NR, MR, m0, n) for every NR x MR tile of rows [n0, n1) x [0, M); the row
// tail runs with NR = 1 and the batch tail with MR = M % MRmax. Rows go in chunks of
// about 256 KiB of packed weights, and each chunk meets every MR-row slab of x before
// the next chunk starts: the chunk then streams from DRAM once and stays in L2 while
// x is re-read from cache once per chunk (not once per NR rows).
template <int NR, int MRmax, class Tile>
inline void for_each_tile(int64_t M, int64_t n0, int64_t n1, int64_t row_bytes, Tile&& tile) {
  auto rows = [&](auto nr, int64_t m0, int64_t n) {
    if (M - m0 >= MRmax) return tile(nr, std::integral_constant<int, MRmax>{}, m0, n);
    const int64_t rest = M - m0;
    static_for(std::make_integer_sequence<int, MRmax>{}, [&](auto mr) {
      if constexpr (mr.value > 0) if (rest == mr.value) tile(nr, mr, m0, n);
    });
  };
  const int64_t chunk = std::max<int64_t>(NR, (256 * 1024 / std::max<int64_t>(row_bytes, 1)) / NR * NR);
  for (int64_t c0 = n0; c0 < n1; c0 += chunk) {
    const int64_t c1 = std::min(n1, c0 + chunk);
    for (int64_t m0 = 0; m0 < M; m0 += MRmax) {
      int64_t n = c0;
      for (; n + NR <= c1; n += NR) rows(std::integral_constant<int, NR>{}, m0, n);
      for (; n < c1; ++n) rows(std::integral_constant<int, 1>{}, m0, n);
    }
  }
}

// FP6, fp32 x: dots[r][m] = sum_k x[m, k] * fp6(code[n + r, k]) (scale not applied).
template <int NR, int MR>
inline void fp6_tile_f32(const float* x, int64_t ldx, const uint8_t* h4, const uint8_t* l2,
                         int64_t Kp, float (&dots)[NR][MR], const Avx512Tables& t, bool prefetch) {
  __m512 acc[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks_in(Kp); ++b) {
    const bool half_block = (b + 1) * kBlock > Kp;  // slices 4..7 absent
    if (prefetch) prefetch_fp6_block(h4, l2, Kp, b, NR);
    static_for(std::make_integer_sequence<int, 8>{}, [&](auto I) __attribute__((always_inline)) {
      if (I >= 4 && half_block) return;
      const int64_t k = b * kBlock + 32 * I;
      __m512 xa[MR], xb[MR];
      for (int m = 0; m < MR; ++m) {
        xa[m] = _mm512_loadu_ps(x + m * ldx + k);
        xb[m] = _mm512_loadu_ps(x + m * ldx + k + 16);
      }
      for (int r = 0; r < NR; ++r) {
        __m512 wa, wb;
        bf16_lanes_to_ps(fp6_slice_bf16<I>(h4 + r * (Kp / 2) + b * 128, l2 + r * lo2_row(Kp) + b * 64, t), wa, wb);
        for (int m = 0; m < MR; ++m) {
          acc[r][m] = _mm512_fmadd_ps(xa[m], wa, acc[r][m]);
          acc[r][m] = _mm512_fmadd_ps(xb[m], wb, acc[r][m]);
        }
      }
    });
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) dots[r][m] = _mm512_reduce_add_ps(acc[r][m]);
}

// INT4, fp32 x. For one or two rows of x each group's dot product runs first and its
// scale multiplies it (fewest operations per weight); for more rows, where a second
// set of accumulators would not fit in registers, the group scale multiplies the decoded
// weights instead (code * scale is the dequantized weight, one fp32 rounding exactly as
// in the simulator).
template <int NR, int MR>
inline void int4_tile_f32(const float* x, int64_t ldx, const uint8_t* row, const float* gs,
                          int64_t K, float (&dots)[NR][MR], const Avx512Tables& t, bool prefetch) {
  constexpr bool kScaleAfterGroup = MR <= 2;
  const int64_t groups = K / kInt4Group;
  // part_a / part_b: the two halves of each slice in separate chains (FMA latency).
  __m512 acc[NR][MR], part_a[NR][MR], part_b[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = part_a[r][m] = part_b[r][m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    if (prefetch)
      for (int r = 0; r < NR; ++r) prefetch_line(row + (r + kPrefetchRows) * (K / 2) + g * 64);
    static_for(std::make_integer_sequence<int, 4>{}, [&](auto I) __attribute__((always_inline)) {
      const int64_t k = g * kInt4Group + 32 * I;
      __m512 xa[MR], xb[MR];
      for (int m = 0; m < MR; ++m) {
        xa[m] = _mm512_loadu_ps(x + m * ldx + k);
        xb[m] = _mm512_loadu_ps(x + m * ldx + k + 16);
      }
      for (int r = 0; r < NR; ++r) {
        __m512 wa, wb;
        bf16_lanes_to_ps(int4_slice_bf16<I>(row + r * (K / 2) + g * 64, t), wa, wb);
        if constexpr (!kScaleAfterGroup) {
          const __m512 s = _mm512_set1_ps(gs[r * groups + g]);
          wa = _mm512_mul_ps(wa, s);
          wb = _mm512_mul_ps(wb, s);
        }
        __m512 (&sum_a)[NR][MR] = kScaleAfterGroup ? part_a : acc;
        __m512 (&sum_b)[NR][MR] = kScaleAfterGroup ? part_b : acc;
        for (int m = 0; m < MR; ++m) {
          sum_a[r][m] = _mm512_fmadd_ps(xa[m], wa, sum_a[r][m]);
          sum_b[r][m] = _mm512_fmadd_ps(xb[m], wb, sum_b[r][m]);
        }
      }
    });
    if constexpr (kScaleAfterGroup)
      for (int r = 0; r < NR; ++r) {
        const __m512 s = _mm512_set1_ps(gs[r * groups + g]);
        for (int m = 0; m < MR; ++m) {
          acc[r][m] = _mm512_fmadd_ps(_mm512_add_ps(part_a[r][m], part_b[r][m]), s, acc[r][m]);
          part_a[r][m] = part_b[r][m] = _mm512_setzero_ps();
        }
      }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) dots[r][m] = _mm512_reduce_add_ps(acc[r][m]);
}

constexpr int kNr = 4, kMr = 4;

// y[m0 + m, n + r] = dots[r][m], times scales[n + r] when given (FP6: the per-channel
// scale is applied once, after the dot product).
template <int NR, int MR>
inline void store_tile(const float (&dots)[NR][MR], float* y, int64_t ldy, int64_t m0, int64_t n,
                       const float* scales) {
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) y[(m0 + m) * ldy + n + r] = scales ? dots[r][m] * scales[n + r] : dots[r][m];
}

void fp6_rows_avx512(const float* x, int64_t ldx, int64_t M, const uint8_t* hi4,
                     const uint8_t* lo2, const float* scales, int64_t Kp, int64_t n0, int64_t n1,
                     float* y, int64_t ldy, const Avx512Tables& t) {
  for_each_tile<kNr, kMr>(M, n0, n1, Kp * 3 / 4, [&](auto nr, auto mr, int64_t m0, int64_t n) {
    float dots[nr.value][mr.value];
    fp6_tile_f32<nr.value, mr.value>(x + m0 * ldx, ldx, hi4 + n * (Kp / 2), lo2 + n * lo2_row(Kp), Kp, dots, t, m0 == 0);
    store_tile(dots, y, ldy, m0, n, scales);
  });
}

void int4_rows_avx512(const float* x, int64_t ldx, int64_t M, const uint8_t* packed,
                      const float* scales, int64_t K, int64_t n0, int64_t n1, float* y,
                      int64_t ldy, const Avx512Tables& t) {
  const int64_t groups = K / kInt4Group;
  for_each_tile<kNr, kMr>(M, n0, n1, K / 2, [&](auto nr, auto mr, int64_t m0, int64_t n) {
    float dots[nr.value][mr.value];
    int4_tile_f32<nr.value, mr.value>(x + m0 * ldx, ldx, packed + n * (K / 2), scales + n * groups, K, dots, t, m0 == 0);
    store_tile(dots, y, ldy, m0, n, nullptr);
  });
}

void fp6_dequant_row_avx512(const uint8_t* h4, const uint8_t* l2, float scale, int64_t Kp,
                            float* out, const Avx512Tables& t) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t b = 0; b < blocks_in(Kp); ++b) {
    const bool half_block = (b + 1) * kBlock > Kp;  // slices 4..7 absent
    static_for(std::make_integer_sequence<int, 8>{}, [&](auto I) __attribute__((always_inline)) {
      if (I >= 4 && half_block) return;
      __m512 wa, wb;
      bf16_lanes_to_ps(fp6_slice_bf16<I>(h4 + b * 128, l2 + b * 64, t), wa, wb);
      _mm512_storeu_ps(out + b * kBlock + 32 * I, _mm512_mul_ps(wa, s));
      _mm512_storeu_ps(out + b * kBlock + 32 * I + 16, _mm512_mul_ps(wb, s));
    });
  }
}

// Unscaled bf16 weights (exact E3M2 values) in natural k order, for the bf16 GEMM path.
void fp6_codes_row_bf16_avx512(const uint8_t* h4, const uint8_t* l2, int64_t Kp, uint16_t* out,
                               const Avx512Tables& t) {
  alignas(64) uint16_t to_natural[32];
  for (int p = 0; p < 32; ++p) to_natural[p] = static_cast<uint16_t>(p < 16 ? 2 * p : 2 * (p - 16) + 1);
  const __m512i order = _mm512_load_si512(to_natural);
  for (int64_t b = 0; b < blocks_in(Kp); ++b) {
    const bool half_block = (b + 1) * kBlock > Kp;  // slices 4..7 absent
    static_for(std::make_integer_sequence<int, 8>{}, [&](auto I) __attribute__((always_inline)) {
      if (I >= 4 && half_block) return;
      const __m512i lanes = fp6_slice_bf16<I>(h4 + b * 128, l2 + b * 64, t);
      _mm512_storeu_si512(out + b * kBlock + 32 * I, _mm512_permutexvar_epi16(order, lanes));
    });
  }
}

inline uint16_t bf16_round(float value) {  // round to nearest even; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// out[n] = bf16 d[n] * scale[n] in fp32, stored as fp32 (yf) or rounded to bf16 (yb).
void scale_row_avx512(const uint16_t* d, const float* scales, int64_t N, uint16_t* yb, float* yf) {
  int64_t n = 0;
  for (; n + 16 <= N; n += 16) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + n));
    const __m512 v = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)),
                                   _mm512_loadu_ps(scales + n));
    if (yf) {
      _mm512_storeu_ps(yf + n, v);
      continue;
    }
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i high = _mm512_srli_epi32(bits, 16);
    const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(high, _mm512_set1_epi32(1)));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(high, _mm512_set1_epi32(0x40)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(yb + n), _mm512_cvtepi32_epi16(rounded));
  }
  for (; n < N; ++n) {
    uint32_t bits = static_cast<uint32_t>(d[n]) << 16;
    float v;
    std::memcpy(&v, &bits, 4);
    v *= scales[n];
    if (yf) yf[n] = v;
    else yb[n] = bf16_round(v);
  }
}

void int4_dequant_row_avx512(const uint8_t* row, const float* gscales, int64_t K, float* out,
                             const Avx512Tables& t) {
  for (int64_t g = 0; g < K / kInt4Group; ++g) {
    const __m512 s = _mm512_set1_ps(gscales[g]);
    static_for(std::make_integer_sequence<int, 4>{}, [&](auto I) __attribute__((always_inline)) {
      __m512 wa, wb;
      bf16_lanes_to_ps(int4_slice_bf16<I>(row + g * 64, t), wa, wb);
      _mm512_storeu_ps(out + g * kInt4Group + 32 * I, _mm512_mul_ps(wa, s));
      _mm512_storeu_ps(out + g * kInt4Group + 32 * I + 16, _mm512_mul_ps(wb, s));
    });
  }
}

#pragma GCC pop_options

// ---------------------------------------------------------------- AVX-512 BF16
//
// bf16 activations: the decoded bf16 weights meet x directly in vdpbf16ps, which adds
// the two products of each lane pair into an fp32 accumulator (products of two bf16
// values are exact in fp32). The pairs need not be adjacent k: lane j of the weights
// holds position kmap(j), so x is permuted the same way (one vpermw per 32 values of
// x, shared by NR weight rows). vdpbf16ps reads bf16 denormal inputs as zero; no E3M2
// value is a bf16 denormal (the smallest is 2^-4), so only x values below 2^-126 in
// magnitude are affected. The fp32 scale multiplies the finished dot product.

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")

FPBENCH_STATIC_FOR(static_for_bf16)

inline __m512i x_lane_perm() {
  alignas(64) uint16_t lane_pos[32];
  for (int j = 0; j < 32; ++j) lane_pos[j] = static_cast<uint16_t>(kmap(j));
  return _mm512_load_si512(lane_pos);
}

inline __m512 dot_bf16(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh&>(a), reinterpret_cast<__m512bh&>(b));
}

template <int NR, int MR>
inline void fp6_tile_bf16(const uint16_t* x, int64_t ldx, const uint8_t* h4, const uint8_t* l2,
                          int64_t Kp, float (&dots)[NR][MR], const Avx512Tables& t, bool prefetch) {
  const __m512i perm = x_lane_perm();
  __m512 acc[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks_in(Kp); ++b) {
    const bool half_block = (b + 1) * kBlock > Kp;  // slices 4..7 absent
    if (prefetch) prefetch_fp6_block(h4, l2, Kp, b, NR);
    static_for_bf16(std::make_integer_sequence<int, 8>{}, [&](auto I) __attribute__((always_inline)) {
      if (I >= 4 && half_block) return;
      const int64_t k = b * kBlock + 32 * I;
      __m512i xv[MR];
      for (int m = 0; m < MR; ++m) xv[m] = _mm512_permutexvar_epi16(perm, _mm512_loadu_si512(x + m * ldx + k));
      for (int r = 0; r < NR; ++r) {
        const __m512i w = fp6_slice_bf16<I>(h4 + r * (Kp / 2) + b * 128, l2 + r * lo2_row(Kp) + b * 64, t);
        for (int m = 0; m < MR; ++m) acc[r][m] = dot_bf16(acc[r][m], w, xv[m]);
      }
    });
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) dots[r][m] = _mm512_reduce_add_ps(acc[r][m]);
}

// INT4 with bf16 x: code * scale is not exact in bf16, so each group's dot product of
// bf16 codes runs first and the fp32 group scale multiplies it (as in the fp32 AVX2 path).
template <int NR, int MR>
inline void int4_tile_bf16(const uint16_t* x, int64_t ldx, const uint8_t* row, const float* gs,
                           int64_t K, float (&dots)[NR][MR], const Avx512Tables& t, bool prefetch) {
  const __m512i perm = x_lane_perm();
  const int64_t groups = K / kInt4Group;
  __m512 acc[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    if (prefetch)
      for (int r = 0; r < NR; ++r) prefetch_line(row + (r + kPrefetchRows) * (K / 2) + g * 64);
    __m512 part[NR][MR];
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MR; ++m) part[r][m] = _mm512_setzero_ps();
    static_for_bf16(std::make_integer_sequence<int, 4>{}, [&](auto I) __attribute__((always_inline)) {
      const int64_t k = g * kInt4Group + 32 * I;
      __m512i xv[MR];
      for (int m = 0; m < MR; ++m) xv[m] = _mm512_permutexvar_epi16(perm, _mm512_loadu_si512(x + m * ldx + k));
      for (int r = 0; r < NR; ++r) {
        const __m512i w = int4_slice_bf16<I>(row + r * (K / 2) + g * 64, t);
        for (int m = 0; m < MR; ++m) part[r][m] = dot_bf16(part[r][m], w, xv[m]);
      }
    });
    for (int r = 0; r < NR; ++r) {
      const __m512 s = _mm512_set1_ps(gs[r * groups + g]);
      for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_fmadd_ps(part[r][m], s, acc[r][m]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) dots[r][m] = _mm512_reduce_add_ps(acc[r][m]);
}

void fp6_rows_bf16(const uint16_t* x, int64_t ldx, int64_t M, const uint8_t* hi4,
                   const uint8_t* lo2, const float* scales, int64_t Kp, int64_t n0, int64_t n1,
                   float* y, int64_t ldy, const Avx512Tables& t) {
  for_each_tile<kNr, kMr>(M, n0, n1, Kp * 3 / 4, [&](auto nr, auto mr, int64_t m0, int64_t n) {
    float dots[nr.value][mr.value];
    fp6_tile_bf16<nr.value, mr.value>(x + m0 * ldx, ldx, hi4 + n * (Kp / 2), lo2 + n * lo2_row(Kp), Kp, dots, t, m0 == 0);
    store_tile(dots, y, ldy, m0, n, scales);
  });
}

// Two weight rows: part and acc tiles both live in registers.
void int4_rows_bf16(const uint16_t* x, int64_t ldx, int64_t M, const uint8_t* packed,
                    const float* scales, int64_t K, int64_t n0, int64_t n1, float* y,
                    int64_t ldy, const Avx512Tables& t) {
  const int64_t groups = K / kInt4Group;
  for_each_tile<2, kMr>(M, n0, n1, K / 2, [&](auto nr, auto mr, int64_t m0, int64_t n) {
    float dots[nr.value][mr.value];
    int4_tile_bf16<nr.value, mr.value>(x + m0 * ldx, ldx, packed + n * (K / 2), scales + n * groups, K, dots, t, m0 == 0);
    store_tile(dots, y, ldy, m0, n, nullptr);
  });
}

#pragma GCC pop_options

// ---------------------------------------------------------------- AVX2 (+ FMA, F16C)
//
// No 16-bit table lookup here, so the FP6 code is moved into an fp16 bit pattern
// (sign -> bit 15, exponent -> bits 12..10, mantissa -> bits 9..8). That pattern is the
// E3M2 value times 2^-12 for normal and subnormal codes alike (both formats put their
// subnormals at exponent field 0), and F16C widens it to fp32 exactly; the 2^12 goes
// into the scale. The lanes come out in packed order (32*i + kmap(j)), so the caller
// passes x with its columns permuted the same way (see x_lane_order).

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

template <int S>
inline __m256i shift16(__m256i v) {  // left for S > 0, right for S < 0
  if constexpr (S > 0) return _mm256_slli_epi16(v, S);
  else if constexpr (S < 0) return _mm256_srli_epi16(v, -S);
  else return v;
}

template <int I>
inline __m256i fp6_half_avx2(__m256i h, __m256i l) {
  constexpr int ip = I & 3;
  __m256i sign = _mm256_and_si256(shift16<12 - 4 * ip>(h), _mm256_set1_epi16(int16_t(0x8000)));
  __m256i expo = _mm256_and_si256(shift16<10 - 4 * ip>(h), _mm256_set1_epi16(0x1C00));
  __m256i mant = _mm256_and_si256(shift16<8 - 2 * I>(l), _mm256_set1_epi16(0x0300));
  return _mm256_or_si256(_mm256_or_si256(sign, expo), mant);
}

inline void halves_to_ps(__m256i half, __m256& a, __m256& b) {
  a = _mm256_cvtph_ps(_mm256_castsi256_si128(half));
  b = _mm256_cvtph_ps(_mm256_extracti128_si256(half, 1));
}

// One block (256 weights) of one row against MR permuted x rows.
template <int MR, int I>
inline void fp6_slice_avx2(const float* xp, int64_t ldx, const uint8_t* h4, const uint8_t* l2,
                           int64_t b, __m256 (&acc)[MR][2]) {
  for (int half = 0; half < 2; ++half) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h4 + b * 128 + (I / 4) * 64 + half * 32));
    __m256i l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(l2 + b * 64 + half * 32));
    __m256 wa, wb;
    halves_to_ps(fp6_half_avx2<I>(h, l), wa, wb);
    const int64_t k = b * kBlock + 32 * I + 16 * half;
    for (int m = 0; m < MR; ++m) {
      acc[m][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xp + m * ldx + k), wa, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xp + m * ldx + k + 8), wb, acc[m][1]);
    }
  }
}

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

template <int MR>
void fp6_rows_avx2_mr(const float* xp, int64_t ldx, const uint8_t* h4, const uint8_t* l2,
                      int64_t Kp, float* out) {
  __m256 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks_in(Kp); ++b) {
    const bool half_block = (b + 1) * kBlock > Kp;  // slices 4..7 absent
    fp6_slice_avx2<MR, 0>(xp, ldx, h4, l2, b, acc);
    fp6_slice_avx2<MR, 1>(xp, ldx, h4, l2, b, acc);
    fp6_slice_avx2<MR, 2>(xp, ldx, h4, l2, b, acc);
    fp6_slice_avx2<MR, 3>(xp, ldx, h4, l2, b, acc);
    if (half_block) break;  // the last block
    fp6_slice_avx2<MR, 4>(xp, ldx, h4, l2, b, acc);
    fp6_slice_avx2<MR, 5>(xp, ldx, h4, l2, b, acc);
    fp6_slice_avx2<MR, 6>(xp, ldx, h4, l2, b, acc);
    fp6_slice_avx2<MR, 7>(xp, ldx, h4, l2, b, acc);
  }
  for (int m = 0; m < MR; ++m) out[m] = hsum256(_mm256_add_ps(acc[m][0], acc[m][1]));
}

void fp6_rows_avx2(const float* xp, int64_t ldx, int64_t M, const uint8_t* hi4,
                   const uint8_t* lo2, const float* scales, int64_t Kp, int64_t n0, int64_t n1,
                   float* y, int64_t ldy) {
  float dots[kRowsPerPass];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* h4 = hi4 + n * Kp / 2;
    const uint8_t* l2 = lo2 + n * lo2_row(Kp);
    const float scale = scales[n] * 4096.0f;  // undo the 2^-12 of the fp16 pattern (exact)
    for (int64_t m0 = 0; m0 < M; m0 += kRowsPerPass) {
      const int64_t rows = std::min<int64_t>(kRowsPerPass, M - m0);
      const float* xm = xp + m0 * ldx;
      switch (rows) {
        case 4: fp6_rows_avx2_mr<4>(xm, ldx, h4, l2, Kp, dots); break;
        case 3: fp6_rows_avx2_mr<3>(xm, ldx, h4, l2, Kp, dots); break;
        case 2: fp6_rows_avx2_mr<2>(xm, ldx, h4, l2, Kp, dots); break;
        default: fp6_rows_avx2_mr<1>(xm, ldx, h4, l2, Kp, dots); break;
      }
      for (int64_t r = 0; r < rows; ++r) y[(m0 + r) * ldy + n] = dots[r] * scale;
    }
  }
}

template <int I>
inline __m256i int4_half_avx2(__m256i h) {  // nibble I as int16 in 0..15
  return _mm256_and_si256(shift16<-4 * I>(h), _mm256_set1_epi16(15));
}

inline void int16_to_ps(__m256i v, __m256& a, __m256& b) {
  const __m256i eight = _mm256_set1_epi32(8);
  a = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(v)), eight));
  b = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(v, 1)), eight));
}

template <int MR, int I>
inline void int4_slice_avx2(const float* xp, int64_t ldx, const uint8_t* row, int64_t g,
                            __m256 (&part)[MR][2]) {
  for (int half = 0; half < 2; ++half) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + g * 64 + half * 32));
    __m256 wa, wb;
    int16_to_ps(int4_half_avx2<I>(h), wa, wb);
    const int64_t k = g * kInt4Group + 32 * I + 16 * half;
    for (int m = 0; m < MR; ++m) {
      part[m][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xp + m * ldx + k), wa, part[m][0]);
      part[m][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xp + m * ldx + k + 8), wb, part[m][1]);
    }
  }
}

template <int MR>
void int4_rows_avx2_mr(const float* xp, int64_t ldx, const uint8_t* row, const float* gs,
                       int64_t K, float* out) {
  __m256 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < K / kInt4Group; ++g) {
    __m256 part[MR][2];
    for (int m = 0; m < MR; ++m) part[m][0] = part[m][1] = _mm256_setzero_ps();
    int4_slice_avx2<MR, 0>(xp, ldx, row, g, part);
    int4_slice_avx2<MR, 1>(xp, ldx, row, g, part);
    int4_slice_avx2<MR, 2>(xp, ldx, row, g, part);
    int4_slice_avx2<MR, 3>(xp, ldx, row, g, part);
    const __m256 s = _mm256_set1_ps(gs[g]);
    for (int m = 0; m < MR; ++m) {
      acc[m][0] = _mm256_fmadd_ps(part[m][0], s, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(part[m][1], s, acc[m][1]);
    }
  }
  for (int m = 0; m < MR; ++m) out[m] = hsum256(_mm256_add_ps(acc[m][0], acc[m][1]));
}

void int4_rows_avx2(const float* xp, int64_t ldx, int64_t M, const uint8_t* packed,
                    const float* scales, int64_t K, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  float dots[kRowsPerPass];
  const int64_t groups = K / kInt4Group;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = packed + n * K / 2;
    for (int64_t m0 = 0; m0 < M; m0 += kRowsPerPass) {
      const int64_t rows = std::min<int64_t>(kRowsPerPass, M - m0);
      const float* xm = xp + m0 * ldx;
      switch (rows) {
        case 4: int4_rows_avx2_mr<4>(xm, ldx, row, scales + n * groups, K, dots); break;
        case 3: int4_rows_avx2_mr<3>(xm, ldx, row, scales + n * groups, K, dots); break;
        case 2: int4_rows_avx2_mr<2>(xm, ldx, row, scales + n * groups, K, dots); break;
        default: int4_rows_avx2_mr<1>(xm, ldx, row, scales + n * groups, K, dots); break;
      }
      for (int64_t r = 0; r < rows; ++r) y[(m0 + r) * ldy + n] = dots[r];
    }
  }
}

// Dequantize one row in natural k order (the vector decode, then the lane permutation).
void fp6_dequant_row_avx2(const uint8_t* h4, const uint8_t* l2, float scale, int64_t Kp, float* out) {
  alignas(32) float lanes[32];
  const float s = scale * 4096.0f;
  for (int64_t b = 0; b < blocks_in(Kp); ++b) {
    const bool half_block = (b + 1) * kBlock > Kp;  // slices 4..7 absent
    for (int i = 0; i < (half_block ? 4 : 8); ++i) {
      for (int half = 0; half < 2; ++half) {
        __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h4 + b * 128 + (i / 4) * 64 + half * 32));
        __m256i l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(l2 + b * 64 + half * 32));
        __m256i bits;
        switch (i) {
          case 0: bits = fp6_half_avx2<0>(h, l); break;
          case 1: bits = fp6_half_avx2<1>(h, l); break;
          case 2: bits = fp6_half_avx2<2>(h, l); break;
          case 3: bits = fp6_half_avx2<3>(h, l); break;
          case 4: bits = fp6_half_avx2<4>(h, l); break;
          case 5: bits = fp6_half_avx2<5>(h, l); break;
          case 6: bits = fp6_half_avx2<6>(h, l); break;
          default: bits = fp6_half_avx2<7>(h, l); break;
        }
        __m256 wa, wb;
        halves_to_ps(bits, wa, wb);
        // (v * 2^-12) * (scale * 2^12): one rounding, the same as v * scale.
        _mm256_storeu_ps(lanes + 16 * half, _mm256_mul_ps(wa, _mm256_set1_ps(s)));
        _mm256_storeu_ps(lanes + 16 * half + 8, _mm256_mul_ps(wb, _mm256_set1_ps(s)));
      }
      for (int j = 0; j < 32; ++j) out[b * kBlock + 32 * i + kmap(j)] = lanes[j];
    }
  }
}

#pragma GCC pop_options

// ---------------------------------------------------------------- dispatch

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3 };

Isa best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    return __builtin_cpu_supports("avx512bf16") ? Isa::Avx512Bf16 : Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::Avx2;
  return Isa::Scalar;
}

Isa resolve_isa(const std::string& name) {
  const Isa best = best_isa();
  Isa want = best;
  if (name == "avx512_bf16") want = Isa::Avx512Bf16;
  else if (name == "avx512") want = Isa::Avx512;
  else if (name == "avx2") want = Isa::Avx2;
  else if (name == "scalar") want = Isa::Scalar;
  else TORCH_CHECK(name == "auto", "isa must be auto|avx512_bf16|avx512|avx2|scalar, got ", name);
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(best), "this CPU does not support isa=", name);
  return want;
}

std::string isa_name(Isa isa) {
  return isa == Isa::Avx512Bf16 ? "avx512_bf16" : isa == Isa::Avx512 ? "avx512" : isa == Isa::Avx2 ? "avx2" : "scalar";
}

inline bool has_avx512(Isa isa) { return isa >= Isa::Avx512; }

const float* fp6_float_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(64);
    for (int c = 0; c < 64; ++c) t[c] = fp6_value(c);
    return t;
  }();
  return table.data();
}

const Avx512Tables& avx512_tables() {
  static const Avx512Tables tables = make_avx512_tables(fp6_float_table());
  return tables;
}

// Rows [0, N) in chunks handed out one at a time to the threads: a thread that the OS
// delays (another process on the core) takes fewer chunks instead of holding up the
// call. Chunks are whole register tiles and large enough to keep the prefetchers
// streaming.
template <class Body>
void parallel_rows(int64_t N, Body body) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || N <= 64 || at::in_parallel_region()) {
    body(0, N);
    return;
  }
  const int64_t chunk = std::max<int64_t>(32, (N / (8 * threads) + kNr - 1) / kNr * kNr);
  const int64_t chunks = (N + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1))
      body(c * chunk, std::min(N, (c + 1) * chunk));
  });
}

// Column order of x that the AVX2 kernels consume: within each 32 columns, lane j holds
// column kmap(j).
at::Tensor x_lane_order(const at::Tensor& x) {
  const int64_t K = x.size(1);
  std::vector<int64_t> order(K);
  for (int64_t c = 0; c < K / 32; ++c)
    for (int j = 0; j < 32; ++j) order[c * 32 + j] = c * 32 + kmap(j);
  return x.index_select(1, torch::tensor(order, torch::kLong)).contiguous();
}

void check_fp6_args(const at::Tensor& hi4, const at::Tensor& lo2, const at::Tensor& scales) {
  TORCH_CHECK(hi4.dtype() == torch::kUInt8 && lo2.dtype() == torch::kUInt8, "packed arrays must be uint8");
  TORCH_CHECK(hi4.is_contiguous() && lo2.is_contiguous(), "packed arrays must be contiguous");
  TORCH_CHECK(hi4.dim() == 2 && lo2.dim() == 2 && hi4.size(0) == lo2.size(0), "packed arrays must be [N, *]");
  TORCH_CHECK(hi4.size(1) % (kGranule / 2) == 0 && lo2.size(1) == lo2_row(hi4.size(1) * 2),
              "packed_hi4 must be [N, Kp/2] and packed_lo2 [N, 64 * ceil(Kp/256)] with Kp a multiple of 128");
  TORCH_CHECK(scales.dtype() == torch::kFloat32 && scales.is_contiguous() && scales.numel() == hi4.size(0),
              "scales must be contiguous float32 with one value per output channel");
}

void check_int4_args(const at::Tensor& packed, const at::Tensor& scales) {
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.is_contiguous() && packed.dim() == 2, "packed must be contiguous uint8 [N, K/2]");
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(K % kInt4Group == 0, "INT4 K must be a multiple of 128");
  TORCH_CHECK(scales.dtype() == torch::kFloat32 && scales.is_contiguous() && scales.numel() == N * (K / kInt4Group),
              "scales must be contiguous float32 [N, K/128]");
}

// x [M, K] -> contiguous [M, Kp] of the same dtype, zero columns where the packed row is padded.
at::Tensor padded_input(const at::Tensor& x, int64_t Kp) {
  TORCH_CHECK(x.dim() == 2, "x must be a 2-D tensor");
  TORCH_CHECK(x.size(1) <= Kp, "x has more columns than the packed weight");
  at::Tensor xc = x.contiguous();
  if (xc.size(1) < Kp) xc = at::constant_pad_nd(xc, {0, Kp - xc.size(1)}, 0.0);
  return xc;
}

void fp6_dequant_row(Isa isa, const uint8_t* h, const uint8_t* l, float scale, int64_t Kp, float* out) {
  if (has_avx512(isa)) fp6_dequant_row_avx512(h, l, scale, Kp, out, avx512_tables());
  else if (isa == Isa::Avx2) fp6_dequant_row_avx2(h, l, scale, Kp, out);
  else fp6_dequant_row_scalar(h, l, scale, Kp, fp6_float_table(), out);
}

void int4_dequant_row(Isa isa, const uint8_t* p, const float* gs, int64_t K, float* out) {
  if (has_avx512(isa)) int4_dequant_row_avx512(p, gs, K, out, avx512_tables());
  else int4_dequant_row_scalar(p, gs, K, out);
}

at::Tensor fp6_dequantize(const at::Tensor& hi4, const at::Tensor& lo2, const at::Tensor& scales,
                          int64_t K, const std::string& isa_str) {
  check_fp6_args(hi4, lo2, scales);
  const Isa isa = resolve_isa(isa_str);
  const int64_t N = hi4.size(0), Kp = hi4.size(1) * 2;
  at::Tensor out = at::empty({N, Kp}, hi4.options().dtype(torch::kFloat32));
  const uint8_t* h = hi4.data_ptr<uint8_t>();
  const uint8_t* l = lo2.data_ptr<uint8_t>();
  const float* s = scales.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) fp6_dequant_row(isa, h + n * Kp / 2, l + n * lo2_row(Kp), s[n], Kp, o + n * Kp);
  });
  return out.narrow(1, 0, K).contiguous();
}

at::Tensor int4_dequantize(const at::Tensor& packed, const at::Tensor& scales, const std::string& isa_str) {
  check_int4_args(packed, scales);
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  const Isa isa = resolve_isa(isa_str);
  at::Tensor out = at::empty({N, K}, packed.options().dtype(torch::kFloat32));
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* s = scales.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) int4_dequant_row(isa, p + n * K / 2, s + n * (K / kInt4Group), K, o + n * K);
  });
  return out;
}

// Large M: the work is compute-bound, so dequantize tiles of rows (exactly, scale
// included) into a per-thread buffer and let torch's dense GEMM do the multiply.
template <typename DequantRow>
at::Tensor tiled_gemm(const at::Tensor& xc, int64_t N, int64_t Kw, DequantRow dequant_row) {
  const int64_t M = xc.size(0);
  constexpr int64_t kTile = 64;
  at::Tensor y = at::empty({M, N}, xc.options());
  at::parallel_for(0, (N + kTile - 1) / kTile, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor tile = at::empty({kTile, Kw}, xc.options());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kTile, rows = std::min(kTile, N - n0);
      for (int64_t r = 0; r < rows; ++r) dequant_row(n0 + r, tile.data_ptr<float>() + r * Kw);
      y.narrow(1, n0, rows).copy_(at::mm(xc, tile.narrow(0, 0, rows).t()));
    }
  });
  return y;
}

at::Tensor fp6_linear(const at::Tensor& x, const at::Tensor& hi4, const at::Tensor& lo2,
                      const at::Tensor& scales, int64_t gemm_min_m, const std::string& isa_str) {
  check_fp6_args(hi4, lo2, scales);
  TORCH_CHECK(x.dtype() == torch::kFloat32, "fp6_linear needs float32 x (fp6_linear_bf16 takes bfloat16)");
  const Isa isa = resolve_isa(isa_str);
  const int64_t N = hi4.size(0), Kp = hi4.size(1) * 2;
  at::Tensor xc = padded_input(x, Kp);
  const int64_t M = xc.size(0);
  const uint8_t* h = hi4.data_ptr<uint8_t>();
  const uint8_t* l = lo2.data_ptr<uint8_t>();
  const float* s = scales.data_ptr<float>();
  if (M >= gemm_min_m) {
    return tiled_gemm(xc, N, Kp, [&](int64_t n, float* out) {
      fp6_dequant_row(isa, h + n * Kp / 2, l + n * lo2_row(Kp), s[n], Kp, out);
    });
  }
  at::Tensor y = at::empty({M, N}, xc.options());
  if (isa == Isa::Avx2) xc = x_lane_order(xc);
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Small M streams the packed weights once.
  parallel_rows(N, [&](int64_t n0, int64_t n1) {
    if (has_avx512(isa)) fp6_rows_avx512(xp, Kp, M, h, l, s, Kp, n0, n1, yp, N, avx512_tables());
    else if (isa == Isa::Avx2) fp6_rows_avx2(xp, Kp, M, h, l, s, Kp, n0, n1, yp, N);
    else fp6_rows_scalar(xp, Kp, M, h, l, s, Kp, n0, n1, yp, N, fp6_float_table());
  });
  return y;
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       int64_t gemm_min_m, const std::string& isa_str) {
  check_int4_args(packed, scales);
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.dtype() == torch::kFloat32, "x must be float32 [M, K]");
  const Isa isa = resolve_isa(isa_str);
  at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0);
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* s = scales.data_ptr<float>();
  const int64_t groups = K / kInt4Group;
  if (M >= gemm_min_m) {
    return tiled_gemm(xc, N, K, [&](int64_t n, float* out) { int4_dequant_row(isa, p + n * K / 2, s + n * groups, K, out); });
  }
  at::Tensor y = at::empty({M, N}, xc.options());
  if (isa == Isa::Avx2) xc = x_lane_order(xc);
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  parallel_rows(N, [&](int64_t n0, int64_t n1) {
    if (has_avx512(isa)) int4_rows_avx512(xp, K, M, p, s, K, n0, n1, yp, N, avx512_tables());
    else if (isa == Isa::Avx2) int4_rows_avx2(xp, K, M, p, s, K, n0, n1, yp, N);
    else int4_rows_scalar(xp, K, M, p, s, K, n0, n1, yp, N);
  });
  return y;
}

// y[m, col0 + n] = d[m, n] * scale[n] for bf16 d, computed in fp32 and rounded once (to
// nearest even, as torch's .to(bfloat16)) when y is bf16.
void scale_columns(const at::Tensor& d, const float* scales, at::Tensor& y, int64_t col0) {
  const int64_t M = d.size(0), N = d.size(1), ldy = y.size(1);
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(d.data_ptr<at::BFloat16>());
  const bool to_bf16 = y.scalar_type() == torch::kBFloat16;
  uint16_t* yb = to_bf16 ? reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()) : nullptr;
  float* yf = to_bf16 ? nullptr : y.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      scale_row_avx512(dp + m * N, scales, N, to_bf16 ? yb + m * ldy + col0 : nullptr,
                       to_bf16 ? nullptr : yf + m * ldy + col0);
  });
}

at::Tensor finish(const at::Tensor& y, bool fp32_out) { return fp32_out ? y : y.to(torch::kBFloat16); }

// bf16 x. With AVX512_BF16: small M on vdpbf16ps; large M (FP6) dequantizes tiles of
// unscaled bf16 weights (exact), multiplies them on torch's bf16 GEMM and applies the
// fp32 scale to its output (the GEMM rounds its fp32 sums to bf16 once before that).
// Without AVX512_BF16 (or when a narrower ISA is forced), x is widened to fp32 exactly
// and the fp32 kernels run. The result is fp32 when fp32_out, else bf16.
at::Tensor fp6_linear_bf16(const at::Tensor& x, const at::Tensor& hi4, const at::Tensor& lo2,
                           const at::Tensor& scales, int64_t gemm_min_m, const std::string& isa_str,
                           bool fp32_out) {
  check_fp6_args(hi4, lo2, scales);
  TORCH_CHECK(x.dim() == 2 && x.dtype() == torch::kBFloat16, "fp6_linear_bf16 needs bfloat16 x [M, K]");
  const Isa isa = resolve_isa(isa_str);
  if (isa != Isa::Avx512Bf16) return finish(fp6_linear(x.to(torch::kFloat32), hi4, lo2, scales, gemm_min_m, isa_str), fp32_out);
  const int64_t N = hi4.size(0), Kp = hi4.size(1) * 2;
  at::Tensor xc = padded_input(x, Kp);
  const int64_t M = xc.size(0);
  const uint8_t* h = hi4.data_ptr<uint8_t>();
  const uint8_t* l = lo2.data_ptr<uint8_t>();
  const float* s = scales.data_ptr<float>();
  if (M >= gemm_min_m) {
    // One parallel region (on a shared machine each region can wait a scheduler time
    // slice for its slowest thread): each thread dequantizes tiles of kGemmTileRows rows
    // (2 MiB at K = 4096, so they stay in cache), multiplies each on torch's bf16 GEMM
    // (single-threaded inside the region) and scales its output columns. The buffers are
    // kept between calls: fresh ones would be page-faulted in on every call.
    constexpr int64_t kGemmTileRows = 256;
    at::Tensor y = at::empty({M, N}, x.options().dtype(fp32_out ? torch::kFloat32 : torch::kBFloat16));
    at::parallel_for(0, (N + kGemmTileRows - 1) / kGemmTileRows, 1, [&](int64_t t0, int64_t t1) {
      thread_local at::Tensor weight_scratch, dot_scratch;
      if (!weight_scratch.defined() || weight_scratch.numel() < kGemmTileRows * Kp)
        weight_scratch = at::empty({kGemmTileRows * Kp}, xc.options());
      if (!dot_scratch.defined() || dot_scratch.numel() < M * kGemmTileRows)
        dot_scratch = at::empty({M * kGemmTileRows}, xc.options());
      uint16_t* wp = reinterpret_cast<uint16_t*>(weight_scratch.data_ptr<at::BFloat16>());
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * kGemmTileRows, rows = std::min(kGemmTileRows, N - n0);
        for (int64_t r = 0; r < rows; ++r)
          fp6_codes_row_bf16_avx512(h + (n0 + r) * Kp / 2, l + (n0 + r) * lo2_row(Kp), Kp, wp + r * Kp,
                                    avx512_tables());
        at::Tensor dots = dot_scratch.narrow(0, 0, M * rows).view({M, rows});
        at::mm_out(dots, xc, weight_scratch.narrow(0, 0, rows * Kp).view({rows, Kp}).t());
        scale_columns(dots, s + n0, y, n0);
      }
    });
    return y;
  }
  at::Tensor y = at::empty({M, N}, x.options().dtype(torch::kFloat32));
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  parallel_rows(N, [&](int64_t n0, int64_t n1) { fp6_rows_bf16(xp, Kp, M, h, l, s, Kp, n0, n1, yp, N, avx512_tables()); });
  return finish(y, fp32_out);
}

// INT4 with bf16 x: vdpbf16ps at every M (code * group scale is not exact in bf16, so
// no bf16 GEMM of dequantized weights); without AVX512_BF16 the fp32 path.
at::Tensor int4_linear_bf16(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                            int64_t gemm_min_m, const std::string& isa_str, bool fp32_out) {
  check_int4_args(packed, scales);
  TORCH_CHECK(x.dim() == 2 && x.dtype() == torch::kBFloat16, "int4_linear_bf16 needs bfloat16 x [M, K]");
  const Isa isa = resolve_isa(isa_str);
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(x.size(1) == K, "x must have K = ", K, " columns");
  const int64_t M = x.size(0);
  if (isa != Isa::Avx512Bf16)
    return finish(int4_linear(x.to(torch::kFloat32), packed, scales, gemm_min_m, isa_str), fp32_out);
  at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({M, N}, x.options().dtype(torch::kFloat32));
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* s = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  parallel_rows(N, [&](int64_t n0, int64_t n1) { int4_rows_bf16(xp, K, M, p, s, K, n0, n1, yp, N, avx512_tables()); });
  return finish(y, fp32_out);
}

// Streaming read of a large buffer by all threads: the bandwidth roofline. An integer
// XOR reduction vectorises without fast-math, so the loads, not the adds, set the pace.
double stream_read_gbps(const at::Tensor& buffer, int64_t repeats) {
  TORCH_CHECK(buffer.dtype() == torch::kInt64 && buffer.is_contiguous(), "buffer must be contiguous int64");
  const uint64_t* b = reinterpret_cast<const uint64_t*>(buffer.data_ptr<int64_t>());
  const int64_t n = buffer.numel();
  double best = 0.0;
  std::vector<uint64_t> sinks(at::get_num_threads() * 8, 0);
  for (int64_t r = 0; r < repeats; ++r) {
    auto start = std::chrono::steady_clock::now();
    at::parallel_for(0, n, 1 << 16, [&](int64_t i0, int64_t i1) {
      uint64_t acc = 0;
      for (int64_t i = i0; i < i1; ++i) acc ^= b[i];
      sinks[at::get_thread_num() * 8] ^= acc;  // keeps the loads alive
    });
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, n * 8.0 / seconds / 1e9);
  }
  return sinks[0] == 0x5eed ? -best : best;  // a use of the sink the compiler cannot drop
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fp6_linear", &fp6_linear, "y = x @ (scale * fp6(codes))^T from 4+2 packed codes, fp32 x");
  m.def("fp6_linear_bf16", &fp6_linear_bf16, "the same with bfloat16 x; fp32 or bf16 result");
  m.def("fp6_dequantize", &fp6_dequantize, "fp32 weights scale[n] * fp6(code[n, k]) [N, K]");
  m.def("int4_linear", &int4_linear, "y = x @ (int4 * group scale)^T, groups of 128, fp32 x");
  m.def("int4_linear_bf16", &int4_linear_bf16, "the same with bfloat16 x; fp32 or bf16 result");
  m.def("int4_dequantize", &int4_dequantize, "fp32 weights [N, K] of the INT4 kernel");
  m.def("stream_read_gbps", &stream_read_gbps, "best streaming-read bandwidth in GB/s");
  m.def("best_isa", [] { return isa_name(best_isa()); }, "widest ISA this CPU supports");
}
