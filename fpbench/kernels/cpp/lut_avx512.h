// The AVX-512 kernels (F+BW+VL, and the VBMI GEMV): GEMVs, dequantization and the
// streaming-read probe. Part of lut_linear.cpp's translation unit.
#pragma once

#include "lut_avx2.h"

namespace {

#if FPBENCH_X86
// ---------------------------------------------------------------- AVX-512 (F + BW + VL)
//
// One zmm holds a whole unit's 64 codes: its 128-bit lanes 0,1 are the AVX2 decode's
// first half and lanes 2,3 its second, so fp32 vector i holds k = 8i..8i+7 (low 256
// bits) and k = 32+8i..32+8i+7 (high 256 bits). x is read through the same order from a
// per-call copy permuted that way (order_x), and the scale of each 8-weight run is
// broadcast into its half.

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")

// The same constants as Avx2Consts, in zmm registers.
template <int BITS, Dec DEC>
struct Avx512Consts {
  // Sign-magnitude codes take the 4-table lookup here.
  static constexpr int kSub = DEC != Dec::Table && DEC != Dec::SignMagnitude ? 0
                              : BITS <= 4                                    ? 1
                              : BITS == 6                                    ? 4
                                                                             : 0;  // 8-bit: gathers
  __m512i lo[kSub > 0 ? kSub : 1], hi[kSub > 0 ? kSub : 1];
  __m256i mask16, special16;  // Float*: fp16-pattern masks
  __m128i shift16;
  __m512 pow2;
  explicit Avx512Consts(const Packed& w) {
    for (int s = 0; s < kSub; ++s) {
      lo[s] = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.table_lo + 16 * s)));
      hi[s] = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.table_hi + 16 * s)));
    }
    mask16 = _mm256_set1_epi16(static_cast<int16_t>(w.mask16));
    special16 = _mm256_set1_epi16(static_cast<int16_t>(w.special16));
    shift16 = _mm_cvtsi32_si128(10 - w.mbits);
    pow2 = _mm512_set1_ps(w.pow2_16);
  }
};

template <int BITS>
inline __m512i codes_avx512(const uint8_t* a, const uint8_t* b, int64_t u) {
  if constexpr (BITS == 8) {
    return _mm512_loadu_si512(a + u * kUnit);
  } else {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + u * 32));
    const __m256i low4 = _mm256_set1_epi8(15);
    const __m512i nibbles = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(bytes, low4)),
                                               _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4), 1);
    if constexpr (BITS == 4) return nibbles;
    const __m512i fields = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + u * 16)));
    const __m512i shift = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6);
    const __m512i low2 = _mm512_and_si512(_mm512_srlv_epi32(fields, shift), _mm512_set1_epi8(3));
    return _mm512_or_si512(_mm512_slli_epi16(nibbles, 2), low2);
  }
}

// Low 8 lanes a, high 8 lanes b (AVX512F only: insertf32x8 would need AVX512DQ).
inline __m512 halves(float a, float b) {
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(a)),
                                             _mm256_castps_pd(_mm256_set1_ps(b)), 1));
}

