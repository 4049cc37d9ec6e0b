// The bf16 dot-product GEMV (AVX-512 BF16): batch-1 decode and up to kBf16GemmMinRows - 1
// rows of bf16 x. Part of lut_linear.cpp's translation unit.
//
// The same contract as the bf16 GEMM (lut_bf16.h): the unscaled values are exact in bf16,
// each product value * x exact in fp32, vdpbf16ps adds pairs of them into fp32 sums, and
// the scale multiplies each group's sum (per channel: the row's); bf16 inputs and fp32
// results below 2^-126 flush to zero. The fp32 GEMVs decode each weight to fp32 and
// multiply it by its scale before one FMA per 16 weights; here a unit of 64 weights is
// two vectors of 32 bf16 words and two vdpbf16ps, with no scale per weight:
// - 4-bit: the unit's 32 code bytes widened to words (vpmovzxbw): the low nibbles (bits
//   0-4 of a word index vpermw's 32 entries: the 16 patterns twice) and the high ones
//   (shifted down) look up positions 0-31 and 32-63 (INT4 per channel: no lookup, see
//   int_decode);
// - 6-bit: each word's nibble shifted into index bits 2-5 beside its two low bits from the
//   2-bit plane (widened the same way), looked up in 64 entries (vpermi2w);
// - 8-bit: the code bytes looked up as low and high bytes (Bf16Bytes; sign-magnitude codes
//   in 128 entries and bit 7 moved to the sign) and interleaved into words.
// Lane j of the two vectors (j < 32 the first) holds weight lane_k(BITS, j) of the unit; x
// is copied once per call in that order (order_x_bf16). Per channel the scale multiplies
// the row's sum; with groups, each vector's sums of a unit are multiplied by their scales
// (Bf16Groups) before they are added up.
//
// Against the fp32 GEMVs on the same bf16 x widened (AMD EPYC with AVX-512 BF16, 2 threads,
// 2048x4096 resident in cache, in turn in one process; G weights/s): INT4 per channel 111
// vs 86, INT4 g128 99 vs 82, FP4 113 vs 88, FP6 E3M2 80 vs 51, E2M3 82 vs 51, INT8 83 vs 55,
// FP8 E4M3 91 vs 64, NVFP4 67 vs 56, MXFP4 91 vs 65, MXFP6 60 vs 39, MXFP8 54 vs 50 (before
// the pairs of units of row_bf16).
#pragma once

#include "lut_bf16.h"

