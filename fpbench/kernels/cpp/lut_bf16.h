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
// and one broadcast of x's pair (x[k], x[k']) multiplies it. A row's block is decoded
// into pairs (dot_panel: the 4- and 6-bit lookup in bf16, or the fp32 decode rounded to
// bf16, exactly) and transposed 16 x 16 words into the panel; x is paired once per call
// in the same order (pair_x). Zero points are not taken (their unscaled values v - z are
// not exact in bf16): such layers keep the fp32 GEMM.
#pragma once

#include "lut_avx512.h"

#include <numeric>

namespace {

#if FPBENCH_X86

constexpr int64_t kDotRows = 48;    // weight rows a panel: three zmm of outputs
constexpr int64_t kDotDepth = 1024;  // columns a block (a multiple of 64 and of G; 512 and 2048: no clear difference)

// Whether the bf16 GEMM takes w (bf16 x from kBlockedMinRows rows, ISA Avx512Bf16).
inline bool bf16_dot(const Packed& w) { return w.zeros.kind == Store::None; }

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16,avx2,fma,f16c")

// Words r[0..16) as 16 x 16 transposed in place: r[c] word i = r[i] word c before.
inline void transpose16(__m512i r[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // b[4i + j], 128-bit lane L: words 4L + j of rows 4i .. 4i + 3.
  for (int i = 0; i < 4; ++i) {
    b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i d0 = _mm512_shuffle_i32x4(b[j], b[4 + j], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i d1 = _mm512_shuffle_i32x4(b[j], b[4 + j], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i e0 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i e1 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], _MM_SHUFFLE(3, 2, 3, 2));
    r[j] = _mm512_shuffle_i32x4(d0, e0, _MM_SHUFFLE(2, 0, 2, 0));
    r[4 + j] = _mm512_shuffle_i32x4(d0, e0, _MM_SHUFFLE(3, 1, 3, 1));
    r[8 + j] = _mm512_shuffle_i32x4(d1, e1, _MM_SHUFFLE(2, 0, 2, 0));
    r[12 + j] = _mm512_shuffle_i32x4(d1, e1, _MM_SHUFFLE(3, 1, 3, 1));
  }
}

// A unit's 64 weights as 32 bf16 pairs, in the order the 4- and 6-bit lookup emits them:
// pair e = 16h + l (h = 0, 1; l < 16) holds the weights weights_avx512 puts in lane l of
// v[2h] and v[2h + 1] (v[i] lane l: k = 8i + l for l < 8, 24 + 8i + l above). A panel
// holds pair e at slot(e), which puts k = 0-15, 16-31, 32-47, 48-63 in slots 0-7, 8-15,
// 16-23, 24-31: a group of 16 or 32 weights is a run of slots. x is paired the same way
// (pair_x).
constexpr int pair_k(int e, int high) {
  const int i = 2 * (e / 16) + high, l = e % 16;
  return l < 8 ? 8 * i + l : 24 + 8 * i + l;
}
constexpr int slot(int e) { return e / 8 == 1 || e / 8 == 2 ? e ^ 24 : e; }  // its own inverse

// The bf16 patterns of a unit's 4- or 6-bit codes (the table's low and high bytes, lo and
// hi: 16-entry tables in every lane for 4-bit codes, 64-entry ones for vpermb for 6-bit),
// as pairs 0-15 (w0) and 16-31 (w1): the lookup of weights_avx512 without its widening to
// fp32 (v[2h]: the low words of wh, v[2h + 1]: the high words).
template <int BITS>
inline void bf16_pairs(const __m512i& lo, const __m512i& hi, const uint8_t* a, const uint8_t* b, int64_t u,
                       __m512i& w0, __m512i& w1) {
  const __m512i codes = codes_avx512<BITS>(a, b, u);
  const __m512i l = BITS == 4 ? _mm512_shuffle_epi8(lo, codes) : _mm512_permutexvar_epi8(codes, lo);
  const __m512i g = BITS == 4 ? _mm512_shuffle_epi8(hi, codes) : _mm512_permutexvar_epi8(codes, hi);
  w0 = _mm512_unpacklo_epi8(l, g);
  w1 = _mm512_unpackhi_epi8(l, g);
}

// fp32 weights v[0] .. v[3] (exact in bf16) as the same pairs: words l and 16 + l of
// vcvtne2ps2bf16(v[2h + 1], v[2h]) side by side.
inline void bf16_pairs(const __m512 (&v)[4], __m512i& w0, __m512i& w1) {
  const __m512i side_by_side = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  w0 = _mm512_permutexvar_epi16(side_by_side, (__m512i)_mm512_cvtne2ps_pbh(v[1], v[0]));
  w1 = _mm512_permutexvar_epi16(side_by_side, (__m512i)_mm512_cvtne2ps_pbh(v[3], v[2]));
}

// x [M, K] bf16 as pairs (pair_k, in slot order), [M, K / 2] 32-bit words.
inline void pair_x(const uint16_t* x, int64_t M, int64_t K, uint32_t* out) {
  int order[2 * 32];
  for (int e = 0; e < 32; ++e) order[2 * slot(e)] = pair_k(e, 0), order[2 * slot(e) + 1] = pair_k(e, 1);
  for (int64_t r = 0; r < M * K; r += kUnit)
    for (int e = 0; e < 32; ++e)
      out[r / 2 + e] = x[r + order[2 * e]] | static_cast<uint32_t>(x[r + order[2 * e + 1]]) << 16;
}

// Rows n0 .. n0 + rows (at most kDotRows; the rest of the panel zero) of units u0 .. u1
// into panel [(u1 - u0) * 32][kDotRows]: the values times their scale factors (factors:
// w.scale_factors of the rows), else unscaled; stage: kDotRows * (u1 - u0) * 32 words.
// Unscaled 4- and 6-bit codes are looked up as bf16 directly; the others take the fp32
// decode times the factor (or 1), rounded to bf16 (exact).
template <int BITS, Dec DEC>
void dot_panel(const Packed& w, const Avx512Consts<BITS, DEC>& t, RowScales* factors, const float* ones, int64_t n0,
               int64_t rows, int64_t u0, int64_t u1, uint32_t* stage, uint32_t* panel) {
  const int64_t words = (u1 - u0) * 32;
  __m512i lo = _mm512_setzero_si512(), hi = lo;
  if (BITS == 4) {
    lo = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.table_lo)));
    hi = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.table_hi)));
  } else if (BITS == 6) {
    lo = _mm512_loadu_si512(w.table_lo);
    hi = _mm512_loadu_si512(w.table_hi);
  }
  for (int64_t r = 0; r < kDotRows; ++r) {
    uint32_t* out = stage + r * words;
    if (r >= rows) {
      std::memset(out, 0, words * 4);
      continue;
    }
    const uint8_t* a = w.plane_a + (n0 + r) * w.lda;
    const uint8_t* b = w.plane_b ? w.plane_b + (n0 + r) * w.ldb : nullptr;
    const float* srow = factors ? factors->scales(n0 + r) : ones;
    for (int64_t u = u0; u < u1; ++u) {
      __m512i w0, w1;
      if (BITS != 8 && !factors) {
        if constexpr (BITS != 8) bf16_pairs<BITS>(lo, hi, a, b, u, w0, w1);
      } else {
        __m512 v[4];
        weights_avx512<BITS, DEC, false>(w, t, a, b, srow, nullptr, u, v);
        bf16_pairs(v, w0, w1);
      }
      _mm512_storeu_si512(out + (u - u0) * 32, w0);
      _mm512_storeu_si512(out + (u - u0) * 32 + 16, w1);
    }
  }
  for (int64_t u = 0; u < u1 - u0; ++u)
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < kDotRows / 16; ++j) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(stage + (16 * j + i) * words + u * 32 + 16 * h);
        transpose16(r);
        for (int e = 0; e < 16; ++e) _mm512_storeu_si512(panel + (u * 32 + slot(16 * h + e)) * kDotRows + 16 * j, r[e]);
      }
}

