// The kernels' shared vocabulary: the ISAs and decoders, a layer's packed codes and
// scales as the kernels read them (Packed, Stored, RowScales), and the order of code
// positions in a unit. One of the pieces lut_linear.cpp includes into one translation
// unit (everything internal: an anonymous namespace).
#pragma once

#include "kernel_linear.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define FPBENCH_X86 1
#else
#pragma message("fpbench kernels: not an x86-64 target, building the scalar kernels only")
#endif

namespace {

constexpr int64_t kUnit = 64;  // weights per packed unit; K must be a multiple of it
constexpr int64_t kBlockedMinRows = 16;     // SIMD ISAs: from here the blocked GEMM (measured crossover: 12-16 rows)
// ISA Avx512Bf16 with bf16 x: from here the bf16 GEMM, below it the bf16 GEMV. On 4096x4096
// (AMD EPYC with AVX-512 BF16, in turn call by call in one process; FP6 per channel, INT4
// g128, INT8 per channel) the GEMM ran 1.35-1.64x as fast as the GEMV at M = 12 and
// 1.21-1.57x at M = 15; at M = 8, 0.62x (FP6) to 1.07x (INT4); at M = 4, 0.51-0.62x.
constexpr int64_t kBf16GemmMinRows = 9;
constexpr int64_t kScalarGemmMinRows = 32;  // the scalar ISA: from here, dequantize once + torch's GEMM

// Avx512Vbmi: AVX-512 with vpermb (6-bit and FP8 GEMV, see row_avx512_vbmi); otherwise as
// Avx512. Avx512Bf16: that and vdpbf16ps (the bf16 GEMV and GEMM for bf16 x, see
// lut_bf16_gemv.h and lut_bf16.h).
enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Vbmi = 3, Avx512Bf16 = 4 };

// How codes become values. Table: the value table (4-bit codes always: one vpshufb per 32
// codes is cheaper than any arithmetic; and the fallback for anything below). SignedInt /
// UnsignedInt: 8-bit two's complement / unsigned integers, converted (exact). Float: an
// 8-bit minifloat code with sign bit s, exponent field E and mantissa field M (m bits)
// is placed as the fp16 pattern (s << 15) | (E:M << (10 - m)), which is 2^(E - 15) * 1.M
// for E > 0 and the fp16 subnormal 2^-14 * 0.M for E = 0; vcvtph2ps (F16C) widens it to
// fp32 exactly, and a multiply by 2^(15 - bias) gives the format's value (a normal fp32,
// so the multiply does not round). The scalar reference places the same bits in an fp32
// pattern, (s << 31) | (E:M << (23 - m)), times 2^(127 - bias). Placing them in fp32
// directly would feed fp32 subnormals (E = 0) to the multiply, which on this AMD EPYC
// took 1.12 ms instead of 0.62 ms for a 1024x4096 fp6_e3m2 GEMV with 9% such codes.
// FloatSpecial: the same plus a compare that gives codes with the all-ones exponent
// (ieee) or the all-ones code (fn) the all-ones exponent, keeping sign and mantissa: inf
// or NaN. Fp16Nibble: 6-bit minifloats with 3 exponent and 2 mantissa bits and no
// special codes (FP6 E3M2). The fp16 pattern of value * 2^(bias - 15) is
// (s << 15) | (E:M << 8): its low byte is 0 and its high byte is T[code >> 2] | (code & 3),
// T[n] = (n >> 3) << 7 | (n & 7) << 2, so one vpshufb on the 4-bit plane, an OR with the
// 2-bit plane and vcvtph2ps decode 32 codes (the 4-table lookup takes 8 lookups and 6
// blends). Its lanes come out in code-position order (see weights_avx2), so the AVX2
// GEMV reads x from a per-call copy in that order, times 2^(15 - bias) (exact: each
// product v * x is then the same real number as with the format's values, rounded the
// same). Dequantization and the AVX-512 and scalar kernels take the table for E3M2 codes,
// and so do groups that are not a multiple of 32. SignMagnitude: other 6-bit codes whose
// upper 32 values are the lower 32 negated (a sign bit on top: FP6 E2M3). The AVX2
// kernels look up the magnitude (code & 31) in two 16-entry tables per byte plane, chosen
// by code bit 4 with one blend each, and OR the sign into the high byte: 4 lookups and 2
// blends per 32 codes instead of the 8 lookups and 6 blends of the 4-table lookup (FP6 E2M3
// GEMV at M = 1 on 4096x4096 and 4096x14336, this AMD EPYC, both decoders timed in turn in
// one process: 1.33-1.38x faster). For E3M2 the fp16 decode above stayed faster (5.98 against
// 6.79 ms on 4096x14336). AVX-512 and scalar code take the table for them.
enum class Dec { Table = 0, SignedInt = 1, UnsignedInt = 2, Float = 3, FloatSpecial = 4, Fp16Nibble = 5,
                 SignMagnitude = 6 };

