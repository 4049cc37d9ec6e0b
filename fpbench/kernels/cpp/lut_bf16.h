// The bf16 dot-product GEMM (AVX-512 BF16): prefill for bf16 activations. Part of
// lut_linear.cpp's translation unit.
//
// When x arrives in bf16 (a model whose dense rest runs in bf16), nothing is lost by
// multiplying it in bf16: every value of a format with at most 8 bits is exact in bf16
// (make_packed checks it), so with the *unscaled* values in bf16 each product x * value
// is exact in fp32 (8 x 8 significant bits), and vdpbf16ps adds two of them at a time
// into fp32 sums. The scale is applied to each group's sum (per channel: to each block of
// kDotDepth columns), one fp32 FMA per group and output, where the fp32 GEMM multiplies
// every weight by its scale first. So the weights are those of the dequantization, the
// products exact, and the outputs differ from a float64 product with the dequantized
// weights by the fp32 summation and the scale's rounding per group sum (a relative
// 2^-24 per term, within the same kind of bound), and by what vdpbf16ps flushes to zero:
// bf16 inputs and fp32 results below 2^-126 (unscaled values are at least 2^-16 in
// magnitude, so only activations that small and their products are affected). Byte
// scales that are a few-bit number times one multiplier (E8M0, NVFP4) go into the panels
// as that number times the value, exactly (Packed::scale_factors), and the multiplier
// into the sum: such layers run as per-channel ones. torch's bf16 GEMM rounds the
// weights themselves to bf16; this one keeps them exact.
//
// torch's bf16 GEMM on an AMD EPYC with AVX-512 BF16 ran ~845 GFLOP/s at M = 512 on
// 4096x4096 (2 threads); the fp32 GEMM (blocked, fp32 FMAs) reaches at most half of
// that. A standalone test of this loop (weights pre-decoded, 8 rows of x x 48 weight rows
// a tile) reached 831 GFLOP/s at M = 64 and 894 at M = 512.
//
// Layout: a panel is kDotRows weight rows x one block of K, stored as [k / 2][kDotRows]
// 32-bit words, each a bf16 pair (k, k') of one row: one zmm load gives 16 rows' pair,
// and one broadcast of x's pair (x[k], x[k']) multiplies it. Each call decodes its
// panels (dot_panel): 16 rows' codes of a unit transposed, then looked up straight to
// bf16 bytes (4-, 6- and 8-bit codes alike), times the folded scale factors where there
// are any. x is paired once per call in the same order (pair_x). Zero points are not
// taken (their unscaled values v - z are not exact in bf16): such layers keep the fp32
// GEMM.
//
// Against torch's bf16 GEMM on an AMD EPYC with AVX-512 BF16 (2 threads, the kernels
// taking turns call by call: `fpbench bench --kernels torch_bf16,FORMAT/GRAN@bf16`),
// median ratios 0.95-1.10 on 4096x4096 and 0.90-1.04 on 4096x14336 at M = 64 and 512
// for FP4/INT4/FP6/INT8/FP8 per channel, INT4 g128, NVFP4 and MXFP4/6/8 (MXFP6 on
// 4096x14336 the low outlier: 0.78 at M = 64, 0.85 at M = 512). The decode takes ~0.4 ms a call on 4096x4096
// (FP6, INT4 g128), against ~3.3 ms for the whole call at M = 64.
#pragma once

#include "lut_avx512.h"

#include <numeric>

