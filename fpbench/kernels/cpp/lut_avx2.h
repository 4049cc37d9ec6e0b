// The AVX2 (+FMA, F16C) kernels: GEMV, dequantization, the blocked GEMM that both SIMD
// ISAs use for prefill (its AVX-512 register block included), and the streaming-read
// probe; with the prefetch and row-tile helpers the AVX-512 kernels share. Part of
// lut_linear.cpp's translation unit.
#pragma once

#include "lut_common.h"

namespace {

#if FPBENCH_X86
// Prefetch the codes kPrefetchBytes of the first plane ahead of unit u (the 2-bit plane as
// many units ahead), on into the next rows, which follow in memory: a row is a few KiB,
// too short for the hardware prefetcher to ramp up on its own, and it stops at 4 KiB pages.
// At M = 1 on this AMD EPYC (2 threads; distances timed in turn in one process), 2-8 KiB
// ahead streamed 5-25% faster than 256-512 bytes (FP6 E3M2 on 4096x14336: 12.2-12.7
// against 11.0-11.5 GB/s; INT8: 13.3-14.5 against 12.2-12.4; INT4: 12.2-13.1 against 10.5).
// The blocked GEMM's panel decode (a few units of a row per panel) keeps 8 units ahead.
// The GEMVs prefetch into L2, not L1 (Ahead): on an AMD EPYC with a 32 KiB L1 (Zen 4, 2
// threads, M = 1, cold, in turn call by call in one process) lines brought into L1 a few
// KiB ahead pushed out x, which the 4-bit GEMVs read four times as often as their codes:
// into L2, INT4 per channel ran 1.55x as fast on 4096x4096 and 4-bit g128 and MX layers
// 1.31-1.60x on 4096x14336 (the bf16 GEMV; 8-bit g128 and MXFP8 1.40-1.58x, FP6 g128
// 1.16x; in cache 0.97-1.02x); the fp32 GEMVs (AVX2, AVX-512 VBMI) 1.15-1.62x.
constexpr int64_t kPrefetchBytes = 4096;

// Bytes of the first plane per 64-weight unit.
constexpr int64_t unit_bytes(int bits) { return bits == 8 ? kUnit : kUnit / 2; }

// The panel decode's prefetch: 8 units ahead in the row.
template <int BITS>
inline void prefetch_panel(const uint8_t* a, const uint8_t* b, int64_t u) {
  constexpr int64_t ahead = 8;
  _mm_prefetch(reinterpret_cast<const char*>(a + (u + ahead) * unit_bytes(BITS)), _MM_HINT_T0);
  if constexpr (BITS == 6) _mm_prefetch(reinterpret_cast<const char*>(b + (u + ahead) * (kUnit / 4)), _MM_HINT_T0);
}

// The GEMVs' prefetch (into L2) for a row's block of K: the codes Packed::ahead_rows rows and
// ahead_units units on in the units the GEMV reads next, which after the block's end
// continue in the same block of the next rows. The address is linear in u but for one jump
// (at unit `jump`, where the distance passes the block's end): pointers that move once a
// block instead of an address worked out per unit (with the weights in cache, 2 threads,
// 2048x4096: the AVX2 INT4 g128 GEMV 1.30x, the bf16 GEMV's see row_bf16; the other fp32
// GEMVs within this machine's spread). at(u) is called for the units in order, STEP apart
// from u_begin (the jump falls on one of them).
template <int BITS, int STEP = 1>
struct Ahead {
  const uint8_t *a, *b;  // unit u's codes to prefetch: a + u * unit_bytes(BITS) (6-bit: b + u * kUnit / 4)
  int64_t jump, da, db;
  Ahead(const Packed& w, const uint8_t* a_row, const uint8_t* b_row) : b(nullptr), db(0) {
    const int64_t span = w.u_end - w.u_begin;
    jump = w.u_begin + std::min(span, (std::max<int64_t>(0, span - w.ahead_units) + STEP - 1) / STEP * STEP);
    a = a_row + w.ahead_rows * w.lda + w.ahead_units * unit_bytes(BITS);
    da = w.lda - span * unit_bytes(BITS);
    if constexpr (BITS == 6) {
      b = b_row + w.ahead_rows * w.ldb + w.ahead_units * (kUnit / 4);
      db = w.ldb - span * (kUnit / 4);
    }
  }
  void at(int64_t u) {
    if (u == jump) a += da, b += db;
    line(u);
    if constexpr (BITS == 6) _mm_prefetch(reinterpret_cast<const char*>(b + u * (kUnit / 4)), _MM_HINT_T1);
  }
  void line(int64_t u) const { _mm_prefetch(reinterpret_cast<const char*>(a + u * unit_bytes(BITS)), _MM_HINT_T1); }
};

// Calls f(MR, m) for the row tiles of M rows of x: tiles of 4 from m = 0, then one of the
// 1-3 rows left; MR is a compile-time integral_constant (the SIMD kernels unroll over it).
template <class F>
void for_row_tiles(int64_t M, F&& f) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) f(std::integral_constant<int, 4>{}, m);
  switch (M - m) {
    case 3: f(std::integral_constant<int, 3>{}, m); break;
    case 2: f(std::integral_constant<int, 2>{}, m); break;
    case 1: f(std::integral_constant<int, 1>{}, m); break;
    default: break;
  }
}