Isa best_isa() {
#if FPBENCH_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    return !__builtin_cpu_supports("avx512vbmi") ? Isa::Avx512
           : __builtin_cpu_supports("avx512bf16") ? Isa::Avx512Bf16
                                                  : Isa::Avx512Vbmi;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::Avx2;
#endif
  return Isa::Scalar;
}

std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512Bf16: return "avx512bf16";
    case Isa::Avx512Vbmi: return "avx512vbmi";
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

Isa pick_isa(const std::string& requested) {
  const Isa best = best_isa();
  if (requested == "auto") return best;
  const Isa isas[] = {Isa::Avx512Bf16, Isa::Avx512Vbmi, Isa::Avx512, Isa::Avx2, Isa::Scalar};
  const Isa* want = std::find_if(std::begin(isas), std::end(isas), [&](Isa isa) { return isa_name(isa) == requested; });
  TORCH_CHECK(want != std::end(isas), "unknown ISA ", requested, "; use auto, avx512bf16, avx512vbmi, avx512, avx2 or scalar");
  TORCH_CHECK(static_cast<int>(*want) <= static_cast<int>(best), "this CPU cannot run the ", requested,
              " kernels (best: ", isa_name(best), ")");
  return *want;
}

// Scales or zero points [N, groups] as a layer stores them: fp32, fp16 or bf16 values, or
// the 8-bit codes of their scale format (E8M0, E4M3, ...) with a 256-entry table of each
// code's exact fp32 value (for NVFP4 times the tensor scale: the same fp32 product the
// simulator forms), so a layer holds the bytes its bits per weight count.
enum class Store { None, F32, F16, BF16, Byte };

inline float half_to_float(uint16_t h) {  // exact; portable (the scalar ISA has no F16C)
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, exp = (h >> 10) & 31u, man = h & 1023u;
  uint32_t bits;
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in fp32
    const float v = std::ldexp(static_cast<float>(man), -24);
    return sign ? -v : v;
  }
  bits = sign | (exp == 31 ? 0x7F800000u : (exp + 112) << 23) | man << 13;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

// 8-bit scale codes decode by arithmetic where it gives their table's values bit for bit:
// against the table's gather, the AVX-512 GEMV at M = 1 ran NVFP4 1.05-1.49x and MXFP4
// 1.03-1.20x faster (AMD EPYC with AVX-512; two runs, the two decodes in turn in one
// process, on 4096x4096, 4096x14336, 1536x576 and 576x1536). Exponent:
// fp32 bits (c << 23) + delta (E8M0, delta 0: 2^(c - 127)). Minifloat: the fp16 pattern
// (c & 0x80) << 8 | (c & 0x7F) << shift, widened exactly, times a multiplier (E4M3,
// shift 7, times 2^8 and NVFP4's tensor scale: the same fp32 product as the table's).
// Up to two codes the formula misses (E8M0's 2^-127 and NaN, E4M3's NaNs) are patched
// from the table. find_byte_decode tries the formulas on all 256 codes (byte_value is
// what the SIMD decode computes) and keeps the gather where none fits.
struct ByteDecode {
  enum class Kind { Gather, Exponent, Minifloat } kind = Kind::Gather;
  uint32_t delta = 0;
  int shift = 0;
  float multiplier = 1.f;
  int patches = 0;
  uint8_t patch_code[2] = {0, 0};
  float patch_value[2] = {0.f, 0.f};
  // Minifloat: every code's value over the multiplier as a bf16 word, the magnitude's
  // (bits 0-6) low and high bytes and bit 7 the sign (codes_to_floats_vbmi), where that
  // gives all 256 values bit for bit (NaNs as NaNs).
  bool words = false;
  uint8_t word_lo[128] = {}, word_hi[128] = {};
};

