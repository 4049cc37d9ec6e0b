// Weight-only FP6 (E3M2, "4+2" layout) and INT4 (group 128) linear kernels for CPU.
//
// y[m, n] = scale[n] * sum_k x[m, k] * fp6(code[n, k])          (FP6, per-channel scale)
// y[m, n] = sum_g scale[n, g] * sum_{k in g} x[m, k] * int4[n, k] (INT4, 128-wide groups)
//
// Packed layout (written by fpbench/packing.py, which documents it in full): each row
// of K weights (K padded to a multiple of 256 with code 0 = +0.0) is cut into blocks
// of 256. A block holds 128 bytes of high nibbles (code >> 2 = sign and exponent) and
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
// ISA: AVX-512 (F+BW), AVX2 (+FMA+F16C) and portable scalar code live in one binary;
// the best one the CPU supports is picked at run time (or forced by the caller).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int64_t kBlock = 256;       // weights per packed FP6 block
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
    fp6_dequant_row_scalar(hi4 + n * Kp / 2, lo2 + n * Kp / 4, 1.0f, Kp, table, w.data());
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

// ---------------------------------------------------------------- AVX-512 (F + BW)

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")

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

// Decode slice i (0..7) of a block: 32 weights as two fp32 vectors (k..k+15, k+16..k+31).
inline void fp6_decode_slice_avx512(__m512i h, __m512i l, int i, const Avx512Tables& t,
                                    __m512& lo_half, __m512& hi_half) {
  const int ip = i & 3;
  // Move nibble ip to bits 5..2 and 2-bit field i to bits 1..0; bits above 5 are junk
  // that the 64-entry lookup ignores.
  __m512i hpart = ip == 0 ? _mm512_slli_epi16(h, 2) : _mm512_srli_epi16(h, 4 * ip - 2);
  __m512i lpart = _mm512_srli_epi16(l, 2 * i);
  // Bit select: bits 1..0 from lpart, the rest from hpart (imm 0xD8 = C ? B : A).
  __m512i code = _mm512_ternarylogic_epi32(hpart, lpart, _mm512_set1_epi16(3), 0xD8);
  __m512i bf16 = _mm512_permutex2var_epi16(t.fp6_pos, code, t.fp6_neg);
  lo_half = _mm512_castsi512_ps(_mm512_slli_epi32(bf16, 16));
  hi_half = _mm512_castsi512_ps(_mm512_and_si512(bf16, _mm512_set1_epi32(0xFFFF0000u)));
}

inline void int4_decode_slice_avx512(__m512i h, int i, const Avx512Tables& t, __m512& lo_half,
                                     __m512& hi_half) {
  __m512i nib = i == 0 ? h : _mm512_srli_epi16(h, 4 * i);
  __m512i bf16 = _mm512_permutexvar_epi16(nib, t.int4);  // uses index bits 4..0
  lo_half = _mm512_castsi512_ps(_mm512_slli_epi32(bf16, 16));
  hi_half = _mm512_castsi512_ps(_mm512_and_si512(bf16, _mm512_set1_epi32(0xFFFF0000u)));
}

template <int MR>
void fp6_rows_avx512_mr(const float* x, int64_t ldx, const uint8_t* h4, const uint8_t* l2,
                        int64_t Kp, float* acc_out, const Avx512Tables& t) {
  __m512 acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int a = 0; a < 4; ++a) acc[m][a] = _mm512_setzero_ps();
  for (int64_t b = 0; b < Kp / kBlock; ++b) {
    __m512i h0 = _mm512_loadu_si512(h4 + b * 128);
    __m512i h1 = _mm512_loadu_si512(h4 + b * 128 + 64);
    __m512i l = _mm512_loadu_si512(l2 + b * 64);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      __m512 wa, wb;
      fp6_decode_slice_avx512(i < 4 ? h0 : h1, l, i, t, wa, wb);
      const int64_t k = b * kBlock + 32 * i;
      const int a = (i & 1) * 2;  // two accumulator pairs hide the FMA latency
      for (int m = 0; m < MR; ++m) {
        acc[m][a] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * ldx + k), wa, acc[m][a]);
        acc[m][a + 1] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * ldx + k + 16), wb, acc[m][a + 1]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    acc_out[m] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]),
                                                    _mm512_add_ps(acc[m][2], acc[m][3])));
}