namespace {

#if FPBENCH_X86

// 4-bit codes in groups of 16 (NVFP4): a vector's words, the low (first vector) or high
// nibbles of the unit's 32 bytes, hold two groups: byte b's nibble lies in the vector's
// group (b % 16) / 8 (position_to_k). The decode orders them so that sum lane i (words 2i,
// 2i + 1) lies in group i % 2, and a vector's scales are one broadcast pair instead of a
// masked load and a permute (NVFP4 with the weights in cache, in turn in one process:
// 1.03-1.10x). The byte of word j (0..31).
inline int alternate_byte(int j) {
  const int group = j / 2 % 2, ordinal = j / 4 * 2 + j % 2;  // 0..15 among the group's bytes
  return 8 * group + (ordinal < 8 ? ordinal : 8 + ordinal);
}

// Whether the decode orders w's words by alternate_byte.
inline bool alternate_lanes(const Packed& w) { return w.bits == 4 && w.group_size == 16; }

// Weight k (in its unit) of lane j of the two decoded vectors: positions in order for 4-
// and 6-bit codes (or by alternate_byte); 8-bit codes stored in k order, bytes 16L + i (i <
// 8) of each 128-bit lane L in the first vector's words 8L + i, bytes 16L + 8 + i in the
// second's.
inline int lane_k(int bits, int j, bool alternate = false) {
  if (bits != 8) return position_to_k(alternate ? 32 * (j / 32) + alternate_byte(j % 32) : j);
  const int v = j / 32, l = j % 32;
  return 16 * (l / 8) + 8 * v + l % 8;
}

// The span of k a decoded vector's weights lie in: its 32 consecutive k for 4- and 6-bit
// codes, the whole unit for 8-bit ones (lane_k). Groups of a multiple of it hold whole vectors.
constexpr int64_t vector_span(int bits) { return bits == 8 ? kUnit : 32; }

// Whether gemv_bf16 takes w: groups that hold whole vectors of a unit (Bf16Groups) or,
// without zero points, 16 or 32 weights (each sum lane's two weights in one group). Zero
// points: v - z is not exact in bf16, so a group's sum is s (sum x v - z sum x) (see
// rows_bf16_t).
inline bool bf16_gemv(const Packed& w) {
  const int64_t G = w.group_size;
  return G % vector_span(w.bits) == 0 || (w.zeros.kind == Store::None && (G == 16 || G == 32));
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16,avx2,fma,f16c")

// Units u0 .. u1 of x (bf16, 64 values a unit) in w's lane order: out[64u + j] = x[64u + lane_k(j)].
inline void order_x_bf16(const Packed& w, const uint16_t* x, int64_t u0, int64_t u1, uint16_t* out) {
  uint16_t order[kUnit];
  for (int j = 0; j < kUnit; ++j) order[j] = static_cast<uint16_t>(lane_k(w.bits, j, alternate_lanes(w)));
  order_units(x, order, u0, u1, out);
}

// 4-bit integer codes per channel without a lookup (int_decode): the bf16 word 0x4300 | u
// is 128 + u exactly (u < 16 in the mantissa's low bits), so where every code n has the
// value (n ^ flip) + c (Packed's int_offset and int_base, set by make_packed) the decode is
// a mask, an XOR and an OR, and each word is the value plus offset = 128 - c (INT4 136,
// INT4 asymmetric 128). A row's sum S = sum x (v + offset) then becomes (S - offset X) s,
// X the sum of x over the row (rows_bf16_t, 16 rows at a time): the products stay exact,
// the result is within the fp32 summation bound counted on |x| (|v| + |z| + offset) s, and
// a one-hot row gives s v bit for bit. Against the lookups, at M = 1 in turn call by call in
// one process (2 threads): INT4 per channel 1.08x on 4096x4096 and 1.05-1.13x on the default
// model's 576x576, 1536x576 and 576x1536 in cache, 1.03-1.07x cold (4096x4096, 4096x14336);
// INT4 asymmetric per channel 1.02-1.07x. (With groups the offset's term, sum_g s_g X_g a
// row, cost more than the decode saved, even with its lanes reduced 16 rows at a time: INT4
// g128 0.94-0.99x, g32 0.89-0.90x, g16 0.91-0.94x, INT4 asymmetric g128 0.96-1.05x on
// 4096x4096, 4096x14336 and the default model's layers; they keep the lookups.)
inline bool int_decode(const Packed& w) { return w.bits == 4 && w.int_offset && w.groups == 1; }

// The lookups of one format: bf16 word tables (4-bit: the 16 patterns twice, 6-bit: 64), or
// the byte tables (8-bit).
template <int BITS>
struct Bf16Words {
  __m512i word[2];
  __m512i alternate;  // 4-bit: byte alternate_byte(j) of a unit's codes in byte 2j
  __m512i int_base;   // 4-bit integers (int_decode): 0x4300 | flip in every word
  explicit Bf16Words(const Packed& w) : int_base(_mm512_set1_epi16(static_cast<short>(w.int_base))) {
    alignas(64) uint16_t patterns[64];
    for (int j = 0; j < 64; ++j) {
      const int c = j % (1 << BITS);
      patterns[j] = static_cast<uint16_t>(w.table_lo[c] | w.table_hi[c] << 8);
    }
    word[0] = _mm512_load_si512(patterns), word[1] = _mm512_load_si512(patterns + 32);
    alignas(64) uint16_t order[32];
    for (int j = 0; j < 32; ++j) order[j] = static_cast<uint16_t>(alternate_byte(j));
    alternate = _mm512_load_si512(order);
  }
};

template <>
struct Bf16Words<8> {
  Bf16Bytes<8> bytes;
  explicit Bf16Words(const Packed& w) : bytes(w) {}
};

// Unit u of a row (planes a, b) as two vectors of 32 bf16 weights (lanes as lane_k; ALTERNATE:
// 4-bit words by alternate_byte). MIRRORED (8-bit): code c + 128 is code c negated. INT (4-bit,
// int_decode): the words hold value + offset.
template <int BITS, bool MIRRORED, bool ALTERNATE = false, bool INT = false>
inline void decode_bf16(const Bf16Words<BITS>& t, const uint8_t* a, const uint8_t* b, int64_t u, __m512i& first,
                        __m512i& second) {
  if constexpr (BITS == 8) {
    const __m512i codes = _mm512_loadu_si512(a + u * kUnit);
    __m512i lo, hi;
    if constexpr (MIRRORED) {
      lo = _mm512_permutex2var_epi8(t.bytes.lo[0], codes, t.bytes.lo[1]);
      // A ^ (B & C): code bit 7 into the sign bit.
      hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(t.bytes.hi[0], codes, t.bytes.hi[1]), codes,
                                     _mm512_set1_epi8(static_cast<char>(0x80)), 0x78);
    } else {
      lo = Bf16Bytes<8>::look(t.bytes.lo, codes);
      hi = Bf16Bytes<8>::look(t.bytes.hi, codes);
    }
    first = _mm512_unpacklo_epi8(lo, hi), second = _mm512_unpackhi_epi8(lo, hi);
  } else {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + u * 32));
    const __m512i nibbles = ALTERNATE ? _mm512_maskz_permutexvar_epi8(0x5555555555555555ull, t.alternate,
                                                                      _mm512_castsi256_si512(bytes))
                                      : _mm512_cvtepu8_epi16(bytes);
    if constexpr (BITS == 4 && INT) {
      // Bits 0-3: nibble ^ flip, the rest from the base (0x6C: C ? A ^ B : B); the high
      // nibbles' words are 0 above bit 3.
      first = _mm512_ternarylogic_epi32(nibbles, t.int_base, _mm512_set1_epi16(0x000F), 0x6C);
      second = _mm512_xor_si512(_mm512_srli_epi16(nibbles, 4), t.int_base);
    } else if constexpr (BITS == 4) {
      first = _mm512_permutexvar_epi16(nibbles, t.word[0]);
      second = _mm512_permutexvar_epi16(_mm512_srli_epi16(nibbles, 4), t.word[0]);
    } else {
      // Word j: byte j % 16 of the 2-bit plane, whose bits 2 (p / 16) hold position p's.
      const __m512i fields = _mm512_cvtepu8_epi16(
          _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + u * 16))));
      const __m512i shift = _mm512_set_epi64(0x0002000200020002, 0x0002000200020002, 0x0002000200020002,
                                             0x0002000200020002, 0, 0, 0, 0);
      const __m512i upper4 = _mm512_set1_epi16(0x3C);
      // Index bits 2-5 from the nibble, the rest from the fields (0xE4: (A & C) | (B & ~C));
      // vpermi2w reads bits 0-5.
      const __m512i low = _mm512_ternarylogic_epi32(_mm512_slli_epi16(nibbles, 2), _mm512_srlv_epi16(fields, shift),
                                                    upper4, 0xE4);
      const __m512i high = _mm512_ternarylogic_epi32(
          _mm512_srli_epi16(nibbles, 2), _mm512_srlv_epi16(fields, _mm512_add_epi16(shift, _mm512_set1_epi16(4))),
          upper4, 0xE4);
      first = _mm512_permutex2var_epi16(t.word[0], low, t.word[1]);
      second = _mm512_permutex2var_epi16(t.word[0], high, t.word[1]);
    }
  }
}