template <int BITS, Dec DEC, bool ZP>
inline void weights_avx512(const Packed& w, const Avx512Consts<BITS, DEC>& t, const uint8_t* a, const uint8_t* b,
                           const float* srow, const float* zrow, int64_t u, __m512 (&v)[4]) {
  constexpr int kSub = Avx512Consts<BITS, DEC>::kSub;
  if constexpr (BITS == 8) {
    // Natural order in memory; read into the same halves as the lookups below.
    for (int i = 0; i < 4; ++i) {
      const __m128i codes = _mm_unpacklo_epi64(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(a + u * kUnit + 8 * i)),
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(a + u * kUnit + 32 + 8 * i)));
      if constexpr (DEC == Dec::Table) {
        v[i] = _mm512_i32gather_ps(_mm512_cvtepu8_epi32(codes), w.table, 4);
      } else if constexpr (DEC == Dec::SignedInt) {
        v[i] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes));
      } else if constexpr (DEC == Dec::UnsignedInt) {
        v[i] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes));
      } else {
        // The fp16 patterns (see Dec::Float), widened exactly, times 2^(15 - bias). Not
        // fp32 patterns: codes with E = 0 would be fp32 subnormals, and on an AVX-512 Xeon
        // a multiply with subnormal operands took microcode assists: the FP8 E3M4 GEMV
        // (random normal weights: many subnormal codes) on 4096x4096 at M = 1 ran 24 ms
        // against 2.8 ms through fp16, in turn in one process. Through fp16, E4M3 and E5M2
        // (few subnormal codes) took 1.37-1.46x the fp32 placement's time there.
        v[i] = _mm512_mul_ps(_mm512_cvtph_ps(fp16_patterns<DEC == Dec::FloatSpecial>(codes, t.shift16, t.mask16,
                                                                                       t.special16)),
                             t.pow2);
      }
    }
  } else {
    static_assert(DEC == Dec::Table || DEC == Dec::SignMagnitude, "4- and 6-bit codes decode through the table");
    const __m512i codes = codes_avx512<BITS>(a, b, u);
    const __m512i index = kSub == 1 ? codes : _mm512_and_si512(codes, _mm512_set1_epi8(15));
    __m512i l[kSub], g[kSub];
    for (int s = 0; s < kSub; ++s) {
      l[s] = _mm512_shuffle_epi8(t.lo[s], index);
      g[s] = _mm512_shuffle_epi8(t.hi[s], index);
    }
    for (int width = kSub, bit = 4; width > 1; width /= 2, ++bit) {
      const __mmask64 sel = _mm512_test_epi8_mask(codes, _mm512_set1_epi8(static_cast<char>(1 << bit)));
      for (int s = 0; s < width / 2; ++s) {
        l[s] = _mm512_mask_blend_epi8(sel, l[2 * s], l[2 * s + 1]);
        g[s] = _mm512_mask_blend_epi8(sel, g[2 * s], g[2 * s + 1]);
      }
    }
    const __m512i w0 = _mm512_unpacklo_epi8(l[0], g[0]), w1 = _mm512_unpackhi_epi8(l[0], g[0]);
    v[0] = _mm512_castsi512_ps(_mm512_slli_epi32(w0, 16));
    v[1] = _mm512_castsi512_ps(_mm512_maskz_mov_epi16(0xAAAAAAAAu, w0));
    v[2] = _mm512_castsi512_ps(_mm512_slli_epi32(w1, 16));
    v[3] = _mm512_castsi512_ps(_mm512_maskz_mov_epi16(0xAAAAAAAAu, w1));
  }
  const int32_t* gof = w.group_of + u * kUnit / 8;
  if (w.group_size % 64 == 0) {  // one group a unit: one broadcast
    const __m512 s = _mm512_set1_ps(srow[gof[0]]);
    const __m512 z = ZP ? _mm512_set1_ps(zrow[gof[0]]) : s;
    for (int i = 0; i < 4; ++i) v[i] = _mm512_mul_ps(ZP ? _mm512_sub_ps(v[i], z) : v[i], s);
    return;
  }
  for (int i = 0; i < 4; ++i) {
    // Group of k = 8i.. (low half) and of k = 32 + 8i.. (high half).
    const int32_t g0 = gof[i], g1 = gof[4 + i];
    if constexpr (ZP) v[i] = _mm512_sub_ps(v[i], halves(zrow[g0], zrow[g1]));
    v[i] = _mm512_mul_ps(v[i], halves(srow[g0], srow[g1]));
  }
}