// y[m, 0..48) (masked) += sum over the block of x[m, k] * panel[k] for MB rows of x (x as
// bf16 pairs, ldx words apart), each group's sum (group_pairs words; per channel one
// group a block) times its scales sc[g][0..48) added to y at once: 8 rows' sums in 24
// registers. (Running totals in another 12 registers, 4 rows a tile, ran 0.73-0.93x as
// fast with groups of 16 and 32 and 0.63-0.69x with 128: 4096x4096, M = 512, separate runs.)
template <int MB>
void dot_tile(const uint32_t* panel, int64_t pairs, int64_t group_pairs, const float* sc, const uint32_t* x,
              int64_t ldx, float* y, int64_t ldy, const __mmask16 (&mask)[3]) {
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
        _mm512_mask_storeu_ps(out, mask[j], _mm512_fmadd_ps(acc[m][j], s, _mm512_maskz_loadu_ps(mask[j], out)));
      }
    }
  }
}

// Panels n0 .. n1 (of kDotRows weight rows) of y [M, N] (zero on entry) = x w^T, x bf16
// [M, K] as pairs.
template <int BITS, Dec DEC>
void gemm_bf16_t(const Packed& w, const uint32_t* x, int64_t M, int64_t p0, int64_t p1, float* y) {
  const Avx512Consts<BITS, DEC> t(w);
  const int64_t K = w.K, G = w.group_size, N = w.N;
  const bool folded = w.scale_factors.kind != Store::None, grouped = w.groups > 1 && !folded;
  Packed wf = w;  // the panels' factors
  wf.scales = w.scale_factors;
  // A block holds whole groups: a multiple of lcm(G, 64) columns.
  const int64_t step = grouped ? std::lcm(G, kUnit) : kUnit;
  const int64_t depth = std::min(K, step * std::max<int64_t>(1, kDotDepth / step));
  const int64_t group_pairs = grouped ? G / 2 : depth / 2;
  const std::vector<float> ones(w.groups, 1.f);
  std::vector<uint32_t> stage(kDotRows * depth / 2), panel(kDotRows * depth / 2);
  std::vector<float> sc(kDotRows * (depth / G + 2));
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n0 = p * kDotRows, rows = std::min(kDotRows, N - n0);
    __mmask16 mask[3];
    for (int j = 0; j < 3; ++j) {
      const int64_t live = std::clamp<int64_t>(rows - 16 * j, 0, 16);
      mask[j] = static_cast<__mmask16>((1u << live) - 1);
    }
    for (int64_t kb = 0; kb < K; kb += depth) {
      const int64_t kb_end = std::min(K, kb + depth), pairs = (kb_end - kb) / 2;
      Packed wb = folded ? wf : w;
      wb.u_begin = kb / kUnit, wb.u_end = kb_end / kUnit;
      RowScales rs(wb, Isa::Avx512);
      if (folded)
        std::fill_n(sc.begin(), kDotRows, w.scale_multiplier);
      else
        for (int64_t r = 0; r < rows; ++r) {
          const float* srow = rs.scales(n0 + r);
          for (int64_t g = rs.g0; g < rs.g1; ++g) sc[(g - rs.g0) * kDotRows + r] = srow[g];
        }
      dot_panel<BITS, DEC>(w, t, folded ? &rs : nullptr, ones.data(), n0, rows, wb.u_begin, wb.u_end, stage.data(),
                           panel.data());
      const uint32_t* xb = x + kb / 2;
      int64_t m = 0;
      const auto tile = [&](auto mb) {
        dot_tile<decltype(mb)::value>(panel.data(), pairs, group_pairs, sc.data(), xb + m * (K / 2), K / 2,
                                      y + m * N + n0, N, mask);
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