// How the scales apply. Channel: one a row, on its sum. Vectors: each vector of a unit in one
// group (G % 32 == 0 for 4- and 6-bit codes, whose first vector holds k = 0-31, G % 64 == 0
// for 8-bit ones), one broadcast. Alternate: 4-bit codes in groups of 16, each vector's sum
// lanes alternating between its two groups (alternate_byte), one broadcast pair. Lanes:
// groups of 16 or 32 across a vector's lanes, a permuted vector of the unit's scales (for
// 8-bit codes the same for both vectors).
enum class Bf16Groups { Channel, Vectors, Alternate, Lanes };

// The scales of each sum lane of vector v (0, 1) in a unit: lane i sums lanes 2i and 2i + 1,
// whose weights lie in the unit's group lane_k / G.
template <int BITS>
inline __m512i lane_groups(int64_t G, int v) {
  alignas(64) int32_t group[16];
  for (int i = 0; i < 16; ++i) group[i] = static_cast<int32_t>(lane_k(BITS, 32 * v + 2 * i) / G);
  return _mm512_load_si512(group);
}

// One weight row's block of K (units u_begin .. u_end) against MR rows of x (lane order, ldx
// apart): sums[m] = the block's sums for row m of x, in 16 lanes (rows_bf16_t adds them up).
// Per channel the products go into 4 chains a row of x at M = 1 (2 from M = 2), two a
// vector by unit parity, to cover vdpbf16ps's latency, and the scale multiplies the row's
// sum. With groups each vector's products of a unit are multiplied by their scales
// (broadcast where a vector lies in one group) into running totals, chained the same way;
// groups of a multiple of 128 weights take two units at a time, each vector's products of
// both summed before one FMA: at M = 1, in turn in one process, INT4 g128 1.09-1.27x and
// FP8 g128 1.13-1.14x with the weights in cache, INT4 g128 1.06-1.10x and FP6 g128 1.02x
// cold. (Summing whole groups with run-time bookkeeping ran at 0.55-0.7x: INT4, G = 64
// and 128.) The loop holds little besides the vector work: one prefetch a 64-byte line
// on a pointer that moves once a block (Ahead), scale addresses from u where G is 16 or 32.
// Against a prefetch address worked out per unit and a scale index read from group_of (2048x4096 in
// cache, 2 threads, in turn in one process): NVFP4 1.08x, MXFP8 1.33x, FP6 E3M2 1.20x, FP6
// E2M3 g128 1.18x, MXFP6 1.12x, INT4 per channel and g128 1.07x, 8-bit per channel 1.02x.
template <int BITS, bool MIRRORED, Bf16Groups GROUPS, bool INT, int MR>
void row_bf16(const Packed& w, const Bf16Words<BITS>& t, const __m512i (&lanes)[2], const float* srow, int64_t n,
              const uint16_t* x, int64_t ldx, __m512* sums) {
  const uint8_t* a = w.plane_a + n * w.lda;
  const uint8_t* b = BITS == 6 ? w.plane_b + n * w.ldb : nullptr;
  constexpr int kChains = MR == 1 ? 4 : 2;
  __m512 acc[MR][kChains];
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < kChains; ++c) acc[m][c] = _mm512_setzero_ps();
  const __m512i lane_scales[2] = {lanes[0], lanes[1]};  // in registers, not read through the reference
  // Lanes (G = 16 or 32): the unit's scales, unit_groups from srow + u * unit_groups.
  const int64_t unit_groups = GROUPS == Bf16Groups::Lanes ? kUnit / w.group_size : 0;
  const __mmask16 unit_scales = static_cast<__mmask16>((1u << unit_groups) - 1);
  // Vectors: the group of vector h of unit u, by a shift where G = 32 x 2^s (against a read
  // of group_of, with the weights in cache, in turn in one process: MXFP4 1.29x, INT4 g64
  // 1.36x, g128 1.05x).
  const int vector_shift = w.group_size & (w.group_size - 1) ? -1 : __builtin_ctzll(w.group_size) - 5;
  const auto vector_group = [&](int64_t u, int h, auto shifted) __attribute__((always_inline)) {
    if constexpr (decltype(shifted)::value) return (2 * u + h) >> vector_shift;
    return static_cast<int64_t>(w.group_of[u * kUnit / 8 + 4 * h]);
  };
  // Unit u into chains c, c + 1 (compile-time indices: chains indexed at run time went
  // through memory).
  const auto unit = [&](int64_t u, auto chain, auto shifted) __attribute__((always_inline)) {
    constexpr int c = decltype(chain)::value;
    __m512i v[2];
    decode_bf16<BITS, MIRRORED, GROUPS == Bf16Groups::Alternate, INT>(t, a, b, u, v[0], v[1]);
    __m512 scale[2];
    if constexpr (GROUPS == Bf16Groups::Alternate) {
      for (int h = 0; h < 2; ++h)
        scale[h] = _mm512_castsi512_ps(
            _mm512_broadcastq_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(srow + 4 * u + 2 * h))));
    } else if constexpr (GROUPS == Bf16Groups::Lanes) {
      const __m512 unit_scale = _mm512_maskz_loadu_ps(unit_scales, srow + u * unit_groups);
      for (int h = 0; h < (BITS == 8 ? 1 : 2); ++h) scale[h] = _mm512_permutexvar_ps(lane_scales[h], unit_scale);
    } else if constexpr (GROUPS == Bf16Groups::Vectors) {
      for (int h = 0; h < 2; ++h) scale[h] = _mm512_set1_ps(srow[vector_group(u, h, shifted)]);
    }
    for (int m = 0; m < MR; ++m) {
      const uint16_t* xu = x + m * ldx + u * kUnit;
      if constexpr (GROUPS == Bf16Groups::Lanes && BITS == 8) {
        // Both vectors' sum lanes in the same groups (lane_k): their products summed first.
        const __m512 p = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)v[0], (__m512bh)_mm512_loadu_si512(xu));
        acc[m][c] = _mm512_fmadd_ps(_mm512_dpbf16_ps(p, (__m512bh)v[1], (__m512bh)_mm512_loadu_si512(xu + 32)),
                                    scale[0], acc[m][c]);
      } else {
        for (int h = 0; h < 2; ++h) {
          const __m512bh xv = (__m512bh)_mm512_loadu_si512(xu + 32 * h);
          __m512& sum = acc[m][c + h];
          if constexpr (GROUPS == Bf16Groups::Channel)
            sum = _mm512_dpbf16_ps(sum, (__m512bh)v[h], xv);
          else
            sum = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)v[h], xv), scale[h], sum);
        }
      }
    }
  };
  // Units u, u + 1 in one group: all their products summed (two dp chains added), then one
  // FMA (against an FMA a vector, at M = 1 in turn call by call in one process, 4096x4096 in
  // cache: INT4 and FP4 g128 1.05-1.07x, INT8 g128 1.10x, FP6 and FP8 g128 1.02x).
  const auto pair = [&](int64_t u, auto shifted) __attribute__((always_inline)) {
    __m512i v[2][2];
    decode_bf16<BITS, MIRRORED>(t, a, b, u, v[0][0], v[0][1]);
    decode_bf16<BITS, MIRRORED>(t, a, b, u + 1, v[1][0], v[1][1]);
    const __m512 scale = _mm512_set1_ps(srow[vector_group(u, 0, shifted)]);
    for (int m = 0; m < MR; ++m) {
      const uint16_t* xu = x + m * ldx + u * kUnit;
      __m512 p[2];
      for (int h = 0; h < 2; ++h) {
        p[h] = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)v[0][h], (__m512bh)_mm512_loadu_si512(xu + 32 * h));
        p[h] = _mm512_dpbf16_ps(p[h], (__m512bh)v[1][h], (__m512bh)_mm512_loadu_si512(xu + kUnit + 32 * h));
      }
      acc[m][0] = _mm512_fmadd_ps(_mm512_add_ps(p[0], p[1]), scale, acc[m][0]);
    }
  };
  Ahead<BITS, 2> ahead(w, a, b);  // one prefetch a 64-byte line of each plane
  // Groups of a multiple of 128 weights from an even unit: every pair of units in one group.
  const bool pairs = GROUPS == Bf16Groups::Vectors && w.group_size % (2 * kUnit) == 0 && w.u_begin % 2 == 0;
  // A loop for each pairing and way of finding a vector's group, chosen once a row. With
  // the choices inside it (two branches a unit), at M = 1 in turn call by call in one
  // process: MXFP4 0.88-0.96x as fast, FP6 g128 0.93-0.99x, INT4 g32 0.90-0.95x (2048x4096
  // in cache and 4096x4096 cold); INT4 g128 and 8-bit g64/g128 the same.
  int64_t u = w.u_begin;
  const auto loop = [&](auto paired, auto shifted) __attribute__((always_inline)) {
    for (; u + 2 <= w.u_end; u += 2) {
      ahead.at(u);
      if constexpr (BITS == 8) ahead.line(u + 1);
      if constexpr (decltype(paired)::value) {
        pair(u, shifted);
      } else {
        unit(u, std::integral_constant<int, 0>{}, shifted);
        unit(u + 1, std::integral_constant<int, kChains - 2>{}, shifted);
      }
    }
    if (u < w.u_end) {
      ahead.at(u);
      unit(u, std::integral_constant<int, 0>{}, shifted);
    }
  };
  using std::false_type, std::true_type;
  if constexpr (GROUPS != Bf16Groups::Vectors)
    loop(false_type{}, false_type{});
  else if (vector_shift < 0)
    pairs ? loop(true_type{}, false_type{}) : loop(false_type{}, false_type{});
  else
    pairs ? loop(true_type{}, true_type{}) : loop(false_type{}, true_type{});
  for (int m = 0; m < MR; ++m) {
    sums[m] = acc[m][0];
    for (int c = 1; c < kChains; ++c) sums[m] = _mm512_add_ps(sums[m], acc[m][c]);
  }
}