// The AVX-512 GEMVs' sums for MR rows of x: 4 / MR independent FMA chains a row (at
// least one), to hide the FMA latency, added up at the end of a weight row.
template <int MR>
struct Avx512Sums {
  static constexpr int kChains = MR >= 4 ? 1 : 4 / MR;
  __m512 acc[MR][kChains];
  Avx512Sums() {
    for (int m = 0; m < MR; ++m)
      for (int c = 0; c < kChains; ++c) acc[m][c] = _mm512_setzero_ps();
  }
  // Vector i of a unit (16 weights) times x at column k of each row, into chain i.
  void add(__m512 v, const float* xp, int64_t ldx, int64_t k, int i) {
    for (int m = 0; m < MR; ++m)
      acc[m][i % kChains] = _mm512_fmadd_ps(v, _mm512_loadu_ps(xp + m * ldx + k), acc[m][i % kChains]);
  }
  void store(const Packed& w, float* y, int64_t ldy, int64_t n) const {
    for (int m = 0; m < MR; ++m) {
      __m512 total = acc[m][0];
      for (int c = 1; c < kChains; ++c) total = _mm512_add_ps(total, acc[m][c]);
      w.put(y + m * ldy + n, _mm512_reduce_add_ps(total));
    }
  }
};

template <int BITS, Dec DEC, bool ZP, int MR>
void row_avx512(const Packed& w, const Avx512Consts<BITS, DEC>& t, RowScales& rs, int64_t n, const float* xp,
                int64_t ldx, float* y, int64_t ldy) {
  const uint8_t* a = w.plane_a + n * w.lda;
  const uint8_t* b = w.plane_b ? w.plane_b + n * w.ldb : nullptr;
  const float* srow = rs.scales(n);
  const float* zrow = ZP ? rs.zeros(n) : nullptr;
  Avx512Sums<MR> sums;
  Ahead<BITS> ahead(w, a, b);
  for (int64_t u = w.u_begin; u < w.u_end; ++u) {
    ahead.at(u);
    __m512 v[4];
    weights_avx512<BITS, DEC, ZP>(w, t, a, b, srow, zrow, u, v);
    for (int i = 0; i < 4; ++i) sums.add(v[i], xp, ldx, u * kUnit + 16 * i, i);
  }
  sums.store(w, y, ldy, n);
}

template <int BITS, Dec DEC, bool ZP>
void rows_avx512_t(const Packed& w, const float* xp, int64_t ldx, int64_t M, int64_t n0, int64_t n1, float* y,
                   int64_t ldy) {
  const Avx512Consts<BITS, DEC> t(w);
  RowScales rs(w, Isa::Avx512);
  for (int64_t n = n0; n < n1; ++n)
    for_row_tiles(M, [&](auto mr, int64_t m) {
      row_avx512<BITS, DEC, ZP, decltype(mr)::value>(w, t, rs, n, xp + m * ldx, ldx, y + m * ldy, ldy);
    });
}

// Fp32 lookups for 4- and 6-bit codes in groups of a multiple of 32 (4-bit) or 64 (6-bit)
// weights, per channel included: the format's values are scaled for the group once,
// (v - z) * s in fp32 as the dequantization forms them (the same bits), and each 16
// weights are one permute of those fp32 tables (vpermps takes 4 index bits, vpermi2ps 5).
// Each dword of a unit's 32 nibble bytes, shifted right by 8i (+ 4 in the high 8 lanes),
// holds in its low nibble the code (4-bit) or the code's upper 4 bits (6-bit) of position
// 32h + 4l + i (l the dword, h the half); the 2-bit plane's 16 bytes, in every 128-bit
// lane, shifted by 8i + 4h + 2(l / 4), hold the lower 2. x is read in that order (see
// order_x). 4-bit: bit 4 of the index picks the high half's table when a unit's halves lie
// in two groups (Grouping::Halves); groups of 16 (Grouping::Sixteen) take the format's own
// values and multiply each lane by its group's scale: lane 8h + l of every vector of a
// unit lies in group 2h + (l % 4) / 2 of the unit's four. 6-bit: two 32-entry permutes and
// a blend on bit 5, or for sign-magnitude codes one permute of the magnitudes and bit 5
// moved to the sign.
template <bool ZP>
inline __m512 scaled(__m512 values, const float* srow, const float* zrow, int64_t g) {
  if constexpr (ZP) values = _mm512_sub_ps(values, _mm512_set1_ps(zrow[g]));
  return _mm512_mul_ps(values, _mm512_set1_ps(srow[g]));
}

enum class Grouping { Units, Halves, Sixteen };  // a group holds whole units; G % 64 == 32; G == 16