void fp6_rows_avx512(const float* x, int64_t ldx, int64_t M, const uint8_t* hi4,
                     const uint8_t* lo2, const float* scales, int64_t Kp, int64_t n0, int64_t n1,
                     float* y, int64_t ldy, const Avx512Tables& t) {
  float dots[kRowsPerPass];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* h4 = hi4 + n * Kp / 2;
    const uint8_t* l2 = lo2 + n * Kp / 4;
    // The packed row (Kp * 3/4 bytes) stays in L1 across the passes over x's rows.
    for (int64_t m0 = 0; m0 < M; m0 += kRowsPerPass) {
      const int64_t rows = std::min<int64_t>(kRowsPerPass, M - m0);
      const float* xm = x + m0 * ldx;
      switch (rows) {
        case 4: fp6_rows_avx512_mr<4>(xm, ldx, h4, l2, Kp, dots, t); break;
        case 3: fp6_rows_avx512_mr<3>(xm, ldx, h4, l2, Kp, dots, t); break;
        case 2: fp6_rows_avx512_mr<2>(xm, ldx, h4, l2, Kp, dots, t); break;
        default: fp6_rows_avx512_mr<1>(xm, ldx, h4, l2, Kp, dots, t); break;
      }
      // The per-channel scale is applied once, after the dot product.
      for (int64_t r = 0; r < rows; ++r) y[(m0 + r) * ldy + n] = dots[r] * scales[n];
    }
  }
}

template <int MR>
void int4_rows_avx512_mr(const float* x, int64_t ldx, const uint8_t* row, const float* gscales,
                         int64_t K, float* acc_out, const Avx512Tables& t) {
  __m512 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < K / kInt4Group; ++g) {
    __m512i h = _mm512_loadu_si512(row + g * 64);
    __m512 part[MR][2];
    for (int m = 0; m < MR; ++m) part[m][0] = part[m][1] = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      __m512 wa, wb;
      int4_decode_slice_avx512(h, i, t, wa, wb);
      const int64_t k = g * kInt4Group + 32 * i;
      for (int m = 0; m < MR; ++m) {
        part[m][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * ldx + k), wa, part[m][0]);
        part[m][1] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * ldx + k + 16), wb, part[m][1]);
      }
    }
    const __m512 s = _mm512_set1_ps(gscales[g]);  // group scale after the group's dot
    for (int m = 0; m < MR; ++m) {
      acc[m][0] = _mm512_fmadd_ps(part[m][0], s, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(part[m][1], s, acc[m][1]);
    }
  }
  for (int m = 0; m < MR; ++m) acc_out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
}

void int4_rows_avx512(const float* x, int64_t ldx, int64_t M, const uint8_t* packed,
                      const float* scales, int64_t K, int64_t n0, int64_t n1, float* y,
                      int64_t ldy, const Avx512Tables& t) {
  float dots[kRowsPerPass];
  const int64_t groups = K / kInt4Group;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = packed + n * K / 2;
    const float* gs = scales + n * groups;
    for (int64_t m0 = 0; m0 < M; m0 += kRowsPerPass) {
      const int64_t rows = std::min<int64_t>(kRowsPerPass, M - m0);
      const float* xm = x + m0 * ldx;
      switch (rows) {
        case 4: int4_rows_avx512_mr<4>(xm, ldx, row, gs, K, dots, t); break;
        case 3: int4_rows_avx512_mr<3>(xm, ldx, row, gs, K, dots, t); break;
        case 2: int4_rows_avx512_mr<2>(xm, ldx, row, gs, K, dots, t); break;
        default: int4_rows_avx512_mr<1>(xm, ldx, row, gs, K, dots, t); break;
      }
      for (int64_t r = 0; r < rows; ++r) y[(m0 + r) * ldy + n] = dots[r];
    }
  }
}

void fp6_dequant_row_avx512(const uint8_t* h4, const uint8_t* l2, float scale, int64_t Kp,
                            float* out, const Avx512Tables& t) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t b = 0; b < Kp / kBlock; ++b) {
    __m512i h0 = _mm512_loadu_si512(h4 + b * 128);
    __m512i h1 = _mm512_loadu_si512(h4 + b * 128 + 64);
    __m512i l = _mm512_loadu_si512(l2 + b * 64);
    for (int i = 0; i < 8; ++i) {
      __m512 wa, wb;
      fp6_decode_slice_avx512(i < 4 ? h0 : h1, l, i, t, wa, wb);
      _mm512_storeu_ps(out + b * kBlock + 32 * i, _mm512_mul_ps(wa, s));
      _mm512_storeu_ps(out + b * kBlock + 32 * i + 16, _mm512_mul_ps(wb, s));
    }
  }
}