// ---------------------------------------------------------------- AVX2 (+ FMA)
//
// A unit is two halves of 32 codes, one ymm of code bytes each; a half decodes into
// four fp32 vectors holding k = 32*half + 8*i .. +7 (i = 0..3), in natural order.

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

// Per-call constants of the decode: byte tables (Dec::Table) or the bit-placement masks.
template <int BITS, Dec DEC>
struct Avx2Consts {
  static constexpr int kSub = DEC == Dec::SignMagnitude ? 2
                              : DEC != Dec::Table       ? 0
                              : BITS <= 4               ? 1
                              : BITS == 6               ? 4
                                                        : 0;  // 8-bit: gathers
  __m256i lo[kSub > 0 ? kSub : 1], hi[kSub > 0 ? kSub : 1];
  __m256i mask16, special16;  // Float*: fp16-pattern masks
  __m128i shift16;
  __m256 pow2;
  __m256i top;  // Fp16Nibble: T[n], the fp16 high byte of the codes n << 2 .. n << 2 | 3
  explicit Avx2Consts(const Packed& w) {
    alignas(16) uint8_t high[16];
    for (int n = 0; n < 16; ++n) high[n] = static_cast<uint8_t>((n >> 3) << 7 | (n & 7) << 2);
    top = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(high)));
    for (int s = 0; s < kSub; ++s) {
      lo[s] = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.table_lo + 16 * s)));
      hi[s] = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.table_hi + 16 * s)));
    }
    mask16 = _mm256_set1_epi16(static_cast<int16_t>(w.mask16));
    special16 = _mm256_set1_epi16(static_cast<int16_t>(w.special16));
    shift16 = _mm_cvtsi32_si128(10 - w.mbits);
    pow2 = _mm256_set1_ps(w.pow2_16);
  }
};

// 16 8-bit minifloat codes -> their fp16 patterns (see Dec::Float). Sign-extending puts
// the sign on bit 15 as well as on the bits the mask clears.
template <bool SPECIAL>
inline __m256i fp16_patterns(__m128i codes, __m128i shift16, __m256i mask16, __m256i special16) {
  const __m256i placed = _mm256_and_si256(_mm256_sll_epi16(_mm256_cvtepi8_epi16(codes), shift16), mask16);
  if constexpr (!SPECIAL) return placed;
  const __m256i special = _mm256_cmpeq_epi16(_mm256_and_si256(placed, special16), special16);
  return _mm256_blendv_epi8(placed, _mm256_or_si256(placed, _mm256_set1_epi16(0x7C00)), special);
}

// Code bytes (0 .. 2^BITS - 1) of half h of unit u of a row.
template <int BITS>
inline __m256i codes_avx2(const uint8_t* a, const uint8_t* b, int64_t u, int h) {
  const __m256i low4 = _mm256_set1_epi8(15);
  if constexpr (BITS == 8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + u * kUnit + 32 * h));
  } else {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + u * 32));
    __m256i nibbles = _mm256_and_si256(h ? _mm256_srli_epi16(bytes, 4) : bytes, low4);
    if constexpr (BITS == 4) return nibbles;
    // 2-bit field 2h (lane 0) and 2h+1 (lane 1) of the 16 bytes of this unit.
    const __m256i fields = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + u * 16)));
    const __m256i shift = h ? _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6) : _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);
    const __m256i low2 = _mm256_and_si256(_mm256_srlv_epi32(fields, shift), _mm256_set1_epi8(3));
    return _mm256_or_si256(_mm256_slli_epi16(nibbles, 2), low2);
  }
}

