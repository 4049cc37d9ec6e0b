// Weight-only linear kernels for every format whose codes have 4, 6 or 8 bits.
//
// y[m, n] = sum_k x[m, k] * w[n, k],   w[n, k] = (value(code[n, k]) - zero[n, g]) * scale[n, g]
//
// with g = k / G (G = K for per-channel scales) and no zero point for symmetric formats.
// The kernel holds no per-format code: ``table`` holds the exact fp32 value of every code
// (computed in Python from the format's own decoder), ``decode`` the format's parameters
// for the arithmetic decoders that replace the table where they are faster (both from
// fpbench/kernels/packing.py), and the weight above is computed in
// fp32 with exactly the operations of QuantizedWeight.dequantize(), so the dequantized
// weights are bit-identical to the simulator's and the outputs differ from a float64
// product only by the fp32 summation.
//
// Packed layout (written by fpbench/kernels/packing.py, which documents it in full): each
// row of K weights (K a multiple of 64) is a sequence of 64-weight units; inside a unit,
// code *positions* 0..63 hold weights in the order the SIMD decode produces them
// (position_to_k in packing.py). 8-bit codes take one byte per weight in natural order;
// 4-bit codes
// take 32 bytes per unit, position t in the low nibble of byte t and position 32 + t in
// the high nibble; 6-bit codes are the "4+2" split (ZeroQuant(4+2), Sec. 5): the high 4
// bits in a 4-bit plane laid out as above and the low 2 bits in a 2-bit plane of 16
// bytes per unit, position p in bits 2*(p/16)..2*(p/16)+1 of byte p % 16.
//
// Decode (see Dec below for the details): 4- and 6-bit codes through the table. Every
// value of a format with at most 8 bits is exact in bf16 (at most 8 significant bits,
// exponents within bf16's range; build checks it), so the table is held as two 16-byte
// tables per 16 codes (low and high byte of the bf16 pattern). vpshufb looks up 32
// (AVX2) or 64 (AVX-512) codes at once in a 16-entry table; 6-bit codes select among 4
// such tables with a blend tree on their upper bits. Interleaving the two byte planes
// gives bf16 words, and a shift (even words) or a mask (odd words) turns them into fp32
// without any further shuffle. 8-bit codes, stored in natural order, decode by
// arithmetic from the format parameters Python passes (integers by conversion,
// minifloats by placing their bits in an fp16 pattern), or, for a format those do not
// cover, are gathered from the fp32 table.
//
// ISA: AVX-512 (F+BW+VL), AVX2 (+FMA, F16C) and portable scalar code live in one binary;
// the best one the CPU supports is picked at run time, or a narrower one forced by the
// caller. On a non-x86 build only the scalar code exists. Workers clear flush-to-zero
// and denormals-are-zero while they run, and the build uses no fast-math, so subnormal
// values stay exact.

#include "kernel_linear.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
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
constexpr int64_t kScalarGemmMinRows = 32;  // the scalar ISA: from here, dequantize once + torch's GEMM

// Avx512Vbmi: AVX-512 with vpermb (6-bit and FP8 GEMV, see row_avx512_vbmi); otherwise as Avx512.
enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Vbmi = 3 };

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
    return __builtin_cpu_supports("avx512vbmi") ? Isa::Avx512Vbmi : Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::Avx2;
#endif
  return Isa::Scalar;
}

std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512Vbmi: return "avx512vbmi";
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

Isa pick_isa(const std::string& requested) {
  const Isa best = best_isa();
  if (requested == "auto") return best;
  const Isa isas[] = {Isa::Avx512Vbmi, Isa::Avx512, Isa::Avx2, Isa::Scalar};
  const Isa* want = std::find_if(std::begin(isas), std::end(isas), [&](Isa isa) { return isa_name(isa) == requested; });
  TORCH_CHECK(want != std::end(isas), "unknown ISA ", requested, "; use auto, avx512vbmi, avx512, avx2 or scalar");
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

// n 8-bit scale codes -> their fp32 values, 8 per gather. NVFP4 on 4096x14336 here: 1.41x
// the time of the same GEMV with fp32 scales one by one, 1.27x with the gather.
__attribute__((target("avx2"))) void codes_to_floats_avx2(const uint8_t* src, int64_t n, const float* table,
                                                          float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i index = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_ps(dst + i, _mm256_i32gather_ps(table, index, 4));
  }
  for (; i < n; ++i) dst[i] = table[src[i]];
}
#endif

// simd: the caller runs a SIMD ISA (which implies AVX2 and F16C); the scalar ISA stays
// portable.
inline void halves_to_floats(const uint16_t* src, int64_t n, float* dst, bool simd) {
#if FPBENCH_X86
  if (simd) return halves_to_floats_f16c(src, n, dst);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(src[i]);
}

inline void codes_to_floats(const uint8_t* src, int64_t n, const float* table, float* dst, bool simd) {
#if FPBENCH_X86
  if (simd) return codes_to_floats_avx2(src, n, table, dst);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = table[src[i]];
}

struct Stored {
  Store kind = Store::None;
  const void* data = nullptr;
  const float* table = nullptr;  // Byte: 256 entries

  // Row n's `groups` values in fp32, of which groups g0 .. g1 are read: in place when
  // stored as fp32, else those decoded into buf (buf[g] for group g).
  const float* row(int64_t n, int64_t groups, int64_t g0, int64_t g1, float* buf, bool simd) const {
    const int64_t at = n * groups + g0;
    switch (kind) {
      case Store::F32: return static_cast<const float*>(data) + n * groups;
      case Store::F16:
        halves_to_floats(static_cast<const uint16_t*>(data) + at, g1 - g0, buf + g0, simd);
        return buf;
      case Store::BF16:
        for (int64_t g = g0; g < g1; ++g) {
          const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(data)[n * groups + g]) << 16;
          std::memcpy(buf + g, &bits, 4);
        }
        return buf;
      case Store::Byte:
        codes_to_floats(static_cast<const uint8_t*>(data) + at, g1 - g0, table, buf + g0, simd);
        return buf;
      default: return nullptr;
    }
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
  // The SIMD GEMVs' block of K: units u_begin .. u_end of each row; a block after the first
  // adds its sums to y (see gemv).
  int64_t u_begin = 0, u_end = 0;
  int64_t ahead_rows = 0, ahead_units = 0;  // the GEMVs' prefetch distance (see prefetch_ahead)
  // y[i] = sum for the first block of K, y[i] + sum for the others.
  void put(float* y, float sum) const { *y = u_begin == 0 ? sum : *y + sum; }
};