// Lane j of the result: the sum of the 16 lanes of v[4 (j % 4) + j / 4] (a slot order that
// is its own inverse: batch_slot). 45 shuffles and adds for 16 rows, where reducing each
// row's vector on its own took 8 a row in a chain of dependent steps at the row's end (on
// rows of 576 weights a third of the GEMV's time, perf).
inline __m512 reduce16(const __m512 (&v)[16]) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)  // 128-bit lanes 0-1 / 2-3 of v[2i] and v[2i + 1]: 8 floats each
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int j = 0; j < 4; ++j)  // 4 floats each, one 128-bit lane per vector
    u[j] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * j], t[2 * j + 1], 0x88),
                         _mm512_shuffle_f32x4(t[2 * j], t[2 * j + 1], 0xDD));
  const __m512 w0 = _mm512_add_ps(_mm512_unpacklo_ps(u[0], u[1]), _mm512_unpackhi_ps(u[0], u[1]));
  const __m512 w1 = _mm512_add_ps(_mm512_unpacklo_ps(u[2], u[3]), _mm512_unpackhi_ps(u[2], u[3]));
  return _mm512_add_ps(_mm512_shuffle_ps(w0, w1, 0x44), _mm512_shuffle_ps(w0, w1, 0xEE));
}
constexpr int batch_slot(int i) { return 4 * (i % 4) + i / 4; }