// Table lookup of 32 code bytes -> low and high bytes of their bf16 patterns.
template <int BITS, Dec DEC>
inline void lookup_avx2(__m256i codes, const Avx2Consts<BITS, DEC>& t, __m256i& lo, __m256i& hi) {
  constexpr int kSub = Avx2Consts<BITS, DEC>::kSub;
  if constexpr (DEC == Dec::SignMagnitude) {
    // vpshufb reads bits 0-3 (and 7, clear here); blendv reads bit 7: code bit 4 shifted
    // there (a 16-bit shift by 3 brings the byte below only into bits 0-2). The sign, code
    // bit 5, becomes bit 7 of the high byte.
    const __m256i sel = _mm256_slli_epi16(codes, 3);
    lo = _mm256_blendv_epi8(_mm256_shuffle_epi8(t.lo[0], codes), _mm256_shuffle_epi8(t.lo[1], codes), sel);
    hi = _mm256_blendv_epi8(_mm256_shuffle_epi8(t.hi[0], codes), _mm256_shuffle_epi8(t.hi[1], codes), sel);
    hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(codes, 2), _mm256_set1_epi8(static_cast<char>(0x80))));
    return;
  }
  const __m256i index = kSub == 1 ? codes : _mm256_and_si256(codes, _mm256_set1_epi8(15));
  __m256i l[kSub], g[kSub];
  for (int s = 0; s < kSub; ++s) {
    l[s] = _mm256_shuffle_epi8(t.lo[s], index);
    g[s] = _mm256_shuffle_epi8(t.hi[s], index);
  }
  // Blend tree: level b keeps table 2i+1 where code bit 4+b is set (blendv reads bit 7
  // of each byte; a 16-bit shift by < 8 moves no other byte's bit there).
  for (int width = kSub, bit = 4; width > 1; width /= 2, ++bit) {
    const __m256i sel = _mm256_sll_epi16(codes, _mm_cvtsi32_si128(7 - bit));
    for (int s = 0; s < width / 2; ++s) {
      l[s] = _mm256_blendv_epi8(l[2 * s], l[2 * s + 1], sel);
      g[s] = _mm256_blendv_epi8(g[2 * s], g[2 * s + 1], sel);
    }
  }
  lo = l[0];
  hi = g[0];
}

// bf16 bytes -> four fp32 vectors: k 0..7, 8..15, 16..23, 24..31 of the half.
inline void widen_avx2(__m256i lo, __m256i hi, __m256 (&v)[4]) {
  const __m256i w0 = _mm256_unpacklo_epi8(lo, hi), w1 = _mm256_unpackhi_epi8(lo, hi);
  const __m256i odd = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  v[0] = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16));
  v[1] = _mm256_castsi256_ps(_mm256_and_si256(w0, odd));
  v[2] = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));
  v[3] = _mm256_castsi256_ps(_mm256_and_si256(w1, odd));
}