void int4_dequant_row_avx512(const uint8_t* row, const float* gscales, int64_t K, float* out,
                             const Avx512Tables& t) {
  for (int64_t g = 0; g < K / kInt4Group; ++g) {
    __m512i h = _mm512_loadu_si512(row + g * 64);
    const __m512 s = _mm512_set1_ps(gscales[g]);
    for (int i = 0; i < 4; ++i) {
      __m512 wa, wb;
      int4_decode_slice_avx512(h, i, t, wa, wb);
      _mm512_storeu_ps(out + g * kInt4Group + 32 * i, _mm512_mul_ps(wa, s));
      _mm512_storeu_ps(out + g * kInt4Group + 32 * i + 16, _mm512_mul_ps(wb, s));
    }
  }
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
  for (int64_t b = 0; b < Kp / kBlock; ++b) {
    fp6_slice_avx2<MR, 0>(xp, ldx, h4, l2, b, acc);
    fp6_slice_avx2<MR, 1>(xp, ldx, h4, l2, b, acc);
    fp6_slice_avx2<MR, 2>(xp, ldx, h4, l2, b, acc);
    fp6_slice_avx2<MR, 3>(xp, ldx, h4, l2, b, acc);
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
    const uint8_t* l2 = lo2 + n * Kp / 4;
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
  for (int64_t b = 0; b < Kp / kBlock; ++b) {
    for (int i = 0; i < 8; ++i) {
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

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };

Isa best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    return Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::Avx2;
  return Isa::Scalar;
}

Isa resolve_isa(const std::string& name) {
  const Isa best = best_isa();
  Isa want = best;
  if (name == "avx512") want = Isa::Avx512;
  else if (name == "avx2") want = Isa::Avx2;
  else if (name == "scalar") want = Isa::Scalar;
  else TORCH_CHECK(name == "auto", "isa must be auto|avx512|avx2|scalar, got ", name);
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(best), "this CPU does not support isa=", name);
  return want;
}

std::string isa_name(Isa isa) {
  return isa == Isa::Avx512 ? "avx512" : isa == Isa::Avx2 ? "avx2" : "scalar";
}

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
  TORCH_CHECK(hi4.size(1) % (kBlock / 2) == 0 && lo2.size(1) * 2 == hi4.size(1),
              "packed_hi4 must be [N, Kp/2] and packed_lo2 [N, Kp/4] with Kp a multiple of 256");
  TORCH_CHECK(scales.dtype() == torch::kFloat32 && scales.is_contiguous() && scales.numel() == hi4.size(0),
              "scales must be contiguous float32 with one value per output channel");
}

// x [M, K] fp32 -> contiguous [M, Kp] with zero columns where the packed row is padded.
at::Tensor padded_input(const at::Tensor& x, int64_t Kp) {
  TORCH_CHECK(x.dim() == 2 && x.dtype() == torch::kFloat32, "x must be a 2-D float32 tensor");
  TORCH_CHECK(x.size(1) <= Kp, "x has more columns than the packed weight");
  at::Tensor xc = x.contiguous();
  if (xc.size(1) < Kp) xc = at::constant_pad_nd(xc, {0, Kp - xc.size(1)}, 0.0);
  return xc;
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
    for (int64_t n = n0; n < n1; ++n) {
      if (isa == Isa::Avx512) fp6_dequant_row_avx512(h + n * Kp / 2, l + n * Kp / 4, s[n], Kp, o + n * Kp, avx512_tables());
      else if (isa == Isa::Avx2) fp6_dequant_row_avx2(h + n * Kp / 2, l + n * Kp / 4, s[n], Kp, o + n * Kp);
      else fp6_dequant_row_scalar(h + n * Kp / 2, l + n * Kp / 4, s[n], Kp, fp6_float_table(), o + n * Kp);
    }
  });
  return out.narrow(1, 0, K).contiguous();
}