// A worker's fp32 copy of one row's scales and zero points (in place when stored as fp32),
// of the groups in w's block of K; simd false for the scalar ISA.
struct RowScales {
  const Packed& w;
  std::vector<float> buf;
  bool simd;
  int64_t g0, g1;
  explicit RowScales(const Packed& w, bool simd = true)
      : w(w), buf(2 * w.groups), simd(simd), g0(w.group_of[w.u_begin * kUnit / 8]),
        g1(w.group_of[w.u_end * kUnit / 8 - 1] + 1) {}
  // Each call prefetches the block's groups kScaleRowsAhead rows on: a row's scales for a
  // block of K are a few bytes, and the rows' blocks lie a row of scales apart.
  static constexpr int64_t kScaleRowsAhead = 4;
  const float* scales(int64_t n) {
    w.scales.prefetch(n + kScaleRowsAhead, w.groups, g0);
    return w.scales.row(n, w.groups, g0, g1, buf.data(), simd);
  }
  const float* zeros(int64_t n) {
    w.zeros.prefetch(n + kScaleRowsAhead, w.groups, g0);
    return w.zeros.row(n, w.groups, g0, g1, buf.data() + w.groups, simd);
  }
};

// Position p (0..63) of a unit -> weight offset inside the unit: the order in which the
// SIMD decode below emits fp32 lanes (see the header comment and packing.position_to_k).
inline int position_to_k(int p) {
  int half = p / 32, q = p % 32, lane = q / 16, r16 = q % 16;
  int word_vec = r16 / 8, r = r16 % 8, parity = r % 2;
  return 32 * half + 8 * (2 * word_vec + parity) + 4 * lane + r / 2;
}

// ---------------------------------------------------------------- scalar (reference)

inline int code_at(const Packed& w, int64_t n, int64_t u, int p) {
  if (w.bits == 8) return w.plane_a[n * w.lda + u * kUnit + p];
  const uint8_t byte = w.plane_a[n * w.lda + u * 32 + (p % 32)];
  const int nibble = p < 32 ? byte & 15 : byte >> 4;
  if (w.bits == 4) return nibble;
  const int low2 = (w.plane_b[n * w.ldb + u * 16 + (p % 16)] >> (2 * (p / 16))) & 3;
  return nibble << 2 | low2;
}

inline float decode_scalar(const Packed& w, int code) {
  switch (w.dec) {
    case Dec::SignedInt: return static_cast<float>(static_cast<int8_t>(code));
    case Dec::UnsignedInt: return static_cast<float>(code);
    case Dec::Float:
    case Dec::FloatSpecial: {
      const uint32_t sign = static_cast<uint32_t>(code >> (w.fbits - 1)) & 1u;
      const uint32_t raw = sign << 31 | (static_cast<uint32_t>(code) & w.em_mask) << (23 - w.mbits);
      const bool special = w.dec == Dec::FloatSpecial && (raw & w.special32) == w.special32;
      float value;
      const uint32_t bits = special ? raw | 0x7F800000u : raw;
      std::memcpy(&value, &bits, 4);
      return special ? value : value * w.pow2;
    }
    default: return w.table[code];
  }
}

void dequant_row_scalar(const Packed& w, RowScales& rs, int64_t n, float* out) {
  const float* srow = rs.scales(n);
  const float* zrow = rs.zeros(n);
  for (int64_t u = 0; u < w.K / kUnit; ++u)
    for (int p = 0; p < kUnit; ++p) {
      const int64_t k = u * kUnit + (w.bits == 8 ? p : position_to_k(p));
      const int32_t g = w.group_of[k / 8];
      float value = decode_scalar(w, code_at(w, n, u, p));
      if (zrow) value = value - zrow[g];
      out[k] = value * srow[g];
    }
}

void rows_scalar(const Packed& w, const float* x, int64_t ldx, int64_t M, int64_t n0, int64_t n1,
                 float* y, int64_t ldy) {
  std::vector<float> row(w.K);
  RowScales rs(w, false);
  for (int64_t n = n0; n < n1; ++n) {
    dequant_row_scalar(w, rs, n, row.data());
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t k = 0; k < w.K; ++k) acc += x[m * ldx + k] * row[k];
      y[m * ldy + n] = acc;
    }
  }
}

#if FPBENCH_X86
// Prefetch the codes kPrefetchBytes of the first plane ahead of unit u (the 2-bit plane as
// many units ahead), on into the next rows, which follow in memory: a row is a few KiB,
// too short for the hardware prefetcher to ramp up on its own, and it stops at 4 KiB pages.
// At M = 1 on this AMD EPYC (2 threads; distances timed in turn in one process), 2-8 KiB
// ahead streamed 5-25% faster than 256-512 bytes (FP6 E3M2 on 4096x14336: 12.2-12.7
// against 11.0-11.5 GB/s; INT8: 13.3-14.5 against 12.2-12.4; INT4: 12.2-13.1 against 10.5).
// The blocked GEMM's panel decode (a few units of a row per panel) keeps 8 units ahead.
constexpr int64_t kPrefetchBytes = 4096;

template <int BITS, bool PANEL = false>
inline void prefetch_ahead(const uint8_t* a, const uint8_t* b, int64_t u) {
  constexpr int64_t unit_bytes = BITS == 8 ? kUnit : kUnit / 2, ahead = PANEL ? 8 : kPrefetchBytes / unit_bytes;
  _mm_prefetch(reinterpret_cast<const char*>(a + (u + ahead) * unit_bytes), _MM_HINT_T0);
  if constexpr (BITS == 6) _mm_prefetch(reinterpret_cast<const char*>(b + (u + ahead) * (kUnit / 4)), _MM_HINT_T0);
}