inline float byte_value(const ByteDecode& d, uint32_t c) {
  uint32_t bits;
  if (d.kind == ByteDecode::Kind::Exponent) {
    bits = (c << 23) + d.delta;
  } else {
    const float v = half_to_float(static_cast<uint16_t>((c & 0x80u) << 8 | (c & 0x7Fu) << d.shift)) * d.multiplier;
    std::memcpy(&bits, &v, 4);
  }
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

inline uint32_t float_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return bits;
}

// The formula's misses patched from the table, if at most two; false where more.
inline bool patch_misses(ByteDecode& d, const float* table) {
  d.patches = 0;
  for (uint32_t c = 0; c < 256; ++c) {
    if (float_bits(byte_value(d, c)) == float_bits(table[c])) continue;
    if (d.patches == 2) return false;
    d.patch_code[d.patches] = static_cast<uint8_t>(c);
    d.patch_value[d.patches++] = table[c];
  }
  return true;
}

// ByteDecode::words for a Minifloat decode, where they give the table.
inline void set_words(ByteDecode& d, const float* table) {
  uint16_t word[128];
  for (int c = 0; c < 128; ++c) {  // the formula's fp16 value, or a patched code's value over the multiplier
    const bool patched = std::find(d.patch_code, d.patch_code + d.patches, c) != d.patch_code + d.patches;
    const float v = patched ? table[c] / d.multiplier : half_to_float(static_cast<uint16_t>(c << d.shift));
    word[c] = std::isnan(v) ? 0x7FC0 : static_cast<uint16_t>(float_bits(v) >> 16);
  }
  for (uint32_t c = 0; c < 256; ++c) {
    const uint32_t bits = static_cast<uint32_t>(word[c & 0x7F] | (c & 0x80) << 8) << 16;
    float v;
    std::memcpy(&v, &bits, 4);
    v *= d.multiplier;
    if (std::isnan(table[c]) ? !std::isnan(v) : float_bits(v) != float_bits(table[c])) return;
  }
  for (int c = 0; c < 128; ++c) d.word_lo[c] = static_cast<uint8_t>(word[c]), d.word_hi[c] = static_cast<uint8_t>(word[c] >> 8);
  d.words = true;
}

inline ByteDecode find_byte_decode(const float* table) {
  ByteDecode d;
  d.kind = ByteDecode::Kind::Exponent;
  d.delta = float_bits(table[128]) - (128u << 23);
  if (patch_misses(d, table)) return d;
  d.kind = ByteDecode::Kind::Minifloat;
  for (d.shift = 4; d.shift <= 8; ++d.shift) {
    // Code 0x40's fp16 pattern is a power of two (shift >= 4): the multiplier is the
    // table's value over it, exactly.
    const float power = half_to_float(static_cast<uint16_t>(0x40 << d.shift));
    d.multiplier = static_cast<float>(static_cast<double>(table[0x40]) / power);
    if (std::isfinite(d.multiplier) && d.multiplier != 0.f && patch_misses(d, table)) {
      set_words(d, table);
      return d;
    }
  }
  return ByteDecode{};
}

#if FPBENCH_X86
// n fp16 values -> fp32, 8 per vcvtph2ps (exact, as half_to_float): an int4/g128 GEMV on
// 4096x14336 here runs within 2% of the same GEMV with fp32 scales, which need no
// conversion.
__attribute__((target("avx,f16c"))) void halves_to_floats_f16c(const uint16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = half_to_float(src[i]);
}