// Dequantized weights of half h of unit u of row n, natural order, in v (SCALED false:
// the code values minus zero points, for a caller that scales the finished sum).
// 8-bit table codes are gathered from the fp32 table: on a 1024x4096 GEMV here (one
// thread, shared AMD EPYC) that took 8.8 ms against 10.7 ms for a 16-way blend tree.
template <int BITS, Dec DEC, bool ZP, bool SCALED = true>
inline void weights_avx2(const Packed& w, const Avx2Consts<BITS, DEC>& t, const uint8_t* a, const uint8_t* b,
                         const float* srow, const float* zrow, int64_t u, int h, __m256 (&v)[4]) {
  if constexpr (BITS == 8 && (DEC == Dec::Float || DEC == Dec::FloatSpecial)) {
    for (int j = 0; j < 2; ++j) {
      const __m256i half = fp16_patterns<DEC == Dec::FloatSpecial>(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + u * kUnit + 32 * h + 16 * j)), t.shift16, t.mask16,
          t.special16);
      v[2 * j] = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(half)), t.pow2);
      v[2 * j + 1] = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(half, 1)), t.pow2);
    }
  } else if constexpr (BITS == 8) {
    for (int i = 0; i < 4; ++i) {
      const __m128i codes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(a + u * kUnit + 32 * h + 8 * i));
      if constexpr (DEC == Dec::Table) {
        v[i] = _mm256_i32gather_ps(w.table, _mm256_cvtepu8_epi32(codes), 4);
      } else if constexpr (DEC == Dec::SignedInt) {
        v[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes));
      } else {
        static_assert(DEC == Dec::UnsignedInt, "8-bit codes: table, integers or floats");
        v[i] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes));
      }
    }
  } else if constexpr (DEC == Dec::Fp16Nibble) {
    static_assert(BITS == 6, "the fp16 nibble decoder is for 6-bit codes");
    // v[i] lane e holds code position 32h + 8i + e of the unit (not weight k: the caller
    // reads x in position order); the group scale below is still right, as each half of
    // a unit lies in one group (G a multiple of 32).
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + u * 32));
    const __m256i nibbles = _mm256_and_si256(h ? _mm256_srli_epi16(bytes, 4) : bytes, _mm256_set1_epi8(15));
    const __m256i fields = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + u * 16)));
    const __m256i shift = h ? _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6) : _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);
    const __m256i low2 = _mm256_and_si256(_mm256_srlv_epi32(fields, shift), _mm256_set1_epi8(3));
    const __m256i high = _mm256_or_si256(_mm256_shuffle_epi8(t.top, nibbles), low2);
    const __m256i w0 = _mm256_unpacklo_epi8(_mm256_setzero_si256(), high);
    const __m256i w1 = _mm256_unpackhi_epi8(_mm256_setzero_si256(), high);
    v[0] = _mm256_cvtph_ps(_mm256_castsi256_si128(w0));
    v[1] = _mm256_cvtph_ps(_mm256_castsi256_si128(w1));
    v[2] = _mm256_cvtph_ps(_mm256_extracti128_si256(w0, 1));
    v[3] = _mm256_cvtph_ps(_mm256_extracti128_si256(w1, 1));
  } else {
    static_assert(DEC == Dec::Table || DEC == Dec::SignMagnitude, "4- and 6-bit codes decode through the table");
    __m256i lo, hi;
    lookup_avx2<BITS, DEC>(codes_avx2<BITS>(a, b, u, h), t, lo, hi);
    widen_avx2(lo, hi, v);
  }
  const int32_t* gof = w.group_of + (u * kUnit + 32 * h) / 8;
  if (w.group_size % 32 == 0) {  // the half unit lies in one group: one broadcast each
    const __m256 zero = ZP ? _mm256_broadcast_ss(zrow + gof[0]) : _mm256_setzero_ps();
    const __m256 scale = SCALED ? _mm256_broadcast_ss(srow + gof[0]) : _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      if constexpr (ZP) v[i] = _mm256_sub_ps(v[i], zero);
      if constexpr (SCALED) v[i] = _mm256_mul_ps(v[i], scale);
    }
    return;
  }
  for (int i = 0; i < 4; ++i) {
    if constexpr (ZP) v[i] = _mm256_sub_ps(v[i], _mm256_broadcast_ss(zrow + gof[i]));
    if constexpr (SCALED) v[i] = _mm256_mul_ps(v[i], _mm256_broadcast_ss(srow + gof[i]));
  }
}

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One weight row against MR rows of x. With few x rows, several accumulators per row
// hide the FMA latency (a single chain would cap a GEMV at one FMA per 4 cycles).
// PER_CHANNEL (one scale, no zero point): the scale multiplies the finished sums, one
// multiply per row instead of one per 8 weights.
template <int BITS, Dec DEC, bool ZP, int MR, bool PER_CHANNEL>
void row_avx2(const Packed& w, const Avx2Consts<BITS, DEC>& t, RowScales& rs, int64_t n, const float* x,
              int64_t ldx, float* y, int64_t ldy) {
  constexpr int kChains = MR >= 4 ? 1 : 4 / MR;
  const uint8_t* a = w.plane_a + n * w.lda;
  const uint8_t* b = w.plane_b ? w.plane_b + n * w.ldb : nullptr;
  const float* srow = rs.scales(n);
  const float* zrow = ZP ? rs.zeros(n) : nullptr;
  __m256 acc[MR][kChains];
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < kChains; ++c) acc[m][c] = _mm256_setzero_ps();
  Ahead<BITS> ahead(w, a, b);
  for (int64_t u = w.u_begin; u < w.u_end; ++u) {
    ahead.at(u);
    for (int h = 0; h < 2; ++h) {
      __m256 v[4];
      weights_avx2<BITS, DEC, ZP, !PER_CHANNEL>(w, t, a, b, srow, zrow, u, h, v);
      const int64_t k = u * kUnit + 32 * h;
      for (int i = 0; i < 4; ++i)
        for (int m = 0; m < MR; ++m)
          acc[m][i % kChains] = _mm256_fmadd_ps(v[i], _mm256_loadu_ps(x + m * ldx + k + 8 * i), acc[m][i % kChains]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    __m256 total = acc[m][0];
    for (int c = 1; c < kChains; ++c) total = _mm256_add_ps(total, acc[m][c]);
    w.put(y + m * ldy + n, PER_CHANNEL ? hsum256(total) * srow[0] : hsum256(total));
  }
}

// One weight row against MR rows of x, for scales per group of G weights (G a multiple of
// 128) and no zero points: each group's products are summed unscaled and the sum takes
// the group's scale once, instead of a broadcast and a multiply per 8 weights (int4/g128
// at M = 1: 1.28x, measured side by side here; with G = 32 or 64 this bookkeeping cost
// what it saved: smaller groups take row_avx2_runs). The same products as row_avx2, summed
// in another order: the result stays within the fp32 summation bound.
template <int BITS, Dec DEC, int MR>
void row_avx2_grouped(const Packed& w, const Avx2Consts<BITS, DEC>& t, RowScales& rs, int64_t n, const float* x,
                      int64_t ldx, float* y, int64_t ldy) {
  constexpr int kChains = MR >= 4 ? 1 : 4 / MR;
  const uint8_t* a = w.plane_a + n * w.lda;
  const uint8_t* b = w.plane_b ? w.plane_b + n * w.ldb : nullptr;
  const float* srow = rs.scales(n);
  // One scaled-sum chain per x row besides the kChains partial ones: all of them, the
  // decode's vectors and its tables stay in the 16 ymm registers.
  __m256 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_ps();
  const int64_t per_group = w.group_size / kUnit;  // units per group (AVX2 takes whole rows: no block starts inside one)
  Ahead<BITS> ahead(w, a, b);
  for (int64_t u0 = w.u_begin; u0 < w.u_end; u0 += per_group) {
    const int64_t u1 = std::min(u0 + per_group, w.u_end);  // the last group may be shorter
    __m256 part[MR][kChains];
    for (int m = 0; m < MR; ++m)
      for (int c = 0; c < kChains; ++c) part[m][c] = _mm256_setzero_ps();
    for (int64_t u = u0; u < u1; ++u) {
      ahead.at(u);
      for (int h = 0; h < 2; ++h) {
        __m256 v[4];
        weights_avx2<BITS, DEC, false, false>(w, t, a, b, srow, nullptr, u, h, v);
        for (int i = 0; i < 4; ++i)
          for (int m = 0; m < MR; ++m)
            part[m][i % kChains] = _mm256_fmadd_ps(v[i], _mm256_loadu_ps(x + m * ldx + u * kUnit + 32 * h + 8 * i),
                                                   part[m][i % kChains]);
      }
    }
    const __m256 scale = _mm256_broadcast_ss(srow + w.group_of[u0 * kUnit / 8]);
    for (int m = 0; m < MR; ++m) {
      __m256 sum = part[m][0];
      for (int c = 1; c < kChains; ++c) sum = _mm256_add_ps(sum, part[m][c]);
      acc[m] = _mm256_fmadd_ps(scale, sum, acc[m]);
    }
  }
  for (int m = 0; m < MR; ++m) w.put(y + m * ldy + n, hsum256(acc[m]));
}

// One weight row against MR rows of x for scales per group of a multiple of 8 RUN weights
// (RUN = 4: 32, a half unit; RUN = 2: 16) and no zero points: each run of RUN vectors' products
// summed unscaled in one chain (a multiply and RUN - 1 FMAs), then one FMA by its group's
// scale, where row_avx2 spends a multiply a vector on the scale besides the FMA. The same
// products, another order of the sums: within the fp32 summation bound. At M = 1 with the ISA
// forced to AVX2 on Zen 4 (2 threads, against row_avx2 in turn call by call in one
// process): NVFP4 1.13x, FP4, INT4 and FP8 g16 1.10-1.15x, INT8 g16 1.27x, MXFP4, MXFP8,
// FP4 g32, INT4 g64 and FP6 g32 1.06-1.11x with a 4096x4096 weight in cache; cold on
// 4096x14336 1.03-1.17x (INT8 g32 1.00x); on the default model's 1536x576 and 576x1536 in
// cache 1.02-1.11x, FP6 E3M2 g32 0.97-0.99x.
template <int BITS, Dec DEC, int MR, int RUN>
void row_avx2_runs(const Packed& w, const Avx2Consts<BITS, DEC>& t, RowScales& rs, int64_t n, const float* x,
                   int64_t ldx, float* y, int64_t ldy) {
  constexpr int kRuns = 4 / RUN;  // a half unit's runs, each into its own chain
  const uint8_t* a = w.plane_a + n * w.lda;
  const uint8_t* b = w.plane_b ? w.plane_b + n * w.ldb : nullptr;
  const float* srow = rs.scales(n);
  __m256 acc[MR][2 * kRuns];
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < 2 * kRuns; ++c) acc[m][c] = _mm256_setzero_ps();
  Ahead<BITS> ahead(w, a, b);
  for (int64_t u = w.u_begin; u < w.u_end; ++u) {
    ahead.at(u);
    for (int h = 0; h < 2; ++h) {
      __m256 v[4];
      weights_avx2<BITS, DEC, false, false>(w, t, a, b, srow, nullptr, u, h, v);
      const int64_t k = u * kUnit + 32 * h;
      for (int r = 0; r < kRuns; ++r) {
        const __m256 scale = _mm256_broadcast_ss(srow + w.group_of[k / 8 + RUN * r]);
        for (int m = 0; m < MR; ++m) {
          const float* xm = x + m * ldx + k + 8 * RUN * r;
          __m256 p = _mm256_mul_ps(v[RUN * r], _mm256_loadu_ps(xm));
          for (int i = 1; i < RUN; ++i) p = _mm256_fmadd_ps(v[RUN * r + i], _mm256_loadu_ps(xm + 8 * i), p);
          acc[m][kRuns * h + r] = _mm256_fmadd_ps(p, scale, acc[m][kRuns * h + r]);
        }
      }
    }
  }
  for (int m = 0; m < MR; ++m) {
    __m256 total = acc[m][0];
    for (int c = 1; c < 2 * kRuns; ++c) total = _mm256_add_ps(total, acc[m][c]);
    w.put(y + m * ldy + n, hsum256(total));
  }
}