// The GEMVs' prefetch for unit u of a row's block of K: as far ahead in the units the
// GEMV reads next, which after the block's end continue in the same block of the next
// rows (Packed::ahead_rows, ahead_units).
template <int BITS>
inline void prefetch_ahead(const Packed& w, const uint8_t* a, const uint8_t* b, int64_t u) {
  constexpr int64_t unit_bytes = BITS == 8 ? kUnit : kUnit / 2;
  int64_t v = u + w.ahead_units, rows = w.ahead_rows;
  if (v >= w.u_end) v -= w.u_end - w.u_begin, ++rows;
  _mm_prefetch(reinterpret_cast<const char*>(a + rows * w.lda + v * unit_bytes), _MM_HINT_T0);
  if constexpr (BITS == 6) _mm_prefetch(reinterpret_cast<const char*>(b + rows * w.ldb + v * (kUnit / 4)), _MM_HINT_T0);
}

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
  for (int64_t u = w.u_begin; u < w.u_end; ++u) {
    prefetch_ahead<BITS>(w, a, b, u);
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
// at M = 1: 1.28x, measured side by side here; with G = 32 or 64 the fold costs what it
// saves, and those keep row_avx2). The same products as row_avx2, summed in another
// order: the result stays within the fp32 summation bound.
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
  const int64_t per_group = w.group_size / kUnit;  // units per group; a block of K holds whole groups
  for (int64_t u0 = w.u_begin; u0 < w.u_end; u0 += per_group) {
    const int64_t u1 = std::min(u0 + per_group, w.u_end);  // the last group may be shorter
    __m256 part[MR][kChains];
    for (int m = 0; m < MR; ++m)
      for (int c = 0; c < kChains; ++c) part[m][c] = _mm256_setzero_ps();
    for (int64_t u = u0; u < u1; ++u) {
      prefetch_ahead<BITS>(w, a, b, u);
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

template <int BITS, Dec DEC, bool ZP>
void rows_avx2_t(const Packed& w, const float* x, int64_t ldx, int64_t M, int64_t n0, int64_t n1, float* y,
                 int64_t ldy) {
  const Avx2Consts<BITS, DEC> t(w);
  RowScales rs(w);
  const bool per_channel = !ZP && w.groups == 1, folded = !ZP && w.group_size % (2 * kUnit) == 0;
  for (int64_t n = n0; n < n1; ++n)
    for_row_tiles(M, [&](auto mr, int64_t m) {
      constexpr int MR = decltype(mr)::value;
      if (per_channel)
        row_avx2<BITS, DEC, false, MR, true>(w, t, rs, n, x + m * ldx, ldx, y + m * ldy, ldy);
      else if (folded)
        row_avx2_grouped<BITS, DEC, MR>(w, t, rs, n, x + m * ldx, ldx, y + m * ldy, ldy);
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
      prefetch_ahead<BITS, true>(a, b, u);
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
  RowScales rs(w);
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
  RowScales rs(w);
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
  for (int64_t u = w.u_begin; u < w.u_end; ++u) {
    prefetch_ahead<BITS>(w, a, b, u);
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
  RowScales rs(w);
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
  for (int64_t u = w.u_begin; u < w.u_end; ++u) {
    prefetch_ahead<BITS>(w, a, b, u);
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
  RowScales rs(w);
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
  RowScales rs(w);
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
// BytePositions). Per channel only (tables built once a row): at M = 1 on 4096x4096 and
// 4096x14336 (an AVX-512 Xeon, both ISAs timed in turn in one process) per-channel FP6 ran
// 1.15-1.26x faster than the fp32 lookup, while rebuilding the tables for each group made
// groups of 128 0.85x and of 64 0.6x its speed.
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

template <int BITS, bool ZP, int MR>
void row_avx512_vbmi(const Packed& w, RowScales& rs, int64_t n, const float* xp, int64_t ldx, float* y, int64_t ldy) {
  static_assert(BITS == 6 || (BITS == 8 && !ZP), "8-bit: sign-magnitude codes, no zero points");
  const uint8_t* a = w.plane_a + n * w.lda;
  const uint8_t* b = BITS == 6 ? w.plane_b + n * w.ldb : nullptr;
  const float s = rs.scales(n)[0], z = ZP ? rs.zeros(n)[0] : 0.f;
  __m512i low[4], high[4];  // 6-bit: codes 0-63; 8-bit: magnitudes 0-63 and 64-127
  byte_tables<ZP>(w.table, s, z, low);
  if (BITS == 8) byte_tables<false>(w.table + 64, s, z, high);
  const __m512i nibble_shift = _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4);
  const __m512i field_shift = _mm512_setr_epi64(0, 0, 2, 2, 4, 4, 6, 6);
  const __m512i low2 = _mm512_set1_epi8(3), upper4 = _mm512_set1_epi8(0x3C);
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
  Avx512Sums<MR> sums;
  for (int64_t u = w.u_begin; u < w.u_end; ++u) {
    prefetch_ahead<BITS>(w, a, b, u);
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
    const __m512 v[4] = {_mm512_castsi512_ps(_mm512_unpacklo_epi16(lo01, lo23)),
                         _mm512_castsi512_ps(_mm512_unpackhi_epi16(lo01, lo23)),
                         _mm512_castsi512_ps(_mm512_unpacklo_epi16(hi01, hi23)),
                         _mm512_castsi512_ps(_mm512_unpackhi_epi16(hi01, hi23))};
    for (int i = 0; i < 4; ++i) sums.add(v[i], xp, ldx, u * kUnit + 16 * i, i);
  }
  sums.store(w, y, ldy, n);
}

template <int BITS, bool ZP>
void rows_avx512_vbmi_t(const Packed& w, const float* xp, int64_t ldx, int64_t M, int64_t n0, int64_t n1, float* y,
                        int64_t ldy) {
  RowScales rs(w);
  for (int64_t n = n0; n < n1; ++n)
    for_row_tiles(M, [&](auto mr, int64_t m) {
      row_avx512_vbmi<BITS, ZP, decltype(mr)::value>(w, rs, n, xp + m * ldx, ldx, y + m * ldy, ldy);
    });
}

// Whether row_avx512_vbmi takes w.
inline bool avx512_vbmi(const Packed& w) {
  return w.groups == 1 && (w.bits == 6 || (w.bits == 8 && w.mirrored && w.zeros.kind == Store::None));
}

void rows_avx512_vbmi(const Packed& w, const float* xp, int64_t ldx, int64_t M, int64_t n0, int64_t n1, float* y,
                      int64_t ldy) {
  if (w.bits == 8) return rows_avx512_vbmi_t<8, false>(w, xp, ldx, M, n0, n1, y, ldy);
  if (w.zeros.kind != Store::None) return rows_avx512_vbmi_t<6, true>(w, xp, ldx, M, n0, n1, y, ldy);
  rows_avx512_vbmi_t<6, false>(w, xp, ldx, M, n0, n1, y, ldy);
}

#pragma GCC pop_options
#endif  // FPBENCH_X86

// ---------------------------------------------------------------- dispatch

// Rows of x (M x K) in the order a GEMV reads them, into out, column c of each 64-column
// unit holding k:
// - Avx512: as the AVX-512 table decode emits weights (its fp32 vector i holds
//   k = 8i.. and 32 + 8i..): c = 16i + 8h + j holds k = 32h + 8i + j;
// - Nibbles: as row_avx512_lookup reads codes: c = 16i + 8h + l holds the weight of
//   position 32h + 4l + i;
// - Positions (Dec::Fp16Nibble): c holds the weight of position c, times `factor` (exact:
//   a power of two);
// - Bytes, BytePositions: as row_avx512_vbmi emits weights: c = 16i + d holds k (8-bit
//   codes) or the weight of position (6-bit) 16 (d / 4) + 4i + d % 4.
// Plain loops: torch's index_select and multiply took 10-15 us a call, a sixth of a small
// layer's GEMV.
enum class XOrder { Avx512, Nibbles, Positions, Bytes, BytePositions };

void order_x(const float* x, int64_t M, int64_t K, XOrder how, float factor, float* out) {
  int order[kUnit];
  for (int c = 0; c < kUnit; ++c) {
    const int i = c / 16, h = c % 16 / 8, j = c % 8;
    const int transposed = c % 16 / 4 * 16 + 4 * i + c % 4;  // row_avx512_vbmi's lane c
    order[c] = how == XOrder::Avx512          ? 32 * h + 8 * i + j
               : how == XOrder::Nibbles       ? position_to_k(32 * h + 4 * j + i)
               : how == XOrder::Bytes         ? transposed
               : how == XOrder::BytePositions ? position_to_k(transposed)
                                              : position_to_k(c);
  }
  for (int64_t r = 0; r < M * K; r += kUnit)
    for (int c = 0; c < kUnit; ++c)
      out[r + c] = how == XOrder::Positions ? x[r + order[c]] * factor : x[r + order[c]];
}

// Calls f(bits, decoder, has_zero_points) with compile-time values, for the combinations
// make_packed can produce.
template <class F>
void with_format(const Packed& w, F&& f) {
  using std::integral_constant;
  using T = std::true_type;
  using N = std::false_type;
  constexpr auto B4 = integral_constant<int, 4>{};
  constexpr auto B6 = integral_constant<int, 6>{};
  constexpr auto B8 = integral_constant<int, 8>{};
  constexpr auto table = integral_constant<Dec, Dec::Table>{};
  constexpr auto sint = integral_constant<Dec, Dec::SignedInt>{};
  constexpr auto unsig = integral_constant<Dec, Dec::UnsignedInt>{};
  constexpr auto flt = integral_constant<Dec, Dec::Float>{};
  constexpr auto special = integral_constant<Dec, Dec::FloatSpecial>{};
  constexpr auto signmag = integral_constant<Dec, Dec::SignMagnitude>{};
  const bool zp = w.zeros.kind != Store::None;
  switch (w.bits * 100 + static_cast<int>(w.dec) * 10 + zp) {
    case 400: f(B4, table, N{}); break;
    case 401: f(B4, table, T{}); break;
    case 600: f(B6, table, N{}); break;
    case 601: f(B6, table, T{}); break;
    case 660: f(B6, signmag, N{}); break;
    case 800: f(B8, table, N{}); break;
    case 801: f(B8, table, T{}); break;
    case 810: f(B8, sint, N{}); break;
    case 811: f(B8, sint, T{}); break;
    case 820: f(B8, unsig, N{}); break;
    case 821: f(B8, unsig, T{}); break;
    case 830: f(B8, flt, N{}); break;
    case 840: f(B8, special, N{}); break;
    default: TORCH_CHECK(false, "no kernel for ", w.bits, "-bit codes with decoder ", static_cast<int>(w.dec),
                         zp ? " and zero points" : "", "; pass zero points only for integer formats");
  }
}

// The decoder for `bits`-bit codes of a format described by `decode` = {kind, ebits,
// mbits, bias, special}: kind 0 table, 1 signed integer, 2 unsigned integer, 3 float;
// special 0 finite, 1 fn (all-ones code is NaN), 2 ieee (all-ones exponent is inf/NaN).
// Anything the arithmetic decoders do not cover takes the table.
Dec pick_decoder(int64_t bits, const std::vector<int64_t>& decode) {
  TORCH_CHECK(decode.size() == 5, "decode must be [kind, ebits, mbits, bias, special]");
  const int64_t kind = decode[0], e = decode[1], m = decode[2], bias = decode[3], special = decode[4];
  TORCH_CHECK(kind >= 0 && kind <= 3 && special >= 0 && special <= 2, "unknown decode kind ", kind,
              " or special rule ", special);
  if (bits == 4) return Dec::Table;  // one vpshufb per 32 codes: cheaper than arithmetic
  if (kind == 1 || kind == 2) return bits == 8 ? (kind == 1 ? Dec::SignedInt : Dec::UnsignedInt) : Dec::Table;
  if (bits == 6 && kind == 3 && e == 3 && m == 2 && special == 0 && bias >= -100 && bias <= 100) return Dec::Fp16Nibble;
  if (bits == 6) return kind == 3 ? Dec::SignMagnitude : Dec::Table;  // make_packed checks the table
  if (kind != 3 || bits != 8 || e < 1 || m < 0) return Dec::Table;
  // Codes are sign-extended from bit 7 and placed in fp16, whose all-ones exponent (E = 31)
  // is inf/NaN: only an ieee format may use it.
  const bool layout = 1 + e + m == 8 && m <= 10 && (e < 5 || (e == 5 && special == 2));
  // 2^(127 - bias) and 2^(15 - bias) must be normal fp32s, and so must every value.
  const bool range = 127 - bias <= 127 && 15 - bias >= -126 && 1 - bias - m >= -126 && (1 << e) - 1 - bias <= 127;
  if (!layout || !range) return Dec::Table;
  return special == 0 ? Dec::Float : Dec::FloatSpecial;
}

std::string decoder_name(Dec dec) {
  switch (dec) {
    case Dec::SignedInt: return "signed_int";
    case Dec::UnsignedInt: return "unsigned_int";
    case Dec::Float: return "float";
    case Dec::FloatSpecial: return "float_special";
    case Dec::Fp16Nibble: return "fp16_nibble";
    case Dec::SignMagnitude: return "sign_magnitude";
    default: return "table";
  }
}

void set_float_decode(Packed& w, const std::vector<int64_t>& decode) {
  const int e = static_cast<int>(decode[1]), m = static_cast<int>(decode[2]), bias = static_cast<int>(decode[3]);
  w.fbits = 1 + e + m;
  w.mbits = m;
  w.em_mask = (1u << (e + m)) - 1;
  w.mask32 = 0x80000000u | w.em_mask << (23 - m);
  w.special32 = decode[4] == 1 ? w.em_mask << (23 - m) : ((1u << e) - 1) << 23;
  w.pow2 = std::ldexp(1.0f, 127 - bias);
  w.mask16 = static_cast<uint16_t>(0x8000u | w.em_mask << (10 - m));
  w.special16 = static_cast<uint16_t>(decode[4] == 1 ? w.em_mask << (10 - m) : ((1u << e) - 1) << 10);
  w.pow2_16 = std::ldexp(1.0f, 15 - bias);
}

// Subnormal fp32 patterns are part of the float decode (and of exact fp32 sums): the
// caller's thread may have set flush-to-zero / denormals-are-zero (torch.set_flush_denormal),
// so each worker clears both for the duration of the kernel.
struct KeepDenormals {
#if FPBENCH_X86
  unsigned saved = _mm_getcsr();
  KeepDenormals() { _mm_setcsr(saved & ~(_MM_FLUSH_ZERO_ON | 0x0040u)); }  // 0x0040: DAZ
  ~KeepDenormals() { _mm_setcsr(saved); }
#endif
};

struct Owned {  // what a Packed points into besides the tensors (2^bits + K/8 entries)
  std::vector<int32_t> group_of;
  std::vector<uint8_t> table_lo, table_hi;
};

// Whether the 64 bf16 patterns are those of sign-magnitude codes: code c + 32 is code c
// (< 32, sign bit clear) with the sign bit set.
bool sign_magnitude(const Owned& t) {
  if (t.table_hi.size() != 64) return false;
  for (int c = 0; c < 32; ++c)
    if (t.table_hi[c] & 0x80 || t.table_hi[c + 32] != (t.table_hi[c] | 0x80) || t.table_lo[c + 32] != t.table_lo[c])
      return false;
  return true;
}

// Whether values[half + c] is values[c] with the sign bit flipped, for every c < half
// (a NaN pairs with any NaN: a NaN code decodes to some NaN).
bool mirrored(const float* values, int64_t half) {
  for (int64_t c = 0; c < half; ++c) {
    uint32_t low, high;
    std::memcpy(&low, &values[c], 4);
    std::memcpy(&high, &values[half + c], 4);
    if (high != (low ^ 0x80000000u) && !(std::isnan(values[c]) && std::isnan(values[half + c]))) return false;
  }
  return true;
}

// Scales or zero points as passed: fp32, fp16 or bf16 values, or uint8 codes with their
// 256-entry fp32 table. Empty: none (zero points of a symmetric format).
Stored stored(const at::Tensor& values, const std::optional<at::Tensor>& table, int64_t count, const char* what) {
  Stored out;
  if (values.numel() == 0) return out;
  TORCH_CHECK(values.is_contiguous() && values.numel() == count, what, " must be contiguous [N, ceil(K/G)]");
  out.data = values.data_ptr();
  const auto type = values.scalar_type();
  if (type == torch::kUInt8) {
    TORCH_CHECK(table && table->scalar_type() == torch::kFloat32 && table->is_contiguous() && table->numel() == 256,
                what, " stored as 8-bit codes need their fp32 table of 256 values");
    out.kind = Store::Byte;
    out.table = table->data_ptr<float>();
    return out;
  }
  TORCH_CHECK(type == torch::kFloat32 || type == torch::kFloat16 || type == torch::kBFloat16, what,
              " must be fp32, fp16, bf16 or uint8 codes with a table");
  out.kind = type == torch::kFloat32 ? Store::F32 : type == torch::kFloat16 ? Store::F16 : Store::BF16;
  return out;
}

Packed make_packed(const at::Tensor& plane_a, const at::Tensor& plane_b, const at::Tensor& table,
                   const at::Tensor& scales, const at::Tensor& zeros, int64_t bits, int64_t K, int64_t G,
                   const std::vector<int64_t>& decode, const std::optional<at::Tensor>& scale_table,
                   const std::optional<at::Tensor>& zero_table, Owned& owned) {
  TORCH_CHECK(bits == 4 || bits == 6 || bits == 8, "code width ", bits, " has no kernel; use 4, 6 or 8 bits");
  TORCH_CHECK(K % kUnit == 0, "K = ", K, " must be a multiple of ", kUnit);
  TORCH_CHECK(G >= 8 && G % 8 == 0, "group size ", G, " must be a multiple of 8");
  TORCH_CHECK(plane_a.dtype() == torch::kUInt8 && plane_a.is_contiguous() && plane_a.dim() == 2,
              "packed codes must be contiguous uint8 [N, bytes]");
  const int64_t N = plane_a.size(0);
  TORCH_CHECK(plane_a.size(1) == (bits == 8 ? K : K / 2), "packed codes: wrong row length for K = ", K);
  if (bits == 6)
    TORCH_CHECK(plane_b.dtype() == torch::kUInt8 && plane_b.is_contiguous() && plane_b.size(0) == N &&
                    plane_b.size(1) == K / 4,
                "6-bit codes need a 2-bit plane uint8 [N, K/4]");
  TORCH_CHECK(table.dtype() == torch::kFloat32 && table.numel() == (int64_t{1} << bits),
              "the value table must be fp32 with 2^bits entries");
  const int64_t groups = (K + G - 1) / G;
  const Stored scale_store = stored(scales, scale_table, N * groups, "scales");
  TORCH_CHECK(scale_store.kind != Store::None, "scales must be given: [N, ceil(K/G)]");
  const Stored zero_store = stored(zeros, zero_table, N * groups, "zero points");
  const bool zp = zero_store.kind != Store::None;
  // bf16 byte tables; every value must be exact in bf16 (true of every format <= 8 bits).
  TORCH_CHECK(table.is_contiguous(), "the value table must be contiguous");
  const float* values = table.data_ptr<float>();
  owned.table_lo.resize(table.numel());
  owned.table_hi.resize(table.numel());
  for (int64_t c = 0; c < table.numel(); ++c) {
    uint32_t bits32;
    std::memcpy(&bits32, &values[c], 4);
    if (std::isnan(values[c])) bits32 = 0x7FC00000u;  // any NaN decodes to a quiet NaN
    TORCH_CHECK((bits32 & 0xFFFF) == 0, "table value ", values[c], " of code ", c, " is not exact in bf16");
    owned.table_lo[c] = static_cast<uint8_t>(bits32 >> 16);
    owned.table_hi[c] = static_cast<uint8_t>(bits32 >> 24);
  }
  owned.group_of.resize(K / 8);
  for (int64_t j = 0; j < K / 8; ++j) owned.group_of[j] = static_cast<int32_t>((8 * j) / G);
  Packed w{static_cast<int>(bits),
           plane_a.data_ptr<uint8_t>(),
           bits == 6 ? plane_b.data_ptr<uint8_t>() : nullptr,
           plane_a.size(1),
           bits == 6 ? plane_b.size(1) : 0,
           scale_store,
           zero_store,
           groups,
           G,
           N,
           K,
           owned.group_of.data(),
           values,
           owned.table_lo.data(),
           owned.table_hi.data(),
           pick_decoder(bits, decode),
           0, 0, 0, 0, 0, 0.f, 0, 0, 0.f};
  if (w.dec == Dec::Fp16Nibble && G % 32 != 0) w.dec = Dec::Table;  // a half unit spans two groups
  if (w.dec == Dec::SignMagnitude && !sign_magnitude(owned)) w.dec = Dec::Table;  // e.g. a NaN code
  if (w.dec == Dec::Float || w.dec == Dec::FloatSpecial || w.dec == Dec::Fp16Nibble) set_float_decode(w, decode);
  w.mirrored = bits == 8 && mirrored(values, 128);
  w.u_end = K / kUnit;
  TORCH_CHECK(!zp || w.dec == Dec::Table || w.dec == Dec::SignedInt || w.dec == Dec::UnsignedInt,
              "zero points are for integer formats; a float format takes scales only");
  return w;
}

int64_t row_grain(int64_t N) {  // rows per task: a few tasks per thread balance the load
  return std::max<int64_t>(1, N / (4 * at::get_num_threads()));
}

// Calls f(n0, n1) for the rows 0..N of a weight of N x K. A large one (from kDynamicWeights
// weights) is handed out in chunks from a shared counter: a thread slowed by other load
// on the machine takes fewer chunks instead of holding the others up at the end
// (at::parallel_for gives each thread one equal range). At M = 1 on this AMD EPYC, timed
// in turn in one process: 1.02-1.19x on 4096x4096 and 4096x14336; on the 576-1536-row
// layers of the default model the chunks' setup cost more than it saved (0.74-0.98x).
constexpr int64_t kDynamicWeights = int64_t{1} << 22;

template <class F>
void parallel_rows(int64_t N, int64_t K, F&& f) {
  const int64_t threads = at::get_num_threads();
  if (N * K < kDynamicWeights || threads == 1) return at::parallel_for(0, N, row_grain(N), f);
  const int64_t chunk = std::max<int64_t>(8, N / (16 * threads));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t n0; (n0 = next.fetch_add(chunk)) < N;) f(n0, std::min(n0 + chunk, N));
  });
}

// Units of K per block of a SIMD GEMV (see gemv): x's block, M x 4 bytes per column,
// stays in a 32 KiB L1 beside the streaming codes. A whole group per block for the GEMV
// that sums a group before its scale (row_avx2_grouped; G a multiple of 128).
//
// Only the AVX-512 4-bit GEMVs take blocks: they need 64 bytes of x per 8 bytes of codes,
// and from L2 that paced them. At M = 1 on 4096x14336 (AMD EPYC with AVX-512, 2 threads,
// with and without blocks in turn in one process): INT4 per channel 1.16-1.24x, FP4 per
// channel 1.15-1.52x, INT4 g128 1.56x (once the scales of the rows ahead were
// prefetched; 0.90x before), NVFP4 and MXFP4 0.98-1.02x; at M = 4 INT4 1.32-1.41x. The
// 6- and 8-bit GEMVs, half as hungry for x per byte, ran 0.86-1.02x with blocks, and the
// AVX2 4-bit GEMV 0.96-0.98x.
int64_t block_units(const Packed& w, Isa isa, int64_t M) {
  constexpr int64_t kBlockXBytes = 16 * 1024;
  const int64_t units = w.K / kUnit;
  if (isa < Isa::Avx512 || w.bits != 4) return units;
  int64_t block = std::max<int64_t>(4, kBlockXBytes / (4 * kUnit * M));
  if (w.group_size < w.K && w.group_size % (2 * kUnit) == 0) {
    const int64_t per_group = w.group_size / kUnit;
    block = (block + per_group - 1) / per_group * per_group;
  }
  return std::min(block, units);
}

// y [M, N] = x [M, K] w^T in fp32 for fewer than kBlockedMinRows rows (the SIMD ISAs) or
// any number (scalar): each thread takes whole weight rows against all rows of x. The SIMD
// GEMVs take a thread's rows one block of K at a time (block_units), each block's sums added
// to y: a row of K = 14336 holds 56 KiB of fp32 x, more than an L1; read from L2 for every
// weight row, it held INT4 per channel at 54 against 74 G weights/s with K = 4096 (AMD
// EPYC with AVX-512, M = 1, one process).
void gemv(Packed w, Isa isa, const float* x, int64_t M, float* y) {
  const int64_t K = w.K;
  const bool nibble = isa == Isa::Avx2 && w.dec == Dec::Fp16Nibble;
  if (w.dec == Dec::Fp16Nibble && !nibble) w.dec = Dec::Table;
  std::vector<float> ordered;
#if FPBENCH_X86
  const bool vbmi = isa == Isa::Avx512Vbmi && avx512_vbmi(w);
  const bool lookup = isa >= Isa::Avx512 && !vbmi && avx512_lookup(w);
  if (isa >= Isa::Avx512 || nibble) {
    ordered.resize(M * K);
    const XOrder how = nibble  ? XOrder::Positions
                       : vbmi  ? (w.bits == 8 ? XOrder::Bytes : XOrder::BytePositions)
                       : lookup ? XOrder::Nibbles
                                : XOrder::Avx512;
    order_x(x, M, K, how, w.pow2_16, ordered.data());
    x = ordered.data();
  }
#endif
  const int64_t block = block_units(w, isa, M), units = K / kUnit;
  parallel_rows(w.N, K, [&](int64_t n0, int64_t n1) {
    const KeepDenormals keep;
#if FPBENCH_X86
    for (int64_t u = 0; isa != Isa::Scalar && u < units; u += block) {
      Packed wb = w;
      wb.u_begin = u, wb.u_end = std::min(u + block, units);
      const int64_t span = wb.u_end - u, ahead = kPrefetchBytes / (w.bits == 8 ? kUnit : kUnit / 2);
      wb.ahead_rows = ahead / span, wb.ahead_units = ahead % span;
      if (vbmi) {
        rows_avx512_vbmi(wb, x, K, M, n0, n1, y, w.N);
      } else if (lookup) {
        rows_avx512_lookup(wb, x, K, M, n0, n1, y, w.N);
      } else if (isa >= Isa::Avx512) {
        with_format(w, [&](auto b, auto d, auto z) { rows_avx512_t<decltype(b)::value, decltype(d)::value, decltype(z)::value>(wb, x, K, M, n0, n1, y, w.N); });
      } else if (nibble) {
        rows_avx2_t<6, Dec::Fp16Nibble, false>(wb, x, K, M, n0, n1, y, w.N);
      } else {
        with_format(w, [&](auto b, auto d, auto z) { rows_avx2_t<decltype(b)::value, decltype(d)::value, decltype(z)::value>(wb, x, K, M, n0, n1, y, w.N); });
      }
    }
    if (isa != Isa::Scalar) return;
#endif
    rows_scalar(w, x, K, M, n0, n1, y, w.N);
  });
}

// y = x w^T in fp32 for x [M, K] of any float dtype.
at::Tensor product(Packed w, Isa isa, const at::Tensor& x_in) {
  const int64_t K = w.K;
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == K, "x must be [M, K] with K = ", K);
  at::Tensor x = x_in.to(torch::kFloat32).contiguous();
  const int64_t M = x.size(0);
#if FPBENCH_X86
  if (isa != Isa::Scalar && M >= kBlockedMinRows) {
    // Both SIMD ISAs take the blocked GEMM (natural-order panels need no reordered x).
    if (w.dec == Dec::Fp16Nibble) w.dec = Dec::Table;
    const int64_t Mp = (M + kXtCols - 1) / kXtCols * kXtCols;
    at::Tensor xt = torch::zeros({Mp, K}, torch::kFloat32);
    xt.narrow(0, 0, M).copy_(x);
    xt = xt.view({Mp / kXtCols, kXtCols, K}).transpose(1, 2).contiguous();
    at::Tensor yt = torch::zeros({w.N, Mp}, torch::kFloat32);
    const float* xtp = xt.data_ptr<float>();
    float* ytp = yt.data_ptr<float>();
    // AVX-512: 32 rows of x a pass (block_avx512). On an AMD EPYC with AVX-512 (2 threads,
    // in turn in one process) 1.70-1.76x the AVX2 blocks' speed at M = 64 and 1.80x at
    // M = 512 on 4096x4096 (FP6 E3M2, INT4 g128).
    const bool wide = isa >= Isa::Avx512;
    at::parallel_for(0, w.N, std::max<int64_t>(24, row_grain(w.N)), [&](int64_t n0, int64_t n1) {
      const KeepDenormals keep;
      with_format(w, [&](auto b, auto d, auto z) { gemm_avx2_t<decltype(b)::value, decltype(d)::value, decltype(z)::value>(w, xtp, Mp, n0, n1, ytp, wide); });
    });
    at::Tensor y = yt.narrow(1, 0, M).t().contiguous();
    return y;
  }
#endif
  at::Tensor y = torch::empty({M, w.N}, torch::kFloat32);
  gemv(w, isa, x.data_ptr<float>(), M, y.data_ptr<float>());
  return y;
}

at::Tensor dequantize(Packed w, Isa isa) {
  if (w.dec == Dec::Fp16Nibble) w.dec = Dec::Table;  // writes weights in k order
  const int64_t K = w.K;
  at::Tensor out = torch::empty({w.N, K}, torch::kFloat32);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, w.N, row_grain(w.N), [&](int64_t n0, int64_t n1) {
    const KeepDenormals keep;
#if FPBENCH_X86
    if (isa >= Isa::Avx512) {
      with_format(w, [&](auto b, auto d, auto z) { dequant_avx512_t<decltype(b)::value, decltype(d)::value, decltype(z)::value>(w, n0, n1, op); });
      return;
    }
    if (isa == Isa::Avx2) {
      with_format(w, [&](auto b, auto d, auto z) { dequant_avx2_t<decltype(b)::value, decltype(d)::value, decltype(z)::value>(w, n0, n1, op); });
      return;
    }
#endif
    RowScales rs(w, false);
    for (int64_t n = n0; n < n1; ++n) dequant_row_scalar(w, rs, n, op + n * K);
  });
  return out;
}

uint64_t stream_scalar(const uint8_t* p, int64_t bytes) {
  const uint64_t* words = reinterpret_cast<const uint64_t*>(p);
  uint64_t acc[4] = {0, 0, 0, 0};
  for (int64_t i = 0; i + 4 <= bytes / 8; i += 4)
    for (int j = 0; j < 4; ++j) acc[j] ^= words[i + j];
  return acc[0] ^ acc[1] ^ acc[2] ^ acc[3];
}

// Best streaming-read bandwidth (GB/s) over `repeats` passes of every thread over its
// share of `buffer`, with the widest loads `isa` allows, as 1 or 8 streams a thread (the
// scalar loop: 1): the ceiling a weight-streaming kernel can reach on this machine.
double stream_read_gbps(const at::Tensor& buffer, int64_t repeats, const std::string& isa_request, int64_t streams) {
  TORCH_CHECK(buffer.is_contiguous() && buffer.data_ptr() != nullptr &&
                  reinterpret_cast<uintptr_t>(buffer.data_ptr()) % 64 == 0,
              "buffer must be contiguous and 64-byte aligned");
  TORCH_CHECK(streams == 1 || streams == 8, "streams must be 1 or 8, not ", streams);
  const Isa isa = pick_isa(isa_request);
  const uint8_t* base = static_cast<const uint8_t*>(buffer.data_ptr());
  const int64_t bytes = buffer.numel() * buffer.element_size() / 4096 * 4096;
  const int64_t pages = bytes / 4096;
  std::vector<uint64_t> sinks(static_cast<size_t>(at::get_num_threads()) * 8, 0);
  double best = 0.0;
  for (int64_t r = 0; r < repeats; ++r) {
    auto start = std::chrono::steady_clock::now();
    at::parallel_for(0, pages, 64, [&](int64_t p0, int64_t p1) {
      const uint8_t* p = base + p0 * 4096;
      const int64_t n = (p1 - p0) * 4096;
      uint64_t acc;
#if FPBENCH_X86
      if (isa >= Isa::Avx512) acc = streams == 1 ? stream_avx512<1>(p, n) : stream_avx512<8>(p, n);
      else if (isa == Isa::Avx2) acc = streams == 1 ? stream_avx2<1>(p, n) : stream_avx2<8>(p, n);
      else acc = stream_scalar(p, n);
#else
      acc = stream_scalar(p, n);
#endif
      sinks[static_cast<size_t>(at::get_thread_num()) * 8] ^= acc;  // keeps the loads alive
    });
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, bytes / seconds / 1e9);
  }
  return sinks[0] == 0x5eed ? -best : best;  // a use of the sink the compiler cannot drop
}

}  // namespace