// Rows n0 .. n1 of y [M, N] (fp32) for x [M, K] in lane order. With zero points the kernel
// sums s x v over each group as without them and each row then takes off sum_g s_g z_g X_g
// (at the row's last block of K, over all its groups), X_g the sum of x over group g (xsum
// [M, groups], fp32, once per call): the products x v stay exact, and the result is within
// the fp32 summation bound of the exact product counted on |x| (|v| + |z|) s, not on |x|
// |v - z| s. INT (int_decode, per channel): the rows' sums are value + offset ones, and the
// flush takes off offset X (X = xsum, the sum of x over the row) before the scale.
template <int BITS, bool MIRRORED, Bf16Groups GROUPS, bool INT>
void rows_bf16_t(const Packed& w, const uint16_t* x, const float* xsum, int64_t M, int64_t n0, int64_t n1,
                 float* y) {
  const Bf16Words<BITS> t(w);
  RowScales rs(w, Isa::Avx512Bf16);  // VBMI: the 64-wide scale decode
  // The zero points' and the offset's terms: at the last block, with the scales and zero
  // points of the whole row.
  const bool zero_term = xsum && w.u_end == w.K / kUnit;
  const bool zero_points = w.zeros.kind != Store::None;
  static_assert(!INT || GROUPS == Bf16Groups::Channel);
  Packed whole = w;
  whole.u_begin = 0;
  std::optional<RowScales> row_rs;
  if (zero_term && w.u_begin != 0) row_rs.emplace(whole, Isa::Avx512Bf16);
  const __m512i lanes[2] = {lane_groups<BITS>(std::min<int64_t>(w.group_size, kUnit), 0),
                            lane_groups<BITS>(std::min<int64_t>(w.group_size, kUnit), 1)};
  // The rows' sums go to y 16 rows at a time (reduce16): y[m, n] = the sum times the row's
  // scale (per channel), added to y after K's first block (Packed::put), less the zero
  // points' term. With RowScales' batches, on the default model's 576x576, 1536x576 and
  // 576x1536 at M = 1 (2 threads, median of three processes each, old and new in turn):
  // FP6 1.09-1.21x, INT4 g128 1.15-1.38x, FP4 g32 and NVFP4 1.09-1.10x, FP8 1.02-1.03x.
  constexpr int kMaxRows = kBf16GemmMinRows - 1;
  // The zero points' term of each row: per channel s z X from the row's s and z (16 rows a
  // vector at the flush), with groups 16 lanes of s_g z_g X_g summed as the rows' sums are
  // (against a reduction a row, at M = 1 in turn call by call in one process: INT4
  // asymmetric per channel 1.04-1.11x, g32 and g128 1.00-1.02x, 4096x4096 and the default
  // model's layers in cache).
  __m512 pending[kMaxRows][16], zero_sums[kMaxRows][16];
  alignas(64) float factor[16], zfactor[16];
  for (int m = 0; m < kMaxRows; ++m)
    for (int i = 0; i < 16; ++i) pending[m][i] = zero_sums[m][i] = _mm512_setzero_ps();
  std::fill_n(factor, 16, 1.f);
  std::fill_n(zfactor, 16, 0.f);
  int count = 0;
  const auto flush = [&](int64_t n_first) {
    const __mmask16 live = static_cast<__mmask16>((1u << count) - 1);
    for (int64_t m = 0; m < M; ++m) {
      float* ym = y + m * w.N + n_first;
      __m512 v = reduce16(pending[m]);
      if (INT && zero_term) v = _mm512_fnmadd_ps(_mm512_set1_ps(static_cast<float>(w.int_offset)), _mm512_set1_ps(xsum[m]), v);
      v = _mm512_mul_ps(v, _mm512_load_ps(factor));
      if (w.u_begin != 0) v = _mm512_add_ps(_mm512_maskz_loadu_ps(live, ym), v);
      if (zero_term && zero_points)
        v = _mm512_sub_ps(v, GROUPS == Bf16Groups::Channel
                                 ? _mm512_mul_ps(_mm512_mul_ps(_mm512_load_ps(factor), _mm512_load_ps(zfactor)),
                                                 _mm512_set1_ps(xsum[m]))
                                 : reduce16(zero_sums[m]));
      _mm512_mask_storeu_ps(ym, live, v);
    }
    count = 0;
  };
  for (int64_t n = n0; n < n1; ++n) {
    const float* srow = rs.scales(n);  // the block's groups
    const int slot = batch_slot(count);
    factor[count] = GROUPS == Bf16Groups::Channel ? srow[0] : 1.f;
    // Tiles of 8, 4, 2 and 1 rows of x: each decodes the weight row once.
    int64_t m = 0;
    const auto tile = [&](auto mr) {
      constexpr int MR = decltype(mr)::value;
      __m512 sums[MR];
      row_bf16<BITS, MIRRORED, GROUPS, INT, MR>(w, t, lanes, srow, n, x + m * w.K, w.K, sums);
      for (int r = 0; r < MR; ++r) pending[m + r][slot] = sums[r];
      m += MR;
    };
    while (m + 8 <= M) tile(std::integral_constant<int, 8>{});
    if (m + 4 <= M) tile(std::integral_constant<int, 4>{});
    if (m + 2 <= M) tile(std::integral_constant<int, 2>{});
    if (m < M) tile(std::integral_constant<int, 1>{});
    if (zero_term && zero_points) {
      if (row_rs) srow = row_rs->scales(n);
      const float* zrow = row_rs ? row_rs->zeros(n) : rs.zeros(n);
      if constexpr (GROUPS == Bf16Groups::Channel) {
        zfactor[count] = zrow[0];
      } else {  // 16 groups a step (a scalar chain of adds cost a fifth of G = 32's row)
        for (m = 0; m < M; ++m) {
          const float* xm = xsum + m * w.groups;
          __m512 sz_x = _mm512_setzero_ps();
          for (int64_t g = 0; g < w.groups; g += 16) {
            const __mmask16 in = static_cast<__mmask16>((1u << std::min<int64_t>(16, w.groups - g)) - 1);
            const __m512 sz = _mm512_mul_ps(_mm512_maskz_loadu_ps(in, srow + g), _mm512_maskz_loadu_ps(in, zrow + g));
            sz_x = _mm512_fmadd_ps(sz, _mm512_maskz_loadu_ps(in, xm + g), sz_x);
          }
          zero_sums[m][slot] = sz_x;
        }
      }
    }
    if (++count == 16 || n + 1 == n1) flush(n + 1 - count);
  }
}