// n 8-bit scale codes -> their fp32 values, 8 at a time (see ByteDecode); the rest from
// the table. d's fields are copied into registers first: read through the reference, they
// were read again for every 8 codes (dst's float stores might alias them).
template <ByteDecode::Kind KIND>
__attribute__((target("avx2,f16c"))) void codes_to_floats_avx2(const uint8_t* src, int64_t n, const float* table,
                                                               const ByteDecode& d, float* dst) {
  using K = ByteDecode::Kind;
  const __m256i delta = _mm256_set1_epi32(static_cast<int>(d.delta));
  const __m128i shift = _mm_cvtsi32_si128(d.shift);
  const __m256 multiplier = _mm256_set1_ps(d.multiplier);
  const int patches = d.patches;
  const __m256i patch_code[2] = {_mm256_set1_epi32(d.patch_code[0]), _mm256_set1_epi32(d.patch_code[1])};
  const __m256 patch_value[2] = {_mm256_set1_ps(d.patch_value[0]), _mm256_set1_ps(d.patch_value[1])};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i));
    const __m256i index = _mm256_cvtepu8_epi32(bytes);
    __m256 v;
    if constexpr (KIND == K::Gather) {
      v = _mm256_i32gather_ps(table, index, 4);
    } else if constexpr (KIND == K::Exponent) {
      v = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_slli_epi32(index, 23), delta));
    } else {
      const __m128i words = _mm_cvtepu8_epi16(bytes);
      const __m128i pattern = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(words, _mm_set1_epi16(0x80)), 8),
                                           _mm_sll_epi16(_mm_and_si128(words, _mm_set1_epi16(0x7F)), shift));
      v = _mm256_mul_ps(_mm256_cvtph_ps(pattern), multiplier);
    }
    if constexpr (KIND != K::Gather)
      for (int p = 0; p < 2; ++p)
        if (p < patches)
          v = _mm256_blendv_ps(v, patch_value[p], _mm256_castsi256_ps(_mm256_cmpeq_epi32(index, patch_code[p])));
    _mm256_storeu_ps(dst + i, v);
  }
  for (; i < n; ++i) dst[i] = table[src[i]];
}

// The same 16 at a time (the rest as above): NVFP4 decodes 4 scales a unit of 64 weights.
template <ByteDecode::Kind KIND>
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,f16c"))) void codes_to_floats_avx512(
    const uint8_t* src, int64_t n, const float* table, const ByteDecode& d, float* dst) {
  using K = ByteDecode::Kind;
  const __m512i delta = _mm512_set1_epi32(static_cast<int>(d.delta));
  const __m128i shift = _mm_cvtsi32_si128(d.shift);
  const __m512 multiplier = _mm512_set1_ps(d.multiplier);
  const int patches = d.patches;
  const __m512i patch_code[2] = {_mm512_set1_epi32(d.patch_code[0]), _mm512_set1_epi32(d.patch_code[1])};
  const __m512 patch_value[2] = {_mm512_set1_ps(d.patch_value[0]), _mm512_set1_ps(d.patch_value[1])};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m512i index = _mm512_cvtepu8_epi32(bytes);
    __m512 v;
    if constexpr (KIND == K::Exponent) {
      v = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(index, 23), delta));
    } else {
      const __m256i words = _mm256_cvtepu8_epi16(bytes);
      const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(words, _mm256_set1_epi16(0x80)), 8);
      const __m256i pattern =
          _mm256_or_si256(sign, _mm256_sll_epi16(_mm256_and_si256(words, _mm256_set1_epi16(0x7F)), shift));
      v = _mm512_mul_ps(_mm512_cvtph_ps(pattern), multiplier);
    }
    for (int p = 0; p < 2; ++p)
      if (p < patches) v = _mm512_mask_mov_ps(v, _mm512_cmpeq_epi32_mask(index, patch_code[p]), patch_value[p]);
    _mm512_storeu_ps(dst + i, v);
  }
  codes_to_floats_avx2<KIND>(src + i, n - i, table, d, dst + i);
}