// The tensors a Packed points into stay referenced here, so a layer's handle stays valid
// whatever Python does with its buffers.
struct fpbench::KernelLinear::Impl {
  at::Tensor plane_a, plane_b, table, scales, zeros;
  std::optional<at::Tensor> scale_table, zero_table, bias;
  Owned owned;
  Packed w;
  Isa isa;
};

fpbench::KernelLinear::KernelLinear(const at::Tensor& plane_a, const at::Tensor& plane_b, const at::Tensor& table,
                                    const at::Tensor& scales, const at::Tensor& zeros, int64_t bits, int64_t K,
                                    int64_t G, const std::vector<int64_t>& decode, const std::string& isa,
                                    const std::optional<at::Tensor>& scale_table,
                                    const std::optional<at::Tensor>& zero_table,
                                    const std::optional<at::Tensor>& bias) {
  auto impl = std::make_shared<Impl>();
  impl->plane_a = plane_a, impl->plane_b = plane_b, impl->table = table, impl->scales = scales, impl->zeros = zeros;
  impl->scale_table = scale_table, impl->zero_table = zero_table;
  if (bias && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->numel() == plane_a.size(0),
                "the bias must be fp32 with one value per output row");
    impl->bias = bias;
  }
  impl->w = make_packed(impl->plane_a, impl->plane_b, impl->table, impl->scales, impl->zeros, bits, K, G, decode,
                        impl->scale_table, impl->zero_table, impl->owned);
  impl->isa = pick_isa(isa);
  impl_ = std::move(impl);
}