template <int BITS, Dec DEC, bool ZP>
void rows_avx2_t(const Packed& w, const float* x, int64_t ldx, int64_t M, int64_t n0, int64_t n1, float* y,
                 int64_t ldy) {
  const Avx2Consts<BITS, DEC> t(w);
  RowScales rs(w, Isa::Avx2);
  const bool per_channel = !ZP && w.groups == 1, folded = !ZP && w.group_size % (2 * kUnit) == 0;
  const int run = ZP ? 0 : w.group_size % 32 == 0 ? 4 : w.group_size % 16 == 0 ? 2 : 0;  // row_avx2_runs
  for (int64_t n = n0; n < n1; ++n)
    for_row_tiles(M, [&](auto mr, int64_t m) {
      constexpr int MR = decltype(mr)::value;
      if (per_channel)
        row_avx2<BITS, DEC, false, MR, true>(w, t, rs, n, x + m * ldx, ldx, y + m * ldy, ldy);
      else if (folded)
        row_avx2_grouped<BITS, DEC, MR>(w, t, rs, n, x + m * ldx, ldx, y + m * ldy, ldy);
      else if (run == 4)
        row_avx2_runs<BITS, DEC, MR, 4>(w, t, rs, n, x + m * ldx, ldx, y + m * ldy, ldy);
      else if (run == 2)
        row_avx2_runs<BITS, DEC, MR, 2>(w, t, rs, n, x + m * ldx, ldx, y + m * ldy, ldy);
      else
        row_avx2<BITS, DEC, ZP, MR, false>(w, t, rs, n, x + m * ldx, ldx, y + m * ldy, ldy);
    });
}