at::Tensor int4_dequantize(const at::Tensor& packed, const at::Tensor& scales, const std::string& isa_str) {
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.is_contiguous() && packed.dim() == 2, "packed must be contiguous uint8 [N, K/2]");
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(K % kInt4Group == 0, "INT4 K must be a multiple of 128");
  TORCH_CHECK(scales.dtype() == torch::kFloat32 && scales.is_contiguous() && scales.numel() == N * (K / kInt4Group),
              "scales must be contiguous float32 [N, K/128]");
  const Isa isa = resolve_isa(isa_str);
  at::Tensor out = at::empty({N, K}, packed.options().dtype(torch::kFloat32));
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* s = scales.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      if (isa == Isa::Avx512) int4_dequant_row_avx512(p + n * K / 2, s + n * (K / kInt4Group), K, o + n * K, avx512_tables());
      else int4_dequant_row_scalar(p + n * K / 2, s + n * (K / kInt4Group), K, o + n * K);
    }
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
  const Isa isa = resolve_isa(isa_str);
  const int64_t N = hi4.size(0), Kp = hi4.size(1) * 2;
  at::Tensor xc = padded_input(x, Kp);
  const int64_t M = xc.size(0);
  const uint8_t* h = hi4.data_ptr<uint8_t>();
  const uint8_t* l = lo2.data_ptr<uint8_t>();
  const float* s = scales.data_ptr<float>();
  if (M >= gemm_min_m) {
    return tiled_gemm(xc, N, Kp, [&](int64_t n, float* out) {
      if (isa == Isa::Avx512) fp6_dequant_row_avx512(h + n * Kp / 2, l + n * Kp / 4, s[n], Kp, out, avx512_tables());
      else if (isa == Isa::Avx2) fp6_dequant_row_avx2(h + n * Kp / 2, l + n * Kp / 4, s[n], Kp, out);
      else fp6_dequant_row_scalar(h + n * Kp / 2, l + n * Kp / 4, s[n], Kp, fp6_float_table(), out);
    });
  }
  at::Tensor y = at::empty({M, N}, xc.options());
  if (isa == Isa::Avx2) xc = x_lane_order(xc);
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Small M streams the packed weights once; both cores take half of the rows.
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    if (isa == Isa::Avx512) fp6_rows_avx512(xp, Kp, M, h, l, s, Kp, n0, n1, yp, N, avx512_tables());
    else if (isa == Isa::Avx2) fp6_rows_avx2(xp, Kp, M, h, l, s, Kp, n0, n1, yp, N);
    else fp6_rows_scalar(xp, Kp, M, h, l, s, Kp, n0, n1, yp, N, fp6_float_table());
  });
  return y;
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       int64_t gemm_min_m, const std::string& isa_str) {
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.is_contiguous() && packed.dim() == 2, "packed must be contiguous uint8 [N, K/2]");
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(K % kInt4Group == 0, "INT4 K must be a multiple of 128");
  TORCH_CHECK(scales.dtype() == torch::kFloat32 && scales.is_contiguous() && scales.numel() == N * (K / kInt4Group),
              "scales must be contiguous float32 [N, K/128]");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.dtype() == torch::kFloat32, "x must be float32 [M, K]");
  const Isa isa = resolve_isa(isa_str);
  at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0);
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* s = scales.data_ptr<float>();
  const int64_t groups = K / kInt4Group;
  if (M >= gemm_min_m) {
    return tiled_gemm(xc, N, K, [&](int64_t n, float* out) {
      if (isa == Isa::Avx512) int4_dequant_row_avx512(p + n * K / 2, s + n * groups, K, out, avx512_tables());
      else int4_dequant_row_scalar(p + n * K / 2, s + n * groups, K, out);
    });
  }
  at::Tensor y = at::empty({M, N}, xc.options());
  if (isa == Isa::Avx2) xc = x_lane_order(xc);
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    if (isa == Isa::Avx512) int4_rows_avx512(xp, K, M, p, s, K, n0, n1, yp, N, avx512_tables());
    else if (isa == Isa::Avx2) int4_rows_avx2(xp, K, M, p, s, K, n0, n1, yp, N);
    else int4_rows_scalar(xp, K, M, p, s, K, n0, n1, yp, N);
  });
  return y;
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
  m.def("fp6_linear", &fp6_linear, "y = x @ (scale * fp6(codes))^T from 4+2 packed codes");
  m.def("fp6_dequantize", &fp6_dequantize, "fp32 weights scale[n] * fp6(code[n, k]) [N, K]");
  m.def("int4_linear", &int4_linear, "y = x @ (int4 * group scale)^T, groups of 128");
  m.def("int4_dequantize", &int4_dequantize, "fp32 weights [N, K] of the INT4 kernel");
  m.def("stream_read_gbps", &stream_read_gbps, "best streaming-read bandwidth in GB/s");
  m.def("best_isa", [] { return isa_name(best_isa()); }, "widest ISA this CPU supports");
}