template <int BITS, Dec DEC, bool ZP, Grouping GROUPS, int MR>
void row_avx512_lookup(const Packed& w, RowScales& rs, int64_t n, const float* xp, int64_t ldx, float* y,
                       int64_t ldy) {
  static_assert(BITS == 4 || GROUPS == Grouping::Units, "6-bit tables take whole units");
  constexpr bool SPLIT = GROUPS == Grouping::Halves, SIXTEEN = GROUPS == Grouping::Sixteen;
  constexpr int kTables = BITS == 4 ? 1 : DEC == Dec::SignMagnitude ? 2 : 4;  // 16 fp32 values each
  const uint8_t* a = w.plane_a + n * w.lda;
  const uint8_t* b = BITS == 6 ? w.plane_b + n * w.ldb : nullptr;
  const float* srow = rs.scales(n);
  const float* zrow = ZP ? rs.zeros(n) : nullptr;
  __m512 values[kTables], table[kTables], high = _mm512_setzero_ps();
  for (int t = 0; t < kTables; ++t) values[t] = _mm512_loadu_ps(w.table + 16 * t);
  const __m512i low4 = _mm512_set1_epi32(15), upper4 = _mm512_set1_epi32(0x3C), bit5 = _mm512_set1_epi32(32);
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const __m512i half = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 16, 16, 16, 16, 16, 16, 16, 16);
  const __m512i quarter = _mm512_setr_epi32(0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3);
  __m512 lane_scale = _mm512_setzero_ps(), lane_zero = _mm512_setzero_ps();
  Avx512Sums<MR> sums;
  int64_t group = -1;
  Ahead<BITS> ahead(w, a, b);
  for (int64_t u = w.u_begin; u < w.u_end; ++u) {
    ahead.at(u);
    const int32_t g = w.group_of[u * kUnit / 8];
    if (SIXTEEN) {
      table[0] = values[0];
      lane_scale = _mm512_permutexvar_ps(quarter, _mm512_castps128_ps512(_mm_loadu_ps(srow + 4 * u)));
      if (ZP) lane_zero = _mm512_permutexvar_ps(quarter, _mm512_castps128_ps512(_mm_loadu_ps(zrow + 4 * u)));
    } else if (SPLIT) {
      table[0] = scaled<ZP>(values[0], srow, zrow, g);
      high = scaled<ZP>(values[0], srow, zrow, w.group_of[u * kUnit / 8 + 4]);
    } else if (g != group) {  // per channel: once a row
      group = g;
      for (int t = 0; t < kTables; ++t) table[t] = scaled<ZP>(values[t], srow, zrow, g);
    }
    const __m512i words = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + u * 32)));
    const __m512i fields =
        BITS == 6 ? _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + u * 16)))
                  : _mm512_setzero_si512();
    for (int i = 0; i < 4; ++i) {
      // 6-bit: the nibble to index bits 2-5 by a rotation (right by 8i + 4h - 2, i.e. left
      // by 2 for i = h = 0).
      const int s = 8 * i, q = BITS == 6 ? 2 : 0;
      const __m512i shift = _mm512_setr_epi32(s - q, s - q, s - q, s - q, s - q, s - q, s - q, s - q, s + 4 - q,
                                              s + 4 - q, s + 4 - q, s + 4 - q, s + 4 - q, s + 4 - q, s + 4 - q,
                                              s + 4 - q);
      const __m512i codes = BITS == 6 ? _mm512_rorv_epi32(words, _mm512_and_si512(shift, _mm512_set1_epi32(31)))
                                      : _mm512_srlv_epi32(words, shift);
      __m512 v;
      if constexpr (BITS == 4) {
        // SPLIT: (codes & 15) | half (ternary-logic table 0xEA is (A & B) | C).
        v = SPLIT ? _mm512_permutex2var_ps(table[0], _mm512_ternarylogic_epi32(codes, low4, half, 0xEA), high)
                  : _mm512_permutexvar_ps(codes, table[0]);
        if (SIXTEEN) v = _mm512_mul_ps(ZP ? _mm512_sub_ps(v, lane_zero) : v, lane_scale);
      } else {
        const __m512i low2 = _mm512_srlv_epi32(
            fields, _mm512_setr_epi32(s, s, s, s, s + 2, s + 2, s + 2, s + 2, s + 4, s + 4, s + 4, s + 4, s + 6,
                                      s + 6, s + 6, s + 6));
        // Bits 2-5 from codes, the rest from low2 (0xE4: (A & C) | (B & ~C)); above bit 5 unused.
        const __m512i index = _mm512_ternarylogic_epi32(codes, low2, upper4, 0xE4);
        const __m512 lower = _mm512_permutex2var_ps(table[0], index, table[1]);
        if constexpr (DEC == Dec::SignMagnitude) {
          // v ^ ((index << 26) & sign) (0x78: A ^ (B & C)): code bit 5 is the sign.
          v = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_castps_si512(lower),
                                                            _mm512_slli_epi32(index, 26), sign, 0x78));
        } else {
          v = _mm512_mask_blend_ps(_mm512_test_epi32_mask(index, bit5), lower,
                                   _mm512_permutex2var_ps(table[2], index, table[3]));
        }
      }
      sums.add(v, xp, ldx, u * kUnit + 16 * i, i);
    }
  }
  sums.store(w, y, ldy, n);
}