// Dequantized weights of rows n0..n1 and units u0..u1 into out: row n at out + (n - n0) * ld,
// unit u at column (u - u0) * 64.
template <int BITS, Dec DEC, bool ZP>
void dequant_tile_avx2(const Packed& w, const Avx2Consts<BITS, DEC>& t, RowScales& rs, int64_t n0, int64_t n1,
                       int64_t u0, int64_t u1, float* out, int64_t ld) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* srow = rs.scales(n);
    const float* zrow = ZP ? rs.zeros(n) : nullptr;
    const uint8_t* a = w.plane_a + n * w.lda;
    const uint8_t* b = w.plane_b ? w.plane_b + n * w.ldb : nullptr;
    float* o = out + (n - n0) * ld - u0 * kUnit;
    for (int64_t u = u0; u < u1; ++u) {
      prefetch_panel<BITS>(a, b, u);
      for (int h = 0; h < 2; ++h) {
        __m256 v[4];
        weights_avx2<BITS, DEC, ZP>(w, t, a, b, srow, zrow, u, h, v);
        for (int i = 0; i < 4; ++i) _mm256_storeu_ps(o + u * kUnit + 32 * h + 8 * i, v[i]);
      }
    }
  }
}

template <int BITS, Dec DEC, bool ZP>
void dequant_avx2_t(const Packed& w, int64_t n0, int64_t n1, float* out) {
  const Avx2Consts<BITS, DEC> t(w);
  RowScales rs(w, Isa::Avx2);
  dequant_tile_avx2<BITS, DEC, ZP>(w, t, rs, n0, n1, 0, w.K / kUnit, out + n0 * w.K, w.K);
}