// Minifloat codes with ByteDecode::words, 64 at a time: the bf16 words looked up (two
// vpermi2b, the sign from code bit 7), widened and times the multiplier; returns how many
// codes it decoded (a multiple of 64). The codes are first permuted so that the unpacked
// words come out in order. Against codes_to_floats_avx512's 16 at a time, in turn call by
// call in one process, NVFP4's bf16 GEMV at M = 1 (its E4M3 scales 256 a row of K = 4096)
// ran 1.05-1.07x as fast with the weights in cache (2048x4096) and 1.00-1.02x cold.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx2,f16c"))) inline int64_t codes_to_floats_vbmi(
    const uint8_t* src, int64_t n, const ByteDecode& d, float* dst) {
  // Byte j from byte 8 b(j / 8) + j % 8, b = 0, 2, 1, 3, 4, 6, 5, 7: 8-byte blocks 1 <-> 2, 5 <-> 6.
  const __m512i permute = _mm512_set_epi64(0x3F3E3D3C3B3A3938, 0x2F2E2D2C2B2A2928, 0x3736353433323130,
                                           0x2726252423222120, 0x1F1E1D1C1B1A1918, 0x0F0E0D0C0B0A0908,
                                           0x1716151413121110, 0x0706050403020100);
  const __m512i lo0 = _mm512_loadu_si512(d.word_lo), lo1 = _mm512_loadu_si512(d.word_lo + 64);
  const __m512i hi0 = _mm512_loadu_si512(d.word_hi), hi1 = _mm512_loadu_si512(d.word_hi + 64);
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512 multiplier = _mm512_set1_ps(d.multiplier);
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m512i c = _mm512_permutexvar_epi8(permute, _mm512_loadu_si512(src + i));
    const __m512i lo = _mm512_permutex2var_epi8(lo0, c, lo1);
    const __m512i hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(hi0, c, hi1), c, sign, 0x78);  // A ^ (B & C)
    // Words of codes 0-15 and 32-47 (first), 16-31 and 48-63 (second), in order.
    const __m512i first = _mm512_unpacklo_epi8(lo, hi), second = _mm512_unpackhi_epi8(lo, hi);
    const __m256i quarters[4] = {_mm512_castsi512_si256(first), _mm512_castsi512_si256(second),
                                 _mm512_extracti64x4_epi64(first, 1), _mm512_extracti64x4_epi64(second, 1)};
    for (int q = 0; q < 4; ++q) {
      const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(quarters[q]), 16));
      _mm512_storeu_ps(dst + i + 16 * q, _mm512_mul_ps(v, multiplier));
    }
  }
  return i;
}
#endif

// isa: the caller's; the SIMD ones imply AVX2 and F16C, the scalar ISA stays portable.
inline void halves_to_floats(const uint16_t* src, int64_t n, float* dst, Isa isa) {
#if FPBENCH_X86
  if (isa != Isa::Scalar) return halves_to_floats_f16c(src, n, dst);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(src[i]);
}

inline void codes_to_floats(const uint8_t* src, int64_t n, const float* table, const ByteDecode& d, float* dst,
                            Isa isa) {
#if FPBENCH_X86
  using K = ByteDecode::Kind;
  const bool avx512 = isa >= Isa::Avx512;
  if (isa != Isa::Scalar) switch (d.kind) {
      case K::Exponent:
        return avx512 ? codes_to_floats_avx512<K::Exponent>(src, n, table, d, dst)
                      : codes_to_floats_avx2<K::Exponent>(src, n, table, d, dst);
      case K::Minifloat: {
        const int64_t done = isa >= Isa::Avx512Vbmi && d.words ? codes_to_floats_vbmi(src, n, d, dst) : 0;
        return avx512 ? codes_to_floats_avx512<K::Minifloat>(src + done, n - done, table, d, dst + done)
                      : codes_to_floats_avx2<K::Minifloat>(src + done, n - done, table, d, dst + done);
      }
      default: return codes_to_floats_avx2<K::Gather>(src, n, table, d, dst);
    }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = table[src[i]];
}

struct Stored {
  Store kind = Store::None;
  const void* data = nullptr;
  const float* table = nullptr;  // Byte: 256 entries
  ByteDecode decode;             // Byte: the SIMD decode