at::Tensor fpbench::KernelLinear::product(const at::Tensor& x) const { return ::product(impl_->w, impl_->isa, x); }

at::Tensor fpbench::KernelLinear::dequantize() const { return ::dequantize(impl_->w, impl_->isa); }

void fpbench::KernelLinear::forward_row(const float* x, float* y) const {
  gemv(impl_->w, impl_->isa, x, 1, y);
  if (impl_->bias) {
    const float* bias = impl_->bias->data_ptr<float>();
    for (int64_t n = 0; n < impl_->w.N; ++n) y[n] += bias[n];
  }
}

int64_t fpbench::KernelLinear::out_features() const { return impl_->w.N; }

at::Tensor fpbench::KernelLinear::forward(const at::Tensor& x) const {
  const Packed& w = impl_->w;
  const at::Tensor rows = x.reshape({-1, w.K});
  // The scalar kernels have no blocked GEMM: from kScalarGemmMinRows rows the layer
  // dequantizes once and calls torch's fp32 GEMM.
  at::Tensor y = rows.size(0) >= kScalarGemmMinRows && impl_->isa == Isa::Scalar
                     ? at::matmul(rows.to(torch::kFloat32), dequantize().t())
                     : product(rows);
  if (impl_->bias) y.add_(*impl_->bias);
  if (y.scalar_type() != x.scalar_type()) y = y.to(x.scalar_type());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = w.N;
  return y.view(shape);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // scales / zeros: fp32, fp16 or bf16 values, or uint8 codes with scale_table / zero_table
  // (256 fp32 values each); zeros empty for symmetric formats.
  using fpbench::KernelLinear;
  m.def("lut_linear",
        [](const at::Tensor& x, const at::Tensor& plane_a, const at::Tensor& plane_b, const at::Tensor& table,
           const at::Tensor& scales, const at::Tensor& zeros, int64_t bits, int64_t K, int64_t G,
           const std::vector<int64_t>& decode, const std::string& isa, const std::optional<at::Tensor>& scale_table,
           const std::optional<at::Tensor>& zero_table) {
          return KernelLinear(plane_a, plane_b, table, scales, zeros, bits, K, G, decode, isa, scale_table,
                              zero_table, std::nullopt)
              .product(x);
        },
        "y = x @ w^T, w = (table[code] - zero) * scale per group, from packed 4/6/8-bit codes; fp32 result",
        py::arg("x"), py::arg("plane_a"), py::arg("plane_b"), py::arg("table"), py::arg("scales"), py::arg("zeros"),
        py::arg("bits"), py::arg("K"), py::arg("G"), py::arg("decode"), py::arg("isa"),
        py::arg("scale_table") = py::none(), py::arg("zero_table") = py::none());
  m.def("lut_dequantize",
        [](const at::Tensor& plane_a, const at::Tensor& plane_b, const at::Tensor& table, const at::Tensor& scales,
           const at::Tensor& zeros, int64_t bits, int64_t K, int64_t G, const std::vector<int64_t>& decode,
           const std::string& isa, const std::optional<at::Tensor>& scale_table,
           const std::optional<at::Tensor>& zero_table) {
          return KernelLinear(plane_a, plane_b, table, scales, zeros, bits, K, G, decode, isa, scale_table,
                              zero_table, std::nullopt)
              .dequantize();
        },
        "fp32 weights [N, K] decoded by the kernel's own code path",
        py::arg("plane_a"), py::arg("plane_b"), py::arg("table"), py::arg("scales"), py::arg("zeros"),
        py::arg("bits"), py::arg("K"), py::arg("G"), py::arg("decode"), py::arg("isa"),
        py::arg("scale_table") = py::none(), py::arg("zero_table") = py::none());
  py::class_<KernelLinear, std::shared_ptr<KernelLinear>>(
      m, "KernelLinear", "one layer's packed weights, checked once: LutLinear's compiled half")
      .def(py::init<const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    int64_t, int64_t, int64_t, const std::vector<int64_t>&, const std::string&,
                    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                    const std::optional<at::Tensor>&>(),
           py::arg("plane_a"), py::arg("plane_b"), py::arg("table"), py::arg("scales"), py::arg("zeros"),
           py::arg("bits"), py::arg("K"), py::arg("G"), py::arg("decode"), py::arg("isa"), py::arg("scale_table"),
           py::arg("zero_table"), py::arg("bias"))
      .def("forward", &KernelLinear::forward, "x [..., K] -> [..., N] in x's dtype, bias added in fp32")
      .def("dequantize", &KernelLinear::dequantize, "fp32 weights [N, K] as this layer's ISA decodes them");
  fpbench::bind_llama_step(m);
  m.def("stream_read_gbps", &stream_read_gbps, "best streaming-read bandwidth in GB/s with the given ISA's loads",
        py::arg("buffer"), py::arg("repeats"), py::arg("isa"), py::arg("streams") = 1);
  m.def("decoder", [](int64_t bits, const std::vector<int64_t>& decode) { return decoder_name(pick_decoder(bits, decode)); },
        "the decoder the AVX2 kernels use for these codes: table, signed_int, unsigned_int, float, float_special, "
        "fp16_nibble or sign_magnitude");
  m.def("scalar_gemm_min_rows", [] { return kScalarGemmMinRows; },
        "rows of x from which the scalar kernels' layer dequantizes once and calls torch's fp32 GEMM");
  m.def("blocked_min_rows", [] { return kBlockedMinRows; },
        "rows of x from which the SIMD kernels decode weight panels once and reuse them (blocked GEMM)");
  m.def("best_isa", [] { return isa_name(best_isa()); }, "widest ISA this CPU supports");
  m.def("position_to_k", [](int64_t p) { return position_to_k(static_cast<int>(p)); },
        "weight offset inside a 64-weight unit of code position p");
}