// ---- blocked GEMM (prefill): from kBlockedMinRows rows of x, each thread decodes a panel
// of whole weight rows once into fp32 (the weights lut_dequantize gives, bit for bit; row
// by row, so the codes stream in order as in the GEMV) and multiplies every row of x by
// it while it sits in L2: the decode is paid once per panel instead of once per 4 rows
// of x, and no [N, K] fp32 copy is written. (Tiles of a few hundred columns of many rows
// read the codes in short runs far apart: latency-bound, 7x slower to decode here.) The
// product is computed transposed, y^T = W x^T, so that a weight is one broadcast and
// x^T (copied once per call, rows padded to 16) gives the vectors: 6 weight rows x 16
// rows of x in 12 accumulators, 8 loads per 12 FMAs, no horizontal sums. x^T is stored
// as Mp/16 blocks [K, 16], each read in order (a column strip of a plain [K, Mp] x^T
// would be a 64-byte run every 4*Mp bytes). Each y[m, n] sums its products in k order
// per kSliceCols columns, then the slices' sums: another fp32 summation order, within
// the same bound.
constexpr int64_t kPanelBytes = 256 * 1024;  // half this AMD EPYC's L2; x^T slices need the rest
constexpr int64_t kPanelCols = 2048;         // long runs of codes per row; x^T's columns in L3
constexpr int64_t kSliceCols = 256;          // columns per pass over a panel: 6 rows' slice in L1
constexpr int64_t kXtCols = 16;              // rows of x per block: two ymm

// yt[j, 0..16) += sum_k wt[j, k] * xt[k, 0..16) for j < NR (wt rows ldw apart).
template <int NR>
inline void block_avx2(const float* wt, int64_t ldw, const float* xt, int64_t kc, float* yt, int64_t ldyt) {
  constexpr int64_t ldxt = kXtCols;
  __m256 acc[NR][2];
  for (int j = 0; j < NR; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 x0 = _mm256_loadu_ps(xt + k * ldxt), x1 = _mm256_loadu_ps(xt + k * ldxt + 8);
    for (int j = 0; j < NR; ++j) {
      const __m256 wv = _mm256_broadcast_ss(wt + j * ldw + k);
      acc[j][0] = _mm256_fmadd_ps(wv, x0, acc[j][0]);
      acc[j][1] = _mm256_fmadd_ps(wv, x1, acc[j][1]);
    }
  }
  for (int j = 0; j < NR; ++j) {
    _mm256_storeu_ps(yt + j * ldyt, _mm256_add_ps(_mm256_loadu_ps(yt + j * ldyt), acc[j][0]));
    _mm256_storeu_ps(yt + j * ldyt + 8, _mm256_add_ps(_mm256_loadu_ps(yt + j * ldyt + 8), acc[j][1]));
  }
}

// The same for two blocks of x^T side by side (the second ldb floats after the first):
// 32 rows of x in two zmm, each y the same FMAs in the same order as block_avx2's.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
template <int NR>
void block_avx512(const float* wt, int64_t ldw, const float* xt, int64_t ldb, int64_t kc, float* yt, int64_t ldyt) {
  constexpr int64_t ldxt = kXtCols;
  __m512 acc[NR][2];
  for (int j = 0; j < NR; ++j) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 x0 = _mm512_loadu_ps(xt + k * ldxt), x1 = _mm512_loadu_ps(xt + ldb + k * ldxt);
    for (int j = 0; j < NR; ++j) {
      const __m512 wv = _mm512_set1_ps(wt[j * ldw + k]);
      acc[j][0] = _mm512_fmadd_ps(wv, x0, acc[j][0]);
      acc[j][1] = _mm512_fmadd_ps(wv, x1, acc[j][1]);
    }
  }
  for (int j = 0; j < NR; ++j) {
    _mm512_storeu_ps(yt + j * ldyt, _mm512_add_ps(_mm512_loadu_ps(yt + j * ldyt), acc[j][0]));
    _mm512_storeu_ps(yt + j * ldyt + 16, _mm512_add_ps(_mm512_loadu_ps(yt + j * ldyt + 16), acc[j][1]));
  }
}
#pragma GCC pop_options