  // Values at .. at + count (of the [N, groups] array, row-major) in fp32 into out.
  void values(int64_t at, int64_t count, float* out, Isa isa) const {
    switch (kind) {
      case Store::F32: std::memcpy(out, static_cast<const float*>(data) + at, count * sizeof(float)); return;
      case Store::F16: halves_to_floats(static_cast<const uint16_t*>(data) + at, count, out, isa); return;
      case Store::BF16:
        for (int64_t i = 0; i < count; ++i) {
          const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(data)[at + i]) << 16;
          std::memcpy(out + i, &bits, 4);
        }
        return;
      case Store::Byte: codes_to_floats(static_cast<const uint8_t*>(data) + at, count, table, decode, out, isa); return;
      default: return;
    }
  }

  // Row n's `groups` values in fp32, of which groups g0 .. g1 are read: in place when
  // stored as fp32, else those decoded into buf (buf[g] for group g).
  const float* row(int64_t n, int64_t groups, int64_t g0, int64_t g1, float* buf, Isa isa) const {
    if (kind == Store::None) return nullptr;
    if (kind == Store::F32) return static_cast<const float*>(data) + n * groups;
    values(n * groups + g0, g1 - g0, buf + g0, isa);
    return buf;
  }

  // Bring group g0 of row n towards the cache (no fault past the end: a prefetch).
  void prefetch(int64_t n, int64_t groups, int64_t g0) const {
    const int64_t size = kind == Store::F32 ? 4 : kind == Store::Byte ? 1 : 2;
    if (kind != Store::None) __builtin_prefetch(static_cast<const char*>(data) + (n * groups + g0) * size);
  }
};

// One packed weight matrix and its scales, as the kernels read it.
struct Packed {
  int bits;                  // 4, 6 or 8
  const uint8_t* plane_a;    // 8-bit: codes [N, K]; 4/6-bit: 4-bit plane [N, K/2]
  const uint8_t* plane_b;    // 6-bit: 2-bit plane [N, K/4]; else null
  int64_t lda, ldb;          // bytes per row of each plane
  Stored scales;             // [N, groups]
  Stored zeros;              // [N, groups], or kind None (symmetric formats)
  int64_t groups, group_size;  // group_size: G (K for per-channel scales)
  int64_t N, K;
  const int32_t* group_of;   // [K / 8]: group of the 8 weights k = 8j .. 8j+7
  const float* table;        // 2^bits exact values
  const uint8_t* table_lo;   // [2^bits]: low byte of each value's bf16 pattern
  const uint8_t* table_hi;   // [2^bits]: high byte
  Dec dec;
  int fbits, mbits;          // Float*: the format's width and mantissa bits
  uint32_t em_mask;          // Float*: low fbits - 1 bits of a code
  uint32_t mask32;           // Float*: sign and E:M bits of the placed fp32 pattern
  uint32_t special32;        // FloatSpecial: placed bits that mark inf/NaN when all set
  float pow2;                // Float*: 2^(127 - bias)
  uint16_t mask16, special16;  // the same for the fp16 placement of the SIMD kernels
  float pow2_16;             // 2^(15 - bias)
  bool mirrored = false;     // 8-bit: code c + 128 is code c negated, bit for bit (sign-magnitude floats)
  // Byte scales that are a few-bit number times one fp32 multiplier (E8M0; E4M3 times
  // NVFP4's tensor scale) such that every value times every such number is exact in bf16:
  // those numbers (kind None where not so), and the multiplier (see lut_bf16.h).
  Stored scale_factors;
  float scale_multiplier = 1.f;
  // 4-bit integer codes whose values are (n ^ flip) + c (INT4: flip 8, c = -8, n the two's
  // complement nibble; INT4 asymmetric: flip 0, c = 0): the bf16 GEMV's words 0x4300 | (n ^
  // flip) = value + int_offset, int_offset = 128 - c (0 where the values are not such;
  // see lut_bf16_gemv.h), int_base = 0x4300 | flip.
  int int_offset = 0;
  uint16_t int_base = 0;
  // The SIMD GEMVs' block of K: units u_begin .. u_end of each row; a block after the first
  // adds its sums to y (see gemv).
  int64_t u_begin = 0, u_end = 0;
  int64_t ahead_rows = 0, ahead_units = 0;  // the GEMVs' prefetch distance (see Ahead)
  // y[i] = sum for the first block of K, y[i] + sum for the others.
  void put(float* y, float sum) const { *y = u_begin == 0 ? sum : *y + sum; }
  // This weight's block of units u .. u + n of each row (cut at the row's end), prefetching
  // `ahead` units on in the order a GEMV reads them.
  Packed block(int64_t u, int64_t n, int64_t ahead) const {
    Packed b = *this;
    b.u_begin = u, b.u_end = std::min(u + n, K / kUnit);
    const int64_t span = b.u_end - u;
    b.ahead_rows = ahead / span, b.ahead_units = ahead % span;
    return b;
  }
};