namespace {

#if FPBENCH_X86

constexpr int64_t kDotRows = 48;    // weight rows a panel: three zmm of outputs
constexpr int64_t kDotDepth = 1024;  // columns a block (a multiple of 64 and of G; 512 and 2048: no clear difference)

// Whether the bf16 GEMM takes w (bf16 x from kBf16GemmMinRows rows, ISA Avx512Bf16).
inline bool bf16_dot(const Packed& w) { return w.zeros.kind == Store::None; }

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16,avx2,fma,f16c")

// A unit's 64 weights as 32 bf16 pairs: pair e = 16h + 4c + t (h = 0, 1; c, t < 4) holds
// the codes at positions 2x and 2x + 1, x = 8c + 4h + t (positions as codes_avx512 emits
// them, position_to_k), that is weights k = pair_k(e, 0) and pair_k(e, 1). A panel holds
// pair e at slot(e), which puts k = 0-15, 16-31, 32-47, 48-63 in slots 0-7, 8-15, 16-23,
// 24-31: a group of 16 or 32 weights is a run of slots. x is paired the same way (pair_x).
constexpr int pair_k(int e, int high) {
  const int i = 2 * (e / 16) + high, l = e % 16;
  return l < 8 ? 8 * i + l : 24 + 8 * i + l;
}
constexpr int slot(int e) { return e / 8 == 1 || e / 8 == 2 ? e ^ 24 : e; }  // its own inverse

// Units u0 .. u1 of x (bf16, 64 values a unit) with each unit's values in `order`:
// out[64u + j] = x[64u + order[j]], two word permutes a unit.
inline void order_units(const uint16_t* x, const uint16_t (&order)[kUnit], int64_t u0, int64_t u1, uint16_t* out) {
  const __m512i first = _mm512_loadu_si512(order), second = _mm512_loadu_si512(order + 32);
  for (int64_t u = u0; u < u1; ++u) {
    const __m512i a = _mm512_loadu_si512(x + u * kUnit), b = _mm512_loadu_si512(x + u * kUnit + 32);
    _mm512_storeu_si512(out + u * kUnit, _mm512_permutex2var_epi16(a, first, b));
    _mm512_storeu_si512(out + u * kUnit + 32, _mm512_permutex2var_epi16(a, second, b));
  }
}

// Units u0 .. u1 of x as pairs (pair_k, in slot order), 32 32-bit words a unit.
inline void pair_x(const uint16_t* x, int64_t u0, int64_t u1, uint32_t* out) {
  uint16_t order[kUnit];
  for (int e = 0; e < 32; ++e) order[2 * slot(e)] = pair_k(e, 0), order[2 * slot(e) + 1] = pair_k(e, 1);
  order_units(x, order, u0, u1, reinterpret_cast<uint16_t*>(out));
}

// The bf16 patterns of code bytes as their low and high bytes, looked up in the value
// table's byte tables: 4-bit codes in 16 entries in every 128-bit lane (vpshufb), 6-bit in
// 64 (vpermb), 8-bit in 256 (two vpermi2b and a blend on bit 7).
template <int BITS>
struct Bf16Bytes {
  static constexpr int kParts = BITS == 8 ? 4 : 1;
  __m512i lo[kParts], hi[kParts];
  explicit Bf16Bytes(const Packed& w) {
    for (int i = 0; i < kParts; ++i) {
      if (BITS == 4) {
        lo[i] = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.table_lo)));
        hi[i] = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.table_hi)));
      } else {
        lo[i] = _mm512_loadu_si512(w.table_lo + 64 * i);
        hi[i] = _mm512_loadu_si512(w.table_hi + 64 * i);
      }
    }
  }
  static __m512i look(const __m512i (&t)[kParts], __m512i c) {
    if constexpr (BITS == 4) return _mm512_shuffle_epi8(t[0], c);
    if constexpr (BITS == 6) return _mm512_permutexvar_epi8(c, t[0]);
    return _mm512_mask_blend_epi8(_mm512_movepi8_mask(c), _mm512_permutex2var_epi8(t[0], c, t[1]),
                                  _mm512_permutex2var_epi8(t[2], c, t[3]));
  }
};

// A unit's 64 code bytes in position order: 4- and 6-bit codes as codes_avx512 gives
// them; 8-bit codes (stored in k order) permuted into the same order.
template <int BITS>
inline __m512i position_codes(const uint8_t* a, const uint8_t* b, int64_t u, const __m512i& order) {
  if constexpr (BITS == 8) return _mm512_permutexvar_epi8(order, _mm512_loadu_si512(a + u * kUnit));
  return codes_avx512<BITS>(a, b, u);
}

// Bf16 pairs of 16 rows (one row a dword) times per-row fp32 factors f, both words: exact
// where set_scale_factors found every value times every factor exact in bf16.
inline __m512i times_factors(__m512i pairs, __m512 f) {
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512i lo = _mm512_castps_si512(_mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)), f));
  const __m512i hi = _mm512_castps_si512(_mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(pairs, high)), f));
  return _mm512_ternarylogic_epi32(high, hi, _mm512_srli_epi32(lo, 16), 0xEA);  // (A & B) | C
}