// Rows n0..n1 of yt = (W x^T) [N, Mp] (zero on entry) from xt = x^T as [Mp/16, K, 16]; wide
// (AVX-512): two blocks of x^T a pass. With the panels decoded once, the decode no longer
// sets the pace of a GEMM, so the AVX2 decode serves both ISAs.
template <int BITS, Dec DEC, bool ZP>
void gemm_avx2_t(const Packed& w, const float* xt, int64_t Mp, int64_t n0, int64_t n1, float* yt, bool wide) {
  const Avx2Consts<BITS, DEC> t(w);
  RowScales rs(w, Isa::Avx2);
  const int64_t K = w.K, cols = std::min(K, kPanelCols);
  const int64_t panel_rows = std::clamp<int64_t>(kPanelBytes / (4 * cols) / 6 * 6, 6, 24);
  std::vector<float> panel(panel_rows * cols);
  for (int64_t kb = 0; kb < K; kb += cols) {  // x^T's columns kb.. stay in L3 for all panels
    const int64_t kb_end = std::min(kb + cols, K);
    for (int64_t nb = n0; nb < n1; nb += panel_rows) {
      const int64_t rows = std::min(panel_rows, n1 - nb);
      dequant_tile_avx2<BITS, DEC, ZP>(w, t, rs, nb, nb + rows, kb / kUnit, kb_end / kUnit, panel.data(), cols);
      for (int64_t k0 = kb; k0 < kb_end; k0 += kSliceCols) {
        const int64_t kc = std::min(kSliceCols, kb_end - k0);
        for (int64_t m0 = 0, step; m0 < Mp; m0 += step) {
          step = wide && m0 + 2 * kXtCols <= Mp ? 2 * kXtCols : kXtCols;
          for (int64_t j = 0; j < rows; j += 6) {
            const float* wt = panel.data() + j * cols + (k0 - kb);
            const float* xb = xt + m0 * K + k0 * kXtCols;
            float* yb = yt + (nb + j) * Mp + m0;
            if (step > kXtCols) {
              switch (std::min<int64_t>(6, rows - j)) {
                case 6: block_avx512<6>(wt, cols, xb, kXtCols * K, kc, yb, Mp); break;
                case 5: block_avx512<5>(wt, cols, xb, kXtCols * K, kc, yb, Mp); break;
                case 4: block_avx512<4>(wt, cols, xb, kXtCols * K, kc, yb, Mp); break;
                case 3: block_avx512<3>(wt, cols, xb, kXtCols * K, kc, yb, Mp); break;
                case 2: block_avx512<2>(wt, cols, xb, kXtCols * K, kc, yb, Mp); break;
                default: block_avx512<1>(wt, cols, xb, kXtCols * K, kc, yb, Mp); break;
              }
              continue;
            }
            switch (std::min<int64_t>(6, rows - j)) {
              case 6: block_avx2<6>(wt, cols, xb, kc, yb, Mp); break;
              case 5: block_avx2<5>(wt, cols, xb, kc, yb, Mp); break;
              case 4: block_avx2<4>(wt, cols, xb, kc, yb, Mp); break;
              case 3: block_avx2<3>(wt, cols, xb, kc, yb, Mp); break;
              case 2: block_avx2<2>(wt, cols, xb, kc, yb, Mp); break;
              default: block_avx2<1>(wt, cols, xb, kc, yb, Mp); break;
            }
          }
        }
      }
    }
  }
}

// The range read as S streams side by side, one per part. On an Intel Xeon (AVX-512, 2
// threads) one stream per thread read 20-22 GB/s, 4 or 8 read 22-26, and torch's fp32
// GEMV 25-26 (medians; fastest calls up to 31) in the same runs: the ceiling is the best
// of both shapes.
template <int S>
uint64_t stream_avx2(const uint8_t* p, int64_t bytes) {
  __m256i acc[S];
  for (int j = 0; j < S; ++j) acc[j] = _mm256_setzero_si256();
  const int64_t part = bytes / S / 64 * 64;
  for (int64_t i = 0; i < part; i += 64)
    for (int j = 0; j < S; ++j) {
      const __m256i* q = reinterpret_cast<const __m256i*>(p + j * part + i);
      acc[j] = _mm256_xor_si256(acc[j], _mm256_xor_si256(_mm256_load_si256(q), _mm256_load_si256(q + 1)));
    }
  __m256i all = acc[0];
  for (int j = 1; j < S; ++j) all = _mm256_xor_si256(all, acc[j]);
  return static_cast<uint64_t>(_mm256_extract_epi64(all, 0) ^ _mm256_extract_epi64(all, 3));
}

#pragma GCC pop_options
#endif  // FPBENCH_X86

}  // namespace