// A worker's fp32 copy of a row's scales and zero points (in place when stored as fp32),
// of the groups in w's block of K, decoded with the caller's ISA; the pointer holds until
// the next call. Where the block spans whole rows, the rows from n on are decoded together
// (kBatchValues values at most: one call for 256 per-channel scales, where a call a row
// took a tenth of a 576-column bf16 GEMV's time, perf). Against a call a row, in turn call
// by call in one process at M = 1 (AMD EPYC, Zen 4, 2 threads, weights in cache): the bf16
// GEMVs 1.03-1.28x on 1536x576 and 576x1536, the fp32 AVX2 ones 1.04-1.19x; 4096x14336
// cold 0.99-1.06x.
struct RowScales {
  static constexpr int64_t kBatchValues = 256;
  const Packed& w;
  Isa isa;
  int64_t g0, g1, batch;  // batch: rows decoded at once
  struct Held {
    std::vector<float> buf;
    int64_t first = -1;  // the row buf starts with (batches)
  } held_scales, held_zeros;
  RowScales(const Packed& w, Isa isa)
      : w(w), isa(isa), g0(w.group_of[w.u_begin * kUnit / 8]), g1(w.group_of[w.u_end * kUnit / 8 - 1] + 1),
        batch(g0 == 0 && g1 == w.groups ? std::max<int64_t>(1, kBatchValues / w.groups) : 1) {
    held_scales.buf.resize(batch * w.groups);
    if (w.zeros.kind != Store::None) held_zeros.buf.resize(batch * w.groups);
  }
  // Row by row, each call prefetches the block's groups kScaleRowsAhead rows on: a row's
  // scales for a block of K are a few bytes, and the rows' blocks lie a row of scales apart.
  static constexpr int64_t kScaleRowsAhead = 4;
  const float* scales(int64_t n) { return get(w.scales, held_scales, n); }
  const float* zeros(int64_t n) { return get(w.zeros, held_zeros, n); }

 private:
  const float* get(const Stored& s, Held& h, int64_t n) {
    if (batch == 1 || s.kind == Store::F32 || s.kind == Store::None) {
      s.prefetch(n + kScaleRowsAhead, w.groups, g0);
      return s.row(n, w.groups, g0, g1, h.buf.data(), isa);
    }
    if (h.first < 0 || n < h.first || n >= h.first + batch) {
      const int64_t rows = std::min(batch, w.N - n);
      s.values(n * w.groups, rows * w.groups, h.buf.data(), isa);
      s.prefetch(n + rows, w.groups, 0);
      h.first = n;
    }
    return h.buf.data() + (n - h.first) * w.groups;
  }
};

// Position p (0..63) of a unit -> weight offset inside the unit: the order in which the
// SIMD decode emits fp32 lanes (see lut_linear.cpp's header comment and packing.position_to_k).
inline int position_to_k(int p) {
  int half = p / 32, q = p % 32, lane = q / 16, r16 = q % 16;
  int word_vec = r16 / 8, r = r16 % 8, parity = r % 2;
  return 32 * half + 8 * (2 * word_vec + parity) + 4 * lane + r / 2;
}

}  // namespace