template <int BITS, Dec DEC, bool ZP, Grouping GROUPS>
void rows_avx512_lookup_t(const Packed& w, const float* xp, int64_t ldx, int64_t M, int64_t n0, int64_t n1, float* y,
                          int64_t ldy) {
  RowScales rs(w, Isa::Avx512);
  for (int64_t n = n0; n < n1; ++n)
    for_row_tiles(M, [&](auto mr, int64_t m) {
      row_avx512_lookup<BITS, DEC, ZP, GROUPS, decltype(mr)::value>(w, rs, n, xp + m * ldx, ldx, y + m * ldy, ldy);
    });
}

// Whether row_avx512_lookup takes w (else the byte-table decode above).
inline bool avx512_lookup(const Packed& w) {
  if (w.bits == 4) return w.group_size % 32 == 0 || w.group_size == 16;
  return w.bits == 6 && w.group_size % 64 == 0 && (w.dec == Dec::Table || w.dec == Dec::SignMagnitude);
}

// Calls rows_avx512_lookup_t for w's combination.
void rows_avx512_lookup(const Packed& w, const float* xp, int64_t ldx, int64_t M, int64_t n0, int64_t n1, float* y,
                        int64_t ldy) {
  using G = Grouping;
  const bool zp = w.zeros.kind != Store::None;
  const auto run = [&](auto bits, auto dec, auto z, auto groups) {
    rows_avx512_lookup_t<decltype(bits)::value, decltype(dec)::value, decltype(z)::value, decltype(groups)::value>(
        w, xp, ldx, M, n0, n1, y, ldy);
  };
  using std::integral_constant;
  constexpr auto B4 = integral_constant<int, 4>{};
  constexpr auto B6 = integral_constant<int, 6>{};
  constexpr auto table = integral_constant<Dec, Dec::Table>{};
  constexpr auto units = integral_constant<G, G::Units>{};
  if (w.bits == 6) {
    constexpr auto signmag = integral_constant<Dec, Dec::SignMagnitude>{};
    if (w.dec == Dec::SignMagnitude) return run(B6, signmag, std::false_type{}, units);
    return zp ? run(B6, table, std::true_type{}, units) : run(B6, table, std::false_type{}, units);
  }
  const auto by_groups = [&](auto z) {
    if (w.group_size == 16) return run(B4, table, z, integral_constant<G, G::Sixteen>{});
    if (w.group_size % 64 != 0) return run(B4, table, z, integral_constant<G, G::Halves>{});
    return run(B4, table, z, units);
  };
  return zp ? by_groups(std::true_type{}) : by_groups(std::false_type{});
}