// Calls rows_bf16_t for w's combination.
void rows_bf16(const Packed& w, const uint16_t* x, const float* xsum, int64_t M, int64_t n0, int64_t n1, float* y) {
  using G = Bf16Groups;
  const auto run = [&](auto bits, auto mirrored) {
    constexpr int B = decltype(bits)::value;
    constexpr bool MI = decltype(mirrored)::value;
    if (w.groups == 1) return rows_bf16_t<B, MI, G::Channel, false>(w, x, xsum, M, n0, n1, y);
    if (w.group_size % vector_span(B) == 0) return rows_bf16_t<B, MI, G::Vectors, false>(w, x, xsum, M, n0, n1, y);
    if (B == 4 && alternate_lanes(w)) return rows_bf16_t<B, MI, G::Alternate, false>(w, x, xsum, M, n0, n1, y);
    rows_bf16_t<B, MI, G::Lanes, false>(w, x, xsum, M, n0, n1, y);
  };
  using std::integral_constant;
  if (int_decode(w)) return rows_bf16_t<4, false, G::Channel, true>(w, x, xsum, M, n0, n1, y);
  if (w.bits == 4) return run(integral_constant<int, 4>{}, std::false_type{});
  if (w.bits == 6) return run(integral_constant<int, 6>{}, std::false_type{});
  w.mirrored ? run(integral_constant<int, 8>{}, std::true_type{}) : run(integral_constant<int, 8>{}, std::false_type{});
}

#pragma GCC pop_options
#endif  // FPBENCH_X86

}  // namespace