// The panel words of unit u of 16 weight rows (row pointers a[r], b[r]): the codes are
// transposed, then looked up as bf16. A row's 64 codes are 32 words, the pairs of code
// positions (2x, 2x + 1). Two unpacks give, per 128-bit lane, rows 4q .. 4q + 3 of two
// columns x; a 4 x 4 transpose of 128-bit blocks puts rows 4c .. 4c + 3 in lane c; the
// lookup's low and high bytes unpacked give each column's 16 rows as 16 pairs, in row
// order. Against looking up row by row and transposing the bf16 words, 16 x 16: half the
// decode's time (FP6 and INT4 g128, 4096x4096), a quarter of the shuffles and no staging
// buffer. factors (or null): per row, the scale factors of the unit's quarters of 16
// weights (pair e lies in quarter 2 (c / 2) + h: k = 0-15, 16-31, 32-47, 48-63).
template <int BITS>
inline void panel_unit16(const Bf16Bytes<BITS>& t, const uint8_t* const (&a)[16], const uint8_t* const (&b)[16],
                         int64_t u, const __m512i& order, const __m512* factors, uint32_t* out) {
  __m512i r[16], d[16];
  for (int i = 0; i < 16; ++i) r[i] = position_codes<BITS>(a[i], b[i], u, order);
  // d[4q + 2s + h], lane c dword t: rows 4q + 2s, 4q + 2s + 1 of column 8c + 4h + t.
  for (int i = 0; i < 8; ++i) {
    d[2 * i] = _mm512_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
    d[2 * i + 1] = _mm512_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
  }
  // r[4q + 2h + g], lane c: rows 4q .. 4q + 3 of columns 8c + 4h + 2g and 8c + 4h + 2g + 1.
  for (int q = 0; q < 4; ++q)
    for (int h = 0; h < 2; ++h) {
      r[4 * q + 2 * h] = _mm512_unpacklo_epi32(d[4 * q + h], d[4 * q + 2 + h]);
      r[4 * q + 2 * h + 1] = _mm512_unpackhi_epi32(d[4 * q + h], d[4 * q + 2 + h]);
    }
  for (int hg = 0; hg < 4; ++hg) {
    // 128-bit blocks: lane c of r[4q + hg] to lane q of column block c.
    const __m512i t0 = _mm512_shuffle_i32x4(r[hg], r[4 + hg], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i t1 = _mm512_shuffle_i32x4(r[hg], r[4 + hg], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i t2 = _mm512_shuffle_i32x4(r[8 + hg], r[12 + hg], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i t3 = _mm512_shuffle_i32x4(r[8 + hg], r[12 + hg], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i block[4] = {_mm512_shuffle_i32x4(t0, t2, _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm512_shuffle_i32x4(t0, t2, _MM_SHUFFLE(3, 1, 3, 1)),
                              _mm512_shuffle_i32x4(t1, t3, _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm512_shuffle_i32x4(t1, t3, _MM_SHUFFLE(3, 1, 3, 1))};
    const int h = hg / 2;
    for (int c = 0; c < 4; ++c) {
      const __m512i l = Bf16Bytes<BITS>::look(t.lo, block[c]), g = Bf16Bytes<BITS>::look(t.hi, block[c]);
      __m512i pairs[2] = {_mm512_unpacklo_epi8(l, g), _mm512_unpackhi_epi8(l, g)};
      if (factors)
        for (auto& p : pairs) p = times_factors(p, factors[2 * (c / 2) + h]);
      // Columns x = 8c + 2hg and x + 1: pairs e = 16h + 4c + 2g (+ 1).
      const int e = 16 * h + 4 * c + 2 * (hg % 2);
      _mm512_storeu_si512(out + slot(e) * kDotRows, pairs[0]);
      _mm512_storeu_si512(out + slot(e + 1) * kDotRows, pairs[1]);
    }
  }
}

// Rows n0 .. n0 + rows (at most kDotRows; rows past the matrix repeat its last row, their
// outputs masked) of units u0 .. u1 into panel [(u1 - u0) * 32][kDotRows]: the values,
// times their scale factors where fac is given (fac[g][r]: group g0 + g of row n0 + r).
template <int BITS>
void dot_panel(const Packed& w, const float* fac, int64_t g0, int64_t n0, int64_t rows, int64_t u0, int64_t u1,
               uint32_t* panel) {
  const Bf16Bytes<BITS> bytes(w);
  alignas(64) uint8_t positions[kUnit];
  for (int p = 0; p < kUnit; ++p) positions[p] = static_cast<uint8_t>(position_to_k(p));
  const __m512i order = _mm512_load_si512(positions);
  for (int64_t j = 0; j < kDotRows / 16; ++j) {
    const uint8_t* a[16];
    const uint8_t* b[16];
    for (int i = 0; i < 16; ++i) {
      const int64_t n = n0 + std::min<int64_t>(16 * j + i, rows - 1);
      a[i] = w.plane_a + n * w.lda;
      b[i] = w.plane_b ? w.plane_b + n * w.ldb : nullptr;
    }
    for (int64_t u = u0; u < u1; ++u) {
      __m512 factors[4];
      if (fac)
        for (int q = 0; q < 4; ++q)
          factors[q] = _mm512_loadu_ps(fac + (w.group_of[u * kUnit / 8 + 2 * q] - g0) * kDotRows + 16 * j);
      panel_unit16<BITS>(bytes, a, b, u, order, fac ? factors : nullptr, panel + (u - u0) * 32 * kDotRows + 16 * j);
    }
  }
}

// y[m, 0..48) (masked) += sum over the block of x[m, k] * panel[k] for MB rows of x (x as
// bf16 pairs, ldx words apart), each group's sum (group_pairs words; per channel one
// group a block) times its scales sc[g][0..48) added to y at once (first: the block is
// K's first, so its first group's products are stored, y not read): 8 rows' sums in 24
// registers. (Running totals in another 12 registers, 4 rows a tile, ran 0.73-0.93x as
// fast with groups of 16 and 32 and 0.63-0.69x with 128: 4096x4096, M = 512, separate runs.)
template <int MB>
void dot_tile(const uint32_t* panel, int64_t pairs, int64_t group_pairs, const float* sc, const uint32_t* x,
              int64_t ldx, float* y, int64_t ldy, const __mmask16 (&mask)[3], bool first) {
  __m512 acc[MB][3];
  for (int64_t p0 = 0, g = 0; p0 < pairs; p0 += group_pairs, ++g) {
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < 3; ++j) acc[m][j] = _mm512_setzero_ps();
    for (int64_t p = p0, p1 = std::min(pairs, p0 + group_pairs); p < p1; ++p) {
      __m512bh wv[3];
      for (int j = 0; j < 3; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(panel + p * kDotRows + 16 * j);
      for (int m = 0; m < MB; ++m) {
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[m * ldx + p]));
        for (int j = 0; j < 3; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], wv[j], xv);
      }
    }
    for (int j = 0; j < 3; ++j) {
      const __m512 s = _mm512_loadu_ps(sc + g * kDotRows + 16 * j);
      for (int m = 0; m < MB; ++m) {
        float* out = y + m * ldy + 16 * j;
        const __m512 sum = first && g == 0 ? _mm512_mul_ps(acc[m][j], s)
                                           : _mm512_fmadd_ps(acc[m][j], s, _mm512_maskz_loadu_ps(mask[j], out));
        _mm512_mask_storeu_ps(out, mask[j], sum);
      }
    }
  }
}

// Panels n0 .. n1 (of kDotRows weight rows) of y [M, N] = x w^T, x bf16 [M, K] as pairs.
template <int BITS>
void gemm_bf16_t(const Packed& w, const uint32_t* x, int64_t M, int64_t p0, int64_t p1, float* y) {
  const int64_t K = w.K, G = w.group_size, N = w.N;
  const bool folded = w.scale_factors.kind != Store::None, grouped = w.groups > 1 && !folded;
  Packed wb = w;  // a block's scales, or its factors
  if (folded) wb.scales = w.scale_factors;
  // A block holds whole groups: a multiple of lcm(G, 64) columns.
  const int64_t step = grouped ? std::lcm(G, kUnit) : kUnit;
  const int64_t depth = std::min(K, step * std::max<int64_t>(1, kDotDepth / step));
  const int64_t group_pairs = grouped ? G / 2 : depth / 2;
  std::vector<uint32_t> panel(kDotRows * depth / 2);
  std::vector<float> sc(kDotRows * (depth / G + 2)), fac(folded ? sc.size() : 0);
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n0 = p * kDotRows, rows = std::min(kDotRows, N - n0);
    __mmask16 mask[3];
    for (int j = 0; j < 3; ++j) {
      const int64_t live = std::clamp<int64_t>(rows - 16 * j, 0, 16);
      mask[j] = static_cast<__mmask16>((1u << live) - 1);
    }
    for (int64_t kb = 0; kb < K; kb += depth) {
      const int64_t kb_end = std::min(K, kb + depth), pairs = (kb_end - kb) / 2;
      wb.u_begin = kb / kUnit, wb.u_end = kb_end / kUnit;
      RowScales rs(wb, Isa::Avx512);
      // Scales (or factors) as [group][row], the rows past the matrix repeating its last.
      float* table = folded ? fac.data() : sc.data();
      for (int64_t r = 0; r < kDotRows; ++r) {
        const float* srow = rs.scales(n0 + std::min(r, rows - 1));
        for (int64_t g = rs.g0; g < rs.g1; ++g) table[(g - rs.g0) * kDotRows + r] = srow[g];
      }
      if (folded) std::fill_n(sc.begin(), kDotRows, w.scale_multiplier);
      dot_panel<BITS>(w, folded ? fac.data() : nullptr, rs.g0, n0, rows, wb.u_begin, wb.u_end, panel.data());
      const uint32_t* xb = x + kb / 2;
      int64_t m = 0;
      const auto tile = [&](auto mb) {
        dot_tile<decltype(mb)::value>(panel.data(), pairs, group_pairs, sc.data(), xb + m * (K / 2), K / 2,
                                      y + m * N + n0, N, mask, kb == 0);
        m += decltype(mb)::value;
      };
      while (m + 8 <= M) tile(std::integral_constant<int, 8>{});
      if (m + 4 <= M) tile(std::integral_constant<int, 4>{});
      while (m < M) tile(std::integral_constant<int, 1>{});
    }
  }
}

#pragma GCC pop_options
#endif  // FPBENCH_X86

}  // namespace