template <int BITS, Dec DEC, bool ZP>
void dequant_avx512_t(const Packed& w, int64_t n0, int64_t n1, float* out) {
  const Avx512Consts<BITS, DEC> t(w);
  RowScales rs(w, Isa::Avx512);
  for (int64_t n = n0; n < n1; ++n) {
    const float* srow = rs.scales(n);
    const float* zrow = ZP ? rs.zeros(n) : nullptr;
    const uint8_t* a = w.plane_a + n * w.lda;
    const uint8_t* b = w.plane_b ? w.plane_b + n * w.ldb : nullptr;
    for (int64_t u = 0; u < w.K / kUnit; ++u) {
      __m512 v[4];
      weights_avx512<BITS, DEC, ZP>(w, t, a, b, srow, zrow, u, v);
      float* o = out + n * w.K + u * kUnit;
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(o + 8 * i, _mm512_castps512_ps256(v[i]));
        _mm256_storeu_ps(o + 32 + 8 * i, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v[i]), 1)));
      }
    }
  }
}

template <int S>
uint64_t stream_avx512(const uint8_t* p, int64_t bytes) {
  __m512i acc[S];
  for (int j = 0; j < S; ++j) acc[j] = _mm512_setzero_si512();
  const int64_t part = bytes / S / 64 * 64;  // see stream_avx2
  for (int64_t i = 0; i < part; i += 64)
    for (int j = 0; j < S; ++j) acc[j] = _mm512_xor_si512(acc[j], _mm512_load_si512(p + j * part + i));
  for (int j = 1; j < S; ++j) acc[0] = _mm512_xor_si512(acc[0], acc[j]);
  return static_cast<uint64_t>(_mm512_reduce_or_epi64(acc[0]));
}

#pragma GCC pop_options

// ---------------------------------------------------------------- AVX-512 VBMI (6- and 8-bit GEMV)
//
// vpermb looks up 64 bytes by 6-bit indices in one instruction, vpermi2b by 7-bit ones in
// two tables. One table per byte of the format's fp32 values scaled for the row
// ((v - z) * s, the dequantization's own fp32 ops: the same bits) decodes a unit of 64
// codes with four lookups and a byte transpose (8 unpacks), where the fp32 lookup above
// takes two vpermi2ps, a blend and the index arithmetic per 16 6-bit codes, and the FP8
// decode a widening, a shift, masks and vcvtph2ps per 16 8-bit codes. 8-bit: sign-magnitude codes
// only (Packed::mirrored: FP8): the magnitude (bits 0-6) is looked up in 128 entries and
// bit 7 flips the fp32 sign. 6-bit: a unit's code bytes come out in position order (byte
// p: nibble p of the 4-bit plane, the low nibble of byte p for p < 32 and the high nibble
// of byte p - 32 else, above bits 0-1 of byte p % 16 of the 2-bit plane shifted right by
// 2 (p / 16), as pack_codes lays them out); 8-bit codes are in k order. After the
// transpose, lane d of fp32 vector i holds code 16 (d / 4) + 4i + d % 4 (XOrder::Bytes,
// BytePositions). Per channel the tables hold the row's scaled values (built once a row):
// at M = 1 on 4096x4096 and 4096x14336 (an AVX-512 Xeon, both ISAs timed in turn in one
// process) per-channel FP6 ran 1.15-1.26x faster than the fp32 lookup. Rebuilding them for
// each group made groups of 128 0.85x and of 64 0.6x its speed, so with groups of a
// multiple of 32 (no zero points) the tables hold the unscaled values and each decoded
// vector is multiplied by its group's scale (value * scale: the dequantization's own
// product). Against the fp32 lookup (6-bit) and the fp16 placement (FP8), in turn in one
// process on an AMD EPYC with AVX-512, M = 1: FP8 g128 1.33-1.61x, MXFP8 1.45-1.64x, FP6
// E3M2 g128 1.20-1.21x, MXFP6 1.29-1.36x, FP6 E2M3 g128 0.98-1.03x; at M = 4 FP8 g128
// 1.21x, the 6-bit ones 0.96-1.04x.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi,avx2,fma,f16c")

// The byte planes of 64 fp32 values (table[0..63]) minus z, times s: plane[q] byte c is
// byte q of value c (values 0-31 from the first two vectors, 32-63 from the last two).
template <bool ZP>
inline void byte_tables(const float* table, float s, float z, __m512i plane[4]) {
  __m512i v[4];
  for (int i = 0; i < 4; ++i) {
    const __m512 values = _mm512_loadu_ps(table + 16 * i);
    v[i] = _mm512_castps_si512(
        _mm512_mul_ps(ZP ? _mm512_sub_ps(values, _mm512_set1_ps(z)) : values, _mm512_set1_ps(s)));
  }
  const __m512i first = _mm512_set_epi32(0x7C787470, 0x6C686460, 0x5C585450, 0x4C484440, 0x3C383430, 0x2C282420,
                                         0x1C181410, 0x0C080400, 0x7C787470, 0x6C686460, 0x5C585450, 0x4C484440,
                                         0x3C383430, 0x2C282420, 0x1C181410, 0x0C080400);  // byte j: 4 (j % 32)
  for (int q = 0; q < 4; ++q) {
    const __m512i idx = _mm512_add_epi8(first, _mm512_set1_epi8(static_cast<char>(q)));
    plane[q] = _mm512_mask_mov_epi8(_mm512_permutex2var_epi8(v[0], idx, v[1]), 0xFFFFFFFF00000000ull,
                                    _mm512_permutex2var_epi8(v[2], idx, v[3]));
  }
}

// The byte planes a row decodes through. 6-bit: codes 0-63 (low); 8-bit: magnitudes
// 0-63 (low) and 64-127 (high).
struct VbmiTables {
  __m512i low[4], high[4];
  template <int BITS, bool ZP>
  void build(const Packed& w, float s, float z) {
    byte_tables<ZP>(w.table, s, z, low);
    if (BITS == 8) byte_tables<false>(w.table + 64, s, z, high);
  }
};

// One weight row through tables t: the row's scaled values (per channel), or the unscaled
// values with srow, the row's group scales (GROUPED).
template <int BITS, bool ZP, int MR, bool GROUPED>
void row_avx512_vbmi(const Packed& w, const VbmiTables& t, const float* srow, int64_t n, const float* xp, int64_t ldx,
                     float* y, int64_t ldy) {
  static_assert(BITS == 6 || (BITS == 8 && !ZP), "8-bit: sign-magnitude codes, no zero points");
  static_assert(!(GROUPED && ZP), "groups: scales only");
  const uint8_t* a = w.plane_a + n * w.lda;
  const uint8_t* b = BITS == 6 ? w.plane_b + n * w.ldb : nullptr;
  const bool halves_of_units = w.group_size % kUnit != 0;
  __m512i low[4], high[4];  // in registers for the row
  for (int q = 0; q < 4; ++q) low[q] = t.low[q], high[q] = BITS == 8 ? t.high[q] : low[q];
  const __m512i nibble_shift = _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4);
  const __m512i field_shift = _mm512_setr_epi64(0, 0, 2, 2, 4, 4, 6, 6);
  const __m512i low2 = _mm512_set1_epi8(3), upper4 = _mm512_set1_epi8(0x3C);
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
  Avx512Sums<MR> sums;
  Ahead<BITS> ahead(w, a, b);
  for (int64_t u = w.u_begin; u < w.u_end; ++u) {
    ahead.at(u);
    __m512i bytes[4];
    if constexpr (BITS == 6) {
      const __m512i nibbles = _mm512_srlv_epi64(
          _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + u * 32))), nibble_shift);
      const __m512i fields = _mm512_and_si512(
          _mm512_srlv_epi64(_mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + u * 16))),
                            field_shift),
          low2);
      // ((nibbles << 2) & 0x3C) | fields (ternary-logic table 0xEA is (A & B) | C).
      const __m512i codes = _mm512_ternarylogic_epi32(_mm512_slli_epi16(nibbles, 2), upper4, fields, 0xEA);
      for (int q = 0; q < 4; ++q) bytes[q] = _mm512_permutexvar_epi8(codes, low[q]);
    } else {
      const __m512i codes = _mm512_loadu_si512(a + u * kUnit);
      for (int q = 0; q < 4; ++q) bytes[q] = _mm512_permutex2var_epi8(low[q], codes, high[q]);
      // A ^ (B & C): code bit 7 flips the sign, -(v * s) = (-v) * s whatever the sign of s.
      bytes[3] = _mm512_ternarylogic_epi32(bytes[3], codes, sign, 0x78);
    }
    const __m512i lo01 = _mm512_unpacklo_epi8(bytes[0], bytes[1]), hi01 = _mm512_unpackhi_epi8(bytes[0], bytes[1]);
    const __m512i lo23 = _mm512_unpacklo_epi8(bytes[2], bytes[3]), hi23 = _mm512_unpackhi_epi8(bytes[2], bytes[3]);
    __m512 v[4] = {_mm512_castsi512_ps(_mm512_unpacklo_epi16(lo01, lo23)),
                   _mm512_castsi512_ps(_mm512_unpackhi_epi16(lo01, lo23)),
                   _mm512_castsi512_ps(_mm512_unpacklo_epi16(hi01, hi23)),
                   _mm512_castsi512_ps(_mm512_unpackhi_epi16(hi01, hi23))};
    if constexpr (GROUPED) {  // lanes 0-7 hold positions 0-31 of the unit, lanes 8-15 the rest
      const int32_t* gof = w.group_of + u * kUnit / 8;
      const __m512 scale = halves_of_units ? halves(srow[gof[0]], srow[gof[4]]) : _mm512_set1_ps(srow[gof[0]]);
      for (int i = 0; i < 4; ++i) v[i] = _mm512_mul_ps(v[i], scale);
    }
    for (int i = 0; i < 4; ++i) sums.add(v[i], xp, ldx, u * kUnit + 16 * i, i);
  }
  sums.store(w, y, ldy, n);
}

template <int BITS, bool ZP, bool GROUPED>
void rows_avx512_vbmi_t(const Packed& w, const float* xp, int64_t ldx, int64_t M, int64_t n0, int64_t n1, float* y,
                        int64_t ldy) {
  RowScales rs(w, Isa::Avx512);
  VbmiTables t;
  if (GROUPED) t.build<BITS, false>(w, 1.f, 0.f);  // the same for every row
  for (int64_t n = n0; n < n1; ++n) {
    const float* srow = rs.scales(n);
    if (!GROUPED) t.build<BITS, ZP>(w, srow[0], ZP ? rs.zeros(n)[0] : 0.f);
    for_row_tiles(M, [&](auto mr, int64_t m) {
      row_avx512_vbmi<BITS, ZP, decltype(mr)::value, GROUPED>(w, t, srow, n, xp + m * ldx, ldx, y + m * ldy, ldy);
    });
  }
}

// Whether row_avx512_vbmi takes w.
inline bool avx512_vbmi(const Packed& w) {
  const bool zp = w.zeros.kind != Store::None;
  return (w.groups == 1 || (w.group_size % 32 == 0 && !zp)) && (w.bits == 6 || (w.bits == 8 && w.mirrored && !zp));
}

void rows_avx512_vbmi(const Packed& w, const float* xp, int64_t ldx, int64_t M, int64_t n0, int64_t n1, float* y,
                      int64_t ldy) {
  const bool grouped = w.groups > 1;
  if (w.bits == 8)
    return grouped ? rows_avx512_vbmi_t<8, false, true>(w, xp, ldx, M, n0, n1, y, ldy)
                   : rows_avx512_vbmi_t<8, false, false>(w, xp, ldx, M, n0, n1, y, ldy);
  if (w.zeros.kind != Store::None) return rows_avx512_vbmi_t<6, true, false>(w, xp, ldx, M, n0, n1, y, ldy);
  grouped ? rows_avx512_vbmi_t<6, false, true>(w, xp, ldx, M, n0, n1, y, ldy)
          : rows_avx512_vbmi_t<6, false, false>(w, xp, ldx, M, n0, n1, y, ldy);
}

#pragma GCC pop_options
#endif  // FPBENCH_X86

}  // namespace
